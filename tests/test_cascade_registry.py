"""The registry of users' cascades works without gym; register_cascade adds only the gym id."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import gymnasium as gym
import pytest
import torch
from torch import nn

from policycascade.cascade_registry import (
    check_registration,
    keep,
    registered_cascade,
    registered_split_sources,
    registered_splits,
)
from policycascade.envs.registration import register_cascade

ROOT = Path(__file__).resolve().parents[1]
GYM_FREE = ("cascade_registry", "registry_checks", "stop_feature_names", "config")
_names = itertools.count()


def splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return {
        name: (torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g))
        for name, n in (("fit", 12), ("val", 10), ("test", 8))
    }


def classifiers() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(5, 3), nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))]


def imported(nodes: list[ast.AST]) -> set[str]:
    """The modules the import statements among ``nodes`` name."""
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize(
    "path",
    sorted(p for p in (ROOT / "policycascade").glob("*.py") if p.stem.startswith(GYM_FREE)),
    ids=lambda p: p.stem,
)
def test_registry_and_config_modules_import_neither_gym_nor_envs_nor_agents_at_top(path):
    tree = ast.parse(path.read_text())
    anywhere, top = imported(list(ast.walk(tree))), imported(tree.body)
    assert not {m for m in anywhere if m.split(".")[0] == "gymnasium"}
    assert not {m for m in anywhere if m.startswith("policycascade.envs")}
    assert not {m for m in top if m.startswith("policycascade.agents")}


def test_a_cascade_kept_without_gym_is_found_and_has_no_gym_id():
    name = f"GymFree{next(_names)}"
    registered = keep(check_registration(name, classifiers(), splits=splits()))
    env_id = f"policycascade/{name}-v0"
    assert registered.env_id == env_id and registered_cascade(env_id) is registered
    assert env_id not in gym.registry
    data = registered_splits(registered)
    assert torch.equal(data.train.x, splits()["fit"][0]) and len(data.test) == 8
    assert registered_split_sources(registered) == {"train": "fit", "val": "val", "test": "test"}


def test_the_same_objects_again_keep_the_cached_outputs_and_different_ones_need_overwrite():
    name, nets, data = f"GymFree{next(_names)}", classifiers(), splits()
    first = keep(check_registration(name, nets, splits=data))
    outputs = first.outputs("val")
    again = keep(check_registration(name, nets, splits=data))
    assert again is first and again.outputs("val") is outputs
    with pytest.raises(ValueError, match="already registered with different classifiers"):
        keep(check_registration(name, classifiers(), splits=data))
    replaced = keep(check_registration(name, classifiers(), splits=data), overwrite=True)
    assert registered_cascade(first.env_id) is replaced is not first
    with pytest.raises(TypeError, match="overwrite must be True or False, got 'yes'"):
        keep(replaced, overwrite="yes")


def test_register_cascade_points_the_gym_id_at_the_registry_entry():
    name, nets, data = f"GymFree{next(_names)}", classifiers(), splits()
    env_id = register_cascade(name, nets, splits=data)
    registered = registered_cascade(env_id)
    env = gym.make(env_id, split="test")
    assert torch.equal(env.unwrapped._probs, registered.outputs("test").probs)
    assert register_cascade(name, nets, splits=data) == env_id  # the same objects: kept
    assert registered_cascade(env_id) is registered
