"""Scoring checkpoints (one, or an ensemble averaging their probabilities) on a dataset split."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from kmnist import plots, runs
from kmnist.checkpoint import load_checkpoint, model_from_checkpoint
from kmnist.config import PRECISIONS
from kmnist.data import load_dataset, pixel_stats, same_pixel_stats, split_validation
from kmnist.errors import KmnistError, KmnistWarning
from kmnist.metrics import (TTA_SHIFTS, accuracy, balanced_accuracy, confusion_matrix, per_class_accuracy,
                            emulates_bf16, predict_logits, resolved_precision)
from kmnist.train import select_device


def evaluate_checkpoints(paths: Sequence[str | Path], data_dir: str | Path, split: str = "test",
                         device: str = "auto", expected_model: str | None = None, out: str | Path | None = None,
                         batch_size: int = 1024, check_md5: bool = True, tta: int = 1,
                         precision: str | None = None) -> dict[str, Any]:
    """score_checkpoints, then its metrics.json and confusion matrix PNG written to `out` (default: a folder
    beside the first checkpoint, default_folder_name); returns the metrics with the PNG's path."""
    out = Path(out) if out else Path(paths[0]).parent / default_folder_name(paths, split, tta)
    made = [folder for folder in (out, *out.parents) if not folder.exists()]  # deepest first
    try:  # before the work: a folder that cannot be written (the checkpoint's, read-only) is found now
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise KmnistError(f"{out}: {error.strerror or error}; name a folder for the results with --out DIR") from None
    try:
        result = score_checkpoints(paths, data_dir, split, device, expected_model, batch_size, check_md5, tta,
                                   precision)
    except BaseException:
        for folder in made:  # nothing was written: no empty folders left behind (a mistyped path made them all)
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    png = plots.confusion_matrix(result["confusion_matrix"], result["class_names"], out / "confusion_matrix.png",
                                 title=f"{split} confusion ({len(paths)} checkpoint(s))")
    result["confusion_matrix_png"] = str(png)
    runs.write_json(out / "metrics.json", result)
    return result


def score_checkpoints(paths: Sequence[str | Path], data_dir: str | Path, split: str = "test", device: str = "auto",
                      expected_model: str | None = None, batch_size: int = 1024, check_md5: bool = True,
                      tta: int = 1, precision: str | None = None) -> dict[str, Any]:
    """Metrics for the mean softmax of the given checkpoints on a split (test, or the runs' validation split).

    precision: of the forward passes (auto, fp32, bf16); None: each checkpoint's own, as its run was scored
    while training (a bf16 pass and an fp32 pass can disagree on an image or two).
    """
    if precision is not None and precision not in PRECISIONS:
        raise KmnistError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if batch_size < 1:
        raise KmnistError(f"--batch-size must be at least 1, got {batch_size}")
    if not 1 <= tta <= len(TTA_SHIFTS):
        raise KmnistError(f"--tta must be between 1 (no augmentation) and {len(TTA_SHIFTS)}, got {tta}")
    payloads = [load_checkpoint(path) for path in paths]
    first = payloads[0]
    for path, payload in zip(paths, payloads):
        if (payload["dataset"], payload["class_names"]) != (first["dataset"], first["class_names"]):
            raise KmnistError(f"{path} was trained on {payload['dataset']}, {paths[0]} on {first['dataset']}")
    models = [model_from_checkpoint(p, expected_model, source=str(path)) for path, p in zip(paths, payloads)]
    if split == "val":  # checked before the data is read (or downloaded)
        config = first["config"]
        if not config["val_size"]:
            raise KmnistError(f"{paths[0]} was trained without a validation split")
        for path, payload in zip(paths[1:], payloads[1:]):
            other = payload["config"]
            if (other["val_size"], other["seed"]) != (config["val_size"], config["seed"]):
                # Another split: this member trained on most of the first one's validation images.
                raise KmnistError(f"--split val needs members with the same validation split: {paths[0]} holds out "
                                  f"{config['val_size']} images with seed {config['seed']}, {path} "
                                  f"{other['val_size']} with seed {other['seed']}")
    dataset = load_dataset(first["dataset"], data_dir, check_md5=check_md5, test_only=split != "val")
    if split == "val":
        trained_on, images_labels = split_validation(dataset.train, config["val_size"], config["seed"])
        check_same_training_images(paths, payloads, trained_on)
    else:
        images_labels = dataset.test
    target = select_device(device)
    labels = images_labels.labels
    probabilities = torch.zeros(len(images_labels), len(first["class_names"]))
    member_predictions = []  # (images,) per checkpoint: what each member alone predicts
    precisions = [precision or payload["config"].get("precision", "auto") for payload in payloads]
    if any(emulates_bf16(target, p) for p in precisions):
        warnings.warn("a checkpoint trained in bf16 is scored in bf16, which this CPU has no units for: emulated, "
                      "many times slower; --precision fp32 is faster (its score may differ by an image or two)",
                      KmnistWarning)
    for model, payload, member_precision in zip(models, payloads, precisions):
        logits = predict_logits(model.to(target), images_labels.images, batch_size=batch_size, tta=tta,
                                precision=member_precision, **payload["normalization"])
        probabilities += torch.softmax(logits, dim=1).cpu()
        member_predictions.append(logits.argmax(dim=1).cpu())
    probabilities /= len(models)
    predicted = probabilities.argmax(dim=1)
    confusion = confusion_matrix(predicted, labels, len(first["class_names"]))
    result = {
        "dataset": first["dataset"],
        "split": split,
        "count": len(labels),
        "checkpoints": [str(p) for p in paths],
        "models": [p["model"] for p in payloads],
        "tta_views": tta,
        # what the forward passes ran in on this device (auto resolved), one per checkpoint
        "precision": [resolved_precision(target, p) for p in precisions],
        "accuracy": accuracy(predicted, labels),
        "balanced_accuracy": balanced_accuracy(confusion),
        "per_class_accuracy": dict(zip(first["class_names"], per_class_accuracy(confusion).tolist())),
        "class_names": list(first["class_names"]),
        "confusion_matrix": confusion.tolist(),
    }
    if len(models) > 1:
        result.update(ensemble_gain(result, member_predictions, labels, len(first["class_names"]), paths))
    return result


def check_same_training_images(paths: Sequence[str | Path], payloads: Sequence[dict], trained_on: Any) -> None:
    """The validation split is rebuilt from the data files given: on other files than a run trained on, it could
    hold images the model learnt from. The run's normalisation (its training images' pixel statistics) tells."""
    mean, std = pixel_stats(trained_on.images)
    for path, payload in zip(paths, payloads):
        saved = payload["normalization"]
        if not same_pixel_stats(saved, mean, std):
            raise KmnistError(f"{path} was trained on other data files (training pixels: mean "
                              f"{float(saved['mean']):.5f}, std {float(saved['std']):.5f}; these: {mean:.5f}, "
                              f"{std:.5f}), so its validation split cannot be rebuilt from them; give the --data-dir "
                              "it trained with")


def default_folder_name(paths: Sequence[str | Path], split: str, tta: int) -> str:
    """A folder per evaluation (checkpoint or members, split, views), so that one never replaces another:
    evaluation-test-best, evaluation-val-last-tta9, evaluation-test-ensemble3-1a2b3c (members' paths hashed)."""
    if len(paths) == 1:
        name = f"evaluation-{split}-{Path(paths[0]).stem}"
    else:
        members = "\n".join(str(Path(path).resolve()) for path in paths)
        name = f"evaluation-{split}-ensemble{len(paths)}-{hashlib.sha1(members.encode()).hexdigest()[:6]}"
    return name + (f"-tta{tta}" if tta > 1 else "")


def ensemble_gain(ensemble: dict[str, Any], member_predictions: Sequence[torch.Tensor], labels: torch.Tensor,
                  classes: int, paths: Sequence[str | Path]) -> dict[str, Any]:
    """What an ensemble adds: each member scored alone (same views), and the errors all members share.

    Gains are given in accuracy and in balanced accuracy (K49's score), over the best member by that score.
    """
    members = []
    for path, predicted in zip(paths, member_predictions):
        confusion = confusion_matrix(predicted, labels, classes)
        members.append({"checkpoint": str(path), "accuracy": accuracy(predicted, labels),
                        "balanced_accuracy": balanced_accuracy(confusion)})
    gains = {}
    for score in ("accuracy", "balanced_accuracy"):
        scores = [member[score] for member in members]
        gains[f"best_member_{score}"] = max(scores)
        gains[f"gain_over_best_member_{score}"] = ensemble[score] - max(scores)
        gains[f"gain_over_member_mean_{score}"] = ensemble[score] - sum(scores) / len(scores)
    shared = torch.stack([predicted != labels for predicted in member_predictions]).all(dim=0)
    return {"members": members, **gains, "errors_shared_by_all_members": int(shared.sum())}
