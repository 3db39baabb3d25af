"""The course report's MLP-Mixer: p x p patches, a Linear + BatchNorm stem, token- and channel-mixing MLP blocks."""

from __future__ import annotations

import torch
from torch import nn

from kmnist.models.fused import mlp
from kmnist.models.registry import register_model

IMAGE_SIZE = 28  # pixels per side (as config.IMAGE_SIZE; models import nothing outside models/)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 1, H, W) -> (B, (H/p)*(W/p), p*p), patches in row-major order."""
    batch, _, height, width = images.shape
    grid_h, grid_w = height // patch, width // patch
    x = images.reshape(batch, grid_h, patch, grid_w, patch)
    return x.permute(0, 1, 3, 2, 4).reshape(batch, grid_h * grid_w, patch * patch)


class ReportMixerBlock(nn.Module):
    """Token mixing across patches, then channel mixing within each patch."""

    def __init__(self, tokens: int, channels: int, token_hidden: int, channel_hidden: int, dropout: float,
                 residual: bool):
        super().__init__()
        self.residual = residual
        self.fused = True  # Linear + ReLU as one oneDNN product on the CPU (kmnist.models.fused); same numbers
        self.mlp_tokens = nn.Sequential(
            nn.Linear(tokens, token_hidden), nn.ReLU(), nn.Linear(token_hidden, tokens), nn.Dropout(dropout)
        )
        self.mlp_channels = nn.Sequential(
            nn.Linear(channels, channel_hidden), nn.ReLU(), nn.Linear(channel_hidden, channels), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        mixed = mlp(self.mlp_tokens, x.transpose(1, 2), self.fused).transpose(1, 2)  # MLP over the token axis
        x = x + mixed if self.residual else mixed
        mixed = mlp(self.mlp_channels, x, self.fused)  # MLP over the channel axis
        return x + mixed if self.residual else mixed


@register_model("report-mixer")
class ReportMixer(nn.Module):
    """The report's MLP-Mixer-style classifier: 4x4 patches, a Linear + BatchNorm stem, two mixing blocks.

    Its open parts (residual, dropout, width) are arguments; see docs/model.md.
    """

    def __init__(self, num_classes: int = 10, patch: int = 4, channels: int = 16, token_hidden: int = 512,
                 channel_hidden: int = 512, blocks: int = 2, dropout: float = 0.0, residual: bool = True,
                 stem_norm: str = "channels"):
        super().__init__()
        if patch < 1 or IMAGE_SIZE % patch:
            raise ValueError(f"patch must divide {IMAGE_SIZE} (1, 2, 4, 7, 14 or 28), got {patch}")
        if stem_norm not in ("channels", "tokens"):
            raise ValueError(f"stem_norm must be 'channels' or 'tokens', got {stem_norm!r}")
        self.patch = patch
        tokens = (IMAGE_SIZE // patch) ** 2
        self.stem = nn.Linear(patch * patch, channels)
        # BatchNorm1d(channels) on (B, C, T) normalises each channel; BatchNorm1d(tokens) applied to the
        # (B, T, C) tensor as it comes normalises each patch position instead (an equally short reading).
        self.stem_norm_axis = stem_norm
        self.stem_norm = nn.BatchNorm1d(channels if stem_norm == "channels" else tokens)
        self.blocks = nn.Sequential(*[
            ReportMixerBlock(tokens, channels, token_hidden, channel_hidden, dropout, residual) for _ in range(blocks)
        ])
        self.head = nn.Linear(channels, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28) -> (B, classes)
        x = self.stem(patchify(images, self.patch))  # (B, T, C)
        if self.stem_norm_axis == "channels":
            x = self.stem_norm(x.transpose(1, 2)).transpose(1, 2)
        else:
            x = self.stem_norm(x)
        x = self.blocks(x)
        logits = self.head(x.mean(dim=1))  # mean over tokens
        return logits


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for a random subset of the batch during training."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) >= self.rate
        return x * keep / (1 - self.rate)


class MixerBlock(nn.Module):
    """Pre-norm residual Mixer block with GELU MLPs."""

    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int, dropout: float,
                 drop_path: float):
        super().__init__()
        self.norm_tokens = nn.LayerNorm(dim)
        self.mlp_tokens = nn.Sequential(nn.Linear(tokens, token_hidden), nn.GELU(), nn.Dropout(dropout),
                                        nn.Linear(token_hidden, tokens))
        self.norm_channels = nn.LayerNorm(dim)
        self.mlp_channels = nn.Sequential(nn.Linear(dim, channel_hidden), nn.GELU(), nn.Dropout(dropout),
                                          nn.Linear(channel_hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        x = x + self.drop_path(self.mlp_tokens(self.norm_tokens(x).transpose(1, 2)).transpose(1, 2))
        return x + self.drop_path(self.mlp_channels(self.norm_channels(x)))


def drop_path_rates(rate: float, blocks: int) -> list[float]:
    """Stochastic-depth rates rising linearly from 0 to `rate`: deeper blocks are dropped more often."""
    return [rate * i / max(1, blocks - 1) for i in range(blocks)]


@register_model("mixer")
class Mixer(nn.Module):
    """An all-MLP Mixer with no convolution: residual, pre-norm, GELU, stochastic depth.

    stride < patch gives overlapping patches, cut out with unfold (a gather of pixels; the only
    learned map on them is the Linear patch embedding).
    """

    def __init__(self, num_classes: int = 10, patch: int = 4, stride: int = 0, dim: int = 128, depth: int = 6,
                 token_hidden: int = 256, channel_hidden: int = 512, dropout: float = 0.0, drop_path: float = 0.1):
        super().__init__()
        stride = stride or patch
        if patch < 1 or stride < 1 or patch > IMAGE_SIZE or (IMAGE_SIZE - patch) % stride:
            raise ValueError(f"patch {patch} with stride {stride} must tile {IMAGE_SIZE} pixels exactly")
        self.patch, self.stride = patch, stride
        tokens = ((IMAGE_SIZE - patch) // stride + 1) ** 2
        self.embed = nn.Linear(patch * patch, dim)
        self.position = nn.Parameter(torch.zeros(1, tokens, dim))
        rates = drop_path_rates(drop_path, depth)
        self.blocks = nn.Sequential(*[MixerBlock(tokens, dim, token_hidden, channel_hidden, dropout, rate)
                                      for rate in rates])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28) -> (B, classes)
        if self.stride == self.patch:
            patches = patchify(images, self.patch)  # (B, T, p*p)
        else:
            patches = nn.functional.unfold(images, self.patch, stride=self.stride).transpose(1, 2)
        x = self.embed(patches) + self.position  # (B, T, C)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


@register_model("mixer-pyramid")
class PyramidMixer(nn.Module):
    """An all-MLP Mixer in two stages, still with no convolution: `depth` blocks on a fine grid of
    patches (4x4 every 2 pixels, the image padded by 1: 14x14 tokens), then each 2x2 group of tokens
    merged into one (their features concatenated, LayerNorm, Linear to twice the width: a reshape and a
    matrix product) and `depth2` blocks on the 7x7 grid. Channel MLPs widen by `expansion`.
    """

    def __init__(self, num_classes: int = 10, patch: int = 4, stride: int = 2, dim: int = 96, depth: int = 2,
                 depth2: int = 6, token_hidden: int = 128, token_hidden2: int = 128, expansion: int = 2,
                 dropout: float = 0.0, drop_path: float = 0.1):
        super().__init__()
        stride = stride or patch  # 0: patches side by side, as for `mixer` (here a 7x7 grid, refused below)
        pad = max(0, patch - stride) // 2
        span = IMAGE_SIZE + 2 * pad - patch
        grid = span // stride + 1
        if patch < 1 or stride < 1 or span % stride or grid % 2:
            raise ValueError(f"patch {patch} with stride {stride} must tile {IMAGE_SIZE} pixels (padded by {pad}) "
                             f"in an even number of steps; got {span / stride + 1:g}")
        self.patch, self.stride, self.pad, self.grid = patch, stride, pad, grid
        fine, coarse = grid * grid, (grid // 2) ** 2
        self.embed = nn.Linear(patch * patch, dim)
        self.position = nn.Parameter(torch.zeros(1, fine, dim))
        rates = drop_path_rates(drop_path, depth + depth2)  # one rising schedule over both stages
        self.stage1 = nn.Sequential(*[MixerBlock(fine, dim, token_hidden, expansion * dim, dropout, rate)
                                      for rate in rates[:depth]])
        self.merge_norm = nn.LayerNorm(4 * dim)
        self.merge = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.stage2 = nn.Sequential(*[MixerBlock(coarse, 2 * dim, token_hidden2, expansion * 2 * dim, dropout, rate)
                                      for rate in rates[depth:]])
        self.norm = nn.LayerNorm(2 * dim)
        self.head = nn.Linear(2 * dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28) -> (B, classes)
        patches = nn.functional.unfold(images, self.patch, padding=self.pad, stride=self.stride).transpose(1, 2)
        x = self.stage1(self.embed(patches) + self.position)  # (B, grid*grid, C)
        batch, half, dim = x.shape[0], self.grid // 2, x.shape[2]
        x = x.reshape(batch, half, 2, half, 2, dim).permute(0, 1, 3, 2, 4, 5).reshape(batch, half * half, 4 * dim)
        x = self.stage2(self.merge(self.merge_norm(x)))  # (B, (grid/2)^2, 2C)
        return self.head(self.norm(x).mean(dim=1))
