"""Runs that die or are stopped mid-way leave a loadable checkpoint and resume cleanly."""

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from policycascade.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_atomic
from policycascade.train import main

PAYLOAD_BYTES = 4_000_000  # a few MB, so a kill often lands in the middle of a write


def _write_forever(path: str, first: int, acknowledged) -> None:
    """Save states first, first + 1, ... until killed; publish each number once it is in place."""
    weights = np.arange(250_000, dtype=np.float32)  # 1 MB, the same in every state
    i = first
    while True:
        tag = i.to_bytes(8, "little")
        payload = tag * (PAYLOAD_BYTES // 8)
        save_atomic({"i": i, "payload": payload, "weights": torch.from_numpy(weights)}, path)
        acknowledged.value = i
        i += 1


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def _write_in_progress(directory: Path, before: set, path: Path, full_size: int) -> bool:
    """A new (temporary) file has appeared, or the checkpoint itself is shorter than a whole one."""
    try:
        return bool(set(directory.iterdir()) - before) or path.stat().st_size < full_size
    except FileNotFoundError:
        return True


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs fork() to start fast"
)
def test_sigkill_during_save_leaves_a_whole_checkpoint(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    context = multiprocessing.get_context("fork")  # torch is imported once, not per writer
    rng = random.Random(0)
    for round_ in range(6):
        before = set(tmp_path.iterdir()) | {path}
        acknowledged = context.Value("q", -1)
        first = round_ * 1_000_000
        writer = context.Process(target=_write_forever, args=(str(path), first, acknowledged))
        writer.start()
        try:
            _wait_for(lambda a=acknowledged, f=first: a.value >= f, 60, "the first save")
            if round_ % 2:  # kill while a write is under way
                full_size = path.stat().st_size
                _wait_for(
                    lambda b=before, n=full_size: _write_in_progress(tmp_path, b, path, n),
                    60,
                    "a write in progress",
                )
            else:  # kill at a random moment
                time.sleep(rng.uniform(0.0, 0.3))
        finally:
            os.kill(writer.pid, signal.SIGKILL)
            writer.join(30)
        assert writer.exitcode == -signal.SIGKILL
        last = acknowledged.value  # saved and renamed before the kill
        for source in (tmp_path, path):  # the run directory and the file itself
            state = load_checkpoint(source)
            assert state["i"] in (last, last + 1)  # the last finished save, or the one after it
            assert state["payload"] == state["i"].to_bytes(8, "little") * (PAYLOAD_BYTES // 8)
            assert torch.equal(state["weights"], torch.arange(250_000, dtype=torch.float32))
    # Temporary files left by killed writers stop neither loading nor a later save.
    save_atomic({"i": -1}, path)
    assert load_checkpoint(tmp_path)["i"] == -1


def _scalar_steps(path: Path, tag: str) -> list[int]:
    events = EventAccumulator(str(path), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return []
    return [event.step for event in events.Scalars(tag)]


def test_sigterm_stops_after_a_saved_epoch_and_resume_finishes(tmp_path):
    logdir = tmp_path / "runs"
    command = [sys.executable, "-m", "policycascade.train", "--no-progress"]
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(
            [
                *command,
                "--agent",
                "reinforce",
                "--alpha",
                "0.01",
                "--pretrain-epochs",
                "2",
                "--epochs",
                "200",
            ]
            + ["--logdir", str(logdir)],
            stdout=stdout,
            stderr=stderr,
        )
        try:
            _wait_for(
                lambda: any(logdir.glob(f"*/{CHECKPOINT_NAME}")) or process.poll() is not None,
                240,
                "the first checkpoint",
            )
            assert process.poll() is None, err.read_text()
            process.send_signal(signal.SIGTERM)
            status = process.wait(240)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    stderr_text = err.read_text()
    assert status == 130, stderr_text
    (run_dir,) = logdir.iterdir()
    assert f"--resume {run_dir}" in stderr_text and "Traceback" not in stderr_text

    state = load_checkpoint(run_dir)
    finished = state["epoch"]
    assert 1 <= finished < 202 and state["config"]["reinforce"]["epochs"] == 200
    assert not (run_dir / "metrics.json").exists()
    # Lower the run's length (checkpoint and config.yaml alike) so that the resumed run
    # trains two more epochs and ends.
    pretrain = state["config"]["reinforce"]["pretrain_epochs"]
    epochs = max(finished - pretrain, 0) + 2
    total = pretrain + epochs
    state["config"]["reinforce"]["epochs"] = epochs
    torch.save(state, run_dir / CHECKPOINT_NAME)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["reinforce"]["epochs"] = epochs
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    # The same entry point as `python -m policycascade.train --resume RUN_DIR`, run in-process
    # to spare a second torch import.
    assert main(["--resume", str(run_dir), "--no-progress"]) == 0
    assert (run_dir / "metrics.json").is_file()
    assert load_checkpoint(run_dir)["epoch"] == total

    # What TensorBoard shows: one point per epoch, the killed and the resumed part joined.
    assert _scalar_steps(run_dir, "val/accuracy") == list(range(1, total + 1))
    # The event files themselves: no epoch written twice (a graceful stop leaves no orphans).
    files = sorted(run_dir.glob("events.out.tfevents.*"))
    assert len(files) >= 2
    steps = [step for f in files for step in _scalar_steps(f, "val/accuracy")]
    assert sorted(steps) == list(range(1, total + 1))


def test_ltc_run_interrupted_after_a_saved_epoch_resumes_to_the_same_result(tmp_path, monkeypatch):
    import policycascade.checkpointing as harness

    fast = ["--agent", "ltc", "--ltc-epochs", "2", "--no-progress", "--device", "cpu"]
    assert main([*fast, "--logdir", str(tmp_path / "a")]) == 0
    saves = {"count": 0}
    real_save = harness.save_atomic

    def save_then_signal(state, path):
        real_save(state, path)
        saves["count"] += 1
        if saves["count"] == 3:  # part 1 (the MLP-256), epoch 1 of 2
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(harness, "save_atomic", save_then_signal)
    assert main([*fast, "--logdir", str(tmp_path / "b")]) == 130
    monkeypatch.setattr(harness, "save_atomic", real_save)
    (run_b,) = (tmp_path / "b").iterdir()
    state = torch.load(run_b / "checkpoint.pt", weights_only=False)
    assert state["algorithm"] == "ltc" and state["epoch"] == 3
    assert state["state"]["thresholds"] is None and state["state"]["part"]["part"] == 1
    assert state["state"]["part"]["schedule"]["last_epoch"] == 1  # 1 epoch of part 1 done
    assert not (run_b / "metrics.json").exists()
    assert main(["--resume", str(run_b), "--no-progress"]) == 0
    (run_a,) = (tmp_path / "a").iterdir()
    a = json.loads((run_a / "metrics.json").read_text())
    b = json.loads((run_b / "metrics.json").read_text())
    assert a["thresholds"] is not None and a["epochs_trained"] == 8
    assert a == b  # bit for bit on the CPU
