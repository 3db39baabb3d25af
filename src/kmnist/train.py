"""The one training loop: `fit(config, dataset)` trains any registered model and returns its per-epoch history."""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from kmnist import runs
from kmnist.augment import AugmentSettings, augment, mix
from kmnist.checkpoint import atomic_torch_save, load_checkpoint, make_checkpoint, model_from_checkpoint
from kmnist.config import GRAPH_MODES, TORCH_COMPILE_MODES, TrainConfig, same_experiment
from kmnist.cpu import keep_freed_memory
from kmnist.data import Dataset, Split, normalize, pixel_stats, same_pixel_stats, selection_metric, split_validation
from kmnist.errors import KmnistError, KmnistWarning, TrainingDiverged
from kmnist.graphed import GraphedStep
from kmnist.metrics import (accuracy, autocast_for, balanced_accuracy, confusion_matrix, cross_entropy,
                            predict_logits)
from kmnist.models import create_model, resolve_model_args


# Random streams: each (seed, epoch, purpose) seeds a generator of its own, so a resumed run draws the same
# numbers. The stride is a prime above any epoch count, so no two (seed, epoch) pairs share a seed.
EPOCH_STRIDE = 1_000_003
STREAMS = 8  # purposes per epoch, room to spare
ORDER_STREAM, AUGMENT_STREAM, MIX_STREAM = 0, 1, 2  # batch order, random warps and erasing, mixup/cutmix


def stream_seed(seed: int, epoch: int, stream: int) -> int:
    """The seed of one random stream; config.SEED_LIMIT keeps it within torch's 64 bits."""
    return (seed * EPOCH_STRIDE + epoch) * STREAMS + stream


def training_device(config: TrainConfig) -> torch.device:
    """The device a config trains on; a one-line error where it cannot (no CUDA, or a CUDA graph on a CPU)."""
    device = select_device(config.device)
    if config.compile in GRAPH_MODES and device.type != "cuda":
        raise KmnistError(f"--compile {config.compile} needs a CUDA device; on a CPU train without it")
    return device


def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise KmnistError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = model.parameters()
    # fused: one kernel updates every parameter, instead of several passes over memory per tensor.
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=True,
                               weight_decay=config.weight_decay, fused=True)
    kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)


def lr_factor(config: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the peak lr at optimiser step `step` for the cosine and one-cycle schedules."""
    warmup = config.warmup_epochs * steps_per_epoch
    if config.scheduler == "onecycle" and warmup == 0:
        warmup = 0.25 * total_steps  # one-cycle: a quarter of the run warming up unless told otherwise
    if step < warmup:
        return min(1.0, (step + 1) / warmup)  # a fractional warm-up ends at the peak, not past it
    progress = min(1.0, (step - warmup) / max(1.0, total_steps - warmup))
    if config.scheduler == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0 - progress  # onecycle: linear anneal to zero


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    if config.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=config.plateau_factor, patience=config.plateau_patience)
    if config.scheduler in ("cosine", "onecycle"):
        total = config.epochs * steps_per_epoch
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(config, step, total, steps_per_epoch))
    return None


@dataclass(frozen=True)
class StepEvent:
    """An optimiser step done, for a progress display."""

    epoch: int
    step: int  # steps done in this epoch, 1 to steps
    steps: int  # steps in the epoch
    loss: float | None  # mean training loss of the epoch so far, every LOSS_EVERY steps; else None


StepCallback = Callable[[StepEvent], None]
LOSS_EVERY = 50


def batches_per_epoch(num_images: int, batch_size: int) -> int:
    # A last batch of one image would break BatchNorm in training mode, so it is dropped.
    return num_images // batch_size + (1 if num_images % batch_size >= 2 else 0)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def sync_device(device: torch.device) -> None:
    """Wait until a GPU has done the work queued on it (timings and results read after it are final)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class WeightAverage:
    """Exponential moving average of a model's weights and BatchNorm statistics, evaluated instead of the raw model."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        # Short memory at first, so the average is not dominated by the random initialisation.
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1 - decay)
        # BatchNorm statistics are averaged like the weights. Copied from the raw model they do not fit the
        # averaged weights while the weights move fast: `cnn-best` on a GPU swung between 77% and 99.6%
        # validation accuracy at high learning rates, and a small ResNet fell from 99.0% to 93.5% in one
        # epoch where averaged statistics gave 99.2% (docs/results.md).
        for average, current in zip(self.model.buffers(), model.buffers()):
            if average.is_floating_point():
                average.lerp_(current, 1 - decay)
            else:  # BatchNorm's batch counter
                average.copy_(current)


def check_teacher(config: TrainConfig) -> None:
    """Before a run writes anything: a one-line error where --teacher is not a checkpoint of this dataset, and a
    KmnistWarning where the teacher was trained without the run's validation split, so that it may have learned
    from the images the run is chosen on (which would flatter the validation score)."""
    payload = load_checkpoint(config.teacher)
    if payload["dataset"] != config.dataset:
        raise KmnistError(f"--teacher {config.teacher} was trained on {payload['dataset']}; this run trains on "
                          f"{config.dataset}")
    own = payload["config"]
    if config.val_size and (own.get("val_size"), own.get("seed")) != (config.val_size, config.seed):
        warnings.warn(f"the teacher {config.teacher} was trained without this run's validation split (its "
                      f"--val-size {own.get('val_size')} --seed {own.get('seed')}, here {config.val_size} / "
                      f"{config.seed}), so it may have learned from images this run validates on", KmnistWarning)


class Teacher:
    """A trained model whose predictions the trained model also learns from (knowledge distillation).

    Its network is used as saved, frozen and in eval mode; batches normalised with the student's statistics
    are mapped onto the teacher's own before it sees them. With temperature 0 the student learns the
    teacher's top class as a hard label (DeiT's hard distillation), otherwise the KL divergence to its
    probabilities softened at that temperature (Hinton et al.), scaled by the temperature squared.
    """

    def __init__(self, config: TrainConfig, dataset_name: str, class_names: list[str],
                 normalization: dict[str, float], device: torch.device):
        payload = load_checkpoint(config.teacher)
        if (payload["dataset"], payload["class_names"]) != (dataset_name, class_names):
            raise KmnistError(f"--teacher {config.teacher} was trained on {payload['dataset']} with "
                              f"{len(payload['class_names'])} classes; this run trains on {dataset_name} with "
                              f"{len(class_names)}")
        self.model = model_from_checkpoint(payload, source=config.teacher).to(device)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        own = payload["normalization"]
        self.scale = normalization["std"] / own["std"]
        self.shift = (normalization["mean"] - own["mean"]) / own["std"]
        self.temperature = config.distill_temperature
        self.label_smoothing = config.label_smoothing
        self.device, self.precision = device, config.precision

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast_for(self.device, self.precision):
            return self.model(images * self.scale + self.shift).float()

    def loss(self, logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """The distillation term for the student's `logits` on the batch `images` (as the student saw them)."""
        target = self.logits(images)
        if self.temperature == 0:
            return F.cross_entropy(logits, target.argmax(dim=1), label_smoothing=self.label_smoothing)
        t = self.temperature
        return F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(target / t, dim=1), log_target=True,
                        reduction="batchmean") * t * t


class Trainer:
    """State of one run: model, optimiser, data on the device. `fit` drives it."""

    def __init__(self, config: TrainConfig, dataset: Dataset):
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = training_device(config)
        if self.device.type == "cpu":
            keep_freed_memory()
        torch.manual_seed(config.seed)
        train, val = split_validation(dataset.train, config.val_size, config.seed)
        mean, std = pixel_stats(train.images)
        self.normalization = {"mean": mean, "std": std}
        self.train, self.val = train.to(self.device), val.to(self.device)
        self.test = dataset.test.to(self.device)
        self.class_names = dataset.class_names
        self.dataset_name = dataset.name
        self.model_args = resolve_model_args(config.model, config.model_args)
        self.model = create_model(config.model, num_classes=dataset.num_classes, **self.model_args).to(self.device)
        self.optimizer = make_optimizer(config, self.model)
        # The training forward: the model itself, or a compiled view of it sharing its parameters
        # (checkpoints, the weight average and evaluation keep using the plain module).
        self.graphed: GraphedStep | None = None  # made by warm_up with --compile cuda-graph[-compiled]
        self.forward = self.model if config.compile not in TORCH_COMPILE_MODES else torch.compile(
            self.model, mode=TORCH_COMPILE_MODES[config.compile], dynamic=False)
        self.steps_per_epoch = batches_per_epoch(len(self.train), config.batch_size)
        self.scheduler = make_scheduler(config, self.optimizer, self.steps_per_epoch)
        counts = torch.bincount(self.train.labels, minlength=dataset.num_classes).float()
        self.class_weights = (counts.sum() / (len(counts) * counts.clamp(min=1))) if config.class_weighting else None
        self.sample_weights = (1 / counts.clamp(min=1))[self.train.labels] if config.balanced_sampling else None
        self.augment = AugmentSettings(config.translate, config.rotate, config.scale, config.shear, config.elastic,
                                       config.erase)
        self.average = WeightAverage(self.model, config.ema) if config.ema else None
        self.teacher = (Teacher(config, dataset.name, dataset.class_names, self.normalization, self.device)
                        if config.teacher else None)
        self.history: list[dict[str, Any]] = []
        self.best_val_score = -math.inf  # the selection metric's best value so far

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are evaluated and saved for inference: the moving average when there is one."""
        return self.average.model if self.average is not None else self.model

    def generator(self, epoch: int, stream: int) -> torch.Generator:
        """A random stream fixed by (seed, epoch, purpose), so a resumed run draws the same numbers."""
        return torch.Generator(device=self.device).manual_seed(stream_seed(self.config.seed, epoch, stream))

    # --- one epoch -------------------------------------------------------------------------------

    def is_clean_epoch(self, epoch: int) -> bool:
        """Whether `epoch` is one of the last `clean_epochs`, trained on the images as they are."""
        return epoch > self.config.epochs - self.config.clean_epochs

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This epoch's training batches: indexing the uint8 tensor on the device, normalised as a batch."""
        config = self.config
        generator = self.generator(epoch, ORDER_STREAM)
        if self.sample_weights is not None:  # class-balanced: each class equally likely per draw
            order = torch.multinomial(self.sample_weights, len(self.train), replacement=True, generator=generator)
        else:
            order = torch.randperm(len(self.train), generator=generator, device=self.device)
        augment_generator = self.generator(epoch, AUGMENT_STREAM)
        augmenting = (self.augment.warps or self.augment.erase) and not self.is_clean_epoch(epoch)
        for step in range(self.steps_per_epoch):
            index = order[step * config.batch_size:(step + 1) * config.batch_size]
            images = self.train.images[index].unsqueeze(1)  # (B, 1, 28, 28) uint8
            if augmenting:
                images = augment(images.float(), self.augment, augment_generator)
            yield normalize(images, **self.normalization), self.train.labels[index]

    def train_epoch(self, epoch: int, on_step: StepCallback | None = None,
                    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None) -> tuple[float, float]:
        """One pass of optimiser steps; returns (mean loss, accuracy %). `batches` defaults to `self.batches`;
        `on_step` hears of each step (a progress bar)."""
        config, model, device = self.config, self.model, self.device
        model.train()
        if self.graphed is not None:  # the captured step sums into these; the eager steps below add in place
            loss_sum, correct = self.graphed.loss_sum.zero_(), self.graphed.correct.zero_()
        else:
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device)  # float: a mixed image counts for each label by its weight
        seen = 0
        mixing = (config.mixup > 0 or config.cutmix > 0) and not self.is_clean_epoch(epoch)
        mix_generator = self.generator(epoch, MIX_STREAM)
        for step, (images, labels) in enumerate(self.batches(epoch) if batches is None else batches):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if self.graphed is not None and len(labels) == self.graphed.batch_size:
                self.graphed.step(images, labels)  # adds its loss and correct count into loss_sum and correct
            elif mixing:
                images, labels, partners, lam = mix(images, labels, config.mixup, config.cutmix, mix_generator)
                self.train_step(images, labels, loss_sum, correct, partners, lam)
            else:
                self.train_step(images, labels, loss_sum, correct)
            self._after_step()
            seen += len(labels)
            if on_step is not None:  # the running loss only now and then: reading it waits for the device
                on_step(StepEvent(epoch, step + 1, self.steps_per_epoch,
                                  float(loss_sum) / seen if step % LOSS_EVERY == LOSS_EVERY - 1 else None))
        return float(loss_sum) / seen, float(correct) / seen * 100

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, loss_sum: torch.Tensor, correct: torch.Tensor,
                   partners: torch.Tensor | None = None, lam: float = 1.0, autocast_cache: bool = True) -> None:
        """Forward, loss (mixed with `partners` by `lam`), backward and optimiser step on one batch; the batch's
        summed loss and correct count are added into `loss_sum` and `correct` in place. Eager, compiled, and
        recorded once as a CUDA graph by kmnist.graphed (autocast_cache=False: cached casts would go stale)."""
        self.optimizer.zero_grad(set_to_none=True)
        self._mark_step()
        with autocast_for(self.device, self.config.precision, cache=autocast_cache):
            logits = self.forward(images).float()  # (B, classes)
        loss = self.loss(logits, labels)
        if partners is not None:
            loss = lam * loss + (1 - lam) * self.loss(logits, partners)
        if self.teacher is not None:
            weight = self.config.distill_weight
            loss = (1 - weight) * loss + weight * self.teacher.loss(logits, images)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            loss_sum += loss.detach() * len(labels)
            predictions = logits.argmax(dim=1)
            if partners is None:
                correct += (predictions == labels).sum()
            else:  # as the loss does: right on the image's label counts lam, on its partner's 1 - lam
                correct += lam * (predictions == labels).sum() + (1 - lam) * (predictions == partners).sum()

    def last_step_lr(self) -> float:
        """The learning rate the last optimiser step used (a per-step schedule has already moved on to the next)."""
        scheduler = self.scheduler
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) and scheduler.last_epoch > 0:
            return float(scheduler.base_lrs[0] * scheduler.lr_lambdas[0](scheduler.last_epoch - 1))
        return float(self.optimizer.param_groups[0]["lr"])

    def _after_step(self) -> None:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):
            self.scheduler.step()
        if self.average is not None:
            self.average.update(self.model)

    def warm_up(self) -> float:
        """Compile the training step for this run's batch sizes before any epoch is timed; returns seconds.

        With --compile cuda-graph[-compiled]: capture the step at the full batch size as one CUDA graph
        (kmnist.graphed); its warm-up steps compile the model first where it is compiled.

        Forward and backward on real training images, then weights, BatchNorm statistics, gradients
        and random state are put back, so a compiled run computes what an uncompiled one does.
        """
        if self.config.compile == "off":
            return 0.0
        sync_device(self.device)
        started = time.perf_counter()
        if self.config.compile in GRAPH_MODES:  # batches of other sizes (the last, shorter one) run eagerly
            with self._compile_errors():
                self.graphed = GraphedStep(self, min(self.config.batch_size, len(self.train)))
            sync_device(self.device)
            return time.perf_counter() - started
        # The sizes `batches` yields: the first batch's and the last's (shorter where the split does not divide).
        size, last = self.config.batch_size, self.steps_per_epoch - 1
        sizes = {min(size, len(self.train) - step * size) for step in (0, last)}
        self.model.train()
        with self.undone():
            for size in sorted(sizes, reverse=True):
                images, labels = self.first_batch(size)
                # Fresh gradients for each size, as in training: with CUDA graphs (reduce-overhead) the first
                # size's gradients live in its graph's memory, which the next size's replay may overwrite.
                self.optimizer.zero_grad(set_to_none=True)
                self._mark_step()
                with self._compile_errors():
                    with autocast_for(self.device, self.config.precision):
                        logits = self.forward(images)
                    self.loss(logits.float(), labels).backward()
        self.optimizer.zero_grad(set_to_none=True)
        sync_device(self.device)
        return time.perf_counter() - started

    @contextmanager
    def _compile_errors(self) -> Iterator[None]:
        """A failure of torch.compile or of a graph capture (e.g. no C++ compiler for inductor on a CPU) as one
        line naming the --compile mode, not a traceback."""
        try:
            yield
        except KmnistError:
            raise
        except Exception as error:  # noqa: BLE001
            first_line = (str(error).strip().splitlines() or [""])[0][:300]
            raise KmnistError(f"--compile {self.config.compile}: compiling failed "
                              f"({type(error).__name__}: {first_line}); train without --compile") from error

    @contextmanager
    def undone(self) -> Iterator[None]:
        """Run warm-up work on the run's state: afterwards its weights, BatchNorm statistics, optimiser state
        and random streams are what they were, put back in place (the tensors stay where they are)."""
        weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        state = {id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
                 for p, s in self.optimizer.state.items()}
        rng = _rng_state(self.device)
        yield
        self.model.load_state_dict(weights)
        for parameter, values in self.optimizer.state.items():
            saved = state.get(id(parameter), {})
            for key, value in values.items():
                if torch.is_tensor(value):
                    # A state the run had is put back; one the warm-up made is zeroed, which for SGD's
                    # momentum and Adam's moments and step count is what a first step starts from.
                    value.copy_(saved[key]) if key in saved else value.zero_()
        _set_rng_state(rng, self.device)

    def first_batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `size` training images, normalised as batches are, and their labels: warm-up material."""
        return normalize(self.train.images[:size].unsqueeze(1).float(), **self.normalization), self.train.labels[:size]

    def _mark_step(self) -> None:
        """A new training step begins: CUDA graphs (--compile reduce-overhead) may reuse the last step's memory."""
        if self.config.compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, weight=self.class_weights, label_smoothing=self.config.label_smoothing)

    def evaluate(self, split: Split) -> tuple[float, float, float]:
        """Loss, accuracy and balanced accuracy (percent) of the evaluated weights on one split."""
        if len(split) == 0:
            return float("nan"), float("nan"), float("nan")
        logits = predict_logits(self.eval_model, split.images, batch_size=self.config.eval_batch_size,
                                precision=self.config.precision, **self.normalization)
        predictions = logits.argmax(dim=1)
        confusion = confusion_matrix(predictions, split.labels, len(self.class_names))
        return cross_entropy(logits, split.labels), accuracy(predictions, split.labels), balanced_accuracy(confusion)

    # --- checkpoints -----------------------------------------------------------------------------

    def checkpoint(self, epoch: int, with_training_state: bool) -> dict:
        training_state = None
        if with_training_state:
            training_state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "rng": _rng_state(self.device),
                "history": self.history,
                # With a moving average, state_dict holds the average; the raw weights are kept here.
                "model": ({k: v.detach().cpu() for k, v in self.model.state_dict().items()}
                          if self.average is not None else None),
                "average_updates": self.average.updates if self.average is not None else 0,
                "images": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            }
        return make_checkpoint(
            self.eval_model, model_name=self.config.model, model_args=self.model_args, class_names=self.class_names,
            dataset=self.dataset_name, normalization=self.normalization, config=self.config.to_dict(),
            epoch=epoch, metrics=self.history[-1] if self.history else {}, training_state=training_state)

    def check_same_data(self, path: Path, normalization: dict[str, float], images: dict[str, int] | None) -> None:
        """A run resumed on other data files would end unlike the run it continues: refuse it."""
        sizes = {"train": len(self.train), "val": len(self.val), "test": len(self.test)}
        same_pixels = same_pixel_stats(normalization, self.normalization["mean"], self.normalization["std"])
        if images is not None and images != sizes:
            count = lambda split: "/".join(str(split[key]) for key in ("train", "val", "test"))  # noqa: E731
            detail = f"train/val/test images: {count(images)}; these: {count(sizes)}"
        elif not same_pixels:
            detail = (f"training pixels: mean {float(normalization['mean']):.5f}, std {float(normalization['std']):.5f}; "
                      f"these: {self.normalization['mean']:.5f}, {self.normalization['std']:.5f}")
        else:
            return
        raise KmnistError(f"{path} was trained on other data files ({detail}); resume it with the data it started on "
                          "(its --data-dir)")

    def restore(self, path: Path) -> int:
        """Load a last.pt written by this configuration; returns the number of finished epochs."""
        payload = load_checkpoint(path)
        if not same_experiment(payload["config"], self.config.to_dict()) or "training_state" not in payload:
            raise KmnistError(f"{path} was written by a different configuration; cannot resume from it")
        state = payload["training_state"]
        self.check_same_data(path, payload["normalization"], state.get("images"))
        self.model.load_state_dict(state["model"] if self.average is not None else payload["state_dict"])
        if self.average is not None:
            self.average.model.load_state_dict(payload["state_dict"])
            self.average.updates = state["average_updates"]
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], self.device)
        self.history = list(state["history"])
        # The best validation score so far follows from the history (NaN-free: a run without a
        # validation split never improves), so checkpoints need not store it.
        column = selection_metric(self.dataset_name)
        scores = [row.get(column, math.nan) for row in self.history]
        self.best_val_score = max((v for v in scores if not math.isnan(v)), default=-math.inf)
        return payload["epoch"]


def settle_pending_best(run_dir: Path, finished: int) -> None:
    """A best.pt left waiting by a process killed after an epoch's last.pt: put in place if of that epoch (the
    last finished one), else dropped (its epoch, not saved in last.pt, is trained again)."""
    pending = run_dir / runs.BEST_PENDING
    if not pending.is_file():
        return
    try:
        epoch = load_checkpoint(pending)["epoch"]
    except KmnistError:  # cut off mid-write cannot happen (atomic), but an unreadable file is no best.pt
        epoch = None
    if epoch == finished:
        os.replace(pending, run_dir / runs.BEST)
    else:
        pending.unlink()


def fit(config: TrainConfig, dataset: Dataset, run_dir: str | Path | None = None, resume: bool = False,
        on_step: StepCallback | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train `config.model` on `dataset`; returns one dict of metrics per epoch. `on_step` hears of each
    optimiser step, `on_epoch` gets each finished epoch's row.

    With a run_dir, every finished epoch rewrites metrics.csv and last.pt (atomically), and best.pt follows
    the best validation score (accuracy; balanced accuracy for K49), or the last epoch when nothing is
    held out, so an interrupted run loses at most the epoch in progress.
    """
    trainer = Trainer(config, dataset)
    run_dir = Path(run_dir) if run_dir is not None else None
    start = 1
    if resume:
        if run_dir is None or not (run_dir / runs.LAST).is_file():
            raise KmnistError(f"nothing to resume: no {runs.LAST} in {run_dir}")
        start = trainer.restore(run_dir / runs.LAST) + 1
        settle_pending_best(run_dir, start - 1)
        # The checkpoint's history is the record: metrics.csv follows it (a run stopped by a kill that
        # cannot be held back, between last.pt and metrics.csv, has one row fewer in the file).
        runs.write_metrics(run_dir, trainer.history)
    compile_seconds = trainer.warm_up() if start <= config.epochs else 0.0
    for epoch in range(start, config.epochs + 1):
        sync_device(trainer.device)
        started = time.perf_counter()
        train_loss, train_acc = trainer.train_epoch(epoch, on_step)
        sync_device(trainer.device)
        trained = time.perf_counter()
        if not math.isfinite(train_loss):
            where = f"; the last good checkpoint is {run_dir / runs.LAST}" if run_dir and epoch > 1 else ""
            raise TrainingDiverged(f"training loss became {train_loss} in epoch {epoch}; "
                                   f"try a lower learning rate (now --lr {config.lr}){where}")
        val_loss, val_acc, val_bal_acc = trainer.evaluate(trainer.val)
        test_loss, test_acc, test_bal_acc = trainer.evaluate(trainer.test)  # reported only; never used to choose
        row = {
            "epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
            "val_acc": val_acc, "val_bal_acc": val_bal_acc, "test_loss": test_loss, "test_acc": test_acc,
            "test_bal_acc": test_bal_acc, "lr": trainer.last_step_lr(),
            "epoch_seconds": trained - started, "eval_seconds": time.perf_counter() - trained,
            "compile_seconds": compile_seconds if epoch == start else 0.0,
        }
        # The dataset's score on validation (balanced accuracy for imbalanced K49) drives both the
        # plateau scheduler and the choice of best.pt.
        score = row[selection_metric(trainer.dataset_name)]
        if isinstance(trainer.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            trainer.scheduler.step(score if len(trainer.val) else train_acc)
        trainer.history.append(row)
        improved = len(trainer.val) > 0 and score > trainer.best_val_score
        if improved:
            trainer.best_val_score = score
        if run_dir is not None:
            with runs.signals_deferred():  # a stop now waits for the epoch's files to agree
                new_best = improved or not len(trainer.val)
                if new_best:
                    atomic_torch_save(trainer.checkpoint(epoch, with_training_state=False), run_dir / runs.BEST_PENDING)
                atomic_torch_save(trainer.checkpoint(epoch, with_training_state=True), run_dir / runs.LAST)
                runs.write_metrics(run_dir, trainer.history)
                if new_best:
                    os.replace(run_dir / runs.BEST_PENDING, run_dir / runs.BEST)
        if on_epoch is not None:
            on_epoch(row)
    return trainer.history
