"""Your own cascade end to end, with the names the README documents (issue: own cascade)."""

import subprocess
import sys
import textwrap

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import policycascade
from policycascade.compare import main as compare_main
from policycascade.data import load_dataset


def _fit(net: nn.Module, data, steps: int = 60) -> nn.Module:
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(data.train.x), data.train.y).backward()
        opt.step()
    return net.eval()


def test_register_with_splits_train_a_policy_compare_and_read_tensorboard(tmp_path):
    torch.manual_seed(0)
    data = load_dataset("digits", seed=0)
    small = _fit(nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16, 10)), data)
    big = _fit(nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), data)
    splits = {
        "fit": (data.train.x, data.train.y),
        "val": (data.val.x, data.val.y),
        "test": (data.test.x, data.test.y),
    }
    env_id = policycascade.register_cascade("OwnEndToEnd", [small, big], splits=splits)
    run = policycascade.train_policy(env_id, alpha=1e-2, logdir=tmp_path / "runs")
    assert run.finished and run.rule is not None
    # the classifiers were used as given: the run's test accuracy of each is theirs
    with torch.no_grad():
        alone = [
            (c(data.test.x).argmax(-1) == data.test.y).double().mean().item() for c in (small, big)
        ]
    assert [s["accuracy"] for s in run.metrics["single_classifiers"]] == alone
    # the rule was fitted on "fit" only and is evaluated by the one evaluation on test
    assert run.metrics["accuracy"] == run.evaluate("test")["accuracy"]
    assert (run.run_dir / "checkpoint.pt").is_file() and (run.run_dir / "config.yaml").is_file()
    out = tmp_path / "cmp"
    assert compare_main([str(run.run_dir), "--out", str(out), "--sweep-points", "4"]) == 0
    events = EventAccumulator(
        str(out / "tensorboard" / "OwnEndToEnd-v0" / "continuation" / "max-softmax")
    )
    events.Reload()
    assert len(events.Scalars("compare/accuracy")) >= 4
    run_events = EventAccumulator(str(run.run_dir))
    run_events.Reload()
    assert "val/accuracy" in run_events.Tags()["scalars"]


def test_cli_trains_on_a_module_that_registers_the_cascade(tmp_path):
    (tmp_path / "mycascades.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn
            import policycascade
            from policycascade.data import load_dataset

            torch.manual_seed(0)
            data = load_dataset("digits", seed=0)
            nets = [
                nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16, 10)),
                nn.Sequential(nn.Flatten(), nn.Linear(64, 10)),
            ]
            splits = {"val": (data.val.x, data.val.y), "test": (data.test.x, data.test.y)}
            policycascade.register_cascade("FromModule", [n.eval() for n in nets], splits=splits)
            """
        )
    )
    env = "mycascades:policycascade/FromModule-v0"
    command = [sys.executable, "-m", "policycascade", "train", "--env", env, "--alpha", "0.01"]
    command += ["--logdir", str(tmp_path / "runs"), "--no-progress"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "learned policy" in result.stdout and "best threshold" in result.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("FromModule-v0__continuation")
    bad = [sys.executable, "-m", "policycascade", "train", "--env", env, "--agent", "reinforce"]
    result = subprocess.run(bad, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--agent continuation" in result.stderr
