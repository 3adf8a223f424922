"""The import rules: core, training and the commands on top import one way only.

Every module of the installed package (``policycascade``, ``policycascade.agents`` from
``agents/`` and ``policycascade.envs`` from ``envs/``) belongs to one layer:

* **core**: outputs, costs, rules and their fitting, evaluation, certification, the
  drift watch, serving. It never imports the training layer, so a user who brings
  predictions never loads data sets, models or gym.
* **training**: data, models, the classifier-training loop, the harness, the learning
  algorithms (``agents/*_training``) and the gym environments (``envs/``).
* **top**: stored runs, compare, the command lines, benchmarks and studies.

A module may import its own layer and the layers below it, never one above. Imports
inside functions count too (they are how cycles hide); ``if TYPE_CHECKING:`` imports
do not. The test reads the source with ``ast``, so it checks every module without
importing any.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = {
    "policycascade": "policycascade",
    "agents": "policycascade.agents",
    "envs": "policycascade.envs",
}

LAYERS = ("core", "training", "top")

# module (or package prefix ending in '.') -> layer; the longest matching entry wins
LAYER_OF = {
    # core: what a user with cached outputs needs
    "policycascade": "top",  # the package's lazy public API may name anything
    "policycascade.cascade": "core",
    "policycascade.costs": "core",
    "policycascade.rewards": "core",
    "policycascade.evaluation": "core",
    "policycascade.protocol": "core",
    "policycascade.jsonio": "core",
    "policycascade.fsutil": "core",
    "policycascade.cli_support": "core",
    "policycascade.plots": "core",
    "policycascade.outputs_io": "core",
    "policycascade.rule_io": "core",
    "policycascade.serving": "core",
    "policycascade.fitting": "core",
    "policycascade.certify": "core",
    "policycascade.certify_paths": "core",
    "policycascade.certify_bounds": "core",
    "policycascade.watch": "core",
    "policycascade.watch_combined": "core",
    "policycascade.shift": "core",
    "policycascade.subsets": "core",
    "policycascade.inference": "core",
    "policycascade.checkpoint": "core",
    "policycascade.builtin_ids": "core",
    "policycascade.stop_feature_names": "core",
    "policycascade.agents.rules": "core",
    "policycascade.agents.thresholds": "core",
    "policycascade.agents.class_aware": "core",
    "policycascade.agents.stop_features": "core",
    "policycascade.agents.continuation": "core",
    # training: data, models, loops, harness, algorithms, gym
    "policycascade.data.": "training",
    "policycascade.data": "training",
    "policycascade.models.": "training",
    "policycascade.models": "training",
    "policycascade.optimizers": "training",
    "policycascade.augment": "training",
    "policycascade.supervised": "training",
    "policycascade.seeding": "training",
    "policycascade.crossfit": "training",
    "policycascade.fold_stack": "training",
    "policycascade.fold_processes": "training",
    "policycascade.cascade_training": "training",
    "policycascade.runtime": "training",
    "policycascade.distributed": "training",
    "policycascade.finite": "training",
    "policycascade.compiled": "training",
    "policycascade.checkpointing": "training",
    "policycascade.config": "training",
    "policycascade.config_": "training",
    "policycascade.cascade_registry": "training",
    "policycascade.registry_checks": "training",
    "policycascade.harness": "training",
    "policycascade.harness_": "training",
    "policycascade.shared_units": "training",
    "policycascade.agents": "training",
    "policycascade.agents.": "training",
    "policycascade.envs": "training",
    "policycascade.envs.": "training",
    # top: runs, compare, commands, benchmarks, studies
    "policycascade.": "top",
}


def module_name(path: Path) -> str:
    folder, package = path.relative_to(ROOT).parts[0], None
    package = SOURCE_FOLDERS[folder]
    parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def layer_of(module: str) -> str:
    best = max(
        (
            key
            for key in LAYER_OF
            if module == key or (key.endswith(".") or key.endswith("_")) and module.startswith(key)
        ),
        key=len,
    )
    return LAYER_OF[best]


def type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` blocks."""
    hidden: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            hidden.update(id(inner) for stmt in node.body for inner in ast.walk(stmt))
    return hidden


def imported_modules(path: Path, name: str) -> set[str]:
    """The package modules ``path`` imports at runtime (absolute names)."""
    tree = ast.parse(path.read_text())
    hidden = type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from pkg import module` imports the module only
                submodule = f"{target}.{alias.name}"
                found.add(submodule if submodule in MODULES else target)
    return {m for m in found if m.split(".")[0] == "policycascade"}


def all_modules() -> dict[str, Path]:
    modules = {}
    for folder in SOURCE_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            modules[module_name(path)] = path
    return modules


MODULES = all_modules()


def test_every_module_has_a_layer():
    assert set(map(layer_of, MODULES)) <= set(LAYERS)
    assert layer_of("policycascade.cascade") == "core"
    assert layer_of("policycascade.harness") == "training"
    assert layer_of("policycascade.compare.api") == "top"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name):
    rank = LAYERS.index(layer_of(name))
    upward = sorted(
        target
        for target in imported_modules(MODULES[name], name)
        if (target in MODULES) and LAYERS.index(layer_of(target)) > rank
    )
    assert not upward, f"{name} ({layer_of(name)}) imports a higher layer: {upward}"


def test_no_import_cycles():
    graph = {
        name: {t for t in imported_modules(path, name) if t in MODULES and t != name}
        for name, path in MODULES.items()
    }
    # a package's __init__ re-exporting its own modules is not a cycle of design
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_checker_sees_function_level_imports_and_skips_type_checking(tmp_path):
    """The rule can fail: an import hidden in a function is seen, a type-only one is not."""
    source = tmp_path / "mod.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from policycascade.runs import LoadedRun\n"
        "def f():\n"
        "    from .harness import RunHarness\n"
    )
    found = imported_modules(source, "policycascade.evaluation")
    assert "policycascade.harness" in found
    assert "policycascade.runs" not in found
    assert LAYERS.index(layer_of("policycascade.harness")) > LAYERS.index(
        layer_of("policycascade.evaluation")
    )
