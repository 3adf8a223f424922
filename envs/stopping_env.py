"""The cascade as a gymnasium optimal-stopping MDP, one labelled sample per episode."""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.error import InvalidAction, ResetNeeded

from policycascade.cascade import CascadeOutputs
from policycascade.registry_checks import check_integer
from policycascade.rewards import check_alpha, check_loss_name, prediction_loss, step_reward

CONTINUE, STOP = 0, 1


def observation_space(num_classes: int, num_stages: int) -> spaces.Box:
    """Flat observation: the stage's softmax (C values) followed by a one-hot stage index (K)."""
    return spaces.Box(0.0, 1.0, shape=(num_classes + num_stages,), dtype=np.float32)


def check_env_alpha(alpha: Any) -> float:
    """``alpha`` as a float if it is a real number (not a bool or a string), finite and >= 0."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    return check_alpha(alpha)


def check_reset_options(options: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    """``options`` as a dict (``None`` -> ``{}``) whose keys are all in ``allowed``."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ValueError(
            f"options must be None or a dict with keys among {list(allowed)}, got {options!r}"
        )
    for key in options:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown reset option {key!r}{hint}: the options are {list(allowed)}")
    return options


def check_seed(seed: Any) -> int | None:
    """``seed`` as a Python int (NumPy integers included), or ``None``."""
    return None if seed is None else check_integer("seed", seed, 0)


def _is_index(value: Any, size: int) -> bool:
    """Whether ``value`` is an integer (Python, NumPy or 0-d tensor, not bool) in [0, size)."""
    try:
        return 0 <= check_integer("sample_index", value, 0) < size
    except ValueError:
        return False


RESET_OPTIONS = ("sample_index",)


def step_info(
    stage: Any, sample: Any, prediction: Any, label: Any, macs: Any, exit_stage: Any
) -> dict:
    """The ``info`` of a step, the same keys for the single and the batched environment."""
    return {
        "stage": stage,
        "sample_index": sample,
        "prediction": prediction,
        "label": label,
        "correct": prediction == label,
        "macs": macs,
        "exit_stage": exit_stage,
    }


class CascadeStoppingEnv(gym.Env):
    """Decide, one classifier at a time, when to stop and answer.

    ## Description
    A cascade of K classifiers, cheapest first, sees one labelled sample per
    episode. At step t classifier t has run; the agent reads its softmax and
    either stops (the answer is classifier t's arg-max) or continues (classifier
    t+1 runs). Reaching the last classifier always ends the episode. This is the
    optimal-stopping MDP of Guan et al. (IJCAI 2018), over the classifier outputs
    cached in a :class:`~policycascade.cascade.CascadeOutputs`.

    ## Action Space
    ``Discrete(2)``: 0 = continue to the next classifier, 1 = stop. At the last
    stage both actions end the episode.

    ## Observation Space
    ``Box(0, 1, (C + K,), float32)``: classifier t's softmax probabilities (C
    values summing to 1), then a one-hot encoding of the stage t (K values).

    ## Rewards
    Every step at stage t costs ``-alpha * cost_t``, where ``cost_t`` is stage t's
    MACs (classifier plus stopping module) divided by the MACs of the most
    expensive classifier. The step that ends the episode adds ``-loss``: the 0/1
    loss of the prediction (``loss="zero-one"``) or its cross-entropy
    (``loss="cross-entropy"``). An episode's return is therefore
    ``-loss - alpha * (sum of the costs of the stages run)``.

    ## Starting State
    A sample drawn uniformly from the split (``self.np_random``), at stage 0;
    ``reset(options={"sample_index": i})`` picks sample i instead. ``sample_index`` is
    the only option; ``seed`` is an integer >= 0 (Python or NumPy).

    ## Episode End
    Terminated when the agent stops or reaches stage K-1; never truncated.
    Episodes last between 1 and K steps.

    ## Info
    ``stage``, ``sample_index``, ``prediction`` (the current stage's arg-max),
    ``label``, ``correct``, ``macs`` (MACs spent so far) and ``exit_stage``
    (the stage answered from; -1 while the episode runs).

    ## Arguments
    ``outputs``: cached classifier softmaxes, labels and stage costs
    (:class:`~policycascade.cascade.CascadeOutputs`).
    ``alpha``: cost weight, a finite real number >= 0 (not a bool or a string).
    ``loss``: ``"zero-one"`` or ``"cross-entropy"``.
    ``render_mode``: ``None`` or ``"ansi"`` (the stage's top classes as text).

    Made through an id (``gymnasium.make``), the id's creator also takes ``split``:
    ``"train"``/``"val"``/``"test"`` for the digits id; for an id from
    :func:`~policycascade.envs.register_cascade` one of its registered splits
    (default: the first of ``fit``, ``val``, ``test`` registered).

    ## Version History
    v0: initial version. Later changes kept the MDP (rewards, observations) and
    only tightened inputs: booleans, strings and fractional numbers are rejected
    where numbers or integers are expected, unknown ``reset`` options are rejected,
    NumPy integer seeds are accepted; ids from ``register_cascade`` gained ``split``.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        outputs: CascadeOutputs,
        alpha: float = 1e-3,
        loss: str = "zero-one",
        render_mode: str | None = None,
    ):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        if not isinstance(outputs, CascadeOutputs):
            raise TypeError(
                f"outputs must be a CascadeOutputs (cached classifier softmaxes), "
                f"got {type(outputs).__name__}"
            )
        self.alpha = check_env_alpha(alpha)
        self.loss = check_loss_name(loss)
        self.render_mode = render_mode
        outputs = outputs.to("cpu")
        self._probs = outputs.probs.to(torch.float32)
        self._labels = outputs.labels
        self._costs = torch.tensor(outputs.costs.stage_costs, dtype=torch.float64)
        self._cumulative_macs = outputs.costs.cumulative_macs
        self.num_samples, self.num_stages, self.num_classes = outputs.probs.shape
        self.observation_space = observation_space(self.num_classes, self.num_stages)
        self.action_space = spaces.Discrete(2)
        self._sample: int | None = None
        self._stage = 0
        self._done = True

    def _observation(self) -> np.ndarray:
        obs = np.zeros(self.num_classes + self.num_stages, dtype=np.float32)
        obs[: self.num_classes] = self._probs[self._sample, self._stage].numpy()
        obs[self.num_classes + self._stage] = 1.0
        return obs

    def _info(self, exit_stage: int) -> dict[str, Any]:
        prediction = int(self._probs[self._sample, self._stage].argmax())
        label = int(self._labels[self._sample])
        macs = self._cumulative_macs[self._stage]
        return step_info(self._stage, self._sample, prediction, label, macs, exit_stage)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode on a random sample (or ``options["sample_index"]``) at stage 0."""
        super().reset(seed=check_seed(seed))
        index = check_reset_options(options, RESET_OPTIONS).get("sample_index")
        if index is None:
            index = int(self.np_random.integers(self.num_samples))
        elif not _is_index(index, self.num_samples):
            raise ValueError(
                f"options['sample_index'] must be an integer in [0, {self.num_samples}), "
                f"got {index!r}"
            )
        self._sample, self._stage, self._done = int(index), 0, False
        return self._observation(), self._info(exit_stage=-1)

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Stop (1) or continue (0) at the current stage."""
        if self._done:
            if self._sample is None:
                raise ResetNeeded("no episode has started: call reset() before step()")
            raise ResetNeeded("the episode has ended: call reset() before step()")
        if not self.action_space.contains(action):
            raise InvalidAction(f"action must be 0 (continue) or 1 (stop), got {action!r}")
        stage = self._stage
        done = int(action) == STOP or stage == self.num_stages - 1
        probs = self._probs[self._sample, stage].unsqueeze(0)
        label = self._labels[self._sample].unsqueeze(0)
        loss = prediction_loss(probs.double(), probs.argmax(-1), label, self.loss)
        reward = step_reward(self.alpha, self._costs[stage], loss, torch.tensor([done]))
        if done:
            self._done = True
            info = self._info(exit_stage=stage)
        else:
            self._stage += 1
            info = self._info(exit_stage=-1)
        return self._observation(), float(reward), done, False, info

    def render(self) -> str | None:
        """Text of the current stage and its three most probable classes."""
        if self.render_mode != "ansi" or self._sample is None:
            return None
        probs = self._probs[self._sample, self._stage]
        top = probs.topk(min(3, self.num_classes))
        classes = ", ".join(
            f"{int(c)}: {float(p):.3f}" for p, c in zip(top.values, top.indices, strict=True)
        )
        last = self.num_stages - 1
        return f"sample {self._sample} stage {self._stage}/{last}  top classes {classes}"


def env_from_source(
    outputs: Callable[[], CascadeOutputs], alpha: float, loss: str, render_mode: str | None
) -> CascadeStoppingEnv:
    """An env on ``outputs()``, called only once ``alpha`` and ``loss`` are known to be valid."""
    alpha, loss = check_env_alpha(alpha), check_loss_name(loss)  # before the outputs
    return CascadeStoppingEnv(outputs(), alpha=alpha, loss=loss, render_mode=render_mode)
