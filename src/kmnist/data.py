"""Datasets: where the official files live, fetching and verifying them, and loading them as uint8 tensors."""

from __future__ import annotations

import csv
import gzip
import hashlib
import http.client
import io
import math
import os
import shlex
import struct
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from kmnist.config import IMAGE_SIZE
from kmnist.errors import DataError, KmnistWarning
from kmnist.files import atomic_writer

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049


@dataclass(frozen=True)
class RemoteFile:
    name: str
    md5: str
    size: int | None  # bytes; None where the official size is not recorded here


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    url: str  # folder of the official release; a file's URL is url + name
    num_classes: int
    train_count: int
    test_count: int
    classmap: RemoteFile
    # format -> (train images, train labels, test images, test labels)
    formats: dict[str, tuple[RemoteFile, RemoteFile, RemoteFile, RemoteFile]]
    download_format: str  # the format fetched when none is present
    # Imbalanced classes: scored by balanced accuracy (mean of per-class accuracies), and the epoch
    # and model are chosen on validation balanced accuracy.
    balanced: bool = False


DATASETS: dict[str, DatasetSpec] = {
    "kmnist": DatasetSpec(
        name="kmnist",
        url="http://codh.rois.ac.jp/kmnist/dataset/kmnist/",
        num_classes=10,
        train_count=60000,
        test_count=10000,
        classmap=RemoteFile("kmnist_classmap.csv", "899202f6e8dc29a321ac210a03d0f2f1", 151),
        formats={
            "npz": (
                RemoteFile("kmnist-train-imgs.npz", "a183fbc01ed9a345513b145673d3d0bb", 18384171),
                RemoteFile("kmnist-train-labels.npz", "b0e1d240e8afec72b50437fc3bc5908a", 29700),
                RemoteFile("kmnist-test-imgs.npz", "dace6de62ca8b90843cc45366337d02e", 3079479),
                RemoteFile("kmnist-test-labels.npz", "3ae489a79983d0fe386152684e3b5412", 5304),
            ),
            "idx": (
                RemoteFile("train-images-idx3-ubyte.gz", "bdb82020997e1d708af4cf47b453dcf7", 18165135),
                RemoteFile("train-labels-idx1-ubyte.gz", "e144d726b3acfaa3e44228e80efcd344", 29497),
                RemoteFile("t10k-images-idx3-ubyte.gz", "5c965bf0a639b31b8f53240b1b52f4d7", 3041136),
                RemoteFile("t10k-labels-idx1-ubyte.gz", "7320c461ea6c1c855c0b718fb2a4b134", 5120),
            ),
        },
        download_format="idx",
    ),
    "k49": DatasetSpec(
        name="k49",
        url="http://codh.rois.ac.jp/kmnist/dataset/k49/",
        num_classes=49,
        train_count=232365,
        test_count=38547,
        classmap=RemoteFile("k49_classmap.csv", "f7d0d0391f68bdf0fe4cf160ceb85753", 697),
        formats={
            "npz": (
                RemoteFile("k49-train-imgs.npz", "7ac088b20481cf51dcd01ceaab89d821", None),
                RemoteFile("k49-train-labels.npz", "44a8e1b893f81e63ff38d73cad420f7a", 164485),
                RemoteFile("k49-test-imgs.npz", "d352e201d846ce6b94f42c990966f374", None),
                RemoteFile("k49-test-labels.npz", "4da6f7a62e67a832d5eb1bd85c5ee448", 27450),
            ),
        },
        download_format="npz",
        balanced=True,
    ),
}


@dataclass
class Split:
    images: torch.Tensor  # (N, 28, 28) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class Dataset:
    name: str
    class_names: list[str]  # one character per class, from the official class map
    train: Split | None  # None when only the test split was loaded (load_dataset(..., test_only=True))
    test: Split

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def is_balanced(name: str) -> bool:
    """Whether a dataset is scored by balanced accuracy (imbalanced classes). False for a name no
    longer registered, so saved runs of it still load."""
    return name in DATASETS and DATASETS[name].balanced


def selection_metric(name: str) -> str:
    """The validation column that chooses a run's best epoch: balanced accuracy for imbalanced datasets."""
    return "val_bal_acc" if is_balanced(name) else "val_acc"


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def default_data_dir() -> Path:
    """The user cache directory used when neither --data-dir nor KMNIST_DATA is given."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kmnist"


# ---------------------------------------------------------------------------------------------
# verification and parsing


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_file(path: Path, remote: RemoteFile, check_md5: bool = True) -> None:
    """Raise DataError naming the file unless its size and md5 match the official release.

    check_md5=False accepts one's own files in the official format: size and md5 are then not
    compared (the structural checks in read_split still apply).
    """
    problem = file_problem(path, remote) if check_md5 else None
    if problem:
        raise DataError(f"{path}: {problem}")


def file_problem(path: Path, remote: RemoteFile) -> str | None:
    """How a file differs from the official one (size, then md5), or None."""
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        return f"{size} bytes, expected {remote.size} (truncated or incomplete)"
    if md5_of(path) != remote.md5:
        return f"md5 does not match the official {remote.md5} (corrupted)"
    return None


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Parse a gzipped MNIST IDX file (images: magic 2051, labels: magic 2049)."""
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DataError(f"{path}: not a readable gzip file ({error})") from None
    dims = 3 if expected_magic == IDX_IMAGES_MAGIC else 1
    header = 4 * (1 + dims)
    if len(raw) < header:
        raise DataError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != expected_magic:
        raise DataError(f"{path}: wrong magic number {magic}, expected {expected_magic}")
    shape = struct.unpack(f">{dims}I", raw[4:header])
    count = int(np.prod(shape))
    if len(raw) - header != count:
        raise DataError(f"{path}: {len(raw) - header} data bytes, header says {count} (truncated or corrupted)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()  # writable for torch


def read_npz(path: Path) -> np.ndarray:
    """Read the single array 'arr_0' from an official .npz file, never unpickling."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy array under an .npz name
            raise DataError(f"{path}: not a readable .npz file (a single .npy array, not an archive)")
        with loaded as archive:
            if "arr_0" not in archive.files:
                raise DataError(f"{path}: no array 'arr_0' inside (found {', '.join(archive.files) or 'none'})")
            return archive["arr_0"]
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{path}: not a readable .npz file ({str(error).splitlines()[0]})") from None


def check_arrays(images: np.ndarray, labels: np.ndarray, num_classes: int, images_path: Path, labels_path: Path,
                 expected_count: int | None) -> None:
    """Shape, dtype, label range and count checks shared by both formats."""
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{images_path}: images of shape {images.shape} and type {images.dtype}, expected (N, 28, 28) uint8")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{labels_path}: labels of shape {labels.shape} and type {labels.dtype}, expected (N,) integers")
    if len(images) != len(labels):
        raise DataError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path.name}")
    if expected_count is not None and len(labels) != expected_count:
        raise DataError(f"{labels_path}: {len(labels)} examples, the official release has {expected_count}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        wrong = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise DataError(f"{labels_path}: label {wrong} out of range 0..{num_classes - 1}")


def read_split(images_path: Path, labels_path: Path, fmt: str, num_classes: int, expected_count: int | None) -> Split:
    if fmt == "idx":
        images = read_idx(images_path, IDX_IMAGES_MAGIC)
        labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    else:
        images, labels = read_npz(images_path), read_npz(labels_path)
    check_arrays(images, labels, num_classes, images_path, labels_path, expected_count)
    return Split(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)))


def read_classmap(path: Path | None, dataset: str) -> list[str]:
    """Class characters in label order, from a class map CSV (index,codepoint,char)."""
    if path is None:
        text = resources.files("kmnist").joinpath(f"{dataset}_classmap.csv").read_text(encoding="utf-8")
    else:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (as some editors save CSV) is not a column
    rows = list(csv.DictReader(io.StringIO(text)))
    try:
        return [row["char"] for row in sorted(rows, key=lambda row: int(row["index"]))]
    except (KeyError, ValueError):
        raise DataError(f"{path or dataset + '_classmap.csv'}: expected columns index,codepoint,char") from None


# ---------------------------------------------------------------------------------------------
# locating and downloading


def dataset_folders(spec: DatasetSpec, data_dir: Path) -> list[Path]:
    """Where a dataset's files may be: data_dir/<name>/ first, then data_dir itself."""
    return [data_dir / spec.name, data_dir]


def split_files(spec: DatasetSpec, fmt: str, test_only: bool = False) -> tuple[RemoteFile, ...]:
    """The data files of one format: all four, or the test split's two (images, labels)."""
    files = spec.formats[fmt]
    return files[2:] if test_only else files


def format_folder(spec: DatasetSpec, data_dir: Path, fmt: str, test_only: bool = False) -> Path:
    """The folder holding every file of one format (or its test files), else data_dir/<name>/, where downloads go."""
    needed = split_files(spec, fmt, test_only)
    return next((folder for folder in dataset_folders(spec, data_dir) if holds(folder, needed)), data_dir / spec.name)


def holds(folder: Path, files: tuple[RemoteFile, ...]) -> bool:
    return all((folder / f.name).is_file() for f in files)


def locate(spec: DatasetSpec, data_dir: Path, test_only: bool = False) -> tuple[str, Path] | None:
    """The first (format, folder) holding every file of one format (only its test files: test_only), or None."""
    for folder in dataset_folders(spec, data_dir):
        for fmt in spec.formats:
            if holds(folder, split_files(spec, fmt, test_only)):
                return fmt, folder
    return None


def download_file(url: str, destination: Path, remote: RemoteFile, progress: bool = True) -> None:
    """Fetch url into a temporary file beside destination; only a file with the right md5 is renamed into place."""
    from tqdm import tqdm

    # Connect first: a failed download leaves no folder behind (a mistyped --data-dir is not created).
    # timeout: seconds to connect, and the longest wait for any one block of the file.
    with urllib.request.urlopen(url, timeout=30) as response, atomic_writer(destination) as out:
        total = int(response.headers.get("Content-Length") or 0) or remote.size
        digest = hashlib.md5()
        with tqdm(total=total, unit="B", unit_scale=True, desc=remote.name, disable=None if progress else True,
                  leave=False) as bar:
            for block in iter(lambda: response.read(1 << 16), b""):
                out.write(block)
                digest.update(block)
                bar.update(len(block))
        if digest.hexdigest() != remote.md5:  # raising here discards the temporary file
            raise DataError(f"{url}: downloaded file has md5 {digest.hexdigest()}, expected {remote.md5}; try again")


# What a download can fail with: no network, an HTTP error status, a connection cut mid-file (IncompleteRead),
# a disk that cannot take the file, a timeout.
DOWNLOAD_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError)


def fetch(spec: DatasetSpec, data_dir: Path, fmt: str | None = None, progress: bool = True,
          test_only: bool = False) -> tuple[str, Path]:
    """Make sure one complete set of files (test_only: the test split's) is present, downloading what is missing."""
    found = locate(spec, data_dir, test_only)
    if found is not None and (fmt is None or found[0] == fmt):
        return found
    fmt = fmt or spec.download_format
    if fmt not in spec.formats:
        raise DataError(f"{spec.name} is released as {', '.join(spec.formats)}, not {fmt}")
    folder = format_folder(spec, data_dir, fmt, test_only)
    missing = [f for f in (*split_files(spec, fmt, test_only), spec.classmap) if not (folder / f.name).is_file()]
    for remote in missing:
        try:
            download_file(spec.url + remote.name, folder / remote.name, remote, progress)
        except DOWNLOAD_ERRORS as error:
            reason = getattr(error, "reason", error)
            if remote is spec.classmap:  # the package holds a copy of it
                warnings.warn(f"{remote.name}: download from {spec.url} failed ({reason}); using the copy in the "
                              "kmnist package", KmnistWarning)
                continue
            names = ", ".join(f.name for f in missing if not (folder / f.name).is_file())
            raise DataError(
                f"{spec.name} files missing: {names}; download of {remote.name} from {spec.url} failed ({reason}); "
                f"put the official files in {folder}"
            ) from None
    return fmt, folder


def repair(spec: DatasetSpec, data_dir: Path, fmt: str, progress: bool = True) -> list[str]:
    """Download again each file of one format (and the class map) that is present but not the official one
    (cut short, corrupted), in the folder that format is read from (never a same-named file elsewhere); the
    new copy replaces it only once its md5 matches. Returns what was replaced, and why."""
    replaced = []
    folder = format_folder(spec, data_dir, fmt)
    for remote in (*spec.formats[fmt], spec.classmap):
        path = folder / remote.name
        problem = file_problem(path, remote) if path.is_file() else None
        if problem is None:
            continue
        try:
            download_file(spec.url + remote.name, path, remote, progress)
        except DOWNLOAD_ERRORS as error:
            reason = getattr(error, "reason", error)
            raise DataError(f"{path}: {problem}; downloading it again from {spec.url} failed ({reason}); "
                            "put the official file there") from None
        replaced.append(f"{remote.name}: {problem}")
    return replaced


def load_dataset(name: str, data_dir: str | Path, check_md5: bool = True, download: bool = True,
                 progress: bool = True, test_only: bool = False) -> Dataset:
    """Load a dataset's train and test splits as uint8 tensors, verifying every file first.

    test_only: only the test split (train is None); only its files are looked for, verified, read and, when
    missing, downloaded (what evaluating, exporting and serving a trained model need).
    """
    spec = get_spec(name)
    data_dir = Path(data_dir).expanduser()
    found = locate(spec, data_dir, test_only)
    if found is None:
        if not download:
            names = ", ".join(f.name for f in split_files(spec, spec.download_format, test_only))
            raise DataError(f"{spec.name} files not found in {data_dir}: need {names} (from {spec.url})")
        found = fetch(spec, data_dir, progress=progress, test_only=test_only)
    fmt, folder = found
    return read_dataset(spec, fmt, folder, check_md5, test_only)


def read_dataset(spec: DatasetSpec, fmt: str, folder: Path, check_md5: bool = True,
                 test_only: bool = False) -> Dataset:
    """Verify and read the files of one format in one folder (test_only: only the test split's)."""
    train_images, train_labels, test_images, test_labels = spec.formats[fmt]
    data_dir = folder.parent if folder.name == spec.name else folder
    try:
        for remote in split_files(spec, fmt, test_only):
            verify_file(folder / remote.name, remote, check_md5)
        classmap_path = folder / spec.classmap.name
        if classmap_path.is_file():
            verify_file(classmap_path, spec.classmap, check_md5)
    except DataError as problem:  # name the command that mends it
        fix = f"kmnist download --dataset {spec.name} --format {fmt} --data-dir {shlex.quote(str(data_dir))}"
        raise DataError(f"{problem}; `{fix}` fetches the official file again (files of your own in the official "
                        "format: --skip-md5)") from None
    if not classmap_path.is_file():
        classmap_path = None  # fall back to the copy shipped with the package
    class_names = read_classmap(classmap_path, spec.name)
    if len(class_names) != spec.num_classes:
        raise DataError(f"{classmap_path or spec.classmap.name}: {len(class_names)} classes, {spec.name} has "
                        f"{spec.num_classes}")
    # The official counts are checked only together with the official checksums.
    train = None if test_only else read_split(folder / train_images.name, folder / train_labels.name, fmt,
                                              spec.num_classes, spec.train_count if check_md5 else None)
    test = read_split(folder / test_images.name, folder / test_labels.name, fmt, spec.num_classes,
                      spec.test_count if check_md5 else None)
    return Dataset(spec.name, class_names, train, test)


# ---------------------------------------------------------------------------------------------
# splits and normalisation


def check_val_size(val_size: int, n: int) -> None:
    """A validation split must leave a batch to train on: 0 (none held out) up to n - 2 of the n (a batch of
    one image is dropped, as BatchNorm cannot train on it)."""
    if not 0 <= val_size <= n - 2:
        raise DataError(f"val_size must be between 0 and {n - 2} (at least 2 training images left), got {val_size}")


def split_validation(train: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    """Carve a class-stratified validation split of val_size images from train, fixed by seed."""
    n = len(train)
    check_val_size(val_size, n)
    if val_size == 0:
        return train, Split(train.images[:0], train.labels[:0])
    generator = torch.Generator().manual_seed(seed)
    labels = train.labels.cpu()
    counts = torch.bincount(labels)
    # Largest-remainder allocation gives exactly val_size, each class in proportion.
    exact = counts.double() * val_size / n
    quota = exact.floor().long()
    remainder = val_size - int(quota.sum())
    if remainder:
        quota[torch.argsort(exact - quota.double(), descending=True)[:remainder]] += 1
    val_index = []
    for label, take in enumerate(quota.tolist()):
        members = torch.nonzero(labels == label).flatten()
        val_index.append(members[torch.randperm(len(members), generator=generator)[:take]])
    val_index = torch.cat(val_index).sort().values
    keep = torch.ones(n, dtype=torch.bool)
    keep[val_index] = False
    train_index = torch.nonzero(keep).flatten()
    return (Split(train.images[train_index], train.labels[train_index]),
            Split(train.images[val_index], train.labels[val_index]))


def pixel_stats(images: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation of pixel values scaled to [0, 1]."""
    scaled = images.float().div_(255)
    return float(scaled.mean()), float(scaled.std())


def same_pixel_stats(saved: dict[str, float], mean: float, std: float) -> bool:
    """Whether a run's normalisation (its training images' pixel statistics) is that of these images: the same
    data files. They are float32 sums over millions of pixels, so other thread counts move their last digits."""
    return (math.isclose(float(saved["mean"]), mean, rel_tol=1e-5)
            and math.isclose(float(saved["std"]), std, rel_tol=1e-5))


def normalize(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Pixel values 0-255, uint8 or float, (N, 28, 28) or (N, 1, 28, 28) -> float (N, 1, 28, 28) standardised."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    return images.float().sub(mean * 255).div_(std * 255)  # sub makes a new tensor: the input is never changed
