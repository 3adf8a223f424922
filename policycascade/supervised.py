"""Cross-entropy training of every classifier of a cascade: pre-training and the supervised term."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from policycascade.cascade import Cascade
from policycascade.data import Split
from policycascade.optimizers import build_optimizer


def cross_entropy_all_stages(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over stages of each classifier's mean cross-entropy; ``logits`` is (batch, K, C)."""
    k = logits.shape[1]
    flat = rearrange(logits, "b k c -> (b k) c")
    return F.cross_entropy(flat, labels.repeat_interleave(k)) * k


def batches(num_samples: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A shuffled epoch of index batches drawn from ``generator`` (CPU)."""
    order = torch.randperm(num_samples, generator=generator)
    return list(order.split(batch_size))


def fit_classifiers(
    cascade: Cascade,
    train: Split,
    epochs: int = 40,
    lr: float = 3e-3,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> Cascade:
    """Train every stage of ``cascade`` with Adam on cross-entropy; returns it in eval mode."""
    device = next(cascade.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    optimizer = build_optimizer("adam", cascade.parameters(), lr, weight_decay)
    x, y = train.x.to(device), train.y.to(device)
    cascade.train()
    for _ in range(epochs):
        for idx in batches(len(y), batch_size, generator):
            idx = idx.to(device)
            optimizer.zero_grad(set_to_none=True)
            cross_entropy_all_stages(cascade(x[idx]), y[idx]).backward()
            optimizer.step()
    return cascade.eval()
