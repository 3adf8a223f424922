"""The learned stopping policy: one small MLP per stage that reads the stage's softmax."""

from __future__ import annotations

import torch
from torch import nn

from policycascade.costs import count_macs


class StoppingModule(nn.Sequential):
    """Three fully connected layers with ReLU between them -> the logit of *stop*.

    Guan et al. section 4.3 (64 hidden units on CIFAR, 256 on ImageNet). One
    logit through a sigmoid is the same distribution as their 2-way softmax.
    """

    def __init__(self, num_classes: int, hidden: int = 64):
        super().__init__(
            nn.Linear(num_classes, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )


LOG_PROB_FLOOR = -20.0  # log-probabilities below this (p < 2e-9) read as the floor
LOG_PROB_SCALE = 10.0  # inputs are log p / 10, about [-2, 0]


POLICY_INPUTS = ("sorted-log-probs", "log-probs")


def policy_features(probs: torch.Tensor, inputs: str = "log-probs") -> torch.Tensor:
    """What a stopping module reads: the softmax on a (clamped, scaled) log scale.

    ``inputs="sorted-log-probs"`` sorts each softmax in descending order first, so
    the module sees the confidence profile (top-1, top-2, ...) whichever classes
    hold it. Max-softmax and margin rules are then simple functions of the input;
    on raw class order the module would have to learn a max over class positions.

    Same information as the probabilities, but confidences such as 0.99 and
    0.9999, which decide stopping at small alpha, are far apart on this scale
    and nearly equal on the linear one (measured on digits: modules fed raw
    probabilities collapsed to one constant decision for every sample).
    """
    if inputs == "sorted-log-probs":
        probs = probs.sort(dim=-1, descending=True).values
    return probs.clamp_min(1e-30).log().clamp_min(LOG_PROB_FLOOR) / LOG_PROB_SCALE


class StoppingPolicy(nn.Module):
    """K - 1 stopping modules (the last stage always stops, so it needs none).

    Each stage's module is a :class:`StoppingModule`'s three layers, but the K - 1
    modules' weights are stored stacked, (K - 1, in, out) per layer, so one batched
    matmul per layer runs every stage: three kernels instead of 3 (K - 1), and one
    optimiser tensor per layer. Same distribution and initialisation as K - 1
    separate ``nn.Linear`` stacks.
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

    def _layers(self, stages: slice | int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (getattr(self, f"{name}_weight")[stages], getattr(self, f"{name}_bias")[stages])
            for name in self.LAYERS
        ]

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        """Stop logits (batch, K - 1) from the softmaxes ``probs`` (batch, K, class)."""
        hidden = policy_features(probs[:, : self.num_stages - 1], self.inputs).transpose(
            0, 1
        )  # (K-1, B, C)
        layers = self._layers(slice(None))
        for i, (weight, bias) in enumerate(layers):
            hidden = torch.baddbmm(bias, hidden, weight)
            if i < len(layers) - 1:
                hidden = hidden.relu()
        return hidden.squeeze(-1).transpose(0, 1)

    def stage_logits(self, stage: int, probs: torch.Tensor) -> torch.Tensor:
        """Stop logits (batch,) of stage ``stage``'s module alone, from its softmax (batch, C)."""
        hidden = policy_features(probs, self.inputs)
        layers = self._layers(stage)
        for i, (weight, bias) in enumerate(layers):
            hidden = torch.addmm(bias, hidden, weight)
            if i < len(layers) - 1:
                hidden = hidden.relu()
        return hidden.squeeze(-1)

    def stop_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """Probability of stopping at each stage (batch, K); the last column is 1."""
        stop = torch.sigmoid(self(probs))
        return torch.cat([stop, torch.ones_like(stop[:, :1])], dim=1)

    def stop_at_stage(self, stage: int, probs: torch.Tensor) -> torch.Tensor:
        """Deterministic decisions at ``stage`` from its softmax (batch, C): stop if pi >= 1/2."""
        if stage >= self.num_stages - 1:
            return torch.ones(len(probs), dtype=torch.bool, device=probs.device)
        return self.stage_logits(stage, probs) >= 0.0

    def policy_macs(self) -> list[int]:
        """Measured MACs of each stage's stopping module (0 for the last stage)."""
        sample = torch.full((1, self.num_classes), 1.0 / self.num_classes)
        sample = sample.to(self.layer1_weight.device)
        return [count_macs(_OneStage(self, t), sample) for t in range(self.num_stages - 1)] + [0]


class _OneStage(nn.Module):
    """Stage ``stage``'s stopping module of ``policy`` as a module (for measuring its MACs)."""

    def __init__(self, policy: StoppingPolicy, stage: int):
        super().__init__()
        self.policy, self.stage = policy, stage
        self.train(policy.training)  # count_macs restores this flag on the policy too

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        return self.policy.stage_logits(self.stage, probs)


def stopping_module_macs(num_classes: int, hidden: int) -> int:
    """MACs of one stopping module of this width, measured."""
    return count_macs(StoppingModule(num_classes, hidden), torch.full((1, num_classes), 0.1))
