"""Low-dimensional features of a stop decision, read from the softmaxes of the visited stages.

A stopping rule at stage t may read every softmax it has paid for, stages 0..t.
These features summarise that history in a handful of numbers on purpose: a
rule fitted on a few thousand held-out outputs over-fits when it reads whole
softmaxes (it memorises which samples each stage got right), while a threshold on
max-softmax, one monotone number, is hard to beat. The feature sets grow from
exactly the threshold's information to confidence statistics, agreement with
earlier stages and the running ensemble, and optionally the predicted class.
"""

from __future__ import annotations

import torch

from policycascade.stop_feature_names import FEATURE_SETS

_EPS = 1e-12  # log-scale features read p < 1e-12 as 1e-12 (log-odds at most ~27.6)


def running_ensemble(probs: torch.Tensor) -> torch.Tensor:
    """Mean of the softmaxes of stages 0..t for every t: (N, S, C) -> (N, S, C)."""
    visited = torch.arange(1, probs.shape[1] + 1, device=probs.device, dtype=probs.dtype)
    return probs.cumsum(1) / visited.view(1, -1, 1)


def ensemble_probs(history: torch.Tensor) -> torch.Tensor:
    """Softmax of the running ensemble (mean of the visited softmaxes), (N, S, C) -> (N, C)."""
    _check_history(history)
    return running_ensemble(history)[:, -1]


def ensemble_confidence(history: torch.Tensor) -> torch.Tensor:
    """Max-softmax of the running ensemble, (N, S, C) -> (N,): a threshold criterion."""
    return ensemble_probs(history).max(-1).values


def _log_odds_of_top(probs: torch.Tensor) -> torch.Tensor:
    """Log-odds of the top class, log p1 - log(1 - p1), with 1 - p1 summed from the others."""
    top = probs.sort(dim=-1, descending=True).values
    rest = top[..., 1:].sum(-1)
    return top[..., 0].clamp_min(_EPS).log() - rest.clamp_min(_EPS).log()


def _confidence_features(probs: torch.Tensor) -> torch.Tensor:
    """Max-softmax (log-odds), softmax margin, minus the entropy and logit margin of (N, C)."""
    top2 = probs.topk(2, dim=-1).values
    neg_entropy = (probs * probs.clamp_min(_EPS).log()).sum(-1)
    logit_margin = top2[:, 0].clamp_min(_EPS).log() - top2[:, 1].clamp_min(_EPS).log()
    return torch.stack(
        [_log_odds_of_top(probs), top2[:, 0] - top2[:, 1], neg_entropy, logit_margin], dim=1
    )


def stop_features(history: torch.Tensor, feature_set: str = "history") -> torch.Tensor:
    """Features (N, F) of the decision at stage S - 1 from the visited softmaxes (N, S, C).

    - ``"max-softmax"``: the current max-softmax as log-odds (a threshold's information);
    - ``"confidence"``: that, the softmax margin, minus the entropy and the logit margin;
    - ``"history"``: confidence, then per earlier stage its max-softmax (log-odds) and
      whether its arg-max agrees with the current one, then the running ensemble's
      max-softmax (log-odds) and agreement; F = 6 + 2 (S - 1);
    - ``"class"``: history plus the one-hot of the current arg-max.

    Log-odds keep confidences such as 0.99 and 0.9999, which decide stopping at small
    alpha, far apart. Every feature reads only ``history``, so the decision is causal.
    """
    _check_history(history)
    if feature_set not in FEATURE_SETS:
        raise ValueError(f"feature_set must be one of {list(FEATURE_SETS)}, got {feature_set!r}")
    current = history[:, -1]
    if feature_set == "max-softmax":
        return _log_odds_of_top(current).unsqueeze(1)
    features = [_confidence_features(current)]
    if feature_set in ("history", "class"):
        prediction = current.argmax(-1, keepdim=True)  # (N, 1)
        earlier = history[:, :-1]  # (N, S - 1, C)
        ensemble = ensemble_probs(history)
        features += [
            _log_odds_of_top(earlier),
            (earlier.argmax(-1) == prediction).to(history.dtype),
            _log_odds_of_top(ensemble).unsqueeze(1),
            (ensemble.argmax(-1, keepdim=True) == prediction).to(history.dtype),
        ]
    if feature_set == "class":
        features.append(
            torch.nn.functional.one_hot(prediction.squeeze(1), history.shape[-1]).to(history.dtype)
        )
    return torch.cat(features, dim=1)


def _check_history(history: torch.Tensor) -> None:
    if history.ndim != 3 or history.shape[1] < 1 or history.shape[2] < 2:
        raise ValueError(
            "history must be (sample, visited stage, class) softmaxes with at least one stage "
            f"and two classes, got shape {tuple(history.shape)}"
        )
