import csv
import json
import signal

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import policycascade.checkpointing
from conftest import random_outputs
from policycascade.agents import LearnedRule, StoppingPolicy
from policycascade.agents.rules import stop_decisions
from policycascade.agents.thresholds import (
    CRITERIA,
    ScoreSearch,
    ThresholdRule,
    ThresholdSearch,
    apply_temperature,
    confidence,
    fit_temperature,
    oracle_exits,
)
from policycascade.cascade import CascadeOutputs
from policycascade.checkpoint import CHECKPOINT_NAME
from policycascade.compare import CompareOptions, compare_outputs
from policycascade.compare import main as compare_main
from policycascade.evaluation import evaluate_rule, first_stop
from policycascade.protocol import macs_at_accuracy
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
    metrics = evaluate_rule(rule, out)
    last = metrics["stage_accuracy"][-1]
    assert metrics["accuracy"] >= last - epsilon - 1e-12
    assert metrics["mean_macs"] <= out.costs.cumulative_macs[-1]


@pytest.mark.parametrize("criterion", CRITERIA)
def test_budget_is_met_and_more_budget_never_hurts(criterion):
    out, search = _search(criterion, seed=1, temperature=True)
    previous = -1.0
    for share in (0.05, 0.2, 0.5, 1.0):
        rule = search.for_budget(share * out.costs.reference_macs)
        metrics = evaluate_rule(rule, out)
        assert metrics["mean_macs"] <= share * out.costs.reference_macs + 1e-9
        assert metrics["accuracy"] >= previous - 1e-12
        previous = metrics["accuracy"]


def test_unreachable_targets_give_the_nearest_rule_not_the_opposite_extreme():
    out, search = _search()
    best_accuracy = max(evaluate_rule(r, out)["accuracy"] for r in search.sweep(40))
    # an accuracy no thresholds reach (a policy trained on this split can report one)
    rule = search.for_accuracy(1.01)
    metrics = evaluate_rule(rule, out)
    assert metrics["accuracy"] >= best_accuracy - 1e-12
    # a budget below the first stage's cost: the cheapest rule, everything stops at stage 0
    rule = search.for_budget(1.0)
    metrics = evaluate_rule(rule, out)
    assert metrics["mean_macs"] == out.costs.classifier_macs[0]  # a threshold costs nothing


def test_rule_decisions_follow_thresholds():
    rule = ThresholdRule("max-softmax", [0.6, float("inf")])
    probs = torch.tensor([[[0.7, 0.3]] * 3, [[0.55, 0.45]] * 3])
    torch.testing.assert_close(
        rule.stop_scores(probs),
        torch.tensor([[0.7, float("-inf")], [0.55, float("-inf")]], dtype=torch.float64)
        - torch.tensor([0.6, 0.0], dtype=torch.float64),
        rtol=0,
        atol=1e-7,
    )
    # stage 0 stops at 0.7 >= 0.6 only; +inf never stops; the last stage always does
    assert stop_decisions(rule, probs).tolist() == [[True, False, True], [False, False, True]]
    with pytest.raises(ValueError, match="criterion"):
        ThresholdRule("certainty", [0.5])


def learned_rule(k: int = 4, c: int = 5) -> LearnedRule:
    torch.manual_seed(0)
    return LearnedRule(StoppingPolicy(k, c, hidden=8)).eval()


RULES = {
    "threshold": lambda: ThresholdRule("entropy", [-1.2, -0.8, -0.5]),
    "threshold+T": lambda: ThresholdRule("max-softmax", [0.3, 0.4, 0.5], [0.5, 1.0, 2.0, 3.0]),
    "learned": learned_rule,
}


@pytest.mark.parametrize("name", RULES)
def test_stop_scores_on_every_history_prefix_equal_those_on_the_whole_cascade(name):
    """Early-exit inference sees stages 0..t only; its scores are the cached evaluation's."""
    rule = RULES[name]()
    probs = random_outputs(64, 4, 5, seed=4).probs
    whole = rule.stop_scores(probs)
    assert whole.shape == (64, 3)
    assert len(whole.unique()) > 100  # scores that differ between samples and stages
    for t in range(4):
        prefix = rule.stop_scores(probs[:, : t + 1])
        assert prefix.shape == (64, min(t + 1, 3))
        assert torch.equal(prefix, whole[:, : min(t + 1, 3)]), t
    # stage t's score does not depend on any later stage's softmax
    scrambled = probs.clone()
    scrambled[:, 2:] = scrambled[:, 2:].flip(0)
    assert torch.equal(rule.stop_scores(scrambled)[:, :2], whole[:, :2])


class MaxSoftmaxScore:
    """A "learned" score that happens to equal the max-softmax confidence (float32, no cost)."""

    num_stages = 4

    def stop_scores(self, history: torch.Tensor) -> torch.Tensor:
        return history[:, : self.num_stages - 1].max(-1).values

    def policy_macs(self) -> list[int]:
        return [0] * self.num_stages


def _confidence_matters(outputs: CascadeOutputs, seed: int) -> CascadeOutputs:
    """Labels that later stages get right more often, so the fitted rules spread out."""
    g = torch.Generator().manual_seed(seed)
    n, k, _ = outputs.probs.shape
    stage = torch.randint(k, (n,), generator=g)
    labels = outputs.probs[torch.arange(n), stage].argmax(-1)
    return CascadeOutputs(outputs.probs, labels, outputs.costs)


def test_a_score_equal_to_max_softmax_reproduces_the_max_softmax_rules_exactly():
    out = _confidence_matters(random_outputs(500, 4, 5, seed=5, macs=[10, 40, 160, 640]), 0)
    test = _confidence_matters(random_outputs(300, 4, 5, seed=6, macs=[10, 40, 160, 640]), 1)
    args = (out.probs, out.labels, out.costs)
    thresholds = ThresholdSearch(*args, "max-softmax")
    scores = ScoreSearch.for_rule(MaxSoftmaxScore(), *args)
    ref = out.costs.reference_macs
    fits = [lambda s: s.sweep(12)]
    fits += [lambda s, e=e: [s.for_accuracy_drop(e)] for e in (0.0, 0.005, 0.01, 0.02, 0.1)]
    fits += [lambda s, b=b: [s.for_budget(b * ref)] for b in (0.05, 0.1, 0.25, 0.5)]
    fits += [lambda s, a=a: [s.for_reward(a)] for a in (0.0, 0.01, 0.3)]
    distinct = set()
    for fit in fits:
        for expected, got in zip(fit(thresholds), fit(scores), strict=True):
            for outputs in (out, test):
                decisions = stop_decisions(expected, outputs.probs)
                assert torch.equal(stop_decisions(got, outputs.probs), decisions)
                mine, theirs = evaluate_rule(got, outputs), evaluate_rule(expected, outputs)
                for key in ("accuracy", "mean_macs", "exit_distribution"):
                    assert mine[key] == theirs[key], key
            distinct.add(tuple(first_stop(decisions).tolist()))
    assert len(distinct) > 10  # the fits cover many different operating points


def test_oracle_is_never_beaten():
    val = random_outputs(300, 4, 5, seed=2)
    test = random_outputs(300, 4, 5, seed=3)
    options = CompareOptions(epsilons=(0.0, 0.02))
    rows = compare_outputs(val, test, ["a", "b", "c", "d"], options)
    oracle = next(r for r in rows if r.policy == "oracle")
    assert oracle.kind == "oracle"
    exits = oracle_exits(test.probs, test.labels)
    any_right = (test.probs.argmax(-1) == test.labels.unsqueeze(1)).any(1).double().mean()
    assert oracle.accuracy == pytest.approx(float(any_right))
    assert all(r.accuracy <= oracle.accuracy + 1e-12 for r in rows)
    # and it is the cheapest way to be right: every right sample exits at its first right stage
    assert int(exits.max()) <= 3
    singles = [r for r in rows if r.kind == "single"]
    assert [r.point for r in singles] == ["a", "b", "c", "d"]
    assert [r.macs_share for r in singles] == pytest.approx([10 / 270, 30 / 270, 90 / 270, 1.0])
    assert {r.point for r in rows if r.policy == "max-softmax"} >= {"eps=0", "eps=0.02"}


@pytest.mark.parametrize(
    "stage_names, options, argument",
    [
        (["a", "b", "c"], None, "stage_names"),
        (["a", "b", "c", "d"], CompareOptions(epsilons=(2.0,)), "epsilons"),
        (["a", "b", "c", "d"], CompareOptions(budget_shares=(-1.0,)), "budget_shares"),
        (["a", "b", "c", "d"], CompareOptions(criteria=("certainty",)), "criteria"),
        (["a", "b", "c", "d"], CompareOptions(sweep_points=1), "sweep_points"),
    ],
)
def test_compare_outputs_rejects_bad_arguments_naming_them(stage_names, options, argument):
    val = random_outputs(50, 4, 5, seed=2)
    with pytest.raises(ValueError, match=argument):
        compare_outputs(val, val, stage_names, options)


def test_macs_at_accuracy_interpolates_the_upper_envelope():
    points = [(0.5, 10), (0.7, 20), (0.65, 30), (0.9, 40)]  # (accuracy, macs)
    assert macs_at_accuracy(points, 0.5) == 10
    assert macs_at_accuracy(points, 0.8) == pytest.approx(30)  # halfway from (.7,20) to (.9,40)
    assert macs_at_accuracy(points, 0.95) is None


FAST = ["--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Three finished runs (REINFORCE, LtC, multi-exit LtC) and one interrupted after epoch 1."""
    root = tmp_path_factory.mktemp("runs")
    reinforce = ["--agent", "reinforce", "--alpha", "0.01", "--pretrain-epochs", "2"]
    reinforce += ["--epochs", "1", *FAST]
    runs = {}
    for name, args in (
        ("reinforce", reinforce),
        ("ltc", ["--agent", "ltc", "--ltc-epochs", "1", *FAST]),
        ("multi-exit", ["--agent", "ltc", "--ltc-form", "multi-exit", "--ltc-epochs", "1", *FAST]),
    ):
        assert train_main([*args, "--logdir", str(root / name)]) == 0
        (runs[name],) = (root / name).iterdir()
    real_save = policycascade.checkpointing.save_atomic

    def save_then_signal(state, path):
        real_save(state, path)
        signal.raise_signal(signal.SIGTERM)  # as if stopped right after the first epoch

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(policycascade.checkpointing, "save_atomic", save_then_signal)
        assert train_main([*reinforce, "--logdir", str(root / "interrupted")]) == 130
    (runs["interrupted"],) = (root / "interrupted").iterdir()
    return runs


def test_compare_cli_outputs_agree(tiny_runs, tmp_path):
    out = tmp_path / "cmp"
    args = ["--out", str(out), "--criteria", "max-softmax", "entropy", "--sweep-points", "6"]
    assert compare_main([str(tiny_runs["reinforce"]), str(tiny_runs["ltc"]), *args]) == 0
    payload = json.loads((out / "comparison.json").read_text())
    rows = payload["rows"]
    # the reference: the same classifier family trained independently, every rule fitted on it
    assert {r["trained_by"] for r in rows} == {"reinforce", "ltc", "reference"}
    for trained_by in ("reinforce", "ltc"):
        mine = [r for r in rows if r["trained_by"] == trained_by]
        policies = {r["policy"] for r in mine}
        assert {trained_by, f"{trained_by} score", "max-softmax", "entropy"} <= policies
        assert {"random", "oracle", "single"} <= {r["kind"] for r in mine}
        (own,) = (r for r in mine if r["kind"] == "own")
        assert own["policy"] == trained_by
    with open(out / "comparison.csv") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert len(csv_rows) == len(rows)
    for row, line in zip(rows, csv_rows, strict=True):
        assert (line["policy"], line["point"]) == (row["policy"], row["point"])
        assert float(line["accuracy"]) == pytest.approx(row["accuracy"])
        assert float(line["mean_macs"]) == pytest.approx(row["mean_macs"])
    for figure in ("tradeoff.png", "accuracy_by_exit.png"):
        assert (out / figure).stat().st_size > 10_000
    # TensorBoard: each (classifiers, policy) is a run whose scalars are its JSON points,
    # means over seeds (one seed here, so they equal the rows too); step = mean MACs
    assert {
        (a["trained_by"], a["policy"], a["point"], a["accuracy"]) for a in payload["aggregated"]
    } == {(r["trained_by"], r["policy"], r["point"], r["accuracy"]) for r in rows}
    # max-softmax: 6 sweep points (budgets), 4 epsilons, 3 budgets, 3 matched to the REINFORCE
    # policy (accuracy, MACs, reward at its alpha), 2 to LtC's thresholds (no alpha)
    counts = {("reinforce", "max-softmax"): 16, ("ltc", "max-softmax"): 15}
    counts |= {(t, p): n for t in ("reinforce", "ltc") for p, n in (("oracle", 1), ("single", 4))}
    counts |= {("reinforce", "reinforce"): 1, ("ltc", "ltc"): 1}
    for (trained_by, policy), count in counts.items():
        points = (
            a
            for a in payload["aggregated"]
            if (a["trained_by"], a["policy"]) == (trained_by, policy)
        )
        expected = sorted(points, key=lambda r: r["mean_macs"])
        events = EventAccumulator(str(out / "tensorboard" / "digits" / trained_by / policy))
        events.Reload()
        logged = events.Scalars("compare/accuracy")
        assert len(logged) == len(expected) == count, (trained_by, policy)
        for event, row in zip(logged, expected, strict=True):
            assert event.step == round(row["mean_macs"])
            assert event.value == pytest.approx(row["accuracy"], abs=1e-6)
    summary = EventAccumulator(str(out / "tensorboard" / "summary"))
    summary.Reload()
    assert {"compare/tradeoff", "compare/accuracy_by_exit"} <= set(summary.Tags()["images"])
    assert {s["trained_by"] for s in payload["savings"]} == {"reinforce", "ltc"}


def test_compare_cli_stops_with_one_line_on_a_run_that_did_not_finish(tiny_runs, tmp_path, capsys):
    run = tiny_runs["interrupted"]
    assert torch.load(run / CHECKPOINT_NAME, weights_only=False)["epoch"] == 1  # of 3
    out = tmp_path / "cmp"
    assert compare_main([str(tiny_runs["reinforce"]), str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if not line.startswith("evaluating ")]
    assert len(errors) == 1, err
    assert errors[0].startswith("error: ") and "has not finished training" in errors[0]
    assert f"--resume {run}" in errors[0] and "Traceback" not in err
    assert not (out / "comparison.json").exists()


def test_compare_rejects_a_directory_without_runs(tmp_path, capsys):
    assert compare_main([str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_reward_fit_beats_every_swept_rule_on_its_own_objective():
    out, search = _search(seed=2)
    for alpha in (0.0, 0.05, 0.5):

        def reward(rule, alpha=alpha):
            m = evaluate_rule(rule, out)
            return m["accuracy"] - alpha * m["mean_macs"] / out.costs.reference_macs

        best = reward(search.for_reward(alpha))
        assert all(best >= reward(r) - 1e-12 for r in search.sweep(30))
    # a huge cost weight sends everything out at stage 0
    rule = search.for_reward(1e6)
    cheapest = out.costs.classifier_macs[0]
    assert evaluate_rule(rule, out)["mean_macs"] == cheapest


def test_compare_a_multi_exit_ltc_run_beside_a_four_stage_run(tiny_runs, tmp_path):
    out = tmp_path / "cmp"
    args = ["--out", str(out), "--criteria", "max-softmax", "--sweep-points", "4"]
    assert compare_main([str(tiny_runs["reinforce"]), str(tiny_runs["multi-exit"]), *args]) == 0
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
    for trained_by in ("reinforce", "ltc"):
        for policy in (trained_by, "max-softmax"):
            assert (out / "tensorboard" / "digits" / trained_by / policy).is_dir()


def test_compare_subsets_and_shift_extras(tiny_runs, tmp_path, capsys):
    out = tmp_path / "extras"
    args = ["--out", str(out), "--criteria", "max-softmax", "--sweep-points", "4", "--no-reference"]
    args += ["--subsets", "--shift", "noise:2", "contrast:5"]
    assert compare_main([str(tiny_runs["reinforce"]), *args]) == 0
    payload = json.loads((out / "comparison.json").read_text())
    (subset,) = payload["subsets"]
    assert subset["best"]["stages"][-1] == 3  # sub-cascades end with the largest classifier
    shifts = {entry["shift"]: entry["policies"] for entry in payload["shift"]}
    assert set(shifts) == {"noise:2", "contrast:5"}
    contrast = shifts["contrast:5"]["max-softmax eps=0"]
    assert contrast["shifted_accuracy"] < contrast["in_accuracy"]  # a strong shift hurts
    assert "best sub-cascade" in capsys.readouterr().out
    assert compare_main([str(tiny_runs["reinforce"]), "--out", str(out), "--shift", "fog:3"]) == 2


def test_lexicographic_argmax_is_the_last_of_a_stable_sort():
    """The vectorised choice equals the sorted-tuples choice, ties and -inf included."""
    import random

    from policycascade.agents.thresholds import lexicographic_argmax

    rng = random.Random(0)
    values = [0.0, 1.0, -1.0, float("-inf"), 0.5]
    for _ in range(500):
        m = rng.randint(1, 30)
        keys = tuple(
            torch.tensor([rng.choice(values) for _ in range(m)], dtype=torch.float64)
            for _ in range(rng.randint(1, 3))
        )
        expected = sorted(range(m), key=lambda i: tuple(float(k[i]) for k in keys))[-1]
        assert lexicographic_argmax(keys) == expected
