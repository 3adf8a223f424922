import csv
import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import random_outputs
from policycascade.agents.rules import stop_decisions
from policycascade.agents.thresholds import (
    CRITERIA,
    ThresholdRule,
    ThresholdSearch,
    apply_temperature,
    confidence,
    fit_temperature,
    oracle_exits,
)
from policycascade.compare import compare_outputs, macs_at_accuracy
from policycascade.compare import main as compare_main
from policycascade.evaluation import evaluate_exits, first_stop
from policycascade.train import main as train_main


def test_confidences_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    assert float(confidence(probs, "max-softmax")) == pytest.approx(0.7)
    assert float(confidence(probs, "softmax-margin")) == pytest.approx(0.5)
    assert float(confidence(probs, "logit-margin")) == pytest.approx(torch.log(torch.tensor(3.5)))
    entropy = -(probs * probs.log()).sum()
    assert float(confidence(probs, "entropy")) == pytest.approx(-float(entropy))


def test_temperature_recovers_a_known_scaling():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 5, generator=g) * 3
    labels = torch.multinomial(logits.softmax(-1), 1, generator=g).squeeze(1)
    overconfident = (logits * 2.5).softmax(-1)  # a model 2.5x too sure
    t = fit_temperature(overconfident, labels)
    assert t == pytest.approx(2.5, rel=0.1)
    torch.testing.assert_close(
        apply_temperature(overconfident, t), logits.softmax(-1), atol=0.03, rtol=0
    )


def _search(criterion="max-softmax", seed=0, temperature=False):
    out = random_outputs(600, 4, 5, seed=seed, macs=[10, 40, 160, 640])
    return out, ThresholdSearch(out.probs, out.labels, out.costs, criterion, temperature)


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("epsilon", [0.0, 0.01, 0.05])
def test_accuracy_drop_is_met_on_the_validation_data_it_was_fitted_on(criterion, epsilon):
    out, search = _search(criterion)
    rule = search.for_accuracy_drop(epsilon)
    metrics = evaluate_exits(out, first_stop(stop_decisions(rule, out.probs)))
    last = metrics["stage_accuracy"][-1]
    assert metrics["accuracy"] >= last - epsilon - 1e-12
    assert metrics["mean_macs"] <= out.costs.cumulative_macs[-1]


@pytest.mark.parametrize("criterion", CRITERIA)
def test_budget_is_met_and_more_budget_never_hurts(criterion):
    out, search = _search(criterion, seed=1, temperature=True)
    previous = -1.0
    for share in (0.05, 0.2, 0.5, 1.0):
        rule = search.for_budget(share * out.costs.reference_macs)
        metrics = evaluate_exits(out, first_stop(stop_decisions(rule, out.probs)))
        assert metrics["mean_macs"] <= share * out.costs.reference_macs + 1e-9
        assert metrics["accuracy"] >= previous - 1e-12
        previous = metrics["accuracy"]


def test_unreachable_targets_give_the_nearest_rule_not_the_opposite_extreme():
    out, search = _search()
    best_accuracy = max(
        evaluate_exits(out, first_stop(stop_decisions(r, out.probs)))["accuracy"]
        for r in search.sweep(40)
    )
    # an accuracy no thresholds reach (a policy trained on this split can report one)
    rule = search.for_accuracy_drop(0.0, reference_accuracy=1.01)
    metrics = evaluate_exits(out, first_stop(stop_decisions(rule, out.probs)))
    assert metrics["accuracy"] >= best_accuracy - 1e-12
    # a budget below the first stage's cost: the cheapest rule, everything stops at stage 0
    rule = search.for_budget(1.0)
    metrics = evaluate_exits(out, first_stop(stop_decisions(rule, out.probs)))
    assert metrics["mean_macs"] == out.costs.cumulative_macs[0]


def test_rule_decisions_follow_thresholds():
    rule = ThresholdRule("max-softmax", [0.6, float("inf")])
    probs = torch.tensor([[0.7, 0.3], [0.55, 0.45]])
    assert rule.stop_at_stage(0, probs).tolist() == [True, False]
    assert rule.stop_at_stage(1, probs).tolist() == [False, False]
    assert rule.stop_at_stage(2, probs).tolist() == [True, True]
    with pytest.raises(ValueError, match="criterion"):
        ThresholdRule("certainty", [0.5])


def test_oracle_is_never_beaten():
    val = random_outputs(300, 4, 5, seed=2)
    test = random_outputs(300, 4, 5, seed=3)
    rows = compare_outputs(val, test, ["a", "b", "c", "d"], epsilons=(0.0, 0.02))
    oracle = next(r for r in rows if r["policy"] == "oracle")
    exits = oracle_exits(test.probs, test.labels)
    any_right = (test.probs.argmax(-1) == test.labels.unsqueeze(1)).any(1).double().mean()
    assert oracle["accuracy"] == pytest.approx(float(any_right))
    assert all(r["accuracy"] <= oracle["accuracy"] + 1e-12 for r in rows)
    # and it is the cheapest way to be right: every right sample exits at its first right stage
    assert int(exits.max()) <= 3
    singles = [r for r in rows if r["policy"] == "single"]
    assert [r["macs_share"] for r in singles] == pytest.approx([10 / 270, 30 / 270, 90 / 270, 1.0])


def test_macs_at_accuracy_interpolates_the_upper_envelope():
    points = [(10, 0.5), (20, 0.7), (30, 0.65), (40, 0.9)]
    assert macs_at_accuracy(points, 0.5) == 10
    assert macs_at_accuracy(points, 0.8) == pytest.approx(30)  # halfway from (20,.7) to (40,.9)
    assert macs_at_accuracy(points, 0.95) is None


def test_compare_cli_outputs_agree(tmp_path, capsys):
    runs = tmp_path / "runs"
    fast = ["--pretrain-epochs", "3", "--epochs", "3", "--no-progress", "--logdir", str(runs)]
    assert train_main(["--alpha", "0.01", *fast]) == 0
    out = tmp_path / "cmp"
    args = ["--out", str(out), "--criteria", "max-softmax", "entropy", "--sweep-points", "6"]
    assert compare_main([str(runs), *args]) == 0
    payload = json.loads((out / "comparison.json").read_text())
    rows = payload["rows"]
    policies = {r["policy"] for r in rows}
    assert {"reinforce", "max-softmax", "entropy", "random", "oracle", "single"} <= policies
    with open(out / "comparison.csv") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert len(csv_rows) == len(rows)
    for row, line in zip(rows, csv_rows, strict=True):
        assert float(line["accuracy"]) == pytest.approx(row["accuracy"])
        assert float(line["mean_macs"]) == pytest.approx(row["mean_macs"])
    assert (out / "tradeoff.png").stat().st_size > 10_000
    # TensorBoard: each policy's scalars equal its JSON points, means over seeds (one seed
    # here, so they equal the rows too); step = mean MACs
    assert {(a["policy"], a["point"], a["accuracy"]) for a in payload["aggregated"]} == {
        (r["policy"], r["point"], r["accuracy"]) for r in rows
    }
    for policy, count in (("oracle", 1), ("single", 4), ("reinforce", 1), ("max-softmax", 17)):
        points = (a for a in payload["aggregated"] if a["policy"] == policy)
        expected = sorted(points, key=lambda r: r["mean_macs"])
        events = EventAccumulator(str(out / "tensorboard" / policy))
        events.Reload()
        logged = events.Scalars("compare/accuracy")
        assert len(logged) == len(expected) == count
        for event, row in zip(logged, expected, strict=True):
            assert event.step == round(row["mean_macs"])
            assert event.value == pytest.approx(row["accuracy"], abs=1e-6)
    summary = EventAccumulator(str(out / "tensorboard" / "summary"))
    summary.Reload()
    assert "compare/tradeoff" in summary.Tags()["images"]
    assert len(payload["savings"]) == 1 and payload["aggregated"]
    # a run whose checkpoint no longer fits (another version's layout): one line, status 2
    (checkpoint,) = runs.glob("*/checkpoint.pt")
    state = torch.load(checkpoint, weights_only=False)
    state["agent"] = {f"old.{key}": value for key, value in state["agent"].items()}
    torch.save(state, checkpoint)
    assert compare_main([str(runs), "--out", str(tmp_path / "cmp2")]) == 2
    err = capsys.readouterr().err
    assert "does not fit this config's agent" in err and "Traceback" not in err
    assert not (tmp_path / "cmp2").exists()


def test_compare_rejects_a_directory_without_runs(tmp_path, capsys):
    assert compare_main([str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_reward_fit_beats_every_swept_rule_on_its_own_objective():
    out, search = _search(seed=2)
    for alpha in (0.0, 0.05, 0.5):

        def reward(rule, alpha=alpha):
            m = evaluate_exits(out, first_stop(stop_decisions(rule, out.probs)))
            return m["accuracy"] - alpha * m["mean_macs"] / out.costs.reference_macs

        best = reward(search.for_reward(alpha))
        assert all(best >= reward(r) - 1e-12 for r in search.sweep(30))
    # a huge cost weight sends everything out at stage 0
    rule = search.for_reward(1e6)
    cheapest = out.costs.cumulative_macs[0]
    assert evaluate_exits(out, first_stop(stop_decisions(rule, out.probs)))["mean_macs"] == cheapest


def test_compare_a_multi_exit_ltc_run_beside_a_four_stage_run(tmp_path, capsys):
    runs = tmp_path / "runs"
    fast = ["--pretrain-epochs", "2", "--no-progress", "--logdir", str(runs)]
    assert train_main(["--alpha", "0.01", "--epochs", "1", *fast]) == 0
    assert train_main(["--agent", "ltc", "--ltc-form", "multi-exit", *fast]) == 0
    out = tmp_path / "cmp"
    args = ["--out", str(out), "--criteria", "max-softmax", "--sweep-points", "4"]
    assert compare_main([str(runs), *args]) == 0
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert {"reinforce", "ltc"} <= {r["policy"] for r in rows}
    stages = {len(r["exit_distribution"]) for r in rows}
    assert stages == {3, 4}  # the multi-exit net has three exits, the digits cascade four
    with open(out / "comparison.csv") as handle:
        lines = list(csv.DictReader(handle))
    assert len(lines) == len(rows)
    for row, line in zip(rows, lines, strict=True):
        assert float(line["accuracy"]) == pytest.approx(row["accuracy"])
        assert (line["exit_share_stage3"] == "") == (len(row["exit_distribution"]) == 3)
    # two classifier sets (trained by REINFORCE and by LtC): their runs are kept apart
    for policy in ("ltc", "max-softmax", "max-softmax__LtC_classifiers_"):
        assert (out / "tensorboard" / policy).is_dir()
