"""Timing: our training epoch against a per-sample Dataset/DataLoader pipeline of the same model, side by side."""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from kmnist.config import TrainConfig
from kmnist.data import Dataset, Split
from kmnist.train import Trainer, _sync


class PerSampleDataset(TorchDataset):
    """What torchvision's KMNIST with ToTensor() and Normalize() does: one PIL image, one tensor, per index."""

    def __init__(self, split: Split, mean: float, std: float):
        self.images = split.images.cpu().numpy()
        self.labels = split.labels.cpu().numpy()
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        image = Image.fromarray(self.images[index], mode="L")
        tensor = torch.from_numpy(np.array(image, dtype=np.float32) / 255.0).unsqueeze(0)  # ToTensor: (1, 28, 28)
        return (tensor - self.mean) / self.std, int(self.labels[index])  # Normalize


def per_sample_loader(trainer: Trainer, epoch: int) -> DataLoader:
    """A DataLoader over PerSampleDataset with the trainer's batch size, shuffled per epoch."""
    generator = torch.Generator().manual_seed(trainer.config.seed * 1_000_003 + epoch)
    dataset = PerSampleDataset(trainer.train, **trainer.normalization)
    return DataLoader(dataset, batch_size=trainer.config.batch_size, shuffle=True, generator=generator,
                      num_workers=0, drop_last=len(dataset) % trainer.config.batch_size == 1)


def time_pipelines(config: TrainConfig, dataset: Dataset, repeats: int = 3, max_batches: int | None = None,
                   pipelines: tuple[str, ...] = ("tensor", "per-sample")) -> dict[str, Any]:
    """Seconds per training epoch of each pipeline, interleaved so machine noise hits both alike.

    Both pipelines drive the same Trainer (same model, optimiser and step code). With max_batches,
    epochs are cut short and the time is scaled to a whole epoch.
    """
    trainer = Trainer(config, dataset)
    full = trainer.steps_per_epoch
    steps = min(full, max_batches) if max_batches else full
    trainer.steps_per_epoch = steps
    times: dict[str, list[float]] = {name: [] for name in pipelines}
    trainer.train_epoch(0, progress=False, batches=_take(trainer.batches(0), min(steps, 20)))  # warm-up
    for repeat in range(repeats):
        for name in pipelines:
            source = trainer.batches(repeat + 1) if name == "tensor" else iter(per_sample_loader(trainer, repeat + 1))
            _sync(trainer.device)
            started = time.perf_counter()
            trainer.train_epoch(repeat + 1, progress=False, batches=_take(source, steps))
            _sync(trainer.device)
            times[name].append((time.perf_counter() - started) * full / steps)
    medians = {name: statistics.median(values) for name, values in times.items()}
    result: dict[str, Any] = {"epoch_seconds": times, "median_epoch_seconds": medians, "repeats": repeats,
                              "batches_timed_per_epoch": steps, "batches_per_epoch": full}
    if "tensor" in medians and "per-sample" in medians:
        result["speedup"] = medians["per-sample"] / medians["tensor"]
    return result


def _take(iterator, count: int):
    for index, item in enumerate(iterator):
        if index >= count:
            break
        yield item
