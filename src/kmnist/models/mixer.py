"""The course report's MLP-Mixer: p x p patches, a Linear + BatchNorm stem, token- and channel-mixing MLP blocks."""

from __future__ import annotations

import torch
from torch import nn

from kmnist.models.fused import mlp
from kmnist.models.registry import register_model

IMAGE_SIZE = 28


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
    """The report's classifier. Its open parts (residual, dropout, width) are arguments; see docs/model.md."""

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
        if patch < 1 or stride < 1 or (IMAGE_SIZE - patch) % stride:
            raise ValueError(f"patch {patch} with stride {stride} must tile {IMAGE_SIZE} pixels exactly")
        self.patch, self.stride = patch, stride
        tokens = ((IMAGE_SIZE - patch) // stride + 1) ** 2
        self.embed = nn.Linear(patch * patch, dim)
        self.position = nn.Parameter(torch.zeros(1, tokens, dim))
        rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]  # deeper blocks dropped more often
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
