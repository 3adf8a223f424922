import subprocess
import sys
import warnings

import gymnasium as gym
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from torch import nn

import policycascade
from policycascade.envs import CascadeStoppingEnv, CascadeStoppingVectorEnv


def test_digits_id_is_registered_and_passes_env_checker():
    env = gym.make("policycascade/DigitsCascade-v0", alpha=1e-3, split="val")
    assert isinstance(env.unwrapped, CascadeStoppingEnv)
    assert env.unwrapped.num_samples == 270 and env.unwrapped.num_stages == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped)
    vec = gym.make_vec("policycascade/DigitsCascade-v0", num_envs=32, split="val", device="cpu")
    assert isinstance(vec.unwrapped, CascadeStoppingVectorEnv)


def test_namespaced_string_imports_the_package():
    code = (
        "import sys, gymnasium as gym\n"
        "assert 'policycascade' not in sys.modules\n"
        "env = gym.make('policycascade:policycascade/DigitsCascade-v0', split='test')\n"
        "print(env.spec.id, env.unwrapped.num_samples)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["policycascade/DigitsCascade-v0", "450"]


def test_register_cascade_turns_users_classifiers_into_a_gym_id():
    torch.manual_seed(0)
    x, y = torch.randn(100, 8), torch.randint(0, 4, (100,))
    small, big = nn.Linear(8, 4), nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    env_id = policycascade.register_cascade("UserCascade", [small, big], x, y, policy_hidden=8)
    assert env_id == "policycascade/UserCascade-v0"
    env = gym.make(env_id, alpha=0.01)
    obs, info = env.reset(seed=0)
    assert obs.shape == (4 + 2,)
    _, reward, terminated, _, info = env.step(1)
    assert terminated and info["exit_stage"] == 0
    # classifier 8*4 MACs + stopping module 4*8 + 8*8 + 8*1, over the big classifier's MACs
    stage0_cost = (8 * 4 + 4 * 8 + 8 * 8 + 8) / (8 * 32 + 32 * 4)
    loss = 0.0 if info["correct"] else 1.0
    assert reward == pytest.approx(-0.01 * stage0_cost - loss, abs=1e-12)
