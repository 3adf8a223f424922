import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import torch_decisions
from policycascade.agents.rules import exit_stages
from policycascade.agents.thresholds import (
    ScoreSearch,
    ShiftedRule,
    ThresholdRule,
    ThresholdSearch,
    best_reward_rule,
)
from policycascade.cascade import CascadeOutputs
from policycascade.costs import StageCosts
from policycascade.evaluation import evaluate_rule
from policycascade.outputs_io import load_outputs, outputs_from_arrays, save_outputs
from policycascade.rule_io import load_rule, rule_to_dict, save_rule
from policycascade.serving import ServingRule, load_serving_rule

SERVING = Path(__file__).resolve().parents[1] / "policycascade" / "serving.py"


def three_stage_cascade(n: int, seed: int, names=("tiny", "mid", "big")) -> CascadeOutputs:
    """Random 3-stage, 5-class outputs whose later stages are right more often."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(5, (n,), generator=g)
    logits = torch.randn(n, 3, 5, generator=g) * 2
    logits[torch.arange(n), :, labels] += torch.tensor([0.5, 1.5, 3.0])
    return outputs_from_arrays(
        labels, logits=logits, stage_costs=[1.0, 4.0, 20.0], stage_names=list(names)
    )


def serving_metrics(exit_stage: np.ndarray, answer: np.ndarray, outputs: CascadeOutputs) -> dict:
    """Accuracy, exit shares and mean cost of the served decisions, in numpy."""
    labels = outputs.labels.numpy()
    cumulative = np.asarray(outputs.costs.cumulative_macs, dtype=np.float64)
    return {
        "accuracy": float((answer == labels).mean()),
        "exit_distribution": (np.bincount(exit_stage, minlength=3) / len(labels)).tolist(),
        "mean_macs": float(cumulative[exit_stage].mean()),
    }


def fitted_rules(val: CascadeOutputs) -> list:
    """Max-softmax (candidates: every distinct score, so samples sit on the thresholds) and
    entropy with fitted temperatures, both by validation reward."""
    max_softmax = ThresholdSearch(
        val.probs, val.labels, val.costs, "max-softmax", num_candidates=None
    ).for_reward(0.02)
    entropy = ThresholdSearch(
        val.probs, val.labels, val.costs, "entropy", temperature_scaling=True, num_candidates=None
    ).for_reward(0.02)
    return [max_softmax, entropy, best_reward_rule(val.probs, val.labels, val.costs, 0.02)]


def test_csv_outputs_to_fitted_rule_to_numpy_serving_make_the_same_decisions(tmp_path):
    cascade = {"calibration": three_stage_cascade(500, 0), "test": three_stage_cascade(300, 1)}
    save_outputs(cascade, tmp_path / "outputs.csv")
    loaded = load_outputs(tmp_path / "outputs.csv")
    val, test = loaded["calibration"], loaded["test"]
    # what a serving system holds: the plain (N, K, C) array, read without torch
    table = np.genfromtxt(
        tmp_path / "outputs.csv", delimiter=",", names=True, dtype=None, encoding="utf-8"
    )
    columns = [f"{s}p{c}" for s in ("tiny", "mid", "big") for c in range(5)]  # dots dropped
    plain = np.stack([table[name] for name in columns], axis=1).reshape(-1, 3, 5)
    is_val = table["split"] == "calibration"
    plain_val, plain_test = plain[is_val], plain[~is_val]
    assert np.array_equal(plain_val, val.probs.numpy())

    rules = fitted_rules(val)
    assert rules[1].temperatures is not None
    for rule in rules:
        ties = int((rule.stop_scores(val.probs) == 0).sum())
        path = tmp_path / f"{rule.name}.json"
        save_rule(rule, path, outputs=val)
        served = load_serving_rule(path)
        exit_stage, answer = served.predict(plain_val)
        expected_exit, expected_answer = torch_decisions(rule, val)
        assert np.array_equal(exit_stage, expected_exit), rule.name
        assert np.array_equal(answer, expected_answer), rule.name
        metrics = evaluate_rule(rule, val)
        mine = serving_metrics(exit_stage, answer, val)
        assert mine["accuracy"] == metrics["accuracy"]
        assert mine["exit_distribution"] == metrics["exit_distribution"]
        assert mine["mean_macs"] == pytest.approx(metrics["mean_macs"], rel=1e-12)
        # new data: the served file and the torch rule read back from it agree
        loaded_rule = load_rule(path, outputs=test)
        assert np.array_equal(served.predict(plain_test)[0], torch_decisions(loaded_rule, test)[0])
        if rule is not rules[2]:
            assert ties > 0, f"{rule.name}: no sample sits exactly on a threshold"


def test_a_sample_exactly_at_a_max_softmax_threshold_stops_in_both():
    probs = torch.tensor(
        [
            [[0.7, 0.3], [0.9, 0.1], [0.5, 0.5]],  # max 0.7 = threshold: stops at stage 0
            [[0.6, 0.4], [0.8, 0.2], [0.5, 0.5]],  # 0.6 < 0.7, 0.8 = threshold: stops at 1
            [[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]],  # continues twice: stage 2
        ]
    )
    out = CascadeOutputs(probs, torch.tensor([0, 0, 1]), StageCosts([1, 2, 4]))
    at = [float(probs[0, 0, 0]), float(probs[1, 1, 0])]  # float32 values, as the scores are
    rule = ThresholdRule("max-softmax", at)
    assert exit_stages(rule, probs).tolist() == [0, 1, 2]
    served = ServingRule(json.loads(json.dumps(rule_to_dict(rule), allow_nan=False)))
    assert served.exit_stages(probs.numpy()).tolist() == [0, 1, 2]
    assert served.predict(probs.numpy())[1].tolist() == [0, 0, 0]
    assert evaluate_rule(rule, out)["exit_distribution"] == [1 / 3, 1 / 3, 1 / 3]


@pytest.mark.parametrize(
    "criterion", ["max-softmax", "entropy", "softmax-margin", "logit-margin", "ensemble"]
)
def test_every_criterion_and_shifted_rules_match_torch(tmp_path, criterion):
    val, test = three_stage_cascade(250, 2), three_stage_cascade(200, 3)
    search = ThresholdSearch(
        val.probs, val.labels, val.costs, criterion, temperature_scaling=True, num_candidates=None
    )  # float32 softmaxes; every candidate threshold is some sample's score
    rules = [search.for_reward(0.05), search.for_accuracy_drop(0.01), *search.sweep(2)]
    rules.append(ScoreSearch.for_rule(rules[0], val.probs, val.labels, val.costs).for_reward(0.01))
    assert isinstance(rules[-1], ShiftedRule)
    for rule in rules:
        save_rule(rule, tmp_path / "rule.json", outputs=val, overwrite=True)
        served = load_serving_rule(tmp_path / "rule.json")
        for outputs, reference in ((val, rule), (test, load_rule(tmp_path / "rule.json"))):
            exit_stage, answer = served.predict(outputs.probs.numpy())
            expected_exit, expected_answer = torch_decisions(reference, outputs)
            assert np.array_equal(exit_stage, expected_exit)
            assert np.array_equal(answer, expected_answer)


def test_early_exit_serving_with_stop_at_matches_exit_stages(tmp_path):
    val = three_stage_cascade(300, 4)
    rule = ThresholdSearch(val.probs, val.labels, val.costs, "entropy").for_reward(0.05)
    save_rule(rule, tmp_path / "rule.json", outputs=val)
    served = load_serving_rule(tmp_path / "rule.json")
    probs = val.probs.numpy()
    exit_stage = np.full(len(probs), -1)
    running = np.arange(len(probs))
    for stage in range(3):  # stage t only sees the samples still running, and stages 0..t
        stop = served.stop_at(stage, probs[running, : stage + 1])
        exit_stage[running[stop]] = stage
        running = running[~stop]
    assert len(running) == 0
    assert np.array_equal(exit_stage, served.exit_stages(probs))
    assert np.array_equal(exit_stage, exit_stages(rule, val.probs).numpy())
    with pytest.raises(ValueError, match="deciding at stage 2 needs the softmaxes of stages 0..2"):
        served.stop_at(2, probs[:, :2])
    with pytest.raises(ValueError, match="stage must be in \\[0, 3\\), got 3"):
        served.stop_at(3, probs)


def test_round_trip_and_json_safe_infinities(tmp_path):
    rule = ThresholdRule("logit-margin", [float("inf"), float("-inf")], [1.5, 0.5, 2.0], "mine")
    save_rule(rule, tmp_path / "rule.json")
    text = (tmp_path / "rule.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert load_rule(tmp_path / "rule.json") == rule
    shifted = ShiftedRule(ThresholdRule("entropy", [-1.0, -0.5]), [0.25, float("inf")], "s")
    save_rule(shifted, tmp_path / "shifted.json")
    assert load_rule(tmp_path / "shifted.json") == shifted


def test_calibration_block_and_thresholds_lowered_within_their_gaps(tmp_path):
    val = three_stage_cascade(500, 5)
    rule = ThresholdSearch(val.probs, val.labels, val.costs, "max-softmax", num_candidates=None)
    rule = rule.for_reward(0.02)
    data = save_rule(rule, tmp_path / "rule.json", outputs=val, extra={"guarantee": {"delta": 0.1}})
    saved = json.loads((tmp_path / "rule.json").read_text())
    assert saved == data and saved["guarantee"] == {"delta": 0.1}
    assert saved["stage_names"] == ["tiny", "mid", "big"] and saved["num_classes"] == 5
    assert saved["costs"] == {
        "unit": "MACs",
        "classifier": [1, 4, 20],
        "alone": [1, 4, 20],
        "policy": [0, 0, 0],
    }
    metrics = evaluate_rule(rule, val)
    assert saved["calibration"] == {
        "num_samples": 500,
        "exit_shares": metrics["exit_distribution"],
        "mean_cost": metrics["mean_macs"],
        "cost_unit": "MACs",
        "accuracy": metrics["accuracy"],
    }
    # the thresholds lowered by a rounding margin within their gaps: same decisions, fitted kept
    params = saved["parameters"]
    assert params["fitted_thresholds"] == rule.thresholds
    loaded = load_rule(tmp_path / "rule.json")
    assert all(c <= f for c, f in zip(loaded.thresholds, rule.thresholds, strict=True))
    assert torch.equal(exit_stages(loaded, val.probs), exit_stages(rule, val.probs))
    conf = rule.confidences(val.probs).double()
    for t, (lowered, fitted) in enumerate(zip(loaded.thresholds, rule.thresholds, strict=True)):
        if fitted != float("inf"):
            assert fitted - 1e-5 * max(1, abs(fitted)) <= lowered <= fitted
            assert not bool(((conf[:, t] >= lowered) & (conf[:, t] < fitted)).any())


def test_refusals(tmp_path):
    val = three_stage_cascade(100, 6)
    with pytest.raises(TypeError, match="got object"):
        save_rule(object(), tmp_path / "r.json")
    inner = ShiftedRule(ThresholdRule("entropy", [0.0, 0.0]), [0.0, 0.0])
    with pytest.raises(TypeError, match="got a ShiftedRule over ShiftedRule"):
        save_rule(ShiftedRule(inner, [0.0, 0.0]), tmp_path / "r.json")
    rule = ThresholdRule("max-softmax", [0.9, 0.8])
    with pytest.raises(
        ValueError, match="extra must not replace the rule's own block 'parameters'"
    ):
        save_rule(rule, tmp_path / "r.json", extra={"parameters": {}})
    save_rule(rule, tmp_path / "r.json", outputs=val)
    served = load_serving_rule(tmp_path / "r.json")
    with pytest.raises(
        ValueError,
        match="probs has 2 stages and 5 classes but the rule in .* "
        "is for 3 stages \\['tiny', 'mid', 'big'\\], 5 classes",
    ):
        served.check_outputs(val.probs.numpy()[:, :2])
    with pytest.raises(ValueError, match="probs has 3 stages and 4 classes"):
        served.predict(np.full((2, 3, 4), 0.25))
    other = three_stage_cascade(50, 7, names=("a", "b", "c"))
    with pytest.raises(
        ValueError,
        match="fitted for stages \\['tiny', 'mid', 'big'\\] .* these "
        "outputs have stages \\['a', 'b', 'c'\\]",
    ):
        load_rule(tmp_path / "r.json", outputs=other)
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something"}))
    with pytest.raises(ValueError, match="is not a policycascade-rule file"):
        load_serving_rule(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="no rule file at"):
        load_serving_rule(tmp_path / "missing.json")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_serving_module_needs_no_torch():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('serving', {str(SERVING)!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'policycascade')))\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_import_policycascade_serving_does_not_import_torch():
    result = run_python("import sys, policycascade.serving; print('torch' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False", "importing policycascade.serving pulled in torch"


def test_probed_bad_rules_and_probabilities_are_refused(tmp_path):
    val = three_stage_cascade(60, 8)
    rule = ThresholdRule("max-softmax", [0.9, 0.8])
    path = tmp_path / "r.json"
    data = save_rule(rule, path, outputs=val)
    with pytest.raises(FileExistsError, match="'.*r.json' already exists: pass overwrite=True"):
        save_rule(ThresholdRule("max-softmax", [0.5, 0.5]), path)
    assert json.loads(path.read_text()) == data  # the user's file is kept
    save_rule(ThresholdRule("max-softmax", [0.5, 0.5]), path, outputs=val, overwrite=True)
    assert list(load_rule(path).thresholds) == pytest.approx([0.5, 0.5], abs=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    for block, message in (
        ([1], "the 'calibration' block must be a dict"),
        ({"exit_shares": [0.5, 0.5, 0]}, "has no 'num_samples' entry"),
        ({"num_samples": 3, "exit_shares": [1.0]}, "exit_shares must be 3 numbers in \\[0, 1\\]"),
        ({"num_samples": True, "exit_shares": [1, 0, 0]}, "num_samples must be an integer"),
    ):
        broken = dict(data, calibration=block)
        (tmp_path / "broken.json").write_text(json.dumps(broken))
        for load in (load_serving_rule, load_rule):
            with pytest.raises(
                ValueError, match=f"'.*broken.json': {message}|broken.json.*{message}"
            ):
                load(tmp_path / "broken.json")
    served = load_serving_rule(path)
    probs = val.probs.numpy().astype(np.float64)
    for value in (np.nan, -0.2, 1.5, np.inf):
        bad = probs.copy()
        bad[4, 1, 2] = value
        with pytest.raises(ValueError, match="probs\\[4, 1\\] \\(sample 4, stage 1\\) holds"):
            served.predict(bad)
        with pytest.raises(ValueError, match="probs\\[4, 1\\]"):
            served.stop_at(1, bad[:, :2])
