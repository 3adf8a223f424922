"""REINFORCE for the stopping MDP: sampled exits, the score-function loss, and the exact objective.

Guan et al. section 3.3. For one sample the episode is: stop decisions
``a_t ~ Bernoulli(pi_t)`` until the first stop (the last stage always stops),
then, when the classifiers are trained, a label ``y_hat ~ C_k(.|x)`` from the
exit classifier k. The estimator is

    grad J ~ (R - b) * grad[ sum_{t<k} log(1 - pi_t) + log pi_k + log C_k(y_hat|x) ]

with ``R = -loss(y_hat, y) - alpha * sum_{t<=k} cost_t`` (eq. (1)). With
cross-entropy as the loss ``R`` is differentiable in the classifiers and its
pathwise gradient is added. Because K is small the exact objective can be
enumerated over the K exit points (:func:`expected_return`), which the tests
use to check that every estimator here is unbiased.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import repeat
from torch import nn

from policycascade.agents.baselines import Baseline, make_baseline
from policycascade.agents.rules import first_stop
from policycascade.agents.stopping_policy import StoppingPolicy
from policycascade.rewards import check_alpha, check_loss_name, episode_return, prediction_loss

POLICY_GRADIENTS = ("score-function", "exact")


def exit_probabilities(stop_probs: torch.Tensor) -> torch.Tensor:
    """P(exit at stage k) = pi_k * prod_{t<k} (1 - pi_t), shape (batch, K).

    ``stop_probs`` is (batch, K) with the last column 1 (or (batch, K - 1), in
    which case the forced stop at the last stage is appended).
    """
    if not torch.all(stop_probs[:, -1] == 1):
        stop_probs = torch.cat([stop_probs, torch.ones_like(stop_probs[:, :1])], dim=1)
    reach = torch.cumprod(1.0 - stop_probs, dim=1)
    reach = torch.cat([torch.ones_like(reach[:, :1]), reach[:, :-1]], dim=1)
    return reach * stop_probs


def sample_exits(
    stop_logits: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sample each episode's exit stage from stop logits (batch, K - 1)."""
    return _sample_exits(torch.sigmoid(stop_logits.detach()), generator)


def _sample_exits(stop: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return _sample_decisions(stop, generator)[0]


def _sample_decisions(
    stop: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sampled stop decisions from stop probabilities (batch, K - 1).

    Returns the exit stage (batch,) and two 0/1 masks (batch, K - 1): the stages whose
    decision was to go on, and the stages reached (those, and the one it stopped at;
    the last stage always stops). Each stop is ``uniform < pi_t``, one draw per decision.
    """
    uniform = torch.rand(stop.shape, generator=generator, device=stop.device)
    continued = (~(uniform < stop)).cumprod(1)  # int64: 1 until the first stop
    reached = F.pad(continued, (1, -1), value=1)  # stage t is reached if all before went on
    return continued.sum(1), continued, reached


def sample_categorical(
    probs: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One class per row of ``probs`` (batch, C): ``torch.multinomial(probs, 1)``, unchecked.

    The same exponential race (argmax of p / Exp(1)) and the same random numbers as
    torch's own one-sample path, so the draws are identical, but without the two
    host synchronisations with which multinomial validates its input on every call.
    (A non-finite input makes the loss non-finite, which the harness checks.)
    """
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return torch.div(probs, race, out=race).argmax(-1)


def _decision_masks(
    exit_stage: torch.Tensor, num_decisions: int
) -> tuple[torch.Tensor, torch.Tensor]:
    stages = torch.arange(num_decisions, device=exit_stage.device).unsqueeze(0)
    exit_stage = exit_stage.unsqueeze(1)
    return stages < exit_stage, stages == exit_stage  # (continued, stopped), each (batch, K - 1)


def decision_log_prob(stop_logits: torch.Tensor, exit_stage: torch.Tensor) -> torch.Tensor:
    """Log P(the decisions that lead to ``exit_stage``) = sum_{t<k} log(1-pi_t) + log pi_k."""
    return _decision_log_prob(stop_logits, *_decision_masks(exit_stage, stop_logits.shape[1]))


def _decision_log_prob(
    stop_logits: torch.Tensor, continued: torch.Tensor, stopped: torch.Tensor
) -> torch.Tensor:
    log_continue, log_stop = F.logsigmoid(-stop_logits), F.logsigmoid(stop_logits)
    return (log_continue * continued + log_stop * stopped).sum(1)


def decision_score_sq_norm(stop_logits: torch.Tensor, exit_stage: torch.Tensor) -> torch.Tensor:
    """|d log P(decisions) / d stop logits|^2 per episode (the output-layer score)."""
    masks = _decision_masks(exit_stage, stop_logits.shape[1])
    return _decision_score_sq_norm(torch.sigmoid(stop_logits.detach()), *masks)


def _decision_score_sq_norm(
    stop: torch.Tensor, continued: torch.Tensor, stopped: torch.Tensor
) -> torch.Tensor:
    score = -stop * continued + (1.0 - stop) * stopped
    return score.square().sum(1)


def _decision_terms(
    stop_logits: torch.Tensor, stop: torch.Tensor, continued: torch.Tensor, reached: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decisions' log-probability (differentiable) and its score d/d(stop logits).

    From the masks of :func:`_sample_decisions`; the same values as :func:`_decision_log_prob` and
    :func:`_decision_score_sq_norm`'s score, with one log-sigmoid of the signed logits
    (+s where it stopped, -s where it went on) instead of two.
    """
    stopped = reached - continued
    signed = stop_logits * (stopped - continued)  # unreached stages: 0, masked out below
    log_prob = (F.logsigmoid(signed) * reached).sum(1)
    return log_prob, stopped - stop * reached


def expected_loss_per_stage(
    log_probs: torch.Tensor, labels: torch.Tensor, loss: str, sample_prediction: bool
) -> torch.Tensor:
    """E[loss] of answering with each stage's classifier, shape (batch, K).

    With a sampled prediction the 0/1 loss is in expectation 1 - p(y); with the
    arg-max prediction it is deterministic; cross-entropy is -log p(y) either way.
    """
    index = repeat(labels, "b -> b k 1", k=log_probs.shape[1])
    label_log_prob = log_probs.gather(-1, index).squeeze(-1)  # (batch, K)
    if loss == "cross-entropy":
        return -label_log_prob
    if sample_prediction:
        return 1.0 - label_log_prob.exp()  # exp of the label's entry only
    return (log_probs.exp().argmax(-1) != labels.unsqueeze(1)).to(log_probs.dtype)


def expected_return(
    log_probs: torch.Tensor,
    stop_probs: torch.Tensor,
    labels: torch.Tensor,
    cumulative_costs: torch.Tensor,
    alpha: float,
    loss: str = "zero-one",
    sample_prediction: bool = True,
) -> torch.Tensor:
    """Exact expected return of each sample under the stochastic policy, shape (batch,).

    Enumerates the K exit points: sum_k P(exit k) * (-E[loss_k] - alpha * cumulative_cost_k).
    Differentiable in both the classifiers' ``log_probs`` (batch, K, C) and ``stop_probs``.
    """
    exit_p = exit_probabilities(stop_probs)
    stage_loss = expected_loss_per_stage(log_probs, labels, loss, sample_prediction)
    stage_return = episode_return(
        alpha, cumulative_costs.to(stage_loss.dtype).unsqueeze(0), stage_loss
    )
    return (exit_p * stage_return).sum(1)


def _expected_return_from_logits(
    stop_logits: torch.Tensor,
    log_probs: torch.Tensor,
    labels: torch.Tensor,
    cumulative_costs: torch.Tensor,
    alpha: float,
    loss: str,
    sample_prediction: bool,
) -> torch.Tensor:
    """:func:`expected_return` from the stop logits (batch, K - 1), in fewer operations.

    The training step's form of the same value (up to rounding; tested): the exit
    probabilities in log space, log P(exit k) = sum_{t<k} log(1 - pi_t) + log pi_k, one
    cumulative sum instead of a product per stage, and each stage's return read from
    the label's log-probability alone. On the digits step the autograd graph of the
    plain form cost more than the stopping modules.
    """
    continue_log = F.logsigmoid(-stop_logits)  # log(1 - pi_t)
    before = F.pad(continue_log.cumsum(1), (1, 0))  # sum_{t<k}: (batch, K)
    exit_p = (before + F.pad(F.logsigmoid(stop_logits), (0, 1))).exp()  # last stage: pi = 1
    index = labels.view(-1, 1, 1).expand(-1, log_probs.shape[1], 1)
    label_log_prob = log_probs.gather(-1, index).squeeze(-1)  # (batch, K)
    cost = alpha * cumulative_costs.to(log_probs.dtype)
    if loss == "cross-entropy":  # return = log p(y) - alpha c
        stage_return = label_log_prob - cost
    elif sample_prediction:  # return = -(1 - p(y)) - alpha c
        stage_return = label_log_prob.exp() - (1.0 + cost)
    else:  # the arg-max answer: no gradient reaches the classifiers
        wrong = log_probs.exp().argmax(-1) != labels.unsqueeze(1)
        stage_return = -wrong.to(log_probs.dtype) - cost
    return (exit_p * stage_return).sum(1)


class _Episode(NamedTuple):
    """One sampled episode per row of a batch (rollout-major when there are several)."""

    exit_stage: torch.Tensor  # (M * B,)
    log_prob: torch.Tensor  # (M * B,) log P(decisions [and sampled label]), differentiable
    score_sq: torch.Tensor  # (M * B,) squared norm of its score at the output logits
    returns: torch.Tensor  # (M * B,)


@dataclass
class ReinforceStep:
    """One REINFORCE evaluation on a batch: the loss to minimise and what to log."""

    loss: torch.Tensor  # surrogate whose gradient is minus the estimated policy gradient
    baseline_loss: torch.Tensor  # fitting loss of a learned baseline (0 otherwise)
    returns: torch.Tensor  # (M, B) sampled returns; exact gradient: (1, B) expected returns
    advantages: torch.Tensor  # (M, B) R - b; exact gradient: 0
    exit_stage: torch.Tensor  # (M * B,)
    probs: torch.Tensor  # (M * B, K, C) detached softmaxes the decisions were made on


class ReinforceAgent(nn.Module):
    """Stopping policy + baseline + the REINFORCE loss for one alpha.

    ``train_classifiers`` chooses joint training (classifiers receive the
    score-function gradient of a sampled label, Guan et al.) or "Ours (S)"
    (frozen classifiers: the prediction is their arg-max and only the policy learns).
    """

    def __init__(
        self,
        num_stages: int,
        num_classes: int,
        alpha: float,
        loss: str = "zero-one",
        baseline: str = "optimal-constant",
        rollouts: int = 1,
        policy_hidden: int = 64,
        train_classifiers: bool = True,
        policy_gradient: str = "score-function",
        policy_inputs: str = "log-probs",
    ):
        super().__init__()
        self.alpha = check_alpha(alpha)
        self.loss_name = check_loss_name(loss)
        self.policy = StoppingPolicy(num_stages, num_classes, policy_hidden, policy_inputs)
        self.baseline: Baseline = make_baseline(baseline, num_classes)
        if rollouts < self.baseline.min_rollouts:
            raise ValueError(
                f"baseline {baseline!r} needs rollouts >= {self.baseline.min_rollouts}, "
                f"got {rollouts}"
            )
        if rollouts < 1:
            raise ValueError(f"rollouts must be >= 1, got {rollouts}")
        if policy_gradient not in POLICY_GRADIENTS:
            raise ValueError(
                f"policy_gradient must be one of {list(POLICY_GRADIENTS)}, got {policy_gradient!r}"
            )
        self.policy_gradient = policy_gradient
        self.rollouts = rollouts
        self.train_classifiers = train_classifiers

    @property
    def sample_prediction(self) -> bool:
        """Whether the reward scores a prediction drawn from the exit classifier.

        True when classifiers are trained under the 0/1 loss: the label is drawn and
        its log-probability enters the score function (Guan et al.). Frozen
        classifiers answer with their arg-max, as at test time.
        """
        return self.train_classifiers and self.loss_name == "zero-one"

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        cumulative_costs: torch.Tensor,
        generator: torch.Generator | None = None,
        normalised: bool = False,
    ) -> ReinforceStep:
        """The REINFORCE surrogate loss on a batch of classifier logits (batch, K, C).

        ``normalised``: ``logits`` are log-probabilities already (the log-softmax a caller
        shares with its cross-entropy loss), taken as they are instead of normalised again.
        """
        m = self.rollouts
        log_probs = logits if normalised else logits.log_softmax(-1)
        if not self.train_classifiers:
            log_probs = log_probs.detach()
        # The policy reads the softmax (as its log); in joint training its gradient reaches
        # the classifiers too, through ``log_probs``.
        probs = log_probs.detach().exp()
        stop_logits = self.policy(probs, log_probs)
        if self.policy_gradient == "exact":
            return self._exact_step(stop_logits, log_probs, probs, labels, cumulative_costs)
        log_probs_m, probs_m, labels_m = log_probs, probs, labels
        if m > 1:  # rollout-major copies, (m b); one rollout needs no copy
            stop_logits = repeat(stop_logits, "b k -> (m b) k", m=m)
            log_probs_m = repeat(log_probs, "b k c -> (m b) k c", m=m)
            probs_m = repeat(probs, "b k c -> (m b) k c", m=m)
            labels_m = repeat(labels, "b -> (m b)", m=m)
        episode = self._episode(
            stop_logits, log_probs_m, probs_m, labels_m, cumulative_costs, generator
        )
        returns = episode.returns.view(m, -1)
        baseline, baseline_loss = self.baseline(returns, episode.score_sq.view(m, -1), probs[:, 0])
        advantages = (returns.detach() - baseline).reshape(-1)
        # Score-function term, plus the pathwise term when the return is differentiable.
        log_prob = episode.log_prob
        surrogate = -(advantages.to(log_prob.dtype) * log_prob + episode.returns).mean()
        return ReinforceStep(
            loss=surrogate,
            baseline_loss=baseline_loss,
            returns=returns.detach(),
            advantages=advantages.view(m, -1),
            exit_stage=episode.exit_stage,
            probs=probs_m,
        )

    def _episode(
        self,
        stop_logits: torch.Tensor,
        log_probs: torch.Tensor,
        probs: torch.Tensor,
        labels: torch.Tensor,
        cumulative_costs: torch.Tensor,
        generator: torch.Generator | None,
    ) -> _Episode:
        """One sampled episode per row: the exit (and label) drawn, its return and log-probability.

        ``probs`` is ``log_probs.exp()`` without gradient. With a sampled prediction the
        label's log-probability joins the decisions' in the score function (Guan et al.);
        the squared score norms are what the baseline weighs.
        """
        stop = torch.sigmoid(stop_logits.detach())
        exit_stage, continued, reached = _sample_decisions(stop, generator)
        log_prob, score = _decision_terms(stop_logits, stop, continued, reached)
        score_sq = score.square().sum(1)
        rows = torch.arange(len(exit_stage), device=exit_stage.device)
        if self.sample_prediction:
            exit_probs = probs[rows, exit_stage]  # (M*B, C)
            predictions = sample_categorical(exit_probs, generator)
            log_prob = log_prob + log_probs[rows, exit_stage, predictions]
            chosen = exit_probs[rows, predictions]
            score_sq = score_sq + 1.0 - 2.0 * chosen + exit_probs.square().sum(1)
            loss = prediction_loss(exit_probs, predictions, labels, self.loss_name)
        else:
            exit_log_probs = log_probs[rows, exit_stage]  # (M*B, C)
            predictions = exit_log_probs.argmax(-1)
            loss = prediction_loss(exit_log_probs.exp(), predictions, labels, self.loss_name)
        returns = episode_return(self.alpha, cumulative_costs[exit_stage], loss)  # (M*B,)
        return _Episode(exit_stage, log_prob, score_sq, returns)

    def _exact_step(
        self,
        stop_logits: torch.Tensor,
        log_probs: torch.Tensor,
        probs: torch.Tensor,
        labels: torch.Tensor,
        cumulative_costs: torch.Tensor,
    ) -> ReinforceStep:
        """Minus the exact expected return, enumerated over the K exits instead of sampled.

        Its gradient is the one every baseline only approximates (variance 0 in the stop
        decisions), so nothing is sampled and no baseline is fitted: the step's returns
        are each sample's expected return (one row, whatever ``rollouts``), its
        advantages 0, and its exits those of the greedy policy (stop where pi_t >= 1/2).
        """
        expected = _expected_return_from_logits(
            stop_logits,
            log_probs,
            labels,
            cumulative_costs,
            self.alpha,
            self.loss_name,
            self.sample_prediction,
        )
        returns = expected.detach().unsqueeze(0)
        go_on = stop_logits.detach() < 0  # pi_t < 1/2
        greedy = first_stop(torch.cat([~go_on, torch.ones_like(go_on[:, :1])], 1))
        return ReinforceStep(
            loss=-expected.mean(),
            baseline_loss=expected.new_zeros(()),
            returns=returns,
            advantages=torch.zeros_like(returns),
            exit_stage=greedy,
            probs=probs,
        )

    @torch.no_grad()
    def stop_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """Probability of stopping at each stage, (batch, K), last column 1."""
        return self.policy.stop_probs(probs)


def policy_gradient_variance(
    policy: StoppingPolicy, probs: torch.Tensor, exit_stage: torch.Tensor, advantages: torch.Tensor
) -> float:
    """Trace of the per-sample covariance of the estimator's gradient w.r.t. the stopping modules.

    Each sample's estimate is ``advantage * grad log P(decisions)``; the sum of
    their per-parameter variances is what a baseline is meant to shrink. NaN for a
    batch of one sample (no spread to estimate).
    """
    if len(probs) < 2:
        return float("nan")
    params = {name: p.detach() for name, p in policy.named_parameters()}

    def one_sample(params, probs_i, exit_i, advantage_i):
        logits = torch.func.functional_call(policy, params, (probs_i.unsqueeze(0),))
        return advantage_i * decision_log_prob(logits, exit_i.unsqueeze(0)).sum()

    grads = torch.func.vmap(torch.func.grad(one_sample), in_dims=(None, 0, 0, 0))(
        params, probs, exit_stage, advantages.to(probs.dtype)
    )
    return float(sum(g.reshape(len(probs), -1).var(0).sum() for g in grads.values()))
