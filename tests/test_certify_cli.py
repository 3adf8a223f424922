"""Certified rules on the command line: fit and compare --guarantee, and their mistakes."""

import json

import numpy as np
import pytest

import policycascade
from policycascade.compare import main as compare_main
from policycascade.fit_cli import main as fit_main
from policycascade.watch_cli import main as watch_main


def _table(path, n_val=1500, n_test=500, stages=3, seed=0):
    """Outputs of a cascade whose later stages are surer: val and test splits in a CSV."""
    rng = np.random.default_rng(seed)
    n = n_val + n_test
    labels = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, stages, 3))
    for t in range(stages):
        logits[np.arange(n), t, labels] += 1.0 + 1.5 * t
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    split = np.where(np.arange(n) < n_val, "val", "test")
    outputs = {
        name: policycascade.outputs_from_arrays(
            labels[split == name],
            probs=probs[split == name],
            stage_costs=[10 * 5**t for t in range(stages)],
        )
        for name in ("val", "test")
    }
    policycascade.save_outputs(outputs, path)
    return path


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_fit_with_a_guarantee_writes_the_certificate_into_the_rule_file(tmp_path, capsys):
    table = _table(tmp_path / "outputs.csv")
    rule_file = tmp_path / "rule.json"
    args = [str(table), "--accuracy-drop", "0.02", "--guarantee", "0.1", "--out", str(rule_file)]
    assert fit_main(args) == 0
    printed = capsys.readouterr().out
    assert "guarantee:" in printed and "delta 0.1" in printed
    guarantee = json.loads(rule_file.read_text())["guarantee"]
    assert guarantee["delta"] == 0.1 and guarantee["path"].startswith("both (")
    # the fixed path tests on every calibration sample, the split path on half of them
    assert guarantee["num_samples"] in (1500, 750)
    assert isinstance(guarantee["certified"], bool) and guarantee["bound"]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--accuracy-drop", "1.5", "--guarantee", "0.1"], "epsilon must be in [0, 1)"),
        (["--accuracy-drop", "0.01", "--guarantee", "1.5"], "delta must be in (0, 1)"),
        (["--accuracy-drop", "0.01", "--guarantee", "0"], "delta must be in (0, 1)"),
        (["--alpha", "0.01", "--guarantee", "0.1"], "an alpha is a trade-off, not a promise"),
    ],
)
def test_fit_guarantee_mistakes_are_one_line(args, fragment, tmp_path, capsys):
    table = _table(tmp_path / "outputs.csv", n_val=200, n_test=50)
    assert fit_main([str(table), *args]) == 2
    assert fragment in _one_line_error(capsys)


def test_a_calibration_split_of_one_sample_is_one_line(tmp_path, capsys):
    table = _table(tmp_path / "outputs.csv", n_val=1, n_test=50)
    assert fit_main([str(table), "--accuracy-drop", "0.01", "--guarantee", "0.1"]) == 2
    assert "calibration" in _one_line_error(capsys)


@pytest.mark.parametrize("text", ["0.01", "1.2:0.1", "0.01:0", "0.01:1", "a:b"])
def test_compare_guarantee_mistakes_are_one_line(text, tmp_path, capsys):
    table = _table(tmp_path / "outputs.csv", n_val=200, n_test=50)
    out = tmp_path / "cmp"
    assert compare_main(["--outputs", str(table), "--out", str(out), "--guarantee", text]) == 2
    assert "--guarantee must be EPSILON:DELTA" in _one_line_error(capsys)
    assert not out.exists()


def test_compare_reports_certified_rows_next_to_the_plain_ones(tmp_path):
    table = _table(tmp_path / "outputs.csv")
    out = tmp_path / "cmp"
    args = ["--outputs", str(table), "--out", str(out), "--sweep-points", "3"]
    assert compare_main([*args, "--guarantee", "0.02:0.1", "--criteria", "max-softmax"]) == 0
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    certified = [r for r in rows if r["kind"] == "certified"]
    assert len(certified) == 1 and certified[0]["point"].startswith("eps=0.02 delta=0.1 (")
    assert "n=1500" in certified[0]["point"] or "n=750" in certified[0]["point"]
    assert any(r["kind"] == "curve" and r["point"] == "eps=0.02" for r in rows)


def test_watch_refuses_a_rule_file_of_another_cascade(tmp_path, capsys):
    three = _table(tmp_path / "three.csv", n_val=200, n_test=50, stages=3)
    two = _table(tmp_path / "two.csv", n_val=200, n_test=50, stages=2)
    rule_file = tmp_path / "rule.json"
    assert fit_main([str(three), "--accuracy-drop", "0.01", "--out", str(rule_file)]) == 0
    capsys.readouterr()
    assert watch_main([str(two), "--rule", str(rule_file)]) == 2
    _one_line_error(capsys)
