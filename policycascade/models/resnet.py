"""Pre-activation ResNets for 32x32 inputs: Guan et al.'s CIFAR depths and ImageNet32 widths."""

from __future__ import annotations

import torch
from torch import nn


class PreActBasicUnit(nn.Module):
    """Two BN-ReLU-conv3x3 layers and a shortcut: the full pre-activation unit of He et al. 2016b.

    Where the unit changes resolution or width, the shortcut is a 3x3 strided
    convolution on the pre-activated input. That is the reading which reproduces
    Guan et al.'s Table 1: their counts exceed identity shortcuts by the same 2.6M
    FLOPs at every depth, two such convolutions (2.36M) plus a constant 0.26M.
    1x1 projections would put ResNet-8 at 4.94% of ResNet-110 (paper: 5.82%).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
            if stride != 1 or in_channels != out_channels
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual output, same layout as ``x`` (batch, channel, height, width)."""
        pre = torch.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv2(torch.relu(self.bn2(self.conv1(pre))))
        return out + shortcut


def cifar_resnet(depth: int, num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """Pre-activation ResNet-``depth`` for (batch, 3, 32, 32) inputs (Guan et al. 2018, Table 1).

    A 3x3 stem with 16*width filters, three stages of (depth - 2) / 6 basic units
    with 16, 32 and 64 filters (times ``width``; stride 2 at the first unit of
    stages 2 and 3), a final BN-ReLU, global average pooling and a linear layer.
    """
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 20, 32, 56, 110, ...), got {depth}")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    units = (depth - 2) // 6
    channels = [round(16 * width * 2**stage) for stage in range(3)]
    layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 3, padding=1, bias=False)]
    in_channels = channels[0]
    for stage, out_channels in enumerate(channels):
        for unit in range(units):
            stride = 2 if stage > 0 and unit == 0 else 1
            layers.append(PreActBasicUnit(in_channels, out_channels, stride))
            in_channels = out_channels
    layers += [
        nn.BatchNorm2d(in_channels),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(in_channels, num_classes),
    ]
    model = nn.Sequential(*layers)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return model


def wide_resnet40(width: float, num_classes: int = 1000) -> nn.Module:
    """Guan et al.'s ImageNet32x32 classifier: ResNet-40 with every filter count times ``width``.

    Six units per stage, as in Wide-ResNet-40 ((40 - 4) / 6): 36 unit convolutions,
    the stem, the two shortcut convolutions and the linear layer make 40 layers.
    The stem widens too; the paper's FLOPs grow by a term linear in the width,
    which only a widened stem explains.
    """
    return cifar_resnet(38, num_classes, width)
