"""Timing: our training epoch against a per-sample Dataset/DataLoader pipeline of the same model, side by side."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from kmnist.config import TrainConfig
from kmnist.data import Dataset, Split
from kmnist.metrics import uses_bf16
from kmnist.models.fused import set_fused
from kmnist.train import ORDER_STREAM, Trainer, stream_seed, sync_device


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
    generator = torch.Generator().manual_seed(stream_seed(trainer.config.seed, epoch, ORDER_STREAM))
    dataset = PerSampleDataset(trainer.train, **trainer.normalization)
    return DataLoader(dataset, batch_size=trainer.config.batch_size, shuffle=True, generator=generator,
                      num_workers=0, drop_last=len(dataset) % trainer.config.batch_size == 1)


def time_pipelines(config: TrainConfig, dataset: Dataset, repeats: int = 3, max_batches: int | None = None,
                   pipelines: tuple[str, ...] = ("tensor", "per-sample"),
                   baseline_precision: str = "fp32", progress: bool = False) -> dict[str, Any]:
    """Seconds per training epoch of each pipeline, interleaved so machine noise hits both alike.

    "tensor" is kmnist's loop with the config as given; "per-sample" is a torchvision-style pipeline
    (a Dataset returning one normalised tensor per index, through a DataLoader) feeding the same
    model, optimiser and training step, in `baseline_precision` (fp32: such pipelines do not
    autocast), with plain ops in the default layout and without the config's augmentation (which our
    loop runs, so a ratio for an augmenting config understates ours). With config.compile set, "eager"
    (the same loop, not compiled) runs beside them, and compiling happens before any timing. With
    max_batches, epochs are cut short and the time is scaled to a whole epoch.
    """
    if config.compile != "off" and "eager" not in pipelines:
        pipelines = (pipelines[0], "eager", *pipelines[1:])  # what compiling gains, measured beside it
    trainers = {"tensor": Trainer(config, dataset)}
    if "eager" in pipelines:
        trainers["eager"] = Trainer(dataclasses.replace(config, compile="off"), dataset)
    if "per-sample" in pipelines:
        baseline = dataclasses.replace(config, precision=baseline_precision, compile="off")
        trainers["per-sample"] = Trainer(baseline, dataset)
        # As such a pipeline builds it: the default (NCHW) layout, not kmnist's channels-last convolutions,
        # and plain PyTorch ops, not kmnist's fused Linear + ReLU.
        set_fused(trainers["per-sample"].model.to(memory_format=torch.contiguous_format), False)
    full = trainers["tensor"].steps_per_epoch
    steps = min(full, max_batches) if max_batches else full
    times: dict[str, list[float]] = {name: [] for name in pipelines}
    bar = _bar(len(trainers) + repeats * len(pipelines), "timing training epochs", progress)
    compile_seconds = trainers["tensor"].warm_up()
    for name, trainer in trainers.items():
        bar.set_postfix(warm_up=name)
        trainer.steps_per_epoch = steps
        # warm-up: 20 steps let the allocator, oneDNN's kernel choices and cuDNN's autotuning settle
        trainer.train_epoch(0, batches=_take(trainer.batches(0), min(steps, 20)))
        bar.update()
    for repeat in range(repeats):
        for name in pipelines:
            bar.set_postfix(pipeline=name, repeat=repeat + 1)
            trainer = trainers[name]
            source = (iter(per_sample_loader(trainer, repeat + 1)) if name == "per-sample"
                      else trainer.batches(repeat + 1))
            sync_device(trainer.device)
            started = time.perf_counter()
            trainer.train_epoch(repeat + 1, batches=_take(source, steps))
            sync_device(trainer.device)
            times[name].append((time.perf_counter() - started) * full / steps)
            bar.update()
    bar.close()
    medians = {name: statistics.median(values) for name, values in times.items()}
    result: dict[str, Any] = {"epoch_seconds": times, "median_epoch_seconds": medians, "repeats": repeats,
                              "batches_timed_per_epoch": steps, "batches_per_epoch": full,
                              "bf16": uses_bf16(trainers["tensor"].device, config.precision)}
    if "per-sample" in medians:
        result["speedup"] = medians["per-sample"] / medians["tensor"]
        result["baseline_precision"] = baseline_precision
    if "eager" in medians:
        result["compile"] = {"mode": config.compile, "warm_up_seconds": compile_seconds,
                             "speedup_over_eager": medians["eager"] / medians["tensor"]}
    return result


def _bar(total: int, what: str, progress: bool):
    from tqdm import tqdm

    # Timed work is minutes long on a CPU: a bar says where it is (on stderr, outside the timed regions' output).
    return tqdm(total=total, desc=what, leave=False, disable=None if progress else True, dynamic_ncols=True)


def _take(iterator, count: int):
    for index, item in enumerate(iterator):
        if index >= count:
            break
        yield item


def time_inference(model: torch.nn.Module, images: torch.Tensor, mean: float, std: float, batch_size: int,
                   precision: str, count: int, repeats: int) -> float:
    """Images per second of predict_logits at the given batch size (median over repeats)."""
    from kmnist.metrics import predict_logits

    sample = images[:count]
    device = next(model.parameters()).device
    predict_logits(model, sample[:batch_size], mean, std, batch_size, precision)  # warm-up
    rates = []
    for _ in range(repeats):
        sync_device(device)  # a GPU queues the work: time it until it is done
        started = time.perf_counter()
        if batch_size == 1:
            for index in range(len(sample)):
                predict_logits(model, sample[index:index + 1], mean, std, 1, precision)
        else:
            predict_logits(model, sample, mean, std, batch_size, precision)
        sync_device(device)
        rates.append(len(sample) / (time.perf_counter() - started))
    return statistics.median(rates)


def run_benchmark(config: TrainConfig, dataset: Dataset, repeats: int = 3, max_batches: int | None = None,
                  compare: bool = True, baseline_precision: str = "fp32", progress: bool = False) -> dict[str, Any]:
    """Training epoch (ours and, with compare, the per-sample pipeline), evaluation and inference speed."""
    from kmnist.metrics import predict_logits

    pipelines = ("tensor", "per-sample") if compare else ("tensor",)
    result = time_pipelines(config, dataset, repeats, max_batches, pipelines, baseline_precision, progress)
    trainer = Trainer(config, dataset)
    model, stats = trainer.eval_model, trainer.normalization
    bar = _bar(3, "timing evaluation and inference", progress)
    evaluation = []
    for _ in range(repeats):
        sync_device(trainer.device)
        started = time.perf_counter()
        predict_logits(model, trainer.test.images, batch_size=config.eval_batch_size, precision=config.precision,
                       **stats)
        sync_device(trainer.device)
        evaluation.append(time.perf_counter() - started)
    bar.update()
    epoch = result["median_epoch_seconds"]["tensor"]
    result.update({
        "train_images_per_second": len(trainer.train) / epoch,
        "eval_seconds": statistics.median(evaluation),
        "eval_images": len(trainer.test),
    })
    # Batch 1: 500 images, enough for a steady rate (each takes about a millisecond); batch 1024: the test split.
    for batch_size, count in ((1, 500), (1024, len(trainer.test))):
        result[f"infer_images_per_second_batch{batch_size}"] = time_inference(
            model, trainer.test.images, batch_size=batch_size, count=count, precision=config.precision,
            repeats=repeats, **stats)
        bar.update()
    bar.close()
    return result


def markdown_row(result: dict[str, Any]) -> str:
    """One row for docs/benchmarks.md (columns in MARKDOWN_HEADER)."""
    medians = result["median_epoch_seconds"]
    per_sample = medians.get("per-sample")
    recipe = result.get("recipe")
    return "| " + " | ".join([
        result["date"], result["name"],
        result["precision"] + (f" ({'bf16' if result['bf16'] else 'fp32'})" if result["precision"] == "auto" else "")
        + (f", compile {result['compile']['mode']}" if "compile" in result else "")
        + (f"; per-sample in {result['baseline_precision']}" if result.get("baseline_precision", "fp32") != "fp32"
           else ""),
        result["hardware"],
        f"{medians['tensor']:.1f}", f"{per_sample:.1f}" if per_sample else "-",
        f"{result['speedup']:.2f}x" if "speedup" in result else "-",
        f"{result['eval_seconds']:.2f}", f"{result['train_images_per_second']:.0f}",
        f"{result['infer_images_per_second_batch1']:.0f}", f"{result['infer_images_per_second_batch1024']:.0f}",
        f"{recipe['train_seconds']:.0f} s, {recipe_accuracy(recipe)}" if recipe else "-",
        str(result["repeats"]) + (f" ({result['batches_timed_per_epoch']} batches of {result['batches_per_epoch']}, "
                                  "scaled)" if result["batches_timed_per_epoch"] < result["batches_per_epoch"] else ""),
        short_revision(result.get("git_revision")),
    ]) + " |"


def recipe_accuracy(summary: dict[str, Any]) -> str:
    """A full recipe's test accuracy as its run chose it: at the validation-chosen epoch, or after the final
    epoch where it held out no validation split (--val-size 0)."""
    if summary.get("test_acc_at_best_val") is not None:
        return f"{summary['test_acc_at_best_val']:.2f}% (validation-chosen epoch)"
    return f"{summary['final_test_acc']:.2f}% (final epoch)"


def short_revision(revision: str | None) -> str:
    """The commit, cut to 12 characters, keeping the mark of uncommitted changes."""
    if not revision:
        return "-"
    commit, dirty, _ = revision.partition("-dirty")
    return commit[:12] + ("-dirty" if dirty else "")


MARKDOWN_HEADER = (
    "| date | config | precision | hardware | train s/epoch | per-sample s/epoch | speed-up | eval s (test split) "
    "| train img/s | infer img/s (batch 1) | infer img/s (batch 1024) | full recipe | runs | code |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)
