"""``policycascade compare`` ends without the interpreter's teardown: nothing it writes is lost."""

from __future__ import annotations

import json
import subprocess
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import random_outputs
from policycascade.outputs_io import outputs_from_arrays, save_outputs


def test_compare_command_writes_everything_before_its_quick_exit(tmp_path):
    splits = {}
    for name, seed in (("val", 0), ("test", 1)):
        o = random_outputs(300, 3, 4, seed=seed)
        splits[name] = outputs_from_arrays(o.labels, probs=o.probs, stage_costs=[10, 30, 90])
    save_outputs(splits, tmp_path / "outputs.npz")
    out = tmp_path / "cmp"
    command = [sys.executable, "-m", "policycascade", "compare", "--outputs"]
    command += [str(tmp_path / "outputs.npz"), "--out", str(out), "--sweep-points", "3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # the summary's last line reaches a pipe, and every file is complete
    assert done.stdout.rstrip().splitlines()[-1].startswith("TensorBoard: tensorboard --logdir")
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert len((out / "comparison.csv").read_text().splitlines()) == len(rows) + 1
    assert (out / "tradeoff.png").read_bytes().endswith(b"IEND\xaeB`\x82")  # PNG's last chunk
    summary = EventAccumulator(str(out / "tensorboard" / "summary"))
    summary.Reload()
    assert summary.Tags()["images"] == ["compare/tradeoff"]  # (no own policy: no Figure 4)
    # a user error still exits 2 with its one line
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: --out ")
    assert "Traceback" not in done.stderr
