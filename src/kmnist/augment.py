"""Batched on-device augmentation: affine warps, elastic distortion, random erasing, mixup and cutmix.

Images here are float (B, 1, H, W) in pixel units with background 0, before normalisation, so
zero padding matches the page. No flips: a mirrored character is another character or none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentSettings:
    translate: float = 0.0  # max shift, pixels
    rotate: float = 0.0  # max rotation, degrees
    scale: float = 0.0  # max relative change of size (0.1: 90%..110%)
    shear: float = 0.0  # max shear, degrees
    elastic: float = 0.0  # elastic displacement strength, pixels
    erase: float = 0.0  # probability that an image gets a random rectangle erased

    @property
    def warps(self) -> bool:
        return any((self.translate, self.rotate, self.scale, self.shear, self.elastic))


def _uniform(count: int, bound: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return (torch.rand(count, generator=generator, device=device) * 2 - 1) * bound


def warp(images: torch.Tensor, settings: AugmentSettings, generator: torch.Generator) -> torch.Tensor:
    """Random affine (+ elastic) warp of each image, one grid_sample for the whole batch."""
    batch, _, height, width = images.shape
    device = images.device
    angle = _uniform(batch, math.radians(settings.rotate), generator, device)
    shear = _uniform(batch, math.radians(settings.shear), generator, device)
    scale = 1 + _uniform(batch, settings.scale, generator, device)
    shift_x = _uniform(batch, settings.translate * 2 / width, generator, device)  # grid units: 2 = full width
    shift_y = _uniform(batch, settings.translate * 2 / height, generator, device)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Output pixel -> input pixel: rotation, then shear along x, divided by the scale.
    theta = torch.stack([
        torch.stack([cos, -sin + torch.tan(shear) * cos, shift_x], dim=1),
        torch.stack([sin, cos + torch.tan(shear) * sin, shift_y], dim=1),
    ], dim=1) / torch.stack([scale, scale, torch.ones_like(scale)], dim=1)[:, None, :]  # (B, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (B, H, W, 2)
    if settings.elastic:
        grid = grid + elastic_field(batch, height, width, settings.elastic, generator, device)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def elastic_field(batch: int, height: int, width: int, strength: float, generator: torch.Generator,
                  device: torch.device) -> torch.Tensor:
    """Smooth random displacements (B, H, W, 2) in grid units, about `strength` pixels in size."""
    coarse = torch.randn(batch, 2, 4, 4, generator=generator, device=device)  # smoothness from a 4x4 lattice
    field = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    field = field * strength * 2 / torch.tensor([width, height], device=device).view(1, 2, 1, 1)
    return field.permute(0, 2, 3, 1)


def erase(images: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Random erasing: with the given probability, blank a rectangle of 4-16 x 4-16 pixels per image."""
    batch, _, height, width = images.shape
    device = images.device
    sizes_h = torch.randint(4, 17, (batch,), generator=generator, device=device)
    sizes_w = torch.randint(4, 17, (batch,), generator=generator, device=device)
    top = (torch.rand(batch, generator=generator, device=device) * (height - sizes_h + 1)).long()
    left = (torch.rand(batch, generator=generator, device=device) * (width - sizes_w + 1)).long()
    chosen = torch.rand(batch, generator=generator, device=device) < probability
    rows = torch.arange(height, device=device).view(1, height, 1)
    columns = torch.arange(width, device=device).view(1, 1, width)
    inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + sizes_h).view(-1, 1, 1))
              & (columns >= left.view(-1, 1, 1)) & (columns < (left + sizes_w).view(-1, 1, 1)))
    mask = inside & chosen.view(-1, 1, 1)  # (B, H, W)
    return images.masked_fill(mask.unsqueeze(1), 0.0)


def augment(images: torch.Tensor, settings: AugmentSettings, generator: torch.Generator) -> torch.Tensor:
    if settings.warps:
        images = warp(images, settings, generator)
    if settings.erase:
        images = erase(images, settings.erase, generator)
    return images


def mix(images: torch.Tensor, labels: torch.Tensor, mixup: float, cutmix: float,
        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Mixup or cutmix (chosen at random when both are on) with a shuffled copy of the batch.

    Returns (images, labels, partner labels, lam): the loss is lam * CE(labels) + (1 - lam) * CE(partners).
    """
    device = images.device
    permutation = torch.randperm(len(labels), generator=generator, device=device)
    use_cutmix = cutmix > 0 and (mixup <= 0 or float(torch.rand(1, generator=generator, device=device)) < 0.5)
    alpha = cutmix if use_cutmix else mixup
    # Beta(alpha, alpha) from two Gamma draws, with the run's generator (torch.distributions takes none).
    gammas = torch._standard_gamma(torch.full((2,), alpha, device=device), generator=generator)
    lam = float(gammas[0] / gammas.sum())
    if not use_cutmix:
        return lam * images + (1 - lam) * images[permutation], labels, labels[permutation], lam
    _, _, height, width = images.shape
    cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
    centre_y = int(torch.randint(height, (1,), generator=generator, device=device))
    centre_x = int(torch.randint(width, (1,), generator=generator, device=device))
    top, bottom = max(centre_y - cut_h // 2, 0), min(centre_y + cut_h // 2, height)
    left, right = max(centre_x - cut_w // 2, 0), min(centre_x + cut_w // 2, width)
    mixed = images.clone()
    mixed[:, :, top:bottom, left:right] = images[permutation, :, top:bottom, left:right]
    lam = 1 - (bottom - top) * (right - left) / (height * width)  # the area actually pasted
    return mixed, labels, labels[permutation], lam

