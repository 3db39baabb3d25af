"""A whole training run in a run directory: config and environment in, fit, then predictions, summary and figures."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kmnist import plots, runs
from kmnist.checkpoint import load_checkpoint, model_from_checkpoint
from kmnist.config import PLACEMENT_FIELDS, TrainConfig, config_from_dict, option_flag
from kmnist.data import Dataset, check_val_size, is_balanced, load_dataset, selection_metric
from kmnist.errors import KmnistError, KmnistWarning
from kmnist.files import atomic_writer
from kmnist.metrics import confusion_matrix, predict_logits, resolved_precision
from kmnist.models import create_model
from kmnist.runinfo import environment
from kmnist.train import StepCallback, check_teacher, fit, select_device, training_device

def prepare_run(config: TrainConfig, run_dir: Path | None, resume: bool) -> TrainConfig:
    """Check the run directory (writing nothing; None: a new folder, not chosen yet); on resume, return the
    saved config instead."""
    create_model(config.model, **config.model_args)  # a bad model name or argument fails before any work
    if resume:
        run_dir = Path(run_dir)  # a resumed run always names its folder
        if not (run_dir / runs.CONFIG).is_file():
            raise KmnistError(f"cannot resume: {run_dir} holds no {runs.CONFIG}")
        saved = config_from_dict(runs.read_record(run_dir / runs.CONFIG))
        config = dataclasses.replace(saved, **{name: getattr(config, name) for name in PLACEMENT_FIELDS})
    elif run_dir is not None and any((Path(run_dir) / name).exists() for name in RUN_FILES):
        raise already_holds_a_run(run_dir)
    if config.teacher:  # also on resume: a teacher moved away since is found missing before any work
        check_teacher(config)
    defaults = TrainConfig()
    unused = [name for name in ("distill_weight", "distill_temperature")
              if not config.teacher and getattr(config, name) != getattr(defaults, name)]
    if not resume and unused:
        warnings.warn(f"{' and '.join(option_flag(name) for name in unused)} act{'s' if len(unused) == 1 else ''} "
                      "only with --teacher, which is not given: this run learns from the labels alone", KmnistWarning)
    if not resume and config.class_weighting and config.balanced_sampling:
        warnings.warn("--class-weighting and --balanced-sampling each make up for the class imbalance on their "
                      "own; together a class weighs in inverse proportion to its size, so rare classes outweigh "
                      "common ones (one of the two is usually meant)", KmnistWarning)
    return config


RUN_FILES = (runs.CONFIG, runs.LAST, runs.METRICS)  # any of them: the folder holds a run (begun, cut off or ended)


def already_holds_a_run(run_dir: Path) -> KmnistError:
    return KmnistError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out")


def train_run(config: TrainConfig, run_dir: str | Path, data_dir: str | Path, resume: bool = False,
              progress: bool = True, on_step: StepCallback | None = None,
              on_epoch: Callable[[dict[str, Any]], None] | None = None,
              dataset: Dataset | None = None, check_md5: bool = True) -> dict[str, Any]:
    """Train (or resume) one run and leave every output file in run_dir; returns the summary. `progress`: bars
    while the data downloads; `on_step` and `on_epoch` as for `train.fit`."""
    run_dir = Path(run_dir)
    config = prepare_run(config, run_dir, resume)
    if dataset is None:
        dataset = load_dataset(config.dataset, data_dir, check_md5=check_md5, progress=progress)
    check_val_size(config.val_size, len(dataset.train))  # this needs the dataset's size
    training_images = len(dataset.train) - config.val_size
    if not resume and config.batch_size > training_images:
        warnings.warn(f"--batch-size {config.batch_size} is more than the {training_images} training images: each "
                      "step takes all of them (one step per epoch)", KmnistWarning)
    if not resume:  # only now: a user mistake found above (no data, a bad option) leaves no run directory behind
        run_dir.mkdir(parents=True, exist_ok=True)
        try:  # claimed only if free: a run started into the same folder meanwhile keeps it
            runs.write_json(run_dir / runs.CONFIG, config.to_dict(), exclusive=True)
        except FileExistsError:
            raise already_holds_a_run(run_dir) from None
    if config.threads:  # before environment(), so environment.json records the threads the run uses
        torch.set_num_threads(config.threads)
    device = training_device(config)
    with runs.training_lock(run_dir):
        record_environment(run_dir, resumed=resume, placement={
            "device": str(device), "precision": resolved_precision(device, config.precision)})
        # A run cut off before its first epoch ended has no last.pt: it simply starts again.
        history = fit(config, dataset, run_dir, resume=resume and (run_dir / runs.LAST).is_file(),
                      on_step=on_step, on_epoch=on_epoch)
        return finish_run(run_dir, dataset, history, device=config.device, precision=config.precision)


# What sets a run's floating-point rounding besides its config: a session that differs in one of these computes
# the same thing, but its numbers part from those of a run that never stopped. The CPU's threads and model
# matter to a run on the CPU, the GPUs to one on a GPU.
ROUNDING = ("device", "precision", "torch")
ROUNDING_ON = {"cpu": ("torch_threads", "cpu"), "cuda": ("gpus",)}


def record_environment(run_dir: Path, resumed: bool, placement: dict[str, Any] | None = None) -> None:
    """environment.json: where the run started (with `placement`: the device and precision it trains in); a
    resumed run keeps that and adds each later session's environment under "resumed" (a run begun on a GPU
    and finished on a CPU says so), with a warning when the session rounds differently from the last."""
    path = run_dir / runs.ENVIRONMENT
    now = {**environment(), **(placement or {})}
    if resumed and path.is_file():
        try:
            first = runs.read_json(path)
        except KmnistError:  # unreadable: this session's record replaces it
            first = None
        if isinstance(first, dict):
            earlier = first.get("resumed") if isinstance(first.get("resumed"), list) else []
            last = [first, *(session for session in earlier if isinstance(session, dict))][-1]
            keys = (*ROUNDING, *ROUNDING_ON.get(str(now.get("device", "cpu")).split(":")[0], ()))
            changed = [f"{key} {last[key]} -> {now.get(key)}" for key in keys
                       if key in last and last[key] != now.get(key)]
            if changed:
                warnings.warn(f"{run_dir} resumes with other placement than it last ran with ({'; '.join(changed)}): "
                              "the same computation, rounded differently, so its numbers will differ a little "
                              "from those of a run that never stopped", KmnistWarning)
            first["resumed"] = [*earlier, now]
            now = first
    runs.write_json(path, now)


def finish_run(run_dir: Path, dataset: Dataset, history: list[dict[str, Any]], device: str = "auto",
               precision: str = "auto") -> dict:
    """Test predictions of the validation-selected model, summary.json and the run's figures."""
    run_dir = Path(run_dir)
    payload = load_checkpoint(run_dir / runs.BEST)
    model = model_from_checkpoint(payload).to(select_device(device))
    # The run's precision: the saved predictions and figures are those of the model the epoch table scored.
    logits = predict_logits(model, dataset.test.images, precision=precision, **payload["normalization"])
    probabilities = torch.softmax(logits, dim=1).cpu().numpy()
    with atomic_writer(run_dir / runs.PREDICTIONS) as out:
        np.savez_compressed(out, probabilities=probabilities.astype(np.float16),
                            labels=dataset.test.labels.numpy().astype(np.int16))
    summary = runs.summarize(history, select_on=selection_metric(dataset.name))
    summary["best_checkpoint_epoch"] = payload["epoch"]
    write_run_figures(run_dir, dataset, best_epoch=payload["epoch"])
    runs.write_json(run_dir / runs.SUMMARY, summary)  # last: a run with summary.json has every file
    return summary


def write_run_figures(run_dir: Path, dataset: Dataset, best_epoch: int) -> None:
    """The run's PNGs, from its saved files and the epoch of the model chosen on validation (or the last)."""
    run_dir = Path(run_dir)
    config = runs.read_record(run_dir / runs.CONFIG)
    history = runs.read_metrics(run_dir)
    plots.learning_curves(history, run_dir / "learning_curves.png",
                          title=f"{config['model']} on {config['dataset']} ({run_dir.name})",
                          balanced=is_balanced(config["dataset"]))
    with np.load(run_dir / runs.PREDICTIONS) as saved:
        probabilities = saved["probabilities"].astype(np.float32)
        labels = saved["labels"].astype(np.int64)
    predicted = probabilities.argmax(axis=1)
    confusion = confusion_matrix(torch.from_numpy(predicted), torch.from_numpy(labels), dataset.num_classes)
    chosen = "chosen on validation" if config.get("val_size") != 0 else "final epoch, no validation"
    plots.confusion_matrix(confusion.numpy(), dataset.class_names, run_dir / "confusion_matrix.png",
                           title=f"test, epoch {best_epoch} model ({chosen})")
    plots.confident_mistakes(dataset.test.images.numpy(), labels, probabilities, dataset.class_names,
                             run_dir / "confident_mistakes.png")
