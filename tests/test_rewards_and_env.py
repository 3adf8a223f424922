import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.error import InvalidAction, ResetNeeded
from gymnasium.utils.env_checker import check_env

from conftest import hand_outputs, random_outputs
from policycascade.envs import CONTINUE, STOP, CascadeStoppingEnv


def run_episode(env, sample, actions):
    obs, info = env.reset(seed=0, options={"sample_index": sample})
    rewards, infos = [], [info]
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        rewards.append(reward)
        infos.append(info)
        assert not truncated
        if terminated:
            break
    return rewards, terminated, infos


@pytest.mark.parametrize(
    "actions, expected_rewards, exit_stage",
    [
        ([STOP], [-0.5 * 0.1 - 1.0], 0),  # stage 0 answers 0, label is 1
        ([CONTINUE, STOP], [-0.5 * 0.1, -0.5 * 0.3], 1),  # stage 1 is right
        ([CONTINUE, CONTINUE, CONTINUE], [-0.05, -0.15, -0.5 * 1.0 - 1.0], 2),
        ([CONTINUE, CONTINUE, STOP], [-0.05, -0.15, -1.5], 2),  # last stage: any action ends
    ],
)
def test_reward_is_minus_loss_minus_alpha_times_costs(actions, expected_rewards, exit_stage):
    env = CascadeStoppingEnv(hand_outputs(), alpha=0.5)
    rewards, terminated, infos = run_episode(env, 0, actions)
    assert terminated
    assert rewards == pytest.approx(expected_rewards, abs=1e-12)
    last = infos[-1]
    assert last["exit_stage"] == exit_stage
    assert last["macs"] == [10, 40, 140][exit_stage]
    assert last["label"] == 1 and last["correct"] == (exit_stage == 1)
    assert len(rewards) == exit_stage + 1


def test_cross_entropy_loss_uses_label_probability():
    env = CascadeStoppingEnv(hand_outputs(), alpha=0.5, loss="cross-entropy")
    rewards, _, _ = run_episode(env, 0, [CONTINUE, STOP])
    assert sum(rewards) == pytest.approx(-0.5 * 0.4 + math.log(0.7), abs=1e-6)


def test_observation_is_softmax_and_one_hot_stage():
    env = CascadeStoppingEnv(hand_outputs())
    obs, info = env.reset(options={"sample_index": 1})
    np.testing.assert_allclose(obs, [0.2, 0.3, 0.5, 1, 0, 0], atol=1e-7)
    obs, *_ = env.step(CONTINUE)
    np.testing.assert_allclose(obs, [0.1, 0.2, 0.7, 0, 1, 0], atol=1e-7)
    assert obs.dtype == np.float32 and env.observation_space.contains(obs)


def test_passes_env_checker_without_warnings():
    outputs = random_outputs(50, 4, 5)
    gym.register(
        "policycascade/CheckEnvTest-v0",
        entry_point=lambda **kw: CascadeStoppingEnv(outputs, **kw),
    )
    env = gym.make("policycascade/CheckEnvTest-v0", alpha=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped)


def test_same_seed_same_episodes_and_different_seed_differs():
    def samples(seed):
        env = CascadeStoppingEnv(random_outputs(1000, 3, 4))
        env.reset(seed=seed)
        return [env.reset()[1]["sample_index"] for _ in range(20)]

    assert samples(7) == samples(7)
    assert samples(7) != samples(8)


def test_rejects_bad_actions_and_step_after_end():
    env = CascadeStoppingEnv(hand_outputs())
    with pytest.raises(ResetNeeded):
        env.step(STOP)
    env.reset(seed=0)
    for bad in (2, -1, 0.5, "stop"):
        with pytest.raises(InvalidAction):
            env.step(bad)
    env.step(STOP)
    with pytest.raises(ResetNeeded):
        env.step(STOP)


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="alpha"):
        CascadeStoppingEnv(hand_outputs(), alpha=-1)
    with pytest.raises(ValueError, match="alpha"):
        CascadeStoppingEnv(hand_outputs(), alpha=float("nan"))
    with pytest.raises(ValueError, match="loss"):
        CascadeStoppingEnv(hand_outputs(), loss="hinge")
    env = CascadeStoppingEnv(hand_outputs())
    with pytest.raises(ValueError, match="sample_index"):
        env.reset(options={"sample_index": 5})


def test_ansi_render_names_stage_and_top_classes():
    env = CascadeStoppingEnv(hand_outputs(), render_mode="ansi")
    env.reset(options={"sample_index": 0})
    text = env.render()
    assert "stage 0/2" in text and "0: 0.600" in text


def test_works_with_standard_wrappers():
    env = CascadeStoppingEnv(random_outputs(30, 3, 4))
    env = gym.wrappers.RecordEpisodeStatistics(gym.wrappers.TimeLimit(env, max_episode_steps=10))
    env.reset(seed=1)
    terminated = False
    while not terminated:
        _, _, terminated, _, info = env.step(CONTINUE)
    assert info["episode"]["l"] == 3


def test_flatten_observation_and_async_vectorisation():
    import torch

    import policycascade

    torch.manual_seed(0)
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    env_id = policycascade.register_cascade(
        "AsyncTest", [torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)], x, y, policy_hidden=4
    )
    flat = gym.wrappers.FlattenObservation(gym.make(env_id))
    obs, _ = flat.reset(seed=0)
    assert obs.shape == (5,)
    vec = gym.make_vec(env_id, num_envs=2, vectorization_mode="async", alpha=0.1)
    try:
        obs, _ = vec.reset(seed=0)
        obs, rewards, terminated, _, _ = vec.step(np.array([1, 1]))
        assert obs.shape == (2, 5) and terminated.all()
    finally:
        vec.close()
