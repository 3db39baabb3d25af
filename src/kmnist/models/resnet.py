"""Convolutional networks for 28x28 characters: a pre-activation ResNet-18 and a small fast residual CNN."""

from __future__ import annotations

import torch
from torch import nn

from kmnist.models.registry import register_model


class PreActBlock(nn.Module):
    """BN-ReLU-conv, BN-ReLU-conv, plus the (projected) input."""

    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(channels_in)
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(channels_in, channels_out, 1, stride, bias=False)
                         if stride != 1 or channels_in != channels_out else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.norm2(out)))
        return out + shortcut


@register_model("preact-resnet18")
class PreActResNet18(nn.Module):
    """Pre-activation ResNet-18 (He et al. 2016) with a 3x3 stem for 28x28 inputs: 28 -> 28 -> 14 -> 7 -> 4."""

    def __init__(self, num_classes: int = 10, width: int = 64, dropout: float = 0.0):
        super().__init__()
        widths = [width, width * 2, width * 4, width * 8]
        self.stem = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        layers, channels = [], width
        for index, channels_out in enumerate(widths):
            stride = 1 if index == 0 else 2
            layers += [PreActBlock(channels, channels_out, stride), PreActBlock(channels_out, channels_out, 1)]
            channels = channels_out
        self.layers = nn.Sequential(*layers)
        self.norm = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28) -> (B, classes)
        x = self.layers(self.stem(images))
        x = torch.relu(self.norm(x)).mean(dim=(2, 3))  # global average pool
        return self.head(self.dropout(x))


def conv_bn(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(channels_out), nn.GELU())


class PoolStage(nn.Module):
    """conv, 2x2 max-pool, then `depth` residual pairs of convs at the pooled size."""

    def __init__(self, channels_in: int, channels_out: int, depth: int):
        super().__init__()
        self.entry = nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False), nn.MaxPool2d(2),
                                   nn.BatchNorm2d(channels_out), nn.GELU())
        self.residuals = nn.ModuleList(nn.Sequential(conv_bn(channels_out, channels_out),
                                                     conv_bn(channels_out, channels_out)) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.entry(x)
        for residual in self.residuals:
            x = x + residual(x)
        return x


@register_model("resnet-small")
class SmallResNet(nn.Module):
    """A ResNet-9-style CNN sized for CPUs: stem at 28x28, then three pool stages (14, 7, 3)."""

    def __init__(self, num_classes: int = 10, width: int = 32, depth: int = 1, dropout: float = 0.0):
        super().__init__()
        self.stem = conv_bn(1, width)
        self.stages = nn.Sequential(PoolStage(width, width * 2, depth), PoolStage(width * 2, width * 4, depth),
                                    PoolStage(width * 4, width * 8, 0))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width * 8, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28) -> (B, classes)
        x = self.stages(self.stem(images))  # (B, 8w, 3, 3)
        # Global max pool in fp32: the same maxima and ties as in bf16 (the upcast is exact), but torch.compile's
        # backward of a bf16 amax gave NaN gradients from the first step (seen with torch 2.11 and 2.13).
        return self.head(self.dropout(x.float().amax(dim=(2, 3))))
