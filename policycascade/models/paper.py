"""The papers' cascades by name, with each paper's cost per stage to check the measured MACs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from policycascade.costs import count_macs
from policycascade.models.imagenet import cifar_classifier, imagenet_classifier
from policycascade.models.resnet import cifar_resnet, wide_resnet40


@dataclass(frozen=True)
class CascadeSpec:
    """How to build one paper's cascade (random init) and what the paper says its stages cost."""

    build: Callable[[int], list[nn.Module]]  # num_classes -> classifiers, cheapest first
    stage_names: list[str]
    input_shape: tuple[int, ...]  # one sample, no batch dimension
    paper_share: list[float] | None  # paper's cost of each stage / its most expensive stage
    source: str  # the paper table the stages and shares come from
    num_classes: int  # the paper's number of classes, the default for cost_table


def _shares(paper_costs: list[float]) -> list[float]:
    """Each stage's cost as a fraction of the most expensive, from the paper's own numbers."""
    return [c / max(paper_costs) for c in paper_costs]


def _imagenet_cascade(names: list[str]) -> Callable[[int], list[nn.Module]]:
    """A builder for torchvision ImageNet classifiers, which are 1000-way only."""

    def build(num_classes: int) -> list[nn.Module]:
        if num_classes != 1000:
            raise ValueError(f"ImageNet cascades have 1000 classes, got num_classes={num_classes}")
        return [imagenet_classifier(name) for name in names]

    return build


CIFAR_DEPTHS = [8, 20, 32, 56, 110]
IMAGENET32_WIDTHS = [1, 1.5, 2, 3, 4]

PAPER_CASCADES: dict[str, CascadeSpec] = {
    "cifar-resnet": CascadeSpec(
        build=lambda c: [cifar_resnet(depth, c) for depth in CIFAR_DEPTHS],
        stage_names=[f"resnet{depth}" for depth in CIFAR_DEPTHS],
        input_shape=(3, 32, 32),
        paper_share=_shares([14.86, 43.17, 71.48, 128.11, 255.51]),
        source="Guan et al. 2018, Table 1 (CIFAR FLOPs of pre-activation ResNet-8..110)",
        num_classes=10,
    ),
    "imagenet32-wrn40": CascadeSpec(
        build=lambda c: [wide_resnet40(width, c) for width in IMAGENET32_WIDTHS],
        stage_names=[f"resnet40-{width}" for width in IMAGENET32_WIDTHS],
        input_shape=(3, 32, 32),
        paper_share=_shares([85.64, 192.36, 341.68, 768.13, 1364.97]),
        source="Guan et al. 2018, Table 1 (ImageNet32x32 FLOPs of ResNet-40, widths 1..4)",
        num_classes=1000,
    ),
    "imagenet-ann": CascadeSpec(
        build=_imagenet_cascade(["alexnet", "googlenet", "resnet50"]),
        stage_names=["alexnet", "googlenet", "resnet50"],
        input_shape=(3, 224, 224),
        paper_share=_shares([7e9, 15e9, 38e9]),
        source="Guan et al. 2018, Sec. 4.2 and Table 2 (ANN's AlexNet/GoogLeNet/ResNet-50 FLOPs)",
        num_classes=1000,
    ),
    "ltc-cifar100-mobilenetv2-resnet18": CascadeSpec(
        build=lambda c: [cifar_classifier(name, c) for name in ["mobilenet_v2", "resnet18"]],
        stage_names=["mobilenet_v2", "resnet18"],
        input_shape=(3, 32, 32),
        paper_share=_shares([67.6e6, 556.8e6]),
        source="Enomoto & Eda 2021, Table 1 (CIFAR-100 MACs)",
        num_classes=100,
    ),
    "ltc-cifar100-mobilenetv2-vgg11-resnet18": CascadeSpec(
        build=lambda c: [
            cifar_classifier(name, c) for name in ["mobilenet_v2", "vgg11", "resnet18"]
        ],
        stage_names=["mobilenet_v2", "vgg11", "resnet18"],
        input_shape=(3, 32, 32),
        paper_share=_shares([67.6e6, 191.8e6, 556.8e6]),
        source="Enomoto & Eda 2021, Table 1 (CIFAR-100 MACs)",
        num_classes=100,
    ),
    "ltc-imagenet-mobilenetv2-resnet152": CascadeSpec(
        build=_imagenet_cascade(["mobilenet_v2", "resnet152"]),
        stage_names=["mobilenet_v2", "resnet152"],
        input_shape=(3, 224, 224),
        paper_share=_shares([314.13e6, 11.559e9]),
        source="Enomoto & Eda 2021, Table 1 (ImageNet MACs)",
        num_classes=1000,
    ),
}


def cost_table(name: str, num_classes: int | None = None) -> dict:
    """Measured MACs per stage of cascade ``name`` beside the paper's shares, JSON-ready.

    Each classifier is built (random init) and measured by ``count_macs`` on one
    zero sample of the spec's input shape; shares are of the most expensive stage.
    """
    if name not in PAPER_CASCADES:
        raise ValueError(f"cascade must be one of {sorted(PAPER_CASCADES)}, got {name!r}")
    spec = PAPER_CASCADES[name]
    sample = torch.zeros(1, *spec.input_shape)
    macs = [count_macs(model, sample) for model in spec.build(num_classes or spec.num_classes)]
    paper_share = spec.paper_share or [None] * len(macs)
    return {
        "cascade": name,
        "input_shape": list(spec.input_shape),
        "stages": [
            {"name": stage, "macs": m, "share": m / max(macs), "paper_share": p}
            for stage, m, p in zip(spec.stage_names, macs, paper_share, strict=True)
        ],
    }
