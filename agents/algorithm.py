"""The small interface every training algorithm offers the run harness."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from policycascade.agents.rules import StoppingRule
from policycascade.cascade import Cascade, CascadeOutputs
from policycascade.checkpoint import state_dict_mismatch

if TYPE_CHECKING:
    from policycascade.harness import RunHarness


class Algorithm:
    """Trains a cascade (and maybe a stopping policy) one epoch at a time, and ends with a rule.

    The harness owns everything else: device, data, checkpoints, signals, NaN checks,
    logging and the final metrics. An algorithm builds its cascade in ``__init__``
    (so the random initialisation happens in a fixed order after seeding), trains it in
    :meth:`train_epoch`, and says which stopping rule it ends with in :meth:`rule`.
    """

    name: str = ""
    cascade: Cascade
    # True where the classifiers are trained exactly as the comparison's reference trains
    # them (independently, per-classifier early stopping): the reference is then the run's own.
    trains_like_reference: bool = False

    def __init__(self, harness: RunHarness, train: bool = True):
        self.harness, self.training_enabled = harness, train

    @property
    def label(self) -> str:
        """How results name the classifiers this algorithm trained (e.g. ``reinforce-frozen``)."""
        return self.name

    @property
    def num_epochs(self) -> int:
        """Total epochs of the whole algorithm."""
        raise NotImplementedError

    @property
    def classifier_epochs(self) -> int:
        """Epochs each classifier trains for: the budget an independent reference gets."""
        raise NotImplementedError

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """Train epoch ``epoch`` (0-based); returns scalar metrics keyed by TensorBoard tag."""
        raise NotImplementedError

    def rule(self) -> StoppingRule | None:
        """The stopping rule the algorithm ends with (None while it has none yet)."""
        raise NotImplementedError

    def policy_macs(self) -> list[int] | None:
        """MACs of the stopping rule per stage, known before training (None: it costs none)."""
        return None

    def modules(self) -> list[tuple[str, nn.Module]]:
        """Named modules whose gradients the harness checks for NaN/inf before each step."""
        return []

    def evaluation_extras(self, outputs: CascadeOutputs) -> dict[str, float]:
        """Algorithm-specific metrics of its rule on a split (e.g. an expected reward)."""
        return {}

    def final_extras(self) -> dict[str, Any]:
        """Algorithm-specific entries of metrics.json."""
        return {}

    def saved_parts(self) -> dict[str, Any]:
        """Named modules, optimisers and schedules (None where absent) a checkpoint holds."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: weights, optimisers, schedules, own state."""
        return {
            name: None if part is None else part.state_dict()
            for name, part in self.saved_parts().items()
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; a module that does not fit is named."""
        for name, part in self.saved_parts().items():
            if isinstance(part, nn.Module):
                try:
                    part.load_state_dict(state[name])
                except RuntimeError as error:
                    raise ValueError(
                        f"checkpoint in {self.harness.run_dir} does not fit this config's "
                        f"{name} (written by another version or configuration?): "
                        f"{state_dict_mismatch(error)}"
                    ) from None
        optimisers = {k: v for k, v in self.saved_parts().items() if not isinstance(v, nn.Module)}
        load_optimizers(optimisers, state)


def load_optimizers(objects: dict[str, Any], state: dict[str, Any]) -> None:
    """Load the state of each named optimiser or schedule present in ``state``."""
    for key, obj in objects.items():
        if obj is not None and state.get(key) is not None:
            obj.load_state_dict(state[key])


def generator_state(generator: torch.Generator | None) -> torch.Tensor | None:
    """A generator's state as a CPU byte tensor (None for no generator)."""
    return None if generator is None else generator.get_state()
