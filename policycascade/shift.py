"""Distribution shift: image corruptions, what they do to a stopping rule, and a label-free refit.

Corruptions follow CIFAR-10-C (Hendrycks & Dietterich 2019), whose parameters are
made for small images: Gaussian noise, Gaussian blur and contrast reduction at
severities 1..5. A rule fitted on clean validation data sees less (or more)
confident softmaxes under shift, so its exit shares, MACs and accuracy drift;
:func:`refit_to_exit_shares` moves its thresholds so that its exit shares on
unlabelled shifted inputs are the clean validation ones again, keeping the MACs
budget it was fitted for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from policycascade.agents.rules import StoppingRule
from policycascade.agents.thresholds import ShiftedRule, ThresholdRule
from policycascade.cascade import CascadeOutputs
from policycascade.evaluation import evaluate_rule
from policycascade.subsets import check_same_task

CORRUPTIONS = ("noise", "blur", "contrast")
# CIFAR-10-C's parameters per severity 1..5, for images in [0, 1].
NOISE_STD = (0.04, 0.06, 0.08, 0.09, 0.10)  # Gaussian noise, share of the value range
BLUR_SIGMA = (0.4, 0.6, 0.7, 0.8, 1.0)  # pixels at 32x32; grows with the side beyond 32
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)  # factor towards each image's channel means


def corrupt(
    x: torch.Tensor,
    kind: str,
    severity: int,
    generator: torch.Generator | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """Images (N, C, H, W) corrupted by ``kind`` at ``severity`` 1..5, in their dtype and range.

    Float images are taken to lie in ``value_range`` and are clipped to it; uint8
    images are read as [0, 255] (``value_range`` unused), corrupted in [0, 1] and
    rounded back, so a uint8 data set corrupted per batch inside ``Cascade.outputs``'s
    ``transform`` (before ``to_float``) matches a float copy corrupted whole.
    Noise is drawn from ``generator`` (torch's global generator if None), on the
    generator's device; blur and contrast are deterministic.
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"kind must be one of {list(CORRUPTIONS)}, got {kind!r}")
    if isinstance(severity, bool) or severity not in range(1, 6):
        raise ValueError(f"severity must be an integer from 1 to 5, got {severity!r}")
    if x.ndim != 4:
        raise ValueError(
            f"x must be images (N, C, H, W) to corrupt, got shape {tuple(x.shape)}: noise, blur "
            "and contrast are image corruptions"
        )
    if x.dtype == torch.uint8:
        unit = corrupt(x.float() / 255, kind, severity, generator)
        return (unit * 255).round().clamp(0, 255).to(torch.uint8)
    if not x.is_floating_point():
        raise ValueError(f"images must be float or uint8, got dtype {x.dtype}")
    low, high = (float(v) for v in value_range)
    if not high > low:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    level = severity - 1
    if kind == "noise":
        device = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
        out = x + NOISE_STD[level] * (high - low) * noise.to(x.device)
    elif kind == "blur":
        out = gaussian_blur(x, BLUR_SIGMA[level] * max(1.0, min(x.shape[-2:]) / 32))
    else:
        mean = x.mean(dim=(-2, -1), keepdim=True)
        out = mean + CONTRAST[level] * (x - mean)
    return out.clamp(low, high)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) images, edges replicated, radius 3 sigma."""
    radius = max(1, min(math.ceil(3 * sigma), min(x.shape[-2:]) - 1))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    out = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)  # along W
    return F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)  # along H


@dataclass(frozen=True)
class ShiftResult:
    """One rule on in-distribution and shifted test outputs (the same samples, corrupted)."""

    rule: str
    in_accuracy: float
    shifted_accuracy: float
    in_mean_macs: float
    shifted_mean_macs: float
    val_exit_shares: list[float]  # on clean validation, where the rule was fitted
    in_exit_shares: list[float]
    shifted_exit_shares: list[float]
    in_stage_accuracy: list[float]  # each classifier alone
    shifted_stage_accuracy: list[float]

    @property
    def accuracy_lost(self) -> float:
        """In-distribution minus shifted test accuracy."""
        return self.in_accuracy - self.shifted_accuracy

    @property
    def exit_share_drift(self) -> list[float]:
        """Shifted minus in-distribution share of samples exiting at each stage."""
        return [s - i for s, i in zip(self.shifted_exit_shares, self.in_exit_shares, strict=True)]

    @property
    def exit_drift_tv(self) -> float:
        """Total variation between the two exit distributions: the share of exits that moved."""
        return 0.5 * sum(abs(d) for d in self.exit_share_drift)

    def as_dict(self) -> dict:
        """JSON-ready, derived numbers included."""
        return {
            **asdict(self),
            "accuracy_lost": self.accuracy_lost,
            "exit_share_drift": self.exit_share_drift,
            "exit_drift_tv": self.exit_drift_tv,
        }


def shift_report(
    rule: StoppingRule,
    val_outputs_in: CascadeOutputs,
    test_outputs_in: CascadeOutputs,
    test_outputs_shifted: CascadeOutputs,
) -> ShiftResult:
    """Accuracy, MACs and exit shares of ``rule`` on clean and shifted test outputs."""
    check_same_task(val_outputs_in, test_outputs_in, ("val_outputs_in", "test_outputs_in"))
    check_same_task(
        test_outputs_in, test_outputs_shifted, ("test_outputs_in", "test_outputs_shifted")
    )
    if test_outputs_shifted.num_samples != test_outputs_in.num_samples:
        raise ValueError(
            f"the shifted test outputs must be the same {test_outputs_in.num_samples} samples "
            f"corrupted, got {test_outputs_shifted.num_samples}"
        )
    val, clean, shifted = (
        evaluate_rule(rule, o) for o in (val_outputs_in, test_outputs_in, test_outputs_shifted)
    )
    return ShiftResult(
        rule=getattr(rule, "name", "") or type(rule).__name__,
        in_accuracy=clean["accuracy"],
        shifted_accuracy=shifted["accuracy"],
        in_mean_macs=clean["mean_macs"],
        shifted_mean_macs=shifted["mean_macs"],
        val_exit_shares=val["exit_distribution"],
        in_exit_shares=clean["exit_distribution"],
        shifted_exit_shares=shifted["exit_distribution"],
        in_stage_accuracy=clean["stage_accuracy"],
        shifted_stage_accuracy=shifted["stage_accuracy"],
    )


def refit_to_exit_shares(
    rule: StoppingRule, unlabelled_probs: torch.Tensor, target_exit_shares: Sequence[float]
) -> StoppingRule:
    """The rule with per-stage thresholds whose exit shares on ``unlabelled_probs`` are the targets.

    No labels: stage by stage, among the samples still running, the threshold is
    the score of the ``round(share_t * N)``-th most confident one (quantile
    matching), so ``share_t`` of all samples exit at stage t (more where scores
    tie; fewer where too few samples are left); the last stage takes the rest.
    A :class:`ThresholdRule` gets new thresholds on its confidences (same criterion
    and temperatures); any other rule new offsets on its stop scores
    (a :class:`ShiftedRule` of its base where it is one already).

    Args:
        rule: the rule fitted on clean validation data.
        unlabelled_probs: softmaxes (sample, K, C) on shifted inputs, e.g. a
            corrupted validation split, labels unused.
        target_exit_shares: K shares summing to 1, e.g. the rule's exit
            distribution on clean validation data.
    """
    n, k, _ = unlabelled_probs.shape
    shares = [float(s) for s in target_exit_shares]
    if len(shares) != k or any(not s >= 0 for s in shares) or abs(sum(shares) - 1) > 1e-6:
        raise ValueError(f"target_exit_shares needs {k} shares >= 0 summing to 1, got {shares}")
    if isinstance(rule, ThresholdRule):
        scores = rule.confidences(unlabelled_probs)
    elif isinstance(rule, ShiftedRule):
        scores = rule.base.stop_scores(unlabelled_probs)
    else:
        scores = rule.stop_scores(unlabelled_probs)
    scores = scores.double().cpu()
    running = torch.ones(n, dtype=torch.bool)
    thresholds = []
    for t in range(k - 1):
        remaining = scores[running, t].sort(descending=True).values
        count = min(round(shares[t] * n), len(remaining))
        threshold = float(remaining[count - 1]) if count > 0 else math.inf
        thresholds.append(threshold)
        running &= scores[:, t] < threshold
    if isinstance(rule, ThresholdRule):
        return ThresholdRule(rule.criterion, thresholds, rule.temperatures, rule.name)
    if isinstance(rule, ShiftedRule):
        return ShiftedRule(rule.base, thresholds, rule.name)
    return ShiftedRule(rule, thresholds)
