"""Properties of the stopping MDP that hold for every cascade, alpha and action sequence.

The expected values are worked out here from the raw inputs (probabilities, labels,
classifier and stopping-module MACs), not from the environment's own cost tables.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import random_outputs
from policycascade.cascade import CascadeOutputs
from policycascade.costs import StageCosts
from policycascade.envs import STOP, CascadeStoppingEnv, CascadeStoppingVectorEnv

LOSSES = ("zero-one", "cross-entropy")
MIN_PROB = 1e-12  # the clamp of the cross-entropy loss (policycascade.rewards)


class Case:
    """A random cascade together with the raw numbers the expectations are computed from."""

    def __init__(self, outputs, classifier_macs, policy_macs):
        self.outputs = outputs
        self.probs = outputs.probs.numpy()  # (sample, stage, class), float32
        self.labels = outputs.labels.numpy()
        self.k = len(classifier_macs)
        self.c = self.probs.shape[2]
        # The last stage has no stopping module: reaching it always ends the episode.
        self.stage_macs = [
            classifier_macs[t] + (policy_macs[t] if t < self.k - 1 else 0) for t in range(self.k)
        ]
        self.reference_macs = max(classifier_macs)

    def loss(self, sample: int, stage: int, loss: str) -> float:
        probs = self.probs[sample, stage]
        label = int(self.labels[sample])
        if loss == "zero-one":
            return float(int(np.argmax(probs)) != label)
        return -math.log(max(float(probs[label]), MIN_PROB))

    def expected_return(self, sample: int, exit_stage: int, alpha: float, loss: str) -> float:
        cost = sum(self.stage_macs[: exit_stage + 1]) / self.reference_macs
        return -self.loss(sample, exit_stage, loss) - alpha * cost

    def exit_stage(self, actions) -> int:
        """The first stage whose action is stop, or the last stage."""
        for t, action in enumerate(actions[: self.k - 1]):
            if int(action) == STOP:
                return t
        return self.k - 1


@st.composite
def cascades(draw, max_samples: int = 4) -> Case:
    k = draw(st.integers(2, 5))
    c = draw(st.integers(2, 6))
    n = draw(st.integers(1, max_samples))
    seed = draw(st.integers(0, 2**16))
    classifier_macs = draw(st.lists(st.integers(1, 10**9), min_size=k, max_size=k))
    policy_macs = draw(st.lists(st.integers(1, 10**6), min_size=k, max_size=k))
    outputs = random_outputs(n, k, c, seed=seed, macs=classifier_macs)
    # Sharpness 0 gives uniform softmaxes (arg-max ties), large values near one-hot ones
    # whose small probabilities underflow (the cross-entropy clamp).
    sharpness = draw(st.sampled_from([0.0, 0.3, 1.0, 4.0, 60.0]))
    probs = (outputs.probs.log() * sharpness).softmax(-1).to(torch.float32)
    costs = StageCosts(classifier_macs, policy_macs)
    return Case(CascadeOutputs(probs, outputs.labels, costs), classifier_macs, policy_macs)


alphas = st.floats(0.0, 1.0, allow_nan=False, allow_infinity=False)
actions = st.lists(st.sampled_from([0, 1, np.int64(0), np.int64(1)]), min_size=5, max_size=5)


def assert_observation(env, case, obs, sample, stage):
    assert env.observation_space.contains(obs)
    np.testing.assert_array_equal(obs[: case.c], case.probs[sample, stage])
    np.testing.assert_array_equal(obs[case.c :], np.eye(case.k, dtype=np.float32)[stage])


@settings(max_examples=60, deadline=None)
@given(
    case=cascades(),
    alpha=alphas,
    loss=st.sampled_from(LOSSES),
    actions=actions,
    seed=st.integers(0, 2**31 - 1),
)
def test_episode_return_is_minus_loss_minus_alpha_times_costs_run(case, alpha, loss, actions, seed):
    env = CascadeStoppingEnv(case.outputs, alpha=alpha, loss=loss)
    obs, info = env.reset(seed=seed)
    sample = info["sample_index"]
    assert 0 <= sample < case.outputs.num_samples
    assert_observation(env, case, obs, sample, 0)
    rewards, terminated = [], False
    for t, action in enumerate(actions[: case.k]):
        obs, reward, terminated, truncated, info = env.step(action)
        assert type(reward) is float and math.isfinite(reward)
        assert terminated is (int(action) == STOP or t == case.k - 1)  # last stage always ends
        assert truncated is False
        rewards.append(reward)
        stage = t if terminated else t + 1
        assert info["stage"] == stage and info["sample_index"] == sample
        assert info["macs"] == sum(case.stage_macs[: stage + 1])  # spent so far
        assert_observation(env, case, obs, sample, stage)
        if terminated:
            break
    assert terminated
    exit_stage = case.exit_stage(actions)
    assert len(rewards) <= case.k
    assert info["exit_stage"] == exit_stage == len(rewards) - 1
    assert info["macs"] == sum(case.stage_macs[: exit_stage + 1])
    assert info["prediction"] == int(np.argmax(case.probs[sample, exit_stage]))
    assert info["correct"] == (info["prediction"] == info["label"] == case.labels[sample])
    expected = case.expected_return(sample, exit_stage, alpha, loss)
    assert sum(rewards) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    case=cascades(max_samples=8),
    alpha=alphas,
    loss=st.sampled_from(LOSSES),
    num_envs=st.integers(1, 6),
    steps=st.integers(1, 14),
    data=st.data(),
)
def test_vector_env_completed_episodes_obey_the_return_identity(
    case, alpha, loss, num_envs, steps, data
):
    vec = CascadeStoppingVectorEnv(num_envs, case.outputs, alpha=alpha, loss=loss, device="cpu")
    matrix = data.draw(
        st.lists(
            st.lists(st.integers(0, 1), min_size=num_envs, max_size=num_envs),
            min_size=steps,
            max_size=steps,
        ),
        label="actions (step, env)",
    )
    obs, info = vec.reset(seed=data.draw(st.integers(0, 2**31 - 1), label="seed"))
    assert vec.observation_space.contains(obs.numpy())
    sample = info["sample_index"].tolist()
    returns, taken = [0.0] * num_envs, [[] for _ in range(num_envs)]
    restarting = [False] * num_envs
    completed = [0] * num_envs
    for row in matrix:
        obs, reward, terminated, truncated, info = vec.step(torch.tensor(row))
        assert vec.observation_space.contains(obs.numpy())
        assert reward.dtype == torch.float64 and not truncated.any()
        for i in range(num_envs):
            if restarting[i]:  # NEXT_STEP autoreset: the action is ignored, reward 0
                assert reward[i] == 0.0 and not terminated[i]
                sample[i], returns[i], taken[i] = int(info["sample_index"][i]), 0.0, []
                restarting[i] = False
                continue
            assert int(info["sample_index"][i]) == sample[i]
            returns[i] += float(reward[i])
            taken[i].append(row[i])
            assert len(taken[i]) <= case.k
            if len(taken[i]) == case.k:
                assert terminated[i]  # the last stage always ends the episode
            if terminated[i]:
                exit_stage = case.exit_stage(taken[i])
                assert int(info["exit_stage"][i]) == exit_stage == len(taken[i]) - 1
                assert int(info["macs"][i]) == sum(case.stage_macs[: exit_stage + 1])
                expected = case.expected_return(sample[i], exit_stage, alpha, loss)
                assert returns[i] == pytest.approx(expected, rel=1e-9, abs=1e-12)
                restarting[i] = True
                completed[i] += 1
            else:
                assert int(info["exit_stage"][i]) == -1
    for i in range(num_envs):  # the identity was checked on at least every episode that must end
        must_end = steps >= case.k or any(row[i] == STOP for row in matrix[: case.k - 1])
        assert (completed[i] >= 1) == must_end
