import gymnasium as gym
import numpy as np
import pytest
import torch

from conftest import random_outputs
from policycascade.envs import CascadeStoppingEnv, CascadeStoppingVectorEnv


def test_vector_env_matches_single_envs_step_by_step():
    outputs = random_outputs(40, 4, 5, seed=3)
    n = 16
    vec = CascadeStoppingVectorEnv(n, outputs, alpha=0.05, device="cpu")
    singles = [CascadeStoppingEnv(outputs, alpha=0.05) for _ in range(n)]
    obs, info = vec.reset(seed=0)
    for i, env in enumerate(singles):
        o, _ = env.reset(options={"sample_index": int(info["sample_index"][i])})
        np.testing.assert_allclose(obs[i].numpy(), o, atol=0)
    rng = np.random.default_rng(0)
    needs_reset = [False] * n
    episodes_ended = 0
    for _ in range(40):
        actions = rng.integers(0, 2, size=n)
        obs, rew, term, trunc, info = vec.step(torch.as_tensor(actions))
        for i, env in enumerate(singles):
            if needs_reset[i]:  # NEXT_STEP autoreset: reward 0, first observation of a new sample
                o, single_info = env.reset(options={"sample_index": int(info["sample_index"][i])})
                r, t = 0.0, False
                needs_reset[i] = False
            else:
                o, r, t, _, single_info = env.step(int(actions[i]))
                needs_reset[i] = t
                episodes_ended += t
            np.testing.assert_allclose(obs[i].numpy(), o, atol=0)
            assert float(rew[i]) == pytest.approx(r, abs=1e-12)
            assert bool(term[i]) == t and not bool(trunc[i])
            for key in ("stage", "prediction", "label", "correct", "macs", "exit_stage"):
                assert int(info[key][i]) == int(single_info.get(key, -1)), key
    assert episodes_ended > n  # several episodes per env, autoreset exercised


def test_make_vec_returns_native_vector_env_and_sync_mode_works():
    import policycascade  # noqa: F401  (registers the ids)
    from policycascade.envs.registration import register_cascade

    x = torch.randn(64, 6)
    y = torch.randint(0, 3, (64,))
    torch.manual_seed(0)
    env_id = register_cascade(
        "VecTest", [torch.nn.Linear(6, 3), torch.nn.Sequential(torch.nn.Linear(6, 3))], x, y
    )
    native = gym.make_vec(env_id, num_envs=8, vectorization_mode="vector_entry_point", alpha=0.1)
    assert isinstance(native.unwrapped, CascadeStoppingVectorEnv)
    obs, _ = native.reset(seed=0)
    assert tuple(obs.shape) == (8, 3 + 2)
    sync = gym.make_vec(env_id, num_envs=4, vectorization_mode="sync", alpha=0.1)
    obs, _ = sync.reset(seed=0)
    obs, rew, term, trunc, _ = sync.step(np.ones(4, dtype=np.int64))
    assert term.all() and obs.shape == (4, 5)


def test_vector_env_rejects_bad_actions():
    vec = CascadeStoppingVectorEnv(4, random_outputs(10, 3, 3), device="cpu")
    vec.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        vec.step(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="0 \\(continue\\) or 1"):
        vec.step(torch.tensor([0, 1, 2, 0]))
