"""Runs store their outputs and rule: load, compare and fit need no data set, weights or training.

Also: run directories are claimed atomically and have one writer; compare refuses what it
would count twice and never writes into a folder it does not own.
"""

import json
import multiprocessing
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import policycascade
from policycascade.compare import main as compare_main
from policycascade.compare.policies import CompareOptions
from policycascade.config import ConfigError
from policycascade.fit_cli import main as fit_main
from policycascade.runs import claim_run_dir, run_lock

REGISTERING_MODULE = """
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
import policycascade
from policycascade.data import load_dataset

torch.manual_seed(0)
data = load_dataset("digits", seed=0)
nets = [
    nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16, 10)),
    nn.Sequential(nn.Flatten(), nn.Linear(64, 10)),
]
for net in nets:
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(net(data.train.x), data.train.y).backward()
        opt.step()
splits = {
    "fit": (data.train.x, data.train.y),
    "val": (data.val.x, data.val.y),
    "test": (data.test.x, data.test.y),
}
policycascade.register_cascade("Stored", [n.eval() for n in nets], splits=splits)
"""


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory) -> Path:
    """A run trained here on a cascade registered here: other processes never register it."""
    folder = tmp_path_factory.mktemp("own")
    namespace: dict = {}
    exec(textwrap.dedent(REGISTERING_MODULE), namespace)  # registers policycascade/Stored-v0
    run = policycascade.train_policy("policycascade/Stored-v0", alpha=0.01, logdir=folder / "runs")
    return run.run_dir


def test_a_finished_run_stores_its_outputs_rule_and_labels(stored_run):
    for name in ("outputs.npz", "rule.pt", "run.json", "metrics.json"):
        assert (stored_run / name).is_file(), name
    run = policycascade.load_run(stored_run)
    assert run.stored and run._harness is None  # nothing was rebuilt
    metrics = json.loads((stored_run / "metrics.json").read_text())
    test = run.evaluate("test")
    assert test["accuracy"] == metrics["accuracy"]
    assert test["mean_macs"] == pytest.approx(metrics["mean_macs"])
    assert test["exit_distribution"] == metrics["exit_distribution"]
    assert run.evaluate("val")["accuracy"] == metrics["val"]["accuracy"]
    assert run.stage_names == metrics["stage_names"]
    assert run._harness is None  # evaluating stored outputs built no harness either


def test_compare_works_in_a_process_that_never_registered_the_cascade(stored_run, tmp_path):
    """The ``policycascade compare`` command in a fresh process, through its quick exit."""
    out = tmp_path / "cmp"
    argv = ["policycascade", "compare", str(stored_run), "--out", str(out), "--sweep-points", "3"]
    code = (
        "import sys\n"
        "from policycascade import harness, data\n"
        "def refuse(*args, **kwargs): raise AssertionError('a harness or data set was built')\n"
        "harness.RunHarness.__init__ = refuse\n"
        "data.load_dataset = refuse\n"
        "import policycascade.compare.cli as command\n"
        "compare = command.main\n"
        "def checked(argv):\n"
        "    status = compare(argv)\n"
        "    import gymnasium\n"
        "    assert 'policycascade/Stored-v0' not in gymnasium.registry  # registered elsewhere\n"
        "    return status\n"
        "command.main = checked\n"
        f"sys.argv = {argv!r}\n"
        "from policycascade.cli import run\n"
        "run()\n"  # the console script's entry: ends with os._exit once the files are closed
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    own = [r for r in rows if r["kind"] == "own"]
    metrics = json.loads((stored_run / "metrics.json").read_text())
    assert len(own) == 1 and own[0]["accuracy"] == metrics["accuracy"]
    # nothing was cut short by the quick exit: the summary's last line reached the pipe,
    # and every file is whole
    assert result.stdout.rstrip().splitlines()[-1].startswith("TensorBoard: tensorboard --logdir")
    assert len((out / "comparison.csv").read_text().splitlines()) == len(rows) + 1
    for picture in ("tradeoff.png", "accuracy_by_exit.png"):
        assert (out / picture).read_bytes().endswith(b"IEND\xaeB`\x82")  # PNG's last chunk
    summary = EventAccumulator(str(out / "tensorboard" / "summary"))
    summary.Reload()
    assert sorted(summary.Tags()["images"]) == ["compare/accuracy_by_exit", "compare/tradeoff"]


def test_the_console_entry_exits_with_the_commands_status(monkeypatch, tmp_path, capsys):
    """``run()``: a user error still exits 2 with its one line, through the quick exit too."""
    from policycascade import cli

    def exit_now(status):
        raise SystemExit(status)

    monkeypatch.setattr(cli.os, "_exit", exit_now)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    for argv in (["compare", "--outputs", "x.npz", "--out", str(tmp_path / "taken")], ["trian"]):
        monkeypatch.setattr(cli.sys, "argv", ["policycascade", *argv])
        with pytest.raises(SystemExit) as stop:
            cli.run()
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep"


def test_compare_refuses_a_non_empty_out_and_keeps_what_is_there(stored_run, tmp_path, capsys):
    out = tmp_path / "myproject"
    (out / "tensorboard").mkdir(parents=True)
    (out / "tensorboard" / "mine.txt").write_text("keep me")
    assert compare_main([str(stored_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and str(out) in err
    assert compare_main([str(stored_run), "--out", str(out), "--overwrite"]) == 0
    assert (out / "tensorboard" / "mine.txt").read_text() == "keep me"
    assert (out / "comparison.json").is_file()


def test_compare_refuses_a_run_given_twice(stored_run, tmp_path, capsys):
    out = tmp_path / "twice"
    assert compare_main([str(stored_run), str(stored_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "given twice" in err
    assert not out.exists()  # nothing was created for a refused comparison


def test_compare_refuses_two_runs_of_one_configuration_and_seed(stored_run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(stored_run, copy)
    assert compare_main([str(stored_run), str(copy), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "same configuration and seed" in err


def _outputs_csv(path: Path, n: int = 400, seed: int = 0) -> Path:
    """A 3-stage cascade's outputs as a table with val and test splits."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    rows = ["label,split," + ",".join(f"s{t}.p{c}" for t in range(3) for c in range(3))]
    rows[0] += ",s0.cost,s1.cost,s2.cost"
    for i in range(n):
        probs = []
        for t in range(3):
            logits = rng.normal(size=3)
            logits[labels[i]] += 0.8 * (t + 1)
            p = np.exp(logits) / np.exp(logits).sum()
            probs += [f"{v:.17g}" for v in p]
        split = "val" if i < n // 2 else "test"
        rows.append(f"{labels[i]},{split}," + ",".join(probs) + ",10,100,1000")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_compare_and_fit_on_an_outputs_file_with_no_model(tmp_path, capsys):
    table = _outputs_csv(tmp_path / "outputs.csv")
    out = tmp_path / "cmp"
    assert compare_main(["--outputs", str(table), "--out", str(out), "--sweep-points", "3"]) == 0
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert {r["policy"] for r in rows} >= {"max-softmax", "entropy", "oracle", "single"}
    rule_file = tmp_path / "rule.json"
    assert fit_main([str(table), "--accuracy-drop", "0.01", "--out", str(rule_file)]) == 0
    printed = capsys.readouterr().out
    assert "'val'" in printed and "test:" in printed and rule_file.is_file()
    assert fit_main([str(table), "--accuracy-drop", "0.01", "--out", str(rule_file)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # never fitted on the split that is reported
        fit_main([str(table), "--alpha", "0.01", "--split", "test"])
    assert exited.value.code == 2 and "--split" in capsys.readouterr().err


def test_compare_outputs_file_without_a_test_split_is_one_line(tmp_path, capsys):
    table = _outputs_csv(tmp_path / "outputs.csv")
    text = table.read_text().replace(",test,", ",val,")
    table.write_text(text)
    assert compare_main(["--outputs", str(table), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no 'test' split" in err


def _claim(logdir: str, queue) -> None:
    queue.put(str(claim_run_dir(Path(logdir), "run")))


def test_run_directories_are_claimed_atomically_by_concurrent_processes(tmp_path):
    context = multiprocessing.get_context("fork")  # claim_run_dir is plain Python: fork is safe
    queue = context.Queue()
    workers = [context.Process(target=_claim, args=(str(tmp_path), queue)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    claimed = sorted(queue.get(timeout=5) for _ in workers)
    assert len(set(claimed)) == 4
    assert {Path(c).name for c in claimed} == {"run", "run-2", "run-3", "run-4"}


def _try_lock(run_dir: str, queue) -> None:
    try:
        with run_lock(Path(run_dir)):
            queue.put("locked")
    except ConfigError as error:
        queue.put(str(error))


def test_a_run_directory_has_one_writer(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    with run_lock(tmp_path):
        other = context.Process(target=_try_lock, args=(str(tmp_path), queue))
        other.start()
        other.join(60)
        assert "being written by another process" in queue.get(timeout=5)
    other = context.Process(target=_try_lock, args=(str(tmp_path), queue))  # released now
    other.start()
    other.join(60)
    assert queue.get(timeout=5) == "locked"


def test_a_new_run_never_writes_into_a_used_directory(tmp_path):
    from policycascade.config import config_from_dict
    from policycascade.runs import write_config

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        write_config(tmp_path, config_from_dict({}))
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        ({"epsilons": 0.01}, TypeError, "epsilons must be a list or tuple, got 0.01"),
        ({"criteria": "entropy"}, TypeError, "criteria must be a list or tuple"),
        ({"epsilons": (0.01, 0.01)}, ValueError, "epsilons repeats [0.01]"),
        ({"budget_shares": ("a",)}, TypeError, "budget_shares must hold float values"),
    ],
)
def test_compare_options_name_the_argument(kwargs, error, fragment):
    with pytest.raises(error) as caught:
        CompareOptions(**kwargs).validate()
    assert fragment in str(caught.value)


def test_fit_rule_takes_exactly_one_target_and_names_bad_ones():
    from conftest import random_outputs

    outputs = random_outputs(200, 3, 4)
    with pytest.raises(ValueError, match="exactly one target"):
        policycascade.fit_rule(outputs, alpha=0.01, budget=0.5)
    with pytest.raises(ValueError, match="family must be one of"):
        policycascade.fit_rule(outputs, "confidence", alpha=0.01)
    with pytest.raises(ValueError, match="accuracy_drop must be in"):
        policycascade.fit_rule(outputs, accuracy_drop=1.5)
    rule = policycascade.fit_rule(outputs, "entropy", budget=0.3)
    result = policycascade.evaluate(rule, outputs)
    assert result.cost_share <= 0.3 + 1e-9
    assert result.accuracy == pytest.approx(
        policycascade.fitting.evaluate_rule(rule, outputs)["accuracy"]
    )
    assert torch.isclose(
        torch.tensor(sum(result.exit_distribution), dtype=torch.float64),
        torch.tensor(1.0, dtype=torch.float64),
    )


def test_the_console_entry_ends_ctrl_c_and_a_closed_pipe_without_a_traceback(monkeypatch, capsys):
    from policycascade import cli

    def interrupted(argv):
        raise KeyboardInterrupt

    def exit_now(status):
        raise SystemExit(status)

    monkeypatch.setattr(cli.os, "_exit", exit_now)  # (compare's quick exit would end pytest)
    monkeypatch.setattr(cli, "main", interrupted)
    monkeypatch.setattr(cli.sys, "argv", ["policycascade", "compare"])
    with pytest.raises(SystemExit) as stop:
        cli.run()
    assert stop.value.code == 130 and capsys.readouterr().err == "error: interrupted\n"
    # a reader that goes away (``| head``): status 1, nothing on stderr
    code = (
        "import sys\n"
        "from policycascade import cli\n"
        "def chatty(argv):\n"
        "    for _ in range(100000): print('row ' * 20)\n"
        "    return 0\n"
        "cli.main = chatty\n"
        "sys.argv = ['policycascade', 'compare']\n"
        "cli.run()\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    process.stdout.read(10)
    process.stdout.close()  # the reader is gone
    err = process.stderr.read().decode()
    assert process.wait(timeout=60) == 1 and err == "", err


def test_compare_refuses_an_out_it_cannot_write_before_any_work(stored_run, tmp_path, capsys):
    from policycascade.compare import cli as compare_cli

    monkey_access = {"called": False}

    def read_only(path, mode):
        monkey_access["called"] = True
        return False

    original = compare_cli.os.access
    compare_cli.os.access = read_only
    try:
        assert compare_main([str(stored_run), "--out", str(tmp_path / "new" / "cmp")]) == 2
    finally:
        compare_cli.os.access = original
    err = capsys.readouterr().err
    assert monkey_access["called"] and err.count("\n") == 1
    assert "cannot be written" in err and "read-only" in err
    assert not (tmp_path / "new").exists()
