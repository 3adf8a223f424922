"""Every shipped config loads, its cost table prints without data, and the CIFAR path trains."""

import json
from pathlib import Path

import pytest
import yaml
from test_loaders import fake_dataset

from policycascade.config import (
    SECTIONS,
    config_from_dict,
    load_config_file,
    resolve_config_path,
    shipped_configs,
)
from policycascade.train import main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def _as_resolved(written, resolved):
    """A YAML value as the config holds it (a single value for a list option is a list)."""
    return [written] if isinstance(resolved, list) and not isinstance(written, list) else written


def test_every_config_in_the_repository_ships_with_the_package():
    assert shipped_configs() == sorted(p.stem for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_keeps_every_value_it_sets(path):
    written = yaml.safe_load(path.read_text())
    config = config_from_dict(load_config_file(path))
    resolved = config.to_dict()
    # Nothing in the file is dropped or ignored: each value is the resolved config's.
    for key, value in written.items():
        if key in SECTIONS:
            assert key == config.agent, f"{path.name}: {key!r} section, agent {config.agent!r}"
            for name, inner in value.items():
                assert resolved[key][name] == _as_resolved(inner, resolved[key][name]), (
                    f"{path.name}: {key}.{name}"
                )
        else:
            assert resolved[key] == _as_resolved(value, resolved[key]), f"{path.name}: {key}"
    # The resolved config is a complete config: it loads back to itself.
    assert config_from_dict(resolved) == config
    # By name (--config NAME) the same file is read.
    assert resolve_config_path(path.stem).read_text() == path.read_text()
    assert config_from_dict(load_config_file(path.stem)) == config


def test_dry_run_json_matches_the_paper_shares(capsys):
    config = next(p for p in CONFIGS if p.stem == "cifar10-resnet")
    assert main(["--config", str(config), "--dry-run", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in table["stages"]][-1] == "resnet110"
    for stage in table["stages"]:
        assert abs(stage["share"] - stage["paper_share"]) < 0.01
    assert table["stopping_module_macs"] == 10 * 64 + 64 * 64 + 64


def test_cifar10_resnet_cascade_trains_on_files_in_the_on_disk_format(tmp_path, capsys):
    fake_dataset("cifar10", tmp_path / "data")
    argv = [
        "--config",
        str(next(p for p in CONFIGS if p.stem == "cifar10-resnet")),
        "--data-dir",
        str(tmp_path / "data"),
        "--logdir",
        str(tmp_path / "runs"),
        "--alpha",
        "0.01",
        "--pretrain-epochs",
        "1",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--lr-milestones",
        "1",
        "--no-progress",
    ]
    assert main(argv) == 0
    (run,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["single_classifiers"]) == 5 and metrics["epochs_trained"] == 2


def test_missing_data_set_is_a_usage_error_naming_the_folder(tmp_path, capsys):
    argv = [
        "--dataset",
        "cifar10",
        "--cascade",
        "cifar-resnet",
        "--data-dir",
        str(tmp_path),
        "--logdir",
        str(tmp_path / "runs"),
        "--no-progress",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "Traceback" not in err
