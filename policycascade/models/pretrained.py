"""Cascades of torchvision classifiers by name, pretrained or not (Lebovitz et al.'s setting).

Weights come from torchvision's weight enums (``"DEFAULT"`` or a name such as
``"IMAGENET1K_V2"``, downloaded once into the torch hub cache on a connected
machine), from a local state-dict file per model, or not at all (``None``: random
initialisation, the only choice offline without such files). The pretrained models
expect ImageNet-normalised inputs: pass the normalisation as ``Cascade.outputs``'
``transform``.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from policycascade.cascade import Cascade
from policycascade.costs import count_macs

Weights = str | os.PathLike | None  # a weight enum name, a state-dict file, or None
_STATE_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Models with auxiliary heads: without enum weights they are built without them (plain
# logits in train mode too) and with the input rescaling their pretrained weights expect.
_AUX_HEADS = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}


def classifier_names() -> list[str]:
    """Names of torchvision's classification models (``torchvision.models.list_models``)."""
    import torchvision  # slow import (about a second): only when a model is built

    return torchvision.models.list_models(module=torchvision.models)


def torchvision_classifier(
    name: str, weights: Weights = None, num_classes: int = 1000
) -> nn.Module:
    """The torchvision classifier ``name`` with the given weights (see the module docstring)."""
    import torchvision  # slow import (about a second): only when a model is built

    known = classifier_names()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(
            f"unknown torchvision classifier {name!r}{hint} "
            "(torchvision.models.list_models(module=torchvision.models) lists them all)"
        )
    path = _as_path(weights)
    if weights is None or path is not None:
        kwargs = {"num_classes": num_classes}
        if name in _AUX_HEADS:
            kwargs |= {"aux_logits": False, "transform_input": True, "init_weights": path is None}
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        if path is not None:
            _load_file(model, name, path)
        return model
    enum = torchvision.models.get_model_weights(name)
    try:
        chosen = enum.verify(weights)
    except (ValueError, KeyError) as error:
        raise ValueError(
            f"weights {weights!r} for {name!r} are neither a local file nor one of "
            f"{['DEFAULT', *enum.__members__]}"
        ) from error
    categories = len(chosen.meta["categories"])
    if num_classes != categories:
        raise ValueError(
            f"{name} weights {chosen} have {categories} classes, got num_classes={num_classes}; "
            f"pass num_classes={categories}, or weights=None to train a new head"
        )
    try:
        return torchvision.models.get_model(name, weights=chosen)
    except OSError as error:
        raise RuntimeError(
            f"could not download the {name} weights {chosen} ({error}); without network, "
            "pass weights=None (random initialisation) or the path of a local state-dict "
            "file (e.g. the torch hub cache's checkpoint copied from a connected machine)"
        ) from error


def _as_path(weights: Weights) -> Path | None:
    """The state-dict file ``weights`` names, or None where it names torchvision weights."""
    if weights is None:
        return None
    text = os.fspath(weights)
    if isinstance(weights, os.PathLike) or os.sep in text or text.endswith(_STATE_FILE_SUFFIXES):
        return Path(text)
    return Path(text) if Path(text).is_file() else None


def _load_file(model: nn.Module, name: str, path: Path) -> None:
    """Load the state dict in ``path`` into ``model``, naming the file and model on failure."""
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {str(path)!r} for {name} does not exist; pass weights=None for "
            "random initialisation or 'DEFAULT' for torchvision's pretrained weights"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load's errors differ by what the file holds
        raise ValueError(f"{str(path)!r} is not a torch state-dict file: {error}") from error
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict")
    drop = _AUX_HEADS.get(name, ())
    state = {k: v for k, v in state.items() if not k.startswith(drop)} if drop else state
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(
            f"{str(path)!r} does not hold {name} weights for this model "
            f"(architecture and num_classes must match): {error}"
        ) from error


def pretrained_cascade(
    models: Sequence[str | nn.Module],
    weights: Weights | Sequence[Weights] = "DEFAULT",
    input_shape: Sequence[int] = (3, 224, 224),
    num_classes: int = 1000,
    names: Sequence[str] | None = None,
    sort_by_macs: bool = True,
) -> Cascade:
    """A cascade of torchvision classifiers (by name) and/or given modules, cheapest first.

    Each classifier's MACs are measured by ``count_macs`` on one sample of
    ``input_shape``; with ``sort_by_macs`` the stages are ordered by them (stable),
    otherwise the given order must already be cheapest first.

    Args:
        models: torchvision model names (``"mobilenet_v3_small"``, ``"resnet50"`` ...)
            or modules used as they are.
        weights: one value for every named model, or one per model: ``"DEFAULT"`` or
            another weight enum name, a local state-dict file, or None (random
            initialisation). A module takes only a file or None.
        input_shape: one sample's shape, where MACs are measured.
        num_classes: classes of every classifier (pretrained enums fix it, e.g. 1000).
        names: stage names; default the model names (class names for modules),
            numbered where they repeat.
        sort_by_macs: order the stages by measured MACs instead of checking the order.
    """
    models = list(models)
    if isinstance(weights, (str, os.PathLike)) or weights is None:
        per_model = [weights if isinstance(m, str) else None for m in models]
    else:
        per_model = list(weights)
        if len(per_model) != len(models):
            raise ValueError(f"got {len(per_model)} weights for {len(models)} models")
    classifiers = [
        _classifier(model, w, num_classes) for model, w in zip(models, per_model, strict=True)
    ]
    names = list(names) if names is not None else _default_names(models)
    if len(names) != len(classifiers):
        raise ValueError(f"got {len(names)} names for {len(classifiers)} models")
    sample = torch.zeros(1, *input_shape)
    macs = [count_macs(clf, sample) for clf in classifiers]
    order = sorted(range(len(macs)), key=macs.__getitem__)
    if not sort_by_macs and order != list(range(len(macs))):
        measured = dict(zip(names, macs, strict=True))
        raise ValueError(
            f"classifiers must be cheapest first, measured MACs {measured}; "
            "reorder them or pass sort_by_macs=True"
        )
    return Cascade(
        [classifiers[i] for i in order], input_shape, num_classes, [names[i] for i in order]
    )


def _classifier(model: str | nn.Module, weights: Weights, num_classes: int) -> nn.Module:
    """A torchvision classifier by name, or a given module with its weights file loaded."""
    if isinstance(model, str):
        return torchvision_classifier(model, weights, num_classes)
    if not isinstance(model, nn.Module):
        raise TypeError(f"models must be torchvision names or modules, got {model!r}")
    if weights is not None:
        path = _as_path(weights)
        if path is None:
            raise ValueError(
                f"a given {type(model).__name__} module takes weights from a local "
                f"file or None, got {weights!r}"
            )
        _load_file(model, type(model).__name__, path)
    return model


def _default_names(models: Sequence[str | nn.Module]) -> list[str]:
    base = [m if isinstance(m, str) else type(m).__name__.lower() for m in models]
    return [f"{b}-{base[:i].count(b) + 1}" if base.count(b) > 1 else b for i, b in enumerate(base)]
