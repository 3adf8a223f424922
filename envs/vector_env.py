"""N stopping episodes stepped at once as torch tensors: the batched twin of CascadeStoppingEnv."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from gymnasium.error import ResetNeeded
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from policycascade.cascade import CascadeOutputs
from policycascade.envs.stopping_env import (
    RESET_OPTIONS,
    STOP,
    check_env_alpha,
    check_integer,
    check_reset_options,
    check_seed,
    observation_space,
    step_info,
)
from policycascade.rewards import check_loss_name, prediction_loss, step_reward
from policycascade.runtime import resolve_device


class CascadeStoppingVectorEnv(VectorEnv):
    """``num_envs`` copies of :class:`CascadeStoppingEnv` in one set of tensors.

    ## Description
    Same MDP, rewards and info keys as the single environment, with every
    quantity a tensor on ``device`` (observations ``(num_envs, C + K)`` float32,
    rewards float64, ``terminated``/``truncated`` bool). Actions may be a tensor,
    a NumPy array or a list of 0/1 values.

    ## Autoreset
    Gymnasium's default NEXT_STEP mode: the step after an episode ends ignores its
    action, starts a new episode and returns its first observation with reward 0.
    ``step`` before the first ``reset`` raises ``ResetNeeded``, as the single env does.

    ## Starting State
    Samples drawn uniformly with a torch generator seeded by ``reset(seed=...)``
    (an integer >= 0); ``reset(options={"sample_index": idx})`` starts the envs on
    ``num_envs`` given sample indices instead. ``sample_index`` is the only option.

    ## Arguments
    ``num_envs``: an integer >= 1 (Python or NumPy; not a bool or 2.7).
    ``outputs``: cached classifier softmaxes, labels and stage costs.
    ``alpha``: cost weight, a finite real number >= 0 (not a bool or a string).
    ``loss``: ``"zero-one"`` or ``"cross-entropy"``.
    ``device``: ``"auto"`` (CUDA if present), ``"cpu"``, ``"cuda[:N]"`` or a ``torch.device``.

    ## Version History
    v0: initial version. Later changes kept the MDP and tightened inputs as for
    :class:`CascadeStoppingEnv`; ``step`` before ``reset`` raises ``ResetNeeded``
    (it used to start episodes silently).
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(
        self,
        num_envs: int,
        outputs: CascadeOutputs,
        alpha: float = 1e-3,
        loss: str = "zero-one",
        device: str | torch.device = "auto",
    ):
        if not isinstance(outputs, CascadeOutputs):
            raise TypeError(
                f"outputs must be a CascadeOutputs (cached classifier softmaxes), "
                f"got {type(outputs).__name__}"
            )
        self.num_envs = check_integer("num_envs", num_envs, 1)
        self.alpha = check_env_alpha(alpha)
        self.loss = check_loss_name(loss)
        self.device = resolve_device(device)
        self._probs = outputs.probs.to(self.device, torch.float32)
        self._labels = outputs.labels.to(self.device)
        self._costs = torch.tensor(
            outputs.costs.stage_costs, dtype=torch.float64, device=self.device
        )
        self._cumulative_macs = torch.tensor(outputs.costs.cumulative_macs, device=self.device)
        self.num_samples, self.num_stages, self.num_classes = outputs.probs.shape
        self.single_observation_space = observation_space(self.num_classes, self.num_stages)
        self.single_action_space = spaces.Discrete(2)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._generator = torch.Generator(device=self.device)
        self._generator.seed()
        self._sample = torch.zeros(self.num_envs, dtype=torch.int64, device=self.device)
        self._stage = torch.zeros_like(self._sample)
        self._needs_reset = torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
        self._started = False
        self._eye = torch.eye(self.num_stages, device=self.device)
        self._env_index = torch.arange(self.num_envs, device=self.device)

    def _draw_samples(self, count: int) -> torch.Tensor:
        return torch.randint(
            self.num_samples, (count,), generator=self._generator, device=self.device
        )

    def _observation(self) -> torch.Tensor:
        probs = self._probs[self._sample, self._stage]
        return torch.cat([probs, self._eye[self._stage]], dim=1)

    def _info(self, exit_stage: torch.Tensor) -> dict[str, torch.Tensor]:
        prediction = self._probs[self._sample, self._stage].argmax(-1)
        label = self._labels[self._sample]
        macs = self._cumulative_macs[self._stage]
        stage, sample = self._stage.clone(), self._sample.clone()
        return step_info(stage, sample, prediction, label, macs, exit_stage)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Start every env at stage 0 on random samples (or ``options["sample_index"]``)."""
        seed = check_seed(seed)
        index = check_reset_options(options, RESET_OPTIONS).get("sample_index")
        if index is not None:
            index = self._sample_index(index)
        if seed is not None:
            self._generator.manual_seed(seed)
        self._sample = self._draw_samples(self.num_envs) if index is None else index
        self._stage = torch.zeros_like(self._sample)
        self._needs_reset = torch.zeros_like(self._needs_reset)
        self._started = True
        return self._observation(), self._info(torch.full_like(self._stage, -1))

    def _sample_index(self, index: Any) -> torch.Tensor:
        """``options["sample_index"]`` checked: ``num_envs`` integers in [0, num_samples)."""
        expected = f"{self.num_envs} integers in [0, {self.num_samples})"
        try:
            values = torch.as_tensor(index, device=self.device)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"options['sample_index'] must be {expected}, got {index!r}") from None
        if values.dtype == torch.bool or values.dtype.is_floating_point or values.is_complex():
            raise ValueError(f"options['sample_index'] must be {expected}, got {index!r}")
        if values.shape != (self.num_envs,):
            raise ValueError(
                f"options['sample_index'] must have shape ({self.num_envs},), "
                f"got {tuple(values.shape)}"
            )
        if bool((values < 0).any() or (values >= self.num_samples).any()):
            raise ValueError(f"options['sample_index'] must be {expected}, got {index!r}")
        return values.to(torch.int64).clone()

    def step(
        self, actions: torch.Tensor | np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Apply one stop/continue decision per env; envs that ended last step restart instead."""
        if not self._started:
            raise ResetNeeded("no episode has started: call reset() before step()")
        try:
            actions = torch.as_tensor(actions, device=self.device)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(
                f"actions must be {self.num_envs} values 0 (continue) or 1 (stop) "
                f"(tensor, array or list), got {actions!r}"
            ) from None
        if actions.shape != (self.num_envs,):
            raise ValueError(
                f"actions must have shape ({self.num_envs},), got {tuple(actions.shape)}"
            )
        if actions.dtype == torch.bool or bool(((actions != 0) & (actions != 1)).any()):
            raise ValueError("actions must be 0 (continue) or 1 (stop)")
        restarting = self._needs_reset
        stage = self._stage
        done = ((actions == STOP) | (stage == self.num_stages - 1)) & ~restarting
        probs = self._probs[self._sample, stage]
        label = self._labels[self._sample]
        loss = prediction_loss(probs.double(), probs.argmax(-1), label, self.loss)
        reward = step_reward(self.alpha, self._costs[stage], loss, done)
        reward = torch.where(restarting, torch.zeros_like(reward), reward)
        exit_stage = torch.where(done, stage, torch.full_like(stage, -1))
        info_done = self._info(exit_stage)

        advancing = ~done & ~restarting
        self._stage = torch.where(advancing, stage + 1, torch.where(restarting, 0, stage))
        if bool(restarting.any()):
            fresh = self._draw_samples(self.num_envs)
            self._sample = torch.where(restarting, fresh, self._sample)
        self._needs_reset = done
        info = self._info(exit_stage)
        # An env that just ended reports the step it ended on, not a later stage.
        for key in ("stage", "prediction", "correct", "macs"):
            info[key] = torch.where(done, info_done[key], info[key])
        truncated = torch.zeros_like(done)
        return self._observation(), reward, done, truncated, info


def vector_env_from_source(
    outputs: Callable[[], CascadeOutputs], num_envs: int, alpha: float, loss: str, device: str
) -> CascadeStoppingVectorEnv:
    """A batched env on ``outputs()``, called only once the other arguments are valid."""
    num_envs = check_integer("num_envs", num_envs, 1)  # before the outputs
    alpha, loss = check_env_alpha(alpha), check_loss_name(loss)
    return CascadeStoppingVectorEnv(num_envs, outputs(), alpha=alpha, loss=loss, device=device)
