"""Data files: parsing both official formats, verification of every corruption, downloads, splits."""

from __future__ import annotations

import gzip
import http.client
import shutil
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FakeResponse, copy_real, synthetic_arrays, write_dataset, write_idx, write_npz
from kmnist import data
from kmnist.data import DATASETS, Split, load_dataset, split_validation
from kmnist.errors import DataError, KmnistWarning

IDX = [f.name for f in DATASETS["kmnist"].formats["idx"]]


def test_reads_synthetic_idx_and_npz(tmp_path: Path) -> None:
    for fmt in ("idx", "npz"):
        folder = write_dataset(tmp_path / fmt, fmt=fmt, train_count=100, test_count=30)
        dataset = load_dataset("kmnist", folder, check_md5=False, download=False)
        assert dataset.train.images.shape == (100, 28, 28) and dataset.train.images.dtype == torch.uint8
        assert dataset.test.labels.shape == (30,) and dataset.test.labels.dtype == torch.int64
        assert dataset.class_names[0] == "お" and len(dataset.class_names) == 10


def test_k49_official_format(tmp_path: Path) -> None:
    folder = write_dataset(tmp_path, name="k49", fmt="npz", train_count=490, test_count=98)
    dataset = load_dataset("k49", folder, check_md5=False, download=False)
    assert dataset.num_classes == 49 and dataset.class_names[0] == "あ"
    assert int(dataset.train.labels.max()) == 48


def test_real_k49_labels_match_official_md5() -> None:
    from conftest import REAL_DATA

    labels = REAL_DATA / "k49" / "k49-train-labels.npz"
    if not labels.is_file():
        pytest.skip("real K49 labels not present")
    spec = DATASETS["k49"]
    data.verify_file(labels, spec.formats["npz"][1])
    assert len(data.read_npz(labels)) == spec.train_count


def test_real_kmnist_verifies_in_both_formats(real_data_dir: Path) -> None:
    dataset = load_dataset("kmnist", real_data_dir, download=False)
    assert len(dataset.train) == 60000 and len(dataset.test) == 10000
    assert torch.bincount(dataset.train.labels).tolist() == [6000] * 10
    folder = real_data_dir / "kmnist"
    for remote in DATASETS["kmnist"].formats["npz"]:
        data.verify_file(folder / remote.name, remote)
    npz_images = data.read_npz(folder / "kmnist-test-imgs.npz")
    assert np.array_equal(npz_images, dataset.test.images.numpy())


def test_packaged_classmaps_are_the_official_files() -> None:
    from importlib import resources

    for spec in DATASETS.values():
        packaged = Path(str(resources.files("kmnist").joinpath(spec.classmap.name)))
        data.verify_file(packaged, spec.classmap)


def _expect_error(folder: Path, *fragments: str, check_md5: bool = False) -> None:
    with pytest.raises(DataError) as caught:
        load_dataset("kmnist", folder, check_md5=check_md5, download=False)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_truncated_real_file_is_rejected_by_size(real_data_dir: Path, tmp_path: Path) -> None:
    folder = copy_real(real_data_dir, tmp_path, IDX)
    path = folder / "kmnist" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100000])
    _expect_error(folder, "t10k-images-idx3-ubyte.gz", "truncated", check_md5=True)


def test_corrupted_real_file_is_rejected_by_md5(real_data_dir: Path, tmp_path: Path) -> None:
    folder = copy_real(real_data_dir, tmp_path, IDX)
    path = folder / "kmnist" / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[200] ^= 0xFF  # same size, one byte flipped
    path.write_bytes(bytes(raw))
    _expect_error(folder, "t10k-labels-idx1-ubyte.gz", "md5", check_md5=True)


def test_not_gzip(data_dir: Path) -> None:
    (data_dir / "kmnist" / "train-labels-idx1-ubyte.gz").write_bytes(b"this is not gzip at all")
    _expect_error(data_dir, "train-labels-idx1-ubyte.gz", "gzip")


def test_truncated_idx_payload(data_dir: Path) -> None:
    path = data_dir / "kmnist" / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-300]))
    _expect_error(data_dir, "train-images-idx3-ubyte.gz", "truncated")


def test_wrong_magic_number(data_dir: Path) -> None:
    path = data_dir / "kmnist" / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(struct.pack(">I", 2049) + raw[4:]))
    _expect_error(data_dir, "t10k-images-idx3-ubyte.gz", "magic")


def test_wrong_image_shape(data_dir: Path) -> None:
    images, _ = synthetic_arrays(600, 10, 0)
    write_idx(data_dir / "kmnist" / "train-images-idx3-ubyte.gz", images[:, :, :27].copy())
    _expect_error(data_dir, "train-images-idx3-ubyte.gz", "shape")


def test_label_out_of_range(data_dir: Path) -> None:
    _, labels = synthetic_arrays(200, 10, 1)
    labels[5] = 10
    write_idx(data_dir / "kmnist" / "t10k-labels-idx1-ubyte.gz", labels)
    _expect_error(data_dir, "t10k-labels-idx1-ubyte.gz", "out of range")


def test_count_mismatch(data_dir: Path) -> None:
    _, labels = synthetic_arrays(599, 10, 0)
    write_idx(data_dir / "kmnist" / "train-labels-idx1-ubyte.gz", labels)
    _expect_error(data_dir, "599 labels for 600 images")


def test_official_count_checked_with_md5_off_for_npz_shape(tmp_path: Path) -> None:
    folder = write_dataset(tmp_path, fmt="npz", train_count=60, test_count=20)
    write_npz(folder / "kmnist" / "kmnist-test-imgs.npz", np.zeros((20, 28, 28), dtype=np.float32))
    _expect_error(folder, "kmnist-test-imgs.npz", "uint8")
    (folder / "kmnist" / "kmnist-test-imgs.npz").write_bytes(b"PK\x03\x04 broken")
    _expect_error(folder, "kmnist-test-imgs.npz", "not a readable .npz")


def test_an_npz_name_on_a_bare_array_and_a_negative_label(tmp_path: Path) -> None:
    folder = write_dataset(tmp_path, fmt="npz", train_count=60, test_count=20)
    target = folder / "kmnist" / "kmnist-test-labels.npz"
    _, labels = synthetic_arrays(20, 10, 1)
    with open(target, "wb") as out:
        np.save(out, labels)  # .npy content under the .npz name
    _expect_error(folder, "kmnist-test-labels.npz", "a single .npy array, not an archive")
    signed = labels.astype(np.int64)
    signed[3] = -1
    write_npz(target, signed)
    _expect_error(folder, "kmnist-test-labels.npz", "label -1 out of range 0..9")  # the label that is wrong


def test_the_class_map_must_name_every_class(data_dir: Path) -> None:
    path = data_dir / "kmnist" / "kmnist_classmap.csv"
    text = path.read_text(encoding="utf-8")
    path.write_text("\ufeff" + text, encoding="utf-8")  # a byte-order mark, as some editors save CSV
    assert load_dataset("kmnist", data_dir, check_md5=False, download=False).class_names[0] == "お"
    path.write_text("\n".join(text.splitlines()[:6]) + "\n", encoding="utf-8")  # the header and 5 classes
    _expect_error(data_dir, "kmnist_classmap.csv", "5 classes, kmnist has 10")


def test_missing_files_offline_names_them(tmp_path: Path, offline: None) -> None:
    with pytest.raises(DataError) as caught:
        load_dataset("kmnist", tmp_path, progress=False)
    message = str(caught.value)
    assert "train-images-idx3-ubyte.gz" in message and str(tmp_path / "kmnist") in message
    assert "\n" not in message
    assert not any((tmp_path / "kmnist").glob("*")), "a failed download must leave nothing behind"


def test_download_verifies_md5_before_renaming(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               real_data_dir: Path) -> None:
    spec = DATASETS["kmnist"]
    real_folder = real_data_dir / "kmnist"
    served = {spec.url + f.name: (real_folder / f.name).read_bytes() for f in (*spec.formats["idx"], spec.classmap)}
    corrupt = spec.url + "t10k-labels-idx1-ubyte.gz"
    good = served[corrupt]
    served[corrupt] = good[:-1] + bytes([good[-1] ^ 1])
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: FakeResponse(served[url]))
    with pytest.raises(DataError, match="md5"):
        data.fetch(spec, tmp_path, "idx", progress=False)
    assert not (tmp_path / "kmnist" / "t10k-labels-idx1-ubyte.gz").exists()
    assert not list((tmp_path / "kmnist").glob(".*part")), "temporary files must be removed"
    served[corrupt] = good
    data.fetch(spec, tmp_path, "idx", progress=False)
    dataset = load_dataset("kmnist", tmp_path, download=False)
    assert len(dataset.train) == 60000


def test_a_failed_download_names_its_file_and_only_the_files_still_missing(tmp_path: Path, real_data_dir: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    spec = DATASETS["kmnist"]
    served = {spec.url + f.name: (real_data_dir / "kmnist" / f.name).read_bytes()
              for f in (*spec.formats["idx"], spec.classmap)}

    def serve(url, timeout=None):
        if url in failing:
            raise urllib.error.URLError("connection reset by peer")
        return FakeResponse(served[url])

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    failing = {spec.url + "t10k-labels-idx1-ubyte.gz"}
    with pytest.raises(DataError) as caught:
        data.fetch(spec, tmp_path, "idx", progress=False)
    assert str(caught.value).startswith("kmnist files missing: t10k-labels-idx1-ubyte.gz, kmnist_classmap.csv; "
                                        "download of t10k-labels-idx1-ubyte.gz from ")
    failing = {spec.url + spec.classmap.name}  # the package holds the class map: a warning, and the data loads
    with pytest.warns(KmnistWarning, match="kmnist_classmap.csv: download from .* failed"):
        data.fetch(spec, tmp_path, "idx", progress=False)
    assert load_dataset("kmnist", tmp_path, download=False).class_names[0] == "お"


def test_a_download_cut_off_mid_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class CutOff(FakeResponse):
        def read(self, *args):
            raise http.client.IncompleteRead(b"partial", 100)

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: CutOff(b""))
    with pytest.raises(DataError, match="download of train-images-idx3-ubyte.gz from .* failed") as caught:
        data.fetch(DATASETS["kmnist"], tmp_path, "idx", progress=False)
    assert "\n" not in str(caught.value)
    assert not list((tmp_path / "kmnist").glob("*")), "a failed download must leave nothing behind"


def test_validation_split_is_stratified_and_fixed_by_seed() -> None:
    images, labels = synthetic_arrays(1000, 10, 0)
    train = Split(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))
    rest, val = split_validation(train, 100, seed=3)
    assert len(val) == 100 and len(rest) == 900
    assert torch.bincount(val.labels, minlength=10).tolist() == [10] * 10
    again_rest, again_val = split_validation(train, 100, seed=3)
    assert torch.equal(val.images, again_val.images)
    _, other = split_validation(train, 100, seed=4)
    assert not torch.equal(val.images, other.images)
    rest, val = split_validation(train, 0, seed=3)
    assert len(val) == 0 and len(rest) == 1000
    with pytest.raises(DataError):
        split_validation(train, 1000, seed=0)


def test_normalize_is_batched_and_standardises() -> None:
    images = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8)
    mean, std = data.pixel_stats(images)
    out = data.normalize(images, mean, std)
    assert out.shape == (50, 1, 28, 28) and out.dtype == torch.float32
    assert abs(float(out.mean())) < 1e-4 and abs(float(out.std()) - 1) < 1e-3


def test_data_folder_may_hold_the_files_directly(tmp_path: Path) -> None:
    write_dataset(tmp_path, train_count=50, test_count=20)
    flat = tmp_path / "flat"
    shutil.copytree(tmp_path / "kmnist", flat)
    dataset = load_dataset("kmnist", flat, check_md5=False, download=False)
    assert len(dataset.train) == 50


def test_the_test_split_alone_is_looked_for_verified_and_downloaded(tmp_path: Path, real_data_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    spec = DATASETS["kmnist"]
    write_dataset(tmp_path, train_count=50, test_count=20)
    folder = tmp_path / "kmnist"
    (folder / IDX[0]).unlink()  # no training images
    (folder / IDX[1]).write_bytes(b"not gzip")  # nor readable training labels: neither is read
    test = load_dataset("kmnist", tmp_path, check_md5=False, download=False, test_only=True)
    assert test.train is None and len(test.test) == 20 and test.class_names[0] == "お"
    with pytest.raises(DataError, match=r"need train-images-idx3-ubyte\.gz"):
        load_dataset("kmnist", tmp_path, check_md5=False, download=False)
    with pytest.raises(DataError) as caught:
        load_dataset("kmnist", tmp_path / "empty", download=False, test_only=True)
    assert "need t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz " in str(caught.value)
    assert "train-" not in str(caught.value)

    served = {spec.url + f.name: (real_data_dir / "kmnist" / f.name).read_bytes()
              for f in (*spec.formats["idx"], spec.classmap)}
    asked = []

    def serve(url, timeout=None):
        asked.append(url.rsplit("/", 1)[1])
        return FakeResponse(served[url])

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    real = load_dataset("kmnist", tmp_path / "fresh", progress=False, test_only=True)
    assert sorted(asked) == sorted([IDX[2], IDX[3], spec.classmap.name])  # the training files are not fetched
    assert real.train is None and len(real.test) == 10000
    assert sorted(p.name for p in (tmp_path / "fresh" / "kmnist").iterdir()) == sorted(asked)


def test_md5_is_checked_without_the_real_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    write_dataset(tmp_path, train_count=50, test_count=20)
    folder = tmp_path / "kmnist"
    spec = DATASETS["kmnist"]
    official = {name: data.RemoteFile(name, data.md5_of(folder / name), (folder / name).stat().st_size)
                for name in IDX}  # these synthetic files stand in for the official release
    monkeypatch.setitem(DATASETS, "kmnist", dataclasses.replace(
        spec, train_count=50, test_count=20, formats={"idx": tuple(official[name] for name in IDX)}))
    assert len(load_dataset("kmnist", tmp_path, download=False).train) == 50
    damaged = bytearray((folder / IDX[2]).read_bytes())
    damaged[-5] ^= 1  # one bit, the size unchanged: only the md5 can tell
    (folder / IDX[2]).write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: md5 does not match the official .* \(corrupted\)"):
        load_dataset("kmnist", tmp_path, download=False, test_only=True)
    with pytest.raises(DataError, match="CRC check failed"):  # --skip-md5: the gzip structure still catches it
        load_dataset("kmnist", tmp_path, check_md5=False, download=False, test_only=True)
