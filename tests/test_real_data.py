"""One epoch of the report's model on the real KMNIST files: far above chance."""

from __future__ import annotations

from pathlib import Path

from kmnist.config import TrainConfig
from kmnist.data import load_dataset
from kmnist.train import fit


def test_one_epoch_on_real_kmnist(real_data_dir: Path) -> None:
    dataset = load_dataset("kmnist", real_data_dir, download=False)
    history = fit(TrainConfig(epochs=1), dataset)
    row = history[0]
    assert row["val_acc"] > 80 and row["test_acc"] > 65, row  # chance is 10%; one epoch gives about 89 / 78
