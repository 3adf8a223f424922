"""Tiny hand-built cascades whose rewards and gradients can be worked out by hand."""

import dataclasses

import numpy as np
import pytest
import torch

from policycascade.agents.rules import exit_stages, rule_predictions
from policycascade.cascade import CascadeOutputs
from policycascade.costs import StageCosts

torch.set_num_threads(1)  # tiny models: one thread is faster, and far steadier on a shared machine


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test starts on one intra-op thread, whatever an earlier test (a bench, a run's
    thread choice) left behind."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _one_process_unless_asked():
    """Runs train folds (and compare runs) in this process unless a test asks for --processes:
    a forked helper's work is invisible to monkeypatched counters, and the choice would
    follow the machine's load. Session-wide, so module-scoped fixtures see it too."""
    import policycascade.fold_processes as fold_processes

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fold_processes, "free_cores", lambda: (1, None))
        yield


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


def torch_decisions(rule, outputs: CascadeOutputs) -> tuple[np.ndarray, np.ndarray]:
    """A rule's exit stages and answers on cached outputs, by the torch path (for serving)."""
    exit_stage = exit_stages(rule, outputs.probs)
    answer = rule_predictions(rule, outputs.probs, exit_stage)
    if answer is None:
        answer = outputs.probs[torch.arange(outputs.num_samples), exit_stage].argmax(-1)
    return exit_stage.numpy(), answer.numpy()


def digits_harness(tmp_path, samples: int = 128, **reinforce):
    """A digits run on ``samples`` random samples, joint REINFORCE on the training stream."""
    from policycascade.config import TrainConfig
    from policycascade.data import DataSplits, Split
    from policycascade.harness import RunHarness

    defaults = TrainConfig()
    config = dataclasses.replace(
        defaults,
        agent="reinforce",
        cascade="digits",
        device="cpu",
        batch_size=32,
        reinforce=dataclasses.replace(defaults.reinforce, policy_split="train", **reinforce),
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 1, 8, 8, generator=g)
    split = Split(x, torch.randint(10, (samples,), generator=g))
    data = DataSplits("random", split, split, split, 10)
    return RunHarness(config, tmp_path, 1e-3, show_progress=False, data=data)
