"""Bad inputs on the new surface (fit, compare --outputs, watch, fit_rule, certified_fit)."""

import numpy as np
import pytest
import torch

import policycascade
from policycascade.certify import Target, certified_fit
from policycascade.compare import main as compare_main
from policycascade.fit_cli import main as fit_main
from policycascade.watch_cli import main as watch_main


@pytest.fixture
def table(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    labels = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3, 3))
    for t in range(3):
        logits[np.arange(n), t, labels] += 1.0 + t
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    split = np.where(np.arange(n) < 300, "val", "test")
    outputs = {
        name: policycascade.outputs_from_arrays(
            labels[split == name], probs=probs[split == name], stage_costs=[1, 5, 25]
        )
        for name in ("val", "test")
    }
    path = tmp_path / "outputs.npz"
    policycascade.save_outputs(outputs, path)
    return path


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_fit_class_aware_prints_its_per_class_thresholds(table, capsys):
    assert fit_main([str(table), "--accuracy-drop", "0.01", "--family", "class-aware"]) == 0
    assert "thresholds [[" in capsys.readouterr().out


def test_fit_refuses_class_aware_out_and_the_input_as_out(table, tmp_path, capsys):
    out = tmp_path / "rule.json"
    args = [str(table), "--alpha", "0.01", "--family", "class-aware", "--out", str(out)]
    assert fit_main(args) == 2
    assert "class-aware" in _one_line(capsys) and not out.exists()
    before = table.read_bytes()
    assert fit_main([str(table), "--alpha", "0.01", "--out", str(table), "--overwrite"]) == 2
    assert "outputs file itself" in _one_line(capsys)
    assert table.read_bytes() == before


def test_watch_keeps_an_existing_json_file_and_names_shuffle(table, tmp_path, capsys):
    rule = tmp_path / "rule.json"
    assert fit_main([str(table), "--accuracy-drop", "0.01", "--out", str(rule)]) == 0
    mine = tmp_path / "mine.json"
    mine.write_text("keep me")
    assert watch_main([str(table), "--rule", str(rule), "--json", str(mine)]) == 2
    assert "--overwrite" in _one_line(capsys)
    assert mine.read_text() == "keep me"
    assert watch_main([str(table), "--rule", str(rule), "--shuffle", "-1"]) == 2
    assert "--shuffle" in _one_line(capsys)


def test_compare_out_below_a_file_is_refused_before_any_work(table, tmp_path, capsys):
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    assert compare_main(["--outputs", str(table), "--out", str(afile / "cmp")]) == 2
    assert "is a file" in _one_line(capsys)
    assert compare_main(["--outputs", str(table), "--epsilons", "-0.1"]) == 2
    assert _one_line(capsys).startswith("error: --epsilons must be in [0, 1)")


def test_numeric_scalars_of_numpy_and_torch_are_numbers(table):
    val = policycascade.load_outputs(table)["val"]
    a = policycascade.fit_rule(val, alpha=np.float32(0.1))
    b = policycascade.fit_rule(val, alpha=torch.tensor(0.1))
    c = policycascade.fit_rule(val, alpha=float(np.float32(0.1)))
    assert a.thresholds == b.thresholds == c.thresholds
    fit = certified_fit(val, Target.accuracy_drop(0.05), np.float32(0.1))
    assert fit.delta == pytest.approx(0.1)
    with pytest.raises(TypeError, match="alpha must be a number"):
        policycascade.fit_rule(val, alpha="0.1")
    with pytest.raises(TypeError, match="target value must be a number"):
        Target("drop", "0.02")
    with pytest.raises(TypeError, match="rule must be a stopping rule"):
        policycascade.evaluate(None, val)
