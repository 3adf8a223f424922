"""Measured inference cost of a module (MACs per sample) and the per-stage costs of a cascade."""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode for the block; afterwards every submodule has its own flag back.

    ``module.train(was_training)`` would not do: it sets one flag on the whole tree, so a
    submodule kept in eval mode inside a training parent (a frozen classifier, say)
    would come back in training mode.
    """
    training = [m for m in module.modules() if m.training]
    module.eval()
    try:
        yield
    finally:
        for m in training:
            m.training = True


def count_macs(module: nn.Module, sample_input: torch.Tensor) -> int:
    """Count the MACs ``module`` spends on one sample, measured on ``sample_input``.

    ``sample_input`` holds exactly one sample (leading batch dimension of 1).
    torch's FLOP counter counts one multiply-add as 2 FLOPs (matmuls and
    convolutions only; normalisation, activations and pooling count 0), so MACs
    are its total divided by two. The module is run in eval mode without
    gradients and its modules' training flags are restored afterwards.
    """
    if sample_input.shape[0] != 1:
        raise ValueError(
            f"sample_input must hold one sample (batch size 1), got {tuple(sample_input.shape)}"
        )
    with eval_mode(module), torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(sample_input)
    return int(counter.get_total_flops()) // 2


COST_UNITS = ("MACs", "ms")  # counted multiply-accumulates, or measured milliseconds


def as_number(value: float) -> int | float:
    """An integral cost as int (so counted MACs print and compare as before), others as float."""
    if isinstance(value, numbers.Integral):
        return int(value)
    value = float(value)
    return int(value) if value.is_integer() else value


class StageCosts:
    """Per-stage costs of a cascade and the normalised costs the reward uses.

    Stage t costs its classifier plus its stopping module (Guan et al. eq. (1)
    counts the policy's cost in every stage). The last stage has no stopping
    module: reaching it always ends the episode. Normalised costs divide by the
    cost of the most expensive *classifier*, so that running that classifier
    alone costs 1 and ``alpha`` reads as "reward lost per full-size model run".

    ``alone_macs`` is what each classifier costs used on its own; it differs from
    ``classifier_macs`` only where stages share computation (the exits of one
    network, where stage t adds its increment but exit t alone runs the trunk up to t).

    Costs are MACs by default (``unit="MACs"``, counted, kept as ints); ``unit="ms"``
    takes measured latencies, which may be fractional. Attribute names keep ``macs``
    whatever the unit: normalised costs and every decision read only their ratios.
    """

    def __init__(
        self,
        classifier_macs: list[int | float],
        policy_macs: list[int | float] | None = None,
        alone_macs: list[int | float] | None = None,
        unit: str = "MACs",
    ):
        if unit not in COST_UNITS:
            raise ValueError(f"unit must be one of {list(COST_UNITS)}, got {unit!r}")
        k = len(classifier_macs)
        if k < 2:
            raise ValueError(f"a cascade needs at least 2 stages, got K={k}")
        if not all(math.isfinite(m) and m > 0 for m in classifier_macs):
            raise ValueError(
                f"every classifier must cost a finite number > 0 of {unit}, got {classifier_macs}"
            )
        policy_macs = list(policy_macs) if policy_macs is not None else [0] * k
        if len(policy_macs) != k:
            raise ValueError(
                f"policy_macs needs {k} entries (one per stage), got {len(policy_macs)}"
            )
        if not all(math.isfinite(m) and m >= 0 for m in policy_macs):
            raise ValueError(f"policy_macs must be >= 0, got {policy_macs}")
        alone_macs = list(alone_macs) if alone_macs is not None else list(classifier_macs)
        if len(alone_macs) != k or not all(math.isfinite(m) and m > 0 for m in alone_macs):
            raise ValueError(f"alone_macs needs {k} finite entries > 0, got {alone_macs}")
        self.unit = unit
        self.classifier_macs = [as_number(m) for m in classifier_macs]
        self.policy_macs = [as_number(m) for m in policy_macs[:-1]] + [0]
        self.alone_macs = [as_number(m) for m in alone_macs]

    @property
    def num_stages(self) -> int:
        """Number of stages K."""
        return len(self.classifier_macs)

    @property
    def stage_macs(self) -> list[int | float]:
        """Cost of running stage t: its classifier plus its stopping module."""
        return [c + p for c, p in zip(self.classifier_macs, self.policy_macs, strict=True)]

    @property
    def cumulative_macs(self) -> list[int | float]:
        """Cost spent by a sample that exits at stage t (every stage up to t ran)."""
        total, out = 0, []
        for m in self.stage_macs:
            total += m
            out.append(total)
        return out

    @property
    def reference_macs(self) -> int | float:
        """Cost of the most expensive classifier used alone: the unit of normalised cost."""
        return max(self.alone_macs)

    @property
    def stage_costs(self) -> list[float]:
        """Normalised per-stage costs used by the reward (most expensive classifier = 1)."""
        return [m / self.reference_macs for m in self.stage_macs]

    def with_policy_macs(self, policy_macs: list[int | float]) -> StageCosts:
        """The same classifiers with another stopping rule's per-stage cost."""
        return StageCosts(self.classifier_macs, policy_macs, self.alone_macs, self.unit)

    def as_dict(self) -> dict[str, list | str]:
        """JSON-ready table: costs per stage and as a share of the reference classifier.

        ``unit`` appears only when it is not MACs, so MAC tables read as they always did.
        """
        table: dict[str, list | str] = {
            "classifier_macs": self.classifier_macs,
            "policy_macs": self.policy_macs,
            "stage_macs": self.stage_macs,
            "cumulative_macs": self.cumulative_macs,
            "alone_macs": self.alone_macs,
            "classifier_macs_share": [m / self.reference_macs for m in self.alone_macs],
            "stage_costs": self.stage_costs,
        }
        if self.unit != "MACs":
            table["unit"] = self.unit
        return table

    def __repr__(self) -> str:
        unit = f", unit={self.unit!r}" if self.unit != "MACs" else ""
        return (
            f"StageCosts(classifier_macs={self.classifier_macs}, "
            f"policy_macs={self.policy_macs}{unit})"
        )
