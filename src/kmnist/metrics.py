"""Predictions and the numbers computed from them: accuracy, balanced accuracy, confusion matrices."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from kmnist.cpu import has_fast_bf16
from kmnist.data import normalize


def uses_bf16(device: torch.device, precision: str) -> bool:
    """auto means bf16 on CUDA and on CPUs with native bf16 matrix units, fp32 elsewhere."""
    if precision == "auto":
        return device.type == "cuda" or (device.type == "cpu" and has_fast_bf16())
    return precision == "bf16"


def resolved_precision(device: torch.device, precision: str) -> str:
    """What a precision setting computes in on `device`: "bf16" or "fp32" (auto resolved)."""
    return "bf16" if uses_bf16(device, precision) else "fp32"


def emulates_bf16(device: torch.device, precision: str) -> bool:
    """Whether bf16 was asked for on a CPU that has no bf16 matrix units: it then runs emulated, many times slower."""
    return precision == "bf16" and device.type == "cpu" and not has_fast_bf16()


def autocast_for(device: torch.device, precision: str, cache: bool = True):
    """bf16 autocast where `uses_bf16`; a null context otherwise. cache=False for CUDA graph capture."""
    return (torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache) if uses_bf16(device, precision)
            else nullcontext())


CPU_FORWARD_BATCH = 256  # images per forward pass on a CPU (see predict_logits)

# Test-time augmentation views, shifts (dy, dx) nearest first: the image, its 8 one-pixel shifts, then the 16
# two-pixel ones (the ring of the 5x5 square). No flips for characters.
TTA_SHIFTS = ((0, 0), (0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (-1, -1), (1, -1), (-1, 1),
              (0, 2), (0, -2), (2, 0), (-2, 0), (1, 2), (-1, -2), (2, 1), (-2, -1), (1, -2), (-1, 2), (2, -1),
              (-2, 1), (2, 2), (-2, -2), (2, -2), (-2, 2))


def shift_images(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Move (N, H, W) images by (dy, dx) pixels, filling with background 0."""
    if dy == dx == 0:
        return images
    height, width = images.shape[-2:]
    pad = max(abs(dy), abs(dx))
    padded = F.pad(images, (pad, pad, pad, pad))
    return padded[..., pad - dy:pad - dy + height, pad - dx:pad - dx + width]


@torch.inference_mode()
def predict_logits(model: nn.Module, images: torch.Tensor, mean: float, std: float, batch_size: int = 1024,
                   precision: str = "auto", tta: int = 1) -> torch.Tensor:
    """Logits (N, classes) in float32 for uint8 images (N, 28, 28), on the model's device.

    tta > 1 averages the logits over that many shifted views (TTA_SHIFTS).
    """
    if not 1 <= tta <= len(TTA_SHIFTS):
        raise ValueError(f"tta must be between 1 and {len(TTA_SHIFTS)}")
    device = next(model.parameters()).device
    # On a CPU, activations of more than a few hundred images fall out of the caches (the report's
    # model holds 100 KB per image per hidden layer): measured 5,200 img/s at 1024 images per
    # forward pass against 16,300 at 256 (fp32, 2 cores). So CPU forward passes take 256 at most.
    step = batch_size if device.type == "cuda" else min(batch_size, CPU_FORWARD_BATCH)
    was_training = model.training
    model.eval()
    outputs = []
    with autocast_for(device, precision):
        for start in range(0, len(images), step):
            batch = images[start:start + step].to(device, non_blocking=True)
            logits = sum(model(normalize(shift_images(batch, dy, dx), mean, std)).float()
                         for dy, dx in TTA_SHIFTS[:tta])
            outputs.append(logits / tta)
    model.train(was_training)
    if not outputs:
        return torch.empty(0, 0, device=device)
    return torch.cat(outputs)


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of predictions equal to labels."""
    # From the count, in double precision: 4771 of 5000 is 95.42, not float32's 95.4200029...
    return 100 * int((predictions == labels).sum()) / len(labels) if len(labels) else float("nan")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float(F.cross_entropy(logits, labels)) if len(labels) else float("nan")


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(classes, classes) counts: row = true class, column = predicted class."""
    flat = labels.long().cpu() * num_classes + predictions.long().cpu()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(confusion: torch.Tensor) -> torch.Tensor:
    """Percent correct per true class (NaN for a class with no examples)."""
    totals = confusion.sum(dim=1).double()
    return confusion.diagonal().double() / totals * 100


def balanced_accuracy(confusion: torch.Tensor) -> float:
    """Mean of the per-class accuracies over classes present: K49's official score."""
    per_class = per_class_accuracy(confusion)
    return float(per_class[~per_class.isnan()].mean())
