"""JSON forms of the class-aware and continuation rules: saved, served with numpy, watched."""

import json

import numpy as np
import pytest
import torch

from conftest import torch_decisions
from policycascade.agents.class_aware import ClassAwareSearch, ClassAwareThresholdRule
from policycascade.agents.continuation import ContinuationValueRule, fit_continuation_rule
from policycascade.agents.rules import exit_stages
from policycascade.agents.thresholds import ShiftedRule
from policycascade.cascade import CascadeOutputs
from policycascade.fitting import fit_rule
from policycascade.outputs_io import load_outputs, outputs_from_arrays, save_outputs
from policycascade.rule_io import load_rule, save_rule
from policycascade.serving import load_serving_rule
from policycascade.watch_cli import main as watch_main

NAMES = ("tiny", "mid", "big")


def cascade(n: int, seed: int) -> CascadeOutputs:
    """Random 3-stage, 4-class outputs; later stages are right more often, stage 1 is
    confidently wrong on class 3 (where a per-class threshold helps)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(4, (n,), generator=g)
    logits = torch.randn(n, 3, 4, generator=g) * 2
    logits[torch.arange(n), :, labels] += torch.tensor([0.5, 1.5, 3.0])
    logits[labels == 3, 1, 0] += 4.0
    return outputs_from_arrays(
        labels, logits=logits, stage_costs=[1.0, 4.0, 20.0], stage_names=list(NAMES)
    )


def continuation(val: CascadeOutputs, feature_set: str, answer: str, hidden: int):
    costs = torch.tensor(val.costs.cumulative_macs, dtype=torch.float64)
    return fit_continuation_rule(
        val.probs, val.labels, costs / val.costs.reference_macs, 0.01, feature_set, answer, hidden
    )


FEW_ALPHAS = (0.005, 0.02, 0.05)  # reward fits the targets choose from: few, for speed


def class_aware(outputs: CascadeOutputs, criterion: str = "max-softmax", **options):
    return ClassAwareSearch(
        outputs.probs,
        outputs.labels,
        outputs.costs,
        criterion,
        num_candidates=50,
        prior_samples=5.0,
        alphas=FEW_ALPHAS,
        **options,
    )


def class_aware_rules(val: CascadeOutputs) -> list[ClassAwareThresholdRule]:
    """Class-aware rules with and without offsets, and with temperatures and another criterion."""
    search = class_aware(val)
    tempered = class_aware(val, "entropy", temperature_scaling=True)
    rules = [search.for_reward(0.02), search.for_accuracy_drop(0.01), tempered.for_reward(0.02)]
    assert rules[0].offsets is None and rules[1].offsets is not None
    assert rules[2].temperatures is not None
    assert any(len(set(row)) > 1 for row in rules[0].thresholds)  # really per class
    return rules


def test_class_aware_rules_serve_exactly_the_torch_decisions(tmp_path):
    val, test = cascade(600, 0), cascade(2000, 1)
    for rule in class_aware_rules(val):
        saved = save_rule(rule, tmp_path / "r.json", outputs=val, overwrite=True)
        assert saved["family"] == "class-aware-threshold"
        served, loaded = load_serving_rule(tmp_path / "r.json"), load_rule(tmp_path / "r.json")
        assert isinstance(loaded, ClassAwareThresholdRule)
        assert loaded.thresholds == rule.thresholds or "fitted_thresholds" in saved["parameters"]
        for outputs, reference in ((val, rule), (test, loaded)):
            exit_stage, answer = served.predict(outputs.probs.numpy())
            expected_exit, expected_answer = torch_decisions(reference, outputs)
            assert np.array_equal(exit_stage, expected_exit)
            assert np.array_equal(answer, expected_answer)


def test_infinite_class_thresholds_round_trip_as_json():
    rule = ClassAwareThresholdRule(
        "max-softmax", [[float("inf"), 0.5, -float("inf")], [0.9, 0.9, 0.2]], offsets=[0.1, 0.0]
    )
    from policycascade.rule_io import rule_from_dict, rule_to_dict

    text = json.dumps(rule_to_dict(rule), allow_nan=False)
    assert rule_from_dict(json.loads(text)) == rule


@pytest.mark.parametrize(
    ("feature_set", "answer", "hidden"),
    [("history", "exit", 0), ("class", "ensemble", 8), ("confidence", "exit", 4)],
)
def test_continuation_rules_serve_the_torch_decisions(tmp_path, feature_set, answer, hidden):
    val, test = cascade(600, 2), cascade(3000, 3)
    rule = continuation(val, feature_set, answer, hidden)
    shifted = fit_rule(val, rule, accuracy_drop=0.01)
    assert isinstance(shifted, ShiftedRule)
    for fitted, family in ((rule, "continuation-value"), (shifted, "shifted")):
        saved = save_rule(fitted, tmp_path / "r.json", outputs=val, overwrite=True)
        assert saved["family"] == family
        served, loaded = load_serving_rule(tmp_path / "r.json"), load_rule(tmp_path / "r.json")
        for outputs in (val, test):
            torch_scores = loaded.stop_scores(outputs.probs).double().numpy()
            numpy_scores = served.stop_scores(outputs.probs.numpy())
            assert np.allclose(numpy_scores, torch_scores, rtol=0, atol=1e-5)
            exit_stage, answers = served.predict(outputs.probs.numpy())
            expected_exit, expected_answer = torch_decisions(loaded, outputs)
            # float32 torch and float64 numpy may differ on a sample within 1e-6 of a cut
            clear = (np.abs(torch_scores) >= 1e-6).all(1)
            assert clear.mean() > 0.99
            assert np.array_equal(exit_stage[clear], expected_exit[clear])
            assert np.array_equal(answers[clear], expected_answer[clear])
        # on the calibration samples the file decides exactly as the fitted rule
        assert np.array_equal(
            served.exit_stages(val.probs.numpy()), torch_decisions(fitted, val)[0]
        )
    assert (
        exit_stages(load_rule(tmp_path / "r.json"), test.probs).tolist()
        == exit_stages(shifted, test.probs).tolist()
        or saved["parameters"].get("fitted_offsets") is not None
    )


def test_broken_continuation_weights_are_refused(tmp_path):
    rule = continuation(cascade(200, 4), "history", "exit", 0)
    data = save_rule(rule, tmp_path / "r.json")
    bad = json.loads(json.dumps(data))
    bad["parameters"]["stage_models"][0]["head"]["weight"]["shape"] = [1, 1]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="a weight of shape \\[1, 1\\]"):
        load_serving_rule(tmp_path / "bad.json")
    bad["parameters"]["stage_models"] = bad["parameters"]["stage_models"][:1]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="needs 3 cumulative costs and 2 stage models"):
        load_serving_rule(tmp_path / "bad.json")
    back = ContinuationValueRule.from_json_parameters(data["parameters"])
    probs = cascade(50, 5).probs
    assert torch.equal(back.stop_scores(probs), rule.stop_scores(probs))


def test_rules_fitted_from_a_csv_serve_as_fitted_on_cascade_outputs(tmp_path):
    """CSV -> load_outputs -> fit -> JSON -> numpy on the CSV's plain array: the decisions of
    the same family fitted on the CascadeOutputs the CSV was written from."""
    original = {"val": cascade(500, 6), "test": cascade(800, 7)}
    save_outputs(original, tmp_path / "outputs.csv")
    loaded = load_outputs(tmp_path / "outputs.csv")
    table = np.genfromtxt(
        tmp_path / "outputs.csv", delimiter=",", names=True, dtype=None, encoding="utf-8"
    )
    columns = [f"{s}p{c}" for s in NAMES for c in range(4)]
    plain = np.stack([table[name] for name in columns], axis=1).reshape(-1, 3, 4)
    plain_test = plain[table["split"] == "test"]
    fits = {
        "class-aware": lambda o: class_aware(o).for_accuracy_drop(0.01),
        "continuation": lambda o: continuation(o, "history", "exit", 0),
    }
    for name, fit in fits.items():
        from_csv, from_outputs = fit(loaded["val"]), fit(original["val"])
        save_rule(from_csv, tmp_path / f"{name}.json", outputs=loaded["val"])
        served = load_serving_rule(tmp_path / f"{name}.json")
        exit_stage, answer = served.predict(plain_test)
        expected_exit, expected_answer = torch_decisions(from_outputs, original["test"])
        scores = from_outputs.stop_scores(original["test"].probs).double().numpy()
        clear = (np.abs(scores) >= 1e-6).all(1)  # every sample for the class-aware rule
        assert clear.all() or name == "continuation"
        assert np.array_equal(exit_stage[clear], expected_exit[clear]), name
        assert np.array_equal(answer[clear], expected_answer[clear]), name


@pytest.mark.parametrize("kind", ["class-aware", "continuation"])
def test_watch_command_reads_these_rule_files(tmp_path, capsys, kind):
    val = cascade(400, 8)
    rule = (
        class_aware(val).for_accuracy_drop(0.01)
        if kind == "class-aware"
        else continuation(val, "history", "exit", 0)
    )
    save_outputs({"val": val, "test": cascade(600, 9)}, tmp_path / "out.npz")
    data = save_rule(rule, tmp_path / "rule.json", outputs=val)
    assert watch_main([str(tmp_path / "out.npz"), "--rule", str(tmp_path / "rule.json")]) == 0
    printed = capsys.readouterr().out
    shares = ", ".join(f"{s:.3f}" for s in data["calibration"]["exit_shares"])
    assert f"calibration: 400 samples, exit shares {shares}" in printed
