"""Stopping by estimated continuation value, fitted backwards on held-out cascade outputs.

Longstaff & Schwartz (2001), "Valuing American options by simulation: a simple
least-squares approach", applied to the cascade's stopping problem. Working back
from the last stage, at stage t the value of stopping is E[1{answer_t right}] -
alpha * cost_t and the value of continuing is the *realised* return of the policy
already fitted for stages t + 1.. (not the max of estimates, which is biased
upwards), both regressed on features of stage t's history. Stop iff the first is
at least the second.

Why not the paper's REINFORCE or a classifier on backward-induction targets: the
expected return's gradient in a stop logit, ``A pi (1 - pi)``, vanishes where a
module saturates, so training stalls; a per-stage network fitted to each sample's
target on ~2,000 outputs memorises which samples each stage got right. Here each
stage is a small calibrated model (multinomial logistic regression or one hidden
layer) on a few features (:mod:`policycascade.agents.stop_features`), with weight
decay and early stopping on a held-out part of the fitting data.

The per-stage model predicts two distributions from stage t's features:

- the joint outcome (answer_t right?, continuation's answer right?), 4 classes, whose
  marginals are the calibrated immediate and continuation accuracies; their
  difference p(right, wrong) - p(wrong, right) is estimated without the two
  separate errors of two regressions;
- the exit stage of the continuation policy, whose expectation gives the extra
  cost continuing would spend.

Stop score = p(right, wrong) - p(wrong, right) + alpha * E[cost_exit - cost_t].
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from policycascade.agents.stop_features import FEATURE_SETS, running_ensemble, stop_features
from policycascade.evaluation import first_stop
from policycascade.rewards import check_alpha

ANSWERS = ("exit", "ensemble")
OUTCOMES = 4  # (answer_t right, continuation right) as 2 * right_t + right_continuation


def stage_answers(probs: torch.Tensor, answer: str = "exit") -> torch.Tensor:
    """Class answered by stopping at each stage, (N, K, C) -> (N, K).

    ``"exit"``: that stage's arg-max; ``"ensemble"``: the arg-max of the mean of the
    softmaxes of every stage run so far.
    """
    if answer not in ANSWERS:
        raise ValueError(f"answer must be one of {list(ANSWERS)}, got {answer!r}")
    return (running_ensemble(probs) if answer == "ensemble" else probs).argmax(-1)


class _StageModel(nn.Module):
    """Standardised features -> logits of the joint outcome (4) and of the exit stage (m)."""

    def __init__(self, num_features: int, hidden: int, num_exits: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("scale", torch.ones(num_features))
        width = hidden or num_features
        self.body = nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU()) if hidden else None
        self.head = nn.Linear(width, OUTCOMES + num_exits)

    def macs(self) -> int:
        """Multiply-accumulates per sample: one per weight of each linear layer."""
        return sum(
            m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (N, 4 + m): the joint outcome's, then the exit stage's."""
        z = (features - self.mean) / self.scale
        return self.head(self.body(z) if self.body is not None else z)


class ContinuationValueRule(nn.Module):
    """Stop at stage t iff the estimated value of stopping is at least that of continuing.

    Satisfies the score-based ``StoppingRule`` protocol by duck typing: ``num_stages``,
    ``stop_scores``, ``policy_macs`` and ``predictions``. Build one with
    :func:`fit_continuation_rule`; ``to_dict``/``from_dict`` checkpoint it.

    Args:
        num_stages: K, the number of classifiers.
        num_classes: C.
        cumulative_costs: (K,) normalised cost of exiting at each stage (most expensive
            classifier = 1), the one the rule was fitted with.
        alpha: cost weight of the reward ``-loss - alpha * cost``.
        feature_set: one of :data:`~policycascade.agents.stop_features.FEATURE_SETS`.
        answer: ``"exit"`` (the exit classifier's arg-max) or ``"ensemble"`` (the running
            ensemble's).
        hidden: hidden units of each stage's model; 0 = multinomial logistic regression.
    """

    def __init__(
        self,
        num_stages: int,
        num_classes: int,
        cumulative_costs: Sequence[float] | torch.Tensor,
        alpha: float,
        feature_set: str = "history",
        answer: str = "exit",
        hidden: int = 0,
    ):
        super().__init__()
        if num_stages < 2:
            raise ValueError(f"a cascade needs at least 2 stages, got num_stages={num_stages}")
        if feature_set not in FEATURE_SETS:
            raise ValueError(
                f"feature_set must be one of {list(FEATURE_SETS)}, got {feature_set!r}"
            )
        if answer not in ANSWERS:
            raise ValueError(f"answer must be one of {list(ANSWERS)}, got {answer!r}")
        if hidden < 0:
            raise ValueError(f"hidden must be >= 0 (0 = logistic regression), got {hidden}")
        costs = torch.as_tensor(cumulative_costs, dtype=torch.float32).flatten()
        if costs.shape != (num_stages,) or not bool(torch.all(costs[1:] > costs[:-1])):
            raise ValueError(
                f"cumulative_costs must be {num_stages} increasing normalised costs (one per "
                f"stage, e.g. StageCosts.cumulative_macs / reference_macs), got {costs.tolist()}"
            )
        self.num_stages, self.num_classes = int(num_stages), int(num_classes)
        self.alpha = check_alpha(alpha)
        self.feature_set, self.answer, self.hidden = feature_set, answer, int(hidden)
        self.register_buffer("cumulative_costs", costs)
        self.stage_models = nn.ModuleList(
            _StageModel(self.num_features(t), self.hidden, num_stages - 1 - t)
            for t in range(num_stages - 1)
        )

    def num_features(self, stage: int) -> int:
        """Number of features the decision at ``stage`` reads."""
        dummy = torch.full((1, stage + 1, self.num_classes), 1.0 / self.num_classes)
        return stop_features(dummy, self.feature_set).shape[1]

    def stage_scores(self, stage: int, features: torch.Tensor) -> torch.Tensor:
        """Estimated value of stopping minus continuing at ``stage``, (N,), from its features."""
        logits = self.stage_models[stage](features)
        outcome = logits[:, :OUTCOMES].softmax(-1)
        exit_p = logits[:, OUTCOMES:].softmax(-1)  # exit at stage + 1, ..., K - 1
        extra_cost = self.cumulative_costs[stage + 1 :] - self.cumulative_costs[stage]
        # outcome classes: 0 = both wrong, 1 = only the continuation right,
        # 2 = only the stop right, 3 = both right
        return outcome[:, 2] - outcome[:, 1] + self.alpha * (exit_p * extra_cost).sum(-1)

    @torch.no_grad()
    def stop_scores(self, probs: torch.Tensor) -> torch.Tensor:
        """Stop scores (N, min(S, K - 1)) of the visited softmaxes (N, S, C); stop iff >= 0.

        The score of stage t reads ``probs[:, :t + 1]`` only.
        """
        if probs.ndim != 3 or probs.shape[2] != self.num_classes:
            raise ValueError(
                f"probs must be (sample, visited stage, {self.num_classes}) softmaxes, "
                f"got shape {tuple(probs.shape)}"
            )
        if probs.shape[1] > self.num_stages:
            raise ValueError(
                f"probs has {probs.shape[1]} stages but the rule was fitted for {self.num_stages}"
            )
        probs = probs.to(self.cumulative_costs.device, torch.float32)
        stages = range(min(probs.shape[1], self.num_stages - 1))
        columns = [
            self.stage_scores(t, stop_features(probs[:, : t + 1], self.feature_set)) for t in stages
        ]
        return torch.stack(columns, dim=1) if columns else probs.new_zeros(len(probs), 0)

    def exits(self, probs: torch.Tensor) -> torch.Tensor:
        """Exit stage (N,) on cached softmaxes of every stage (N, K, C)."""
        stop = self.stop_scores(probs) >= 0
        return first_stop(torch.cat([stop, torch.ones_like(stop[:, :1])], dim=1))

    def predictions(self, probs: torch.Tensor, exit_stage: torch.Tensor) -> torch.Tensor:
        """Class answered (N,) at ``exit_stage``: its arg-max, or the running ensemble's."""
        answers = stage_answers(probs, self.answer)
        return answers.gather(1, exit_stage.to(answers.device).view(-1, 1)).squeeze(1)

    def policy_macs(self) -> list[int]:
        """MACs of each stage's model (its linear layers); the features count 0.

        The features are closed-form statistics of softmaxes, as a threshold's are. Counted
        from the layer shapes, which is what torch's FLOP counter finds on these models
        (tests/test_continuation.py) without importing torch's compiler to do it.
        """
        return [model.macs() for model in self.stage_models] + [0]

    def config(self) -> dict[str, Any]:
        """Constructor arguments, JSON-ready."""
        return {
            "num_stages": self.num_stages,
            "num_classes": self.num_classes,
            "cumulative_costs": self.cumulative_costs.tolist(),
            "alpha": self.alpha,
            "feature_set": self.feature_set,
            "answer": self.answer,
            "hidden": self.hidden,
        }

    def to_dict(self) -> dict[str, Any]:
        """One checkpoint dict: the constructor arguments and the fitted weights."""
        return {"config": self.config(), "state_dict": self.state_dict()}

    @classmethod
    def from_dict(cls, checkpoint: dict[str, Any]) -> ContinuationValueRule:
        """The rule saved by :meth:`to_dict`."""
        rule = cls(**checkpoint["config"])
        rule.load_state_dict(checkpoint["state_dict"])
        return rule.eval()

    def to_json_parameters(self) -> dict[str, Any]:
        """JSON-ready parameters for a rule file: the config and each stage model's weights.

        Every tensor is ``{"shape": [...], "values": nested lists}`` (float32 values, exact
        as JSON floats); ``hidden`` is null for logistic regression. ``policycascade.serving``
        computes the same scores from them with numpy.
        """

        def tensor(t: torch.Tensor) -> dict[str, Any]:
            return {"shape": list(t.shape), "values": t.detach().cpu().tolist()}

        def layer(linear: nn.Linear) -> dict[str, Any]:
            return {"weight": tensor(linear.weight), "bias": tensor(linear.bias)}

        models = [
            {
                "mean": tensor(m.mean),
                "scale": tensor(m.scale),
                "hidden": None if m.body is None else layer(m.body[0]),
                "head": layer(m.head),
            }
            for m in self.stage_models
        ]
        return {"config": self.config(), "stage_models": models}

    @classmethod
    def from_json_parameters(cls, params: dict[str, Any]) -> ContinuationValueRule:
        """The rule :meth:`to_json_parameters` described; a ValueError where a shape differs."""
        rule = cls(**params["config"])
        if len(params["stage_models"]) != len(rule.stage_models):
            raise ValueError(
                f"the rule has {len(rule.stage_models)} stage models, the parameters "
                f"{len(params['stage_models'])}"
            )
        state = {}
        for t, stored in enumerate(params["stage_models"]):
            layers = {"head": stored["head"]}
            if stored.get("hidden") is not None:
                layers["body.0"] = stored["hidden"]
            state[f"{t}.mean"], state[f"{t}.scale"] = stored["mean"], stored["scale"]
            for name, weights in layers.items():
                state[f"{t}.{name}.weight"] = weights["weight"]
                state[f"{t}.{name}.bias"] = weights["bias"]
        own = rule.stage_models.state_dict()
        if set(state) != set(own):
            raise ValueError(f"stage model weights {sorted(state)} do not match {sorted(own)}")
        loaded = {}
        for key, stored in state.items():
            value = torch.tensor(stored["values"], dtype=torch.float32)
            if list(value.shape) != list(stored["shape"]) or value.shape != own[key].shape:
                raise ValueError(
                    f"{key} has shape {list(value.shape)} (stored {stored['shape']}), the "
                    f"rule needs {list(own[key].shape)}"
                )
            loaded[key] = value
        rule.stage_models.load_state_dict(loaded)
        return rule.eval()


def _fit_stage_model(
    model: _StageModel,
    features: torch.Tensor,
    targets: torch.Tensor,
    train: torch.Tensor,
    val: torch.Tensor,
    weight_decay: float,
    max_rounds: int = 25,
    patience: int = 1,
    min_improvement: float = 1e-4,
) -> None:
    """Fit by full-batch L-BFGS on the joint cross-entropy, early-stopped on ``val``.

    ``targets`` is (N, 2): the joint outcome class and the continuation's exit offset.
    Each round is up to 20 L-BFGS iterations; fitting ends after ``patience`` rounds that
    improve the held-out loss by less than ``min_improvement`` nats, keeping the best round.
    """
    x_train, y_train, x_val, y_val = features[train], targets[train], features[val], targets[val]
    std = x_train.std(0)
    model.mean.copy_(x_train.mean(0))
    model.scale.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))  # constant -> 0

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        return F.cross_entropy(logits[:, :OUTCOMES], y[:, 0]) + F.cross_entropy(
            logits[:, OUTCOMES:], y[:, 1]
        )

    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    optimiser = torch.optim.LBFGS(
        model.parameters(), lr=1.0, max_iter=20, history_size=10, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        total = loss(x_train, y_train) + weight_decay * sum(w.square().sum() for w in weights)
        total.backward()
        return total

    best, best_state, stale = float("inf"), copy.deepcopy(model.state_dict()), 0
    for _ in range(max_rounds):
        optimiser.step(closure)
        with torch.no_grad():
            current = float(loss(x_val, y_val))
        stale = stale + 1 if current > best - min_improvement else 0
        if current < best:
            best, best_state = current, copy.deepcopy(model.state_dict())
        if stale >= patience:
            break
    model.load_state_dict(best_state)


def fit_continuation_rule(
    probs: torch.Tensor,
    labels: torch.Tensor,
    cumulative_costs: Sequence[float] | torch.Tensor,
    alpha: float,
    feature_set: str = "history",
    answer: str = "exit",
    hidden: int = 0,
    weight_decay: float = 1e-5,
    holdout_fraction: float = 0.2,
    seed: int = 0,
) -> ContinuationValueRule:
    """Fit a :class:`ContinuationValueRule` on held-out cached outputs, last stage first.

    ``probs`` (N, K, C) and ``labels`` (N,) are outputs the classifiers were not trained
    on; ``cumulative_costs`` (K,) are normalised (most expensive classifier = 1).
    ``holdout_fraction`` of the samples (drawn with ``seed``) only early-stop each
    stage's model. Deterministic for a given seed.
    """
    if probs.ndim != 3:
        raise ValueError(f"probs must be (sample, stage, class), got {tuple(probs.shape)}")
    n, k, c = probs.shape
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    num_val = int(round(n * holdout_fraction))
    if num_val < 1 or num_val > n - 1:
        raise ValueError(
            f"{n} samples are too few to hold out {holdout_fraction:.0%} for early stopping"
        )
    probs, labels = probs.detach().cpu().float(), labels.detach().cpu()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    val, train = order[:num_val], order[num_val:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rule = ContinuationValueRule(k, c, cumulative_costs, alpha, feature_set, answer, hidden)
    right = (stage_answers(probs, answer) == labels.unsqueeze(1)).long()  # (N, K)
    # Longstaff & Schwartz (2001): the continuation is what the fitted policy *realises*
    # from t + 1 on, on the same paths; start from the last stage, which always stops.
    exit_stage = torch.full((n,), k - 1, dtype=torch.long)
    right_exit = right[:, -1]
    for t in reversed(range(k - 1)):
        features = stop_features(probs[:, : t + 1], feature_set)
        targets = torch.stack([2 * right[:, t] + right_exit, exit_stage - (t + 1)], dim=1)
        _fit_stage_model(rule.stage_models[t], features, targets, train, val, weight_decay)
        with torch.no_grad():
            stop = rule.stage_scores(t, features) >= 0
        exit_stage = torch.where(stop, t, exit_stage)
        right_exit = torch.where(stop, right[:, t], right_exit)
    return rule.eval()
