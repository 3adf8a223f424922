"""Checks of what a user registers as a cascade: names, classifiers, samples and labels.

Every mistake is caught at registration with a message that names the argument and the
value (a one-hot ``y``, classifiers on two devices, a classifier that returns a tuple or
ignores the batch size), before any output is computed.
"""

from __future__ import annotations

import itertools
import operator
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from policycascade.costs import eval_mode

# The splits a stopping policy needs: samples to fit it on, to select or calibrate it
# (thresholds, alpha) and to report it.
SPLIT_NAMES = ("fit", "val", "test")
PROBE_SAMPLES = 3  # each classifier is tried on this many real samples at registration


def check_integer(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int if it is an integer >= ``minimum``, else raise naming ``name``.

    Python, NumPy and 0-d integer tensors count; booleans and floats such as 2.0 do not
    (``int(2.7)`` would silently drop the fraction).
    """
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def check_flag(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False``, else raise naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_name(name: Any) -> str:
    """A plain id name: letters, digits, ``_``, ``.``, ``-``, and no ``-v`` (the version's)."""
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name) or "-v" in name:
        raise ValueError(
            "name must be a plain name like 'MyCascade' (letters, digits, '_', '.', '-'; "
            f"no spaces, '/', ':' or '-v'), got {name!r}"
        )
    return name


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} must be a torch tensor or NumPy array, got {type(value).__name__}")
    return value


def _check_labels(y: torch.Tensor, where: str) -> torch.Tensor:
    """``y`` as int64 class indices of shape (N,); one-hot and float labels named as such."""
    expected = f"{where}y must be integer class indices of shape (N,)"
    kind = "float" if y.dtype.is_floating_point else str(y.dtype).removeprefix("torch.")
    if y.ndim == 2 and y.shape[1] == 1:
        raise ValueError(f"{expected}, got {kind} shape {tuple(y.shape)}: use y.squeeze(1)")
    if y.ndim == 2:
        one_hot = bool(((y == 0) | (y == 1)).all()) and bool((y.sum(1) == 1).all())
        what = "one-hot" if one_hot else "scores"
        shape = tuple(y.shape)
        raise ValueError(f"{expected}, got {kind} {what} of shape {shape}: use y.argmax(1)")
    if y.ndim != 1:
        raise ValueError(f"{expected}, got shape {tuple(y.shape)}")
    if y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"{expected}, got {kind} values")
    if y.dtype.is_floating_point:
        if bool((y.isfinite() & (y == y.round())).all()):
            raise ValueError(f"{expected}, got {y.dtype} values: use y.long()")
        fraction = y[~(y.isfinite() & (y == y.round()))][0].item()
        raise ValueError(f"{expected}, got non-integer values such as {fraction}")
    return y.to(torch.int64)


def _check_data(x: Any, y: Any, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split's samples: tensors (or arrays), as many labels as samples, at least one."""
    x, y = _as_tensor(x, f"{where}x"), _as_tensor(y, f"{where}y")
    if x.ndim == 0:
        raise ValueError(f"{where}x must hold samples along its first dimension, got a scalar")
    if y.ndim == 0:
        raise ValueError(f"{where}y must be integer class indices of shape (N,), got a scalar")
    if len(x) != len(y):
        raise ValueError(
            f"{where}x and y must hold the same number of samples, got {len(x)} and {len(y)}"
        )
    if len(y) == 0:
        raise ValueError(f"{where}x and y must hold at least one sample")
    return x, _check_labels(y, where)


def check_splits(
    x: Any, y: Any, splits: Any
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], bool]:
    """The data as ``{split name: (x, y)}`` and whether it came as one split (``x, y``)."""
    if splits is None:
        if x is None or y is None:
            raise ValueError(
                "register_cascade needs data: x and y (one split) or "
                "splits={'val': (x_val, y_val), 'test': (x_test, y_test)}"
            )
        return {"all": _check_data(x, y, "")}, True
    if x is not None or y is not None:
        raise ValueError("give the data either as x, y (one split) or as splits=..., not both")
    if not isinstance(splits, Mapping) or not splits:
        raise TypeError(
            "splits must be a non-empty dict like {'val': (x_val, y_val), 'test': "
            f"(x_test, y_test)}} with keys among {list(SPLIT_NAMES)}, got {splits!r}"
        )
    checked = {}
    for name, data in splits.items():
        if name not in SPLIT_NAMES:
            hint = " ('fit' holds the samples a stopping policy is trained on)" * (name == "train")
            raise ValueError(f"splits keys must be among {list(SPLIT_NAMES)}, got {name!r}{hint}")
        if not isinstance(data, (tuple, list)) or len(data) != 2:
            raise TypeError(f"splits[{name!r}] must be a pair (x, y), got {type(data).__name__}")
        checked[name] = _check_data(*data, f"splits[{name!r}]: ")
    shapes = {name: (tuple(x.shape[1:]), x.dtype) for name, (x, _) in checked.items()}
    first, *others = shapes
    for name in others:
        if shapes[name] != shapes[first]:
            raise ValueError(
                f"splits[{name!r}] x holds samples of shape {shapes[name][0]} ({shapes[name][1]}) "
                f"but splits[{first!r}] x holds {shapes[first][0]} ({shapes[first][1]}): "
                "every split must hold the same kind of sample"
            )
    return checked, False


def check_classifiers(classifiers: Any) -> list[nn.Module]:
    """``classifiers`` as a list of at least two ``nn.Module``s, or raise naming the mistake."""
    if isinstance(classifiers, nn.Module) and not isinstance(classifiers, nn.ModuleList):
        raise TypeError(
            "classifiers must be a list of trained nn.Modules, cheapest first, "
            f"got one {type(classifiers).__name__}"
        )
    if not isinstance(classifiers, (list, tuple, nn.ModuleList)):
        raise TypeError(
            "classifiers must be a list of trained nn.Modules, cheapest first, "
            f"got {type(classifiers).__name__}"
        )
    for t, clf in enumerate(classifiers):
        if not isinstance(clf, nn.Module):
            raise TypeError(
                f"classifiers[{t}] must be an nn.Module mapping a batch to (batch, C) logits, "
                f"got {type(clf).__name__}"
            )
    if len(classifiers) < 2:
        raise ValueError(f"a cascade needs at least 2 classifiers, got K={len(classifiers)}")
    return list(classifiers)


def check_stage_names(stage_names: Any, num_stages: int) -> list[str]:
    """One distinct name per classifier (default ``stage0``, ``stage1``, ...)."""
    if stage_names is None:
        return [f"stage{t}" for t in range(num_stages)]
    if isinstance(stage_names, str) or not all(isinstance(n, str) for n in stage_names):
        raise TypeError(f"stage_names must be a list of {num_stages} strings, got {stage_names!r}")
    names = list(stage_names)
    if len(names) != num_stages or len(set(names)) != num_stages:
        raise ValueError(
            f"stage_names must be {num_stages} different names, one per classifier, got {names}"
        )
    return names


def _device(module: nn.Module) -> torch.device | None:
    """The device of a module's first parameter or buffer (``None`` for a stateless module)."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return None


def check_devices(classifiers: list[nn.Module], names: list[str]) -> torch.device:
    """The one device every classifier's parameters are on."""
    devices = [(name, _device(clf)) for name, clf in zip(names, classifiers, strict=True)]
    devices = [(name, device) for name, device in devices if device is not None]
    if not any(next(clf.parameters(), None) is not None for clf in classifiers):
        raise ValueError("the classifiers hold no parameters: register trained nn.Modules")
    (first, device), *others = devices
    for name, other in others:
        if other != device:
            raise ValueError(
                f"classifier {name!r} is on {other} but classifier {first!r} is on {device}: "
                f"move every classifier to one device first, e.g. "
                f"[clf.to('{device}') for clf in classifiers] (x may stay where it is)"
            )
    return device


def probe_num_classes(
    classifiers: list[nn.Module],
    names: list[str],
    x: torch.Tensor,
    device: torch.device,
    num_classes: int | None,
) -> int:
    """Run each classifier on a few real samples of ``x``; return the class count C they agree on.

    A batch of :data:`PROBE_SAMPLES` (samples repeated if ``x`` holds fewer) catches
    classifiers that return tuples or dicts, ignore the batch size or disagree on C.
    """
    batch = x[torch.arange(PROBE_SAMPLES) % len(x)].to(device)
    agreed = None if num_classes is None else (num_classes, f"num_classes={num_classes}")
    for name, clf in zip(names, classifiers, strict=True):
        out = _probe_output(clf, name, batch, device)
        agreed = _check_logits(out, name, agreed)
    assert agreed is not None
    if agreed[0] < 2:
        raise ValueError(f"the classifiers must score at least 2 classes, got C={agreed[0]}")
    return agreed[0]


def _probe_output(
    clf: nn.Module, name: str, batch: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """``clf``'s output on ``batch``: a tensor whose first dimension is the batch, or raise."""
    size = len(batch)
    try:
        with eval_mode(clf), torch.no_grad():
            out = clf(batch)
    except Exception as error:
        raise ValueError(
            f"classifier {name!r} failed on a batch of {size} samples of x (shape "
            f"{tuple(batch.shape)}, {batch.dtype}, on {device}): "
            f"{type(error).__name__}: {error}"
        ) from error
    fix = "return a (batch, C) logits tensor"
    if isinstance(out, Mapping):
        key = next(iter(out), None)
        raise ValueError(
            f"classifier {name!r} returned a {type(out).__name__} with keys {list(out)}; "
            f"{fix}, e.g. wrap it to take the {key!r} entry"
        )
    if isinstance(out, (tuple, list)):
        raise ValueError(
            f"classifier {name!r} returned a {type(out).__name__}; {fix}, "
            "e.g. wrap it to take the first element"
        )
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"classifier {name!r} returned a {type(out).__name__}; {fix}")
    shape = tuple(out.shape)
    if out.ndim == 0 or shape[0] != size:
        raise ValueError(
            f"classifier {name!r} returned shape {shape} for a batch of {size} samples: "
            "its first dimension must be the batch (does it ignore the batch size, e.g. "
            "reshape to a fixed size?)"
        )
    return out


def _check_logits(out: torch.Tensor, name: str, agreed: tuple[int, str] | None) -> tuple[int, str]:
    """Check one classifier's (batch, C) logits; return the agreed C and where it came from."""
    shape = tuple(out.shape)
    expected = "C" if agreed is None else str(agreed[0])
    like = "" if agreed is None else f" ({agreed[1]})"
    if out.ndim != 2:
        raise ValueError(
            f"classifier {name!r} must map a batch to (batch, {expected}) logits{like}, "
            f"got output shape {shape}"
        )
    if not out.dtype.is_floating_point:
        raise ValueError(
            f"classifier {name!r} returned {out.dtype} values; return a (batch, C) logits "
            "tensor of floating-point scores, not class predictions"
        )
    if agreed is None:
        agreed = (shape[1], f"like classifier {name!r}")
    elif shape[1] != agreed[0]:
        raise ValueError(
            f"classifier {name!r} must map a batch to (batch, {agreed[0]}) logits{like}, "
            f"got output shape {shape}"
        )
    if not bool(out.isfinite().all()):
        raise ValueError(
            f"classifier {name!r} returned non-finite logits (nan or inf) on samples of x"
        )
    if looks_like_probabilities(out):
        warnings.warn(
            f"classifier {name!r} seems to return probabilities, not logits (on {len(out)} "
            "samples every row lies in [0, 1] and sums to 1): policycascade applies a "
            "softmax to each classifier's output, which flattens probabilities towards "
            "uniform; return logits (drop the final softmax) or log-probabilities",
            UserWarning,
            stacklevel=5,  # _check_logits <- probe <- check_registration <- register <- user
        )
    return agreed


def check_label_range(
    data: Mapping[str, tuple[torch.Tensor, torch.Tensor]], num_classes: int, single_split: bool
) -> None:
    """Every split's labels must be class indices in ``[0, num_classes)``."""
    for split, (_, labels) in data.items():
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            where = "" if single_split else f"splits[{split!r}]: "
            raise ValueError(
                f"{where}y must hold class indices in [0, num_classes={num_classes}), "
                f"got values from {low} to {high}"
            )


def looks_like_probabilities(out: torch.Tensor) -> bool:
    """Whether every row of (batch, C) outputs lies in [0, 1] and sums to 1: a softmax's output."""
    out = out.detach().double()
    in_unit = bool(((out >= 0) & (out <= 1)).all())
    sums_to_one = bool(((out.sum(-1) - 1).abs() <= 1e-4).all())
    return in_unit and sums_to_one


def warn_if_not_cheapest_first(names: Sequence[str], macs: Sequence[int]) -> None:
    """Warn, naming both, when a classifier costs more than one registered after it."""
    for t in range(len(macs) - 1):
        later = min(range(t + 1, len(macs)), key=macs.__getitem__)
        if macs[t] > macs[later]:
            warnings.warn(
                f"classifiers should be registered cheapest first, but {names[t]!r} "
                f"({macs[t]:,} MACs) comes before {names[later]!r} ({macs[later]:,} MACs): "
                "the cascade runs them in the given order, so a sample that continues pays for "
                "the dearer one first and MAC shares can exceed 1; reorder the classifiers by "
                "cost unless this order is intended",
                UserWarning,
                stacklevel=4,
            )
            return
