"""Tiny hand-built cascades whose rewards and gradients can be worked out by hand."""

import pytest
import torch

from policycascade.cascade import CascadeOutputs
from policycascade.costs import StageCosts

torch.set_num_threads(1)  # tiny models: one thread is faster, and far steadier on a shared machine


def hand_outputs() -> CascadeOutputs:
    """K=3 stages, C=3 classes, classifier MACs 10/30/100 (costs 0.1, 0.3, 1.0), no policy cost.

    Sample 0 (label 1): stage 0 says 0, stage 1 says 1 (p=0.7), stage 2 says 2.
    Sample 1 (label 2): every stage is right, more confident each time.
    """
    probs = torch.tensor(
        [
            [[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]],
            [[0.2, 0.3, 0.5], [0.1, 0.2, 0.7], [0.05, 0.05, 0.9]],
        ]
    )
    return CascadeOutputs(probs, torch.tensor([1, 2]), StageCosts([10, 30, 100]))


@pytest.fixture
def outputs() -> CascadeOutputs:
    return hand_outputs()


def random_outputs(n: int, k: int, c: int, seed: int = 0, macs=None) -> CascadeOutputs:
    g = torch.Generator().manual_seed(seed)
    probs = (torch.randn(n, k, c, generator=g) * 2).softmax(-1)
    labels = torch.randint(c, (n,), generator=g)
    macs = macs or [10 * 3**t for t in range(k)]
    return CascadeOutputs(probs, labels, StageCosts(macs, [2] * k))
