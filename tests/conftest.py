"""Shared fixtures: small datasets in the official file formats, the real data when present, a tiny trained
checkpoint, and loopback test servers (in a thread, or `kmnist serve` in a process)."""

from __future__ import annotations

import gzip
import io
import re
import select
import shutil
import struct
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from kmnist.data import DATASETS, Dataset, Split

import torch

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_idx(path: Path, array: np.ndarray) -> None:
    magic = 2051 if array.ndim == 3 else 2049
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def write_npz(path: Path, array: np.ndarray) -> None:
    np.savez_compressed(path, arr_0=array)


def synthetic_arrays(count: int, num_classes: int, seed: int,
                     imbalanced: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is easy to learn: a bright bar whose position and angle depend on the class.

    With `imbalanced`, class c is drawn about (c + 1)-fold less often than class 0 (as K49 ranges from
    about 6,000 to a few hundred images per class), every class at least twice.
    """
    rng = np.random.default_rng(seed)
    if imbalanced:
        weights = 1 / np.arange(1, num_classes + 1)
        extra = rng.choice(num_classes, size=count - 2 * num_classes, p=weights / weights.sum())
        labels = np.concatenate([np.repeat(np.arange(num_classes), 2), extra])
    else:
        labels = np.arange(count) % num_classes
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(count, 28, 28)).astype(np.float64)
    for index, label in enumerate(labels):
        row = 3 + (label * 5) % 22
        column = 3 + (label * 11) % 22
        images[index, row:row + 4, 2:26] += 200 * (label % 2 == 0)
        images[index, 2:26, column:column + 4] += 200 * (label % 2 == 1 or label % 3 == 0)
        images[index, row // 2:row // 2 + 3, column // 2:column // 2 + 3] += 150
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.uint8)


def write_dataset(folder: Path, name: str = "kmnist", fmt: str = "idx", train_count: int = 600,
                  test_count: int = 200, seed: int = 0, imbalanced: bool = False) -> Path:
    """Write a dataset's official file names and formats (content synthetic) into folder/<name>/."""
    spec = DATASETS[name]
    target = folder / name
    target.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = synthetic_arrays(train_count, spec.num_classes, seed, imbalanced)
    test_images, test_labels = synthetic_arrays(test_count, spec.num_classes, seed + 1, imbalanced)
    files = spec.formats[fmt]
    writer = write_idx if fmt == "idx" else write_npz
    for remote, array in zip(files, (train_images, train_labels, test_images, test_labels)):
        writer(target / remote.name, array)
    from importlib import resources

    classmap = resources.files("kmnist").joinpath(spec.classmap.name).read_bytes()
    (target / spec.classmap.name).write_bytes(classmap)
    return folder


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data folder holding a small synthetic KMNIST in IDX format (md5 checks must be skipped)."""
    return write_dataset(tmp_path / "data")


@pytest.fixture
def tiny_dataset() -> Dataset:
    from kmnist.data import read_classmap

    train_images, train_labels = synthetic_arrays(600, 10, 0)
    test_images, test_labels = synthetic_arrays(200, 10, 1)
    return Dataset("kmnist", read_classmap(None, "kmnist"),
                   Split(torch.from_numpy(train_images), torch.from_numpy(train_labels.astype(np.int64))),
                   Split(torch.from_numpy(test_images), torch.from_numpy(test_labels.astype(np.int64))))


@pytest.fixture
def real_data_dir() -> Path:
    if not (REAL_DATA / "kmnist" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real KMNIST files not found in {REAL_DATA}")
    return REAL_DATA


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every download fail as it does on a machine without network."""
    import urllib.error
    import urllib.request

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.pt of a one-epoch fit on synthetic KMNIST-shaped data: a real checkpoint in seconds, made once."""
    from kmnist.config import TrainConfig
    from kmnist.data import read_classmap
    from kmnist.train import fit

    train_images, train_labels = synthetic_arrays(600, 10, 0)
    test_images, test_labels = synthetic_arrays(200, 10, 1)
    dataset = Dataset("kmnist", read_classmap(None, "kmnist"),
                      Split(torch.from_numpy(train_images), torch.from_numpy(train_labels.astype(np.int64))),
                      Split(torch.from_numpy(test_images), torch.from_numpy(test_labels.astype(np.int64))))
    run_dir = tmp_path_factory.mktemp("tiny-run")
    config = TrainConfig(epochs=1, val_size=100, batch_size=32, threads=1,
                         model_args={"token_hidden": 64, "channel_hidden": 64})
    fit(config, dataset, run_dir)
    return run_dir / "best.pt"


@contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """Run an ASGI app with uvicorn on 127.0.0.1 (a free port) in a thread; yields its base URL."""
    import threading
    import time

    import uvicorn

    from kmnist.serve import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the test server did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextmanager
def serve_in_process(arguments: list[str], log: Path) -> Iterator[str]:
    """`kmnist serve ARGUMENTS --port 0` in a process of its own; yields its base URL (no trailing slash), which
    accepts connections as soon as it is printed.

    For a server that outlives one test: in a thread of this process, as serve_in_thread runs one, its first
    image imports PIL's plugins, which register loggers, while pytest may be walking the logger table to
    attach its capture to the next test ("dictionary changed size during iteration", seen in CI).
    """
    with open(log, "w") as errors:
        process = subprocess.Popen([sys.executable, "-m", "kmnist", "serve", *arguments, "--port", "0"],
                                   stdout=subprocess.PIPE, stderr=errors, text=True)
        try:
            ready, _, _ = select.select([process.stdout], [], [], 60)
            line = process.stdout.readline() if ready else ""
            match = re.search(r"http://\S+?(?=/ )", line)
            assert match, f"kmnist serve did not start: {line!r} {log.read_text()}"
            yield match.group(0)
        finally:
            process.terminate()
            process.wait(timeout=30)


class FakeResponse(io.BytesIO):
    """What urllib.request.urlopen returns, serving given bytes (downloads without a network)."""

    headers: dict = {}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def copy_real(real: Path, target: Path, names: list[str]) -> Path:
    folder = target / "kmnist"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(real / "kmnist" / name, folder / name)
    return target


__all__ = ["write_idx", "write_npz", "write_dataset", "synthetic_arrays", "copy_real", "zipfile", "FakeResponse"]
