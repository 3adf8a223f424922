"""The learned stopping policy: one small MLP per stage that reads the stage's softmax."""

from __future__ import annotations

import torch
from torch import nn

from policycascade.costs import count_macs

LOG_PROB_FLOOR = -20.0  # log-probabilities below this (p < 2e-9) read as the floor
LOG_PROB_SCALE = 10.0  # inputs are log p / 10, about [-2, 0]


POLICY_INPUTS = ("sorted-log-probs", "log-probs")


def policy_features(
    probs: torch.Tensor, inputs: str = "log-probs", log_probs: torch.Tensor | None = None
) -> torch.Tensor:
    """What a stopping module reads: the softmax on a (clamped, scaled) log scale.

    ``inputs="sorted-log-probs"`` sorts each softmax in descending order first, so
    the module sees the confidence profile (top-1, top-2, ...) whichever classes
    hold it. Max-softmax and margin rules are then simple functions of the input;
    on raw class order the module would have to learn a max over class positions.

    Same information as the probabilities, but confidences such as 0.99 and
    0.9999, which decide stopping at small alpha, are far apart on this scale
    and nearly equal on the linear one (measured on digits: modules fed raw
    probabilities collapsed to one constant decision for every sample).

    ``log_probs``: the log of ``probs`` where the caller has it (a log-softmax), read
    instead of taking the log again: the same features up to rounding, and in training
    three fewer operations to differentiate.
    """
    if log_probs is None:
        log_probs = probs.clamp_min(1e-30).log()  # (the floor below is far above log 1e-30)
    if inputs == "sorted-log-probs":
        log_probs = log_probs.sort(dim=-1, descending=True).values
    return log_probs.clamp_min(LOG_PROB_FLOOR) / LOG_PROB_SCALE


class StoppingPolicy(nn.Module):
    """K - 1 stopping modules (the last stage always stops, so it needs none).

    Each stage's module is three fully connected layers with ReLU between them -> the
    logit of *stop* (Guan et al. 4.3: 64 hidden units on CIFAR, 256 on ImageNet; one
    logit through a sigmoid is their 2-way softmax). The K - 1 modules' weights are
    stored stacked, (K - 1, in, out) per layer, so one batched matmul per layer runs
    every stage: three kernels instead of 3 (K - 1), and one optimiser tensor per layer.
    Same distribution and initialisation as K - 1 separate ``nn.Linear`` stacks.
    """

    LAYERS = ("layer1", "layer2", "layer3")

    def __init__(
        self, num_stages: int, num_classes: int, hidden: int = 64, inputs: str = "log-probs"
    ):
        super().__init__()
        if num_stages < 2:
            raise ValueError(f"a cascade needs at least 2 stages, got K={num_stages}")
        if hidden < 1:
            raise ValueError(f"policy_hidden must be >= 1, got {hidden}")
        if inputs not in POLICY_INPUTS:
            raise ValueError(f"policy_inputs must be one of {list(POLICY_INPUTS)}, got {inputs!r}")
        self.num_stages, self.num_classes, self.hidden = num_stages, num_classes, hidden
        self.inputs = inputs
        decisions = num_stages - 1
        for name, (fan_in, fan_out) in zip(
            self.LAYERS, [(num_classes, hidden), (hidden, hidden), (hidden, 1)], strict=True
        ):
            # nn.Linear's default: weight and bias uniform in +-1/sqrt(fan_in)
            bound = fan_in**-0.5
            weight = torch.empty(decisions, fan_in, fan_out).uniform_(-bound, bound)
            bias = torch.empty(decisions, 1, fan_out).uniform_(-bound, bound)
            self.register_parameter(f"{name}_weight", nn.Parameter(weight))
            self.register_parameter(f"{name}_bias", nn.Parameter(bias))

    def _layers(self, stages: slice | int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(weight, bias) of each layer, of the stages ``stages`` (default: all, not sliced)."""
        layers = [(getattr(self, f"{n}_weight"), getattr(self, f"{n}_bias")) for n in self.LAYERS]
        if stages is None:
            return layers
        return [(weight[stages], bias[stages]) for weight, bias in layers]

    def forward(self, probs: torch.Tensor, log_probs: torch.Tensor | None = None) -> torch.Tensor:
        """Stop logits (batch, min(S, K - 1)) from the visited stages' softmaxes (batch, S, class).

        Stage t's logit reads stage t's softmax only, so a prefix of the stages (early-exit
        inference) gives the same logits as the whole cascade's cached outputs.
        ``log_probs``: their log where the caller has it (:func:`policy_features`).
        """
        decisions = self.num_stages - 1
        stages = min(probs.shape[1], decisions)
        if stages < decisions:
            # Every module runs, on a prefix too (padded with the last visited softmax, whose
            # logits are dropped): one batched matmul of one shape, so a prefix's logits are
            # bit for bit the whole cascade's. A single stage would take another matmul path,
            # about 1e-8 off, enough to flip a decision at a logit of 0.
            pad = probs[:, -1:].expand(-1, decisions - stages, -1)
            probs = torch.cat([probs, pad], dim=1)
            if log_probs is not None:
                pad = log_probs[:, -1:].expand(-1, decisions - stages, -1)
                log_probs = torch.cat([log_probs, pad], dim=1)
        if log_probs is not None:
            log_probs = log_probs[:, :decisions]
        features = policy_features(probs[:, :decisions], self.inputs, log_probs)
        hidden = features.transpose(0, 1)  # (K-1, B, C)
        layers = self._layers()
        for i, (weight, bias) in enumerate(layers):
            hidden = torch.baddbmm(bias, hidden, weight)
            if i < len(layers) - 1:
                hidden = hidden.relu()
        stop_logits = hidden.squeeze(-1).transpose(0, 1)
        return stop_logits if stages == decisions else stop_logits[:, :stages]

    def stop_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """Probability of stopping at each stage (batch, K); the last column is 1."""
        stop = torch.sigmoid(self(probs))
        return torch.cat([stop, torch.ones_like(stop[:, :1])], dim=1)

    def policy_macs(self) -> list[int]:
        """Measured MACs of each stage's stopping module (0 for the last stage)."""
        sample = torch.full((1, 1, self.num_classes), 1.0 / self.num_classes)
        sample = sample.to(self.layer1_weight.device)
        return [count_macs(_OneStage(self, t), sample) for t in range(self.num_stages - 1)] + [0]


class _OneStage(nn.Module):
    """Stage ``stage``'s stopping module of ``policy`` as a module (for measuring its MACs)."""

    def __init__(self, policy: StoppingPolicy, stage: int):
        super().__init__()
        self.policy, self.stage = policy, stage
        self.train(policy.training)  # count_macs restores this flag on the policy too

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        hidden = policy_features(probs[:, 0], self.policy.inputs)
        layers = self.policy._layers(self.stage)
        for i, (weight, bias) in enumerate(layers):
            hidden = torch.addmm(bias.squeeze(0), hidden, weight)
            if i < len(layers) - 1:
                hidden = hidden.relu()
        return hidden


def stopping_module_macs(num_classes: int, hidden: int) -> int:
    """MACs of one stopping module of this width, measured."""
    return StoppingPolicy(2, num_classes, hidden).policy_macs()[0]


def ensemble_predictions(
    probs: torch.Tensor, stop_probs: torch.Tensor, exit_stage: torch.Tensor
) -> torch.Tensor:
    """Predictions that mix every visited classifier, weighted by its stop probability.

    Guan et al. section 3.4: the stop probability reads as the confidence of its
    stage, so the visited stages' softmaxes are averaged with those weights
    (the exit stage, always visited, has weight 1 if it is the last).
    ``probs`` is (sample, K, C), ``stop_probs`` (sample, K) with the last column 1.
    """
    k = probs.shape[1]
    visited = torch.arange(k, device=probs.device).unsqueeze(0) <= exit_stage.unsqueeze(1)
    weights = stop_probs * visited
    mixed = (weights.unsqueeze(-1) * probs).sum(1)
    return mixed.argmax(-1)


class LearnedRule(nn.Module):
    """A trained stopping policy as a :class:`StoppingRule`: stop where pi >= 1/2 (logit >= 0).

    With ``ensemble`` the answer mixes the visited classifiers weighted by their stop
    probabilities (Guan et al. 3.4) instead of the exit classifier's arg-max.
    """

    def __init__(self, policy: StoppingPolicy, ensemble: bool = False):
        super().__init__()
        self.policy, self.ensemble = policy, ensemble
        self.num_stages = policy.num_stages

    @torch.no_grad()
    def stop_scores(self, history: torch.Tensor) -> torch.Tensor:
        """The stop logits: >= 0 exactly where the stop probability is >= 1/2."""
        return self.policy(history)

    def policy_macs(self) -> list[int]:
        """The stopping modules' measured MACs."""
        return self.policy.policy_macs()

    @torch.no_grad()
    def predictions(self, probs: torch.Tensor, exit_stage: torch.Tensor) -> torch.Tensor | None:
        """The ensemble's answers with ``ensemble``, else None (the exit classifier's arg-max)."""
        if not self.ensemble:
            return None
        return ensemble_predictions(probs, self.policy.stop_probs(probs), exit_stage)
