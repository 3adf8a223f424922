"""torchvision classifiers for pretrained ImageNet cascades, and the CIFAR-sized ones LtC used."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

IMAGENET_CLASSIFIERS = [
    "alexnet",
    "googlenet",
    "resnet50",
    "mobilenet_v2",
    "resnet18",
    "resnet152",
]
CIFAR_CLASSIFIERS = ["mobilenet_v2", "vgg11", "resnet18"]


def _check_name(name: str, names: list[str], function: str) -> None:
    """Raise a ValueError listing the accepted names when ``name`` is not one of them."""
    if name not in names:
        raise ValueError(f"{function} name must be one of {names}, got {name!r}")


def imagenet_classifier(name: str, weights: str | None = None) -> nn.Module:
    """The torchvision ImageNet classifier ``name``: (batch, 3, 224, 224) in, 1000 logits out.

    GoogLeNet has one architecture in every mode: no auxiliary heads, so it returns
    plain logits in train mode too, and the input rescaling its pretrained weights
    expect. A local GoogLeNet file may still hold the heads; they are dropped.

    Args:
        name: one of ``IMAGENET_CLASSIFIERS``.
        weights: None for random initialisation (no download), ``"default"`` for
            torchvision's DEFAULT weights (downloaded once into the torch hub cache),
            or the path of a local state-dict file, e.g. that cached file copied to
            an offline machine.
    """
    _check_name(name, IMAGENET_CLASSIFIERS, "imagenet_classifier")
    import torchvision  # slow import (about a second): only when a model is built

    builder = getattr(torchvision.models, name)
    kwargs = {"transform_input": True} if name == "googlenet" else {}
    if weights == "default":
        # With weights, torchvision's googlenet drops the heads unless aux_logits=True.
        return builder(weights="DEFAULT", **kwargs)
    state = None if weights is None else _read_state_dict(Path(weights))
    if name == "googlenet":
        kwargs |= {"aux_logits": False, "init_weights": state is None}
        if state is not None:
            state = {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2."))}
    model = builder(weights=None, **kwargs)
    if state is not None:
        model.load_state_dict(state)
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict saved with ``torch.save``, failing early with the path if it is missing."""
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {str(path)!r} does not exist; pass weights=None for random "
            "initialisation or weights='default' for torchvision's pretrained weights"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def cifar_classifier(name: str, num_classes: int = 100) -> nn.Module:
    """A classifier ``name`` for (batch, 3, 32, 32) inputs, as in Enomoto & Eda's CIFAR-100 runs.

    The layouts are those of the pytorch-cifar100 models whose training recipe LtC
    reports; torch's counter measures 64.9M, 172.0M and 555.5M MACs for
    mobilenet_v2, vgg11 and resnet18. LtC's Table 1 (67.6M, 191.8M, 556.8M) matches
    these layouts to 0.1% once batch norm (2 per element), conv biases and linear
    layers (multiply plus add) are counted as thop did.
    """
    _check_name(name, CIFAR_CLASSIFIERS, "cifar_classifier")
    import torchvision  # slow import (about a second): only when a model is built
    from torchvision.ops import Conv2dNormActivation

    if name == "resnet18":
        model = torchvision.models.resnet18(num_classes=num_classes)
        # 32x32 inputs keep full resolution in the first stage: 3x3 stem, no max-pool.
        model.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        model.maxpool = nn.Identity()
        _init_like_torchvision(model.conv1)
    elif name == "vgg11":
        # VGG11 with batch norm; five max-pools leave 512x1x1, so the classifier reads
        # those 512 features directly (torchvision's expects 512x7x7).
        vgg = torchvision.models.vgg
        model = nn.Sequential(
            vgg.make_layers(vgg.cfgs["A"], batch_norm=True),
            nn.Flatten(),
            nn.Linear(512, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(4096, num_classes),
        )
        _init_like_torchvision(model)
    else:
        # Strides 1/2/2/2/1/1/1: the 160-channel stage keeps its resolution at 32x32.
        setting = [
            [1, 16, 1, 1],
            [6, 24, 2, 2],
            [6, 32, 3, 2],
            [6, 64, 4, 2],
            [6, 96, 3, 1],
            [6, 160, 3, 1],
            [6, 320, 1, 1],
        ]
        model = torchvision.models.mobilenet_v2(
            num_classes=num_classes, inverted_residual_setting=setting
        )
        # pytorch-cifar100's stem: a 1x1 conv padded by one pixel (34x34 maps), then the
        # first block's 1x1 expansion, which torchvision omits at expansion ratio 1.
        model.features[0] = nn.Sequential(
            Conv2dNormActivation(3, 32, kernel_size=1, padding=1, activation_layer=nn.ReLU6),
            Conv2dNormActivation(32, 32, kernel_size=1, activation_layer=nn.ReLU6),
        )
        _init_like_torchvision(model.features[0])
    return model


def _init_like_torchvision(module: nn.Module) -> None:
    """Initialise a replaced layer as torchvision initialises the rest of these models."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0, 0.01)
            nn.init.zeros_(layer.bias)
