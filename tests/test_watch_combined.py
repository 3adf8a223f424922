"""RuleWatch: exits and first-stage score watched together, its alpha split, CLI and rule forms."""

import json
import math

import numpy as np
import pytest
from scipy.stats import beta as beta_dist

from conftest import random_outputs
from policycascade.agents.rules import LargestOnlyRule, exit_stages
from policycascade.agents.thresholds import ThresholdRule
from policycascade.watch import DriftWatch, ScoreWatch, first_stage_scores
from policycascade.watch_cli import main, null_false_alarms
from policycascade.watch_combined import RuleWatch, split_alpha

SHARES = [0.5, 0.3, 0.2]
COSTS = [10.0, 40.0, 140.0]


def built(rng: np.random.Generator, n: int = 1000, alpha: float = 0.01) -> RuleWatch:
    """A RuleWatch calibrated on n exits from SHARES and n standard normal scores."""
    counts = np.bincount(rng.choice(3, size=n, p=SHARES), minlength=3)
    block = {"num_samples": n, "exit_shares": (counts / n).tolist()}
    return RuleWatch.from_calibration(None, block, COSTS, alpha, "both", rng.normal(size=n))


def test_union_bound_splits_alpha_in_halves_and_sums_back():
    assert split_alpha(0.01, "both", True) == {"exits": 0.005, "score": 0.005}
    assert split_alpha(0.01, "both", False) == {"exits": 0.01}
    assert split_alpha(0.02, "exits", True) == {"exits": 0.02}
    assert split_alpha(0.02, "score", True) == {"score": 0.02}
    watch = built(np.random.default_rng(0), alpha=0.01)
    assert watch.mode == "both" and watch.alpha_false_alarm == pytest.approx(0.01)
    assert watch.exits.alpha_false_alarm == watch.scores.alpha_false_alarm == 0.005
    # DriftWatch at alpha/2: 2Q = 8 martingales share (alpha/2) * (1 - 0.5) of it
    assert watch.exits._threshold == pytest.approx(math.log(8 / (0.005 * 0.5)))
    assert watch.statistics()["score/log10_threshold"] == pytest.approx(math.log10(200))
    with pytest.raises(ValueError, match="watch must be one of"):
        split_alpha(0.01, "all", True)
    with pytest.raises(ValueError, match="alpha_false_alarm"):
        split_alpha(1.0, "both", True)


def test_the_alarm_names_the_watch_that_fired():
    rng = np.random.default_rng(1)
    watch = built(rng)
    clean_exits = rng.choice(3, size=3000, p=SHARES)
    # the score moves up, the exits do not: the score watch fires
    new = watch.update(clean_exits, rng.normal(loc=1.0, size=3000))
    assert new and new[0].watch == "score" and watch.alarm.watch == "score"
    assert "first-stage stop score moved up" in watch.alarm.what
    assert watch.alarm.as_dict()["watch"] == "score"
    # the exits move (everything runs to the last stage), the score does not
    watch.reset()
    assert watch.alarm is None and watch.samples_seen == 0
    watch.update(np.full(200, 2), rng.normal(size=200))
    assert watch.alarm is not None and watch.alarm.watch == "exits"
    assert watch.alarm.what.startswith(("exit share of stage 2 went up", "mean cost went up"))
    assert all(a.watch == "exits" for a in watch.alarms)


def test_batched_updates_give_the_same_alarms_as_one_at_a_time():
    rng = np.random.default_rng(2)
    stages = np.concatenate([rng.choice(3, 400, p=SHARES), rng.choice(3, 400, p=[0.2, 0.3, 0.5])])
    scores = np.concatenate([rng.normal(size=400), rng.normal(loc=0.5, size=400)])
    one, batched = built(np.random.default_rng(3)), built(np.random.default_rng(3))
    for i in range(len(stages)):
        one.update(stages[i : i + 1], scores[i : i + 1])
    batched.update(stages, scores)
    assert [a.as_dict() for a in one.alarms] == [a.as_dict() for a in batched.alarms]
    assert one.alarms and one.alarm.samples_seen <= 800
    with pytest.raises(ValueError, match="one per sample"):
        batched.update(stages[:3], scores[:2])
    with pytest.raises(ValueError, match="needs scores"):
        batched.update(stages[:3])


def test_combined_false_alarm_share_on_short_null_streams_is_within_alpha():
    rng = np.random.default_rng(4)
    alpha, draws, alarmed = 0.2, 200, 0
    for _ in range(draws):
        n, length = 150, 250  # calibration and stream: one i.i.d. sequence (ties included)
        stages = rng.choice(3, size=n + length, p=SHARES)
        scores = np.round(rng.normal(size=n + length))  # 7 values or so: heavy ties
        counts = np.bincount(stages[:n], minlength=3)
        block = {"num_samples": n, "exit_shares": (counts / n).tolist()}
        seed = int(rng.integers(2**32))
        watch = RuleWatch.from_calibration(
            None, block, COSTS, alpha, "both", scores[:n], seed, min_score_calibration=0
        )
        alarmed += bool(watch.update(stages[n:], scores[n:]))
    # P(any alarm) <= alpha: the one-sided 99.9% lower Clopper-Pearson bound must not exceed it
    assert alarmed == 0 or float(beta_dist.ppf(0.001, alarmed, draws - alarmed + 1)) <= alpha


def test_tied_scores_give_uniform_p_values_and_reset_draws_fresh_tie_breaks():
    rng = np.random.default_rng(5)
    watch = ScoreWatch(rng.integers(0, 3, size=500), seed=7)  # three values: heavy ties
    watch.update(rng.integers(0, 3, size=4000))
    p = np.array(watch.p_values)
    # smoothed conformal p-values are exactly uniform under exchangeability, ties or not
    assert abs(p.mean() - 0.5) < 0.03 and np.histogram(p, bins=5, range=(0, 1))[0].min() > 650
    again = ScoreWatch(np.zeros(10), seed=3)
    again.update(np.zeros(20))
    before = list(again.p_values)
    again.reset()
    again.update(np.zeros(20))
    assert again.p_values != before  # all ties: only the fresh draws set them


def test_null_simulation_helper_counts_each_watch():
    rng = np.random.default_rng(6)
    stages, scores = rng.choice(3, size=400, p=SHARES), rng.normal(size=400)
    found = null_false_alarms((stages, scores), 200, COSTS, 0.5, 300, 20, rng)
    assert found["repeats"] == 20 and found["with_replacement"] is True  # 400 < 200 + 300
    assert all(0 <= found[w] <= 20 for w in ("exits", "score", "both"))
    # a pool where every sample exits at the last stage: the exits can never move
    pool = (np.full(800, 2), rng.normal(size=800))
    fixed = null_false_alarms(pool, 200, COSTS, 0.5, 300, 5, rng)
    assert fixed["with_replacement"] is False and fixed["exits"] == 0


def _rule_file(tmp_path, rule, calibration):
    from policycascade.rule_io import save_rule

    path = tmp_path / "rule.json"
    save_rule(rule, path, outputs=calibration)
    return path


def _outputs_file(tmp_path, calibration, stream):
    from policycascade.outputs_io import save_outputs

    path = tmp_path / "outputs.npz"
    save_outputs({"val": calibration, "test": stream}, path)
    return path


def test_json_rule_forms_give_the_same_scores_and_watch(tmp_path):
    from policycascade.rule_io import load_rule
    from policycascade.serving import load_serving_rule

    calibration = random_outputs(300, 3, 4, seed=2)
    path = _rule_file(tmp_path, ThresholdRule("max-softmax", [0.6, 0.5]), calibration)
    torch_rule, serving = load_rule(path), load_serving_rule(path)
    ours = first_stage_scores(torch_rule, calibration.probs)
    theirs = first_stage_scores(serving, calibration.probs.numpy())
    assert np.allclose(ours, theirs) and np.allclose(
        ours, calibration.probs[:, 0].max(-1).values.double().numpy() - 0.6, atol=1e-6
    )
    a = RuleWatch.from_outputs(torch_rule, calibration, min_score_calibration=300)
    b = RuleWatch.from_outputs(serving, calibration, min_score_calibration=300)
    assert a.exits.calibration() == b.exits.calibration() and a.mode == b.mode == "both"
    assert np.allclose(a.scores.calibration_scores, b.scores.calibration_scores)
    stream = random_outputs(200, 3, 4, seed=3)
    assert [x.as_dict() for x in a.update_probs(stream.probs)] == [
        x.as_dict() for x in b.update_probs(stream.probs.numpy())
    ]
    counts = np.bincount(exit_stages(torch_rule, calibration.probs).numpy(), minlength=3)
    assert a.exits.calibration_counts.tolist() == counts.tolist()
    # too few calibration scores for the default: exits alone, at alpha whole, and why
    few = RuleWatch.from_outputs(torch_rule, calibration, 0.01)
    assert few.mode == "exits" and few.exits.alpha_false_alarm == 0.01
    assert "300 calibration scores < min_score_calibration = 1000" in few.note
    assert RuleWatch.from_outputs(torch_rule, calibration, 0.01, "score").mode == "score"
    # the largest classifier alone has no first-stage score: exits alone, at alpha whole
    largest = RuleWatch.from_outputs(LargestOnlyRule(3), calibration, 0.01)
    assert largest.mode == "exits" and largest.alpha_false_alarm == 0.01
    assert "no first-stage stop score" in largest.note
    with pytest.raises(ValueError, match="watch='score' cannot run"):
        RuleWatch.from_outputs(LargestOnlyRule(3), calibration, 0.01, "score")


def _one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_cli_watch_choices_and_one_line_errors(tmp_path, capsys):
    calibration = random_outputs(1000, 3, 4, seed=1)
    rule = _rule_file(tmp_path, ThresholdRule("max-softmax", [0.6, 0.5]), calibration)
    sharp = calibration.probs.clone()
    sharp[:, 0] = (sharp[:, 0].log() * 4).softmax(-1)  # first stage surer; exits move little
    data = _outputs_file(
        tmp_path, calibration, type(calibration)(sharp, calibration.labels, calibration.costs)
    )
    base = [str(data), "--rule", str(rule)]

    assert main([*base, "--watch", "score", "--calibration-split", "val", "--exit-code"]) == 1
    out = capsys.readouterr().out
    assert "watching: first-stage stop score at alpha 0.01 (1000 calibration scores)" in out
    assert "ALARM: first-stage stop score moved up" in out and "exit share" not in out
    board = tmp_path / "board"
    assert main([*base, "--calibration-split", "val", "--tensorboard", str(board)]) == 0
    events = b"".join(f.read_bytes() for f in board.glob("events.out.tfevents.*"))
    assert b"watch/score/log10_evidence" in events and b"watch/mean_cost" in events
    out = capsys.readouterr().out
    assert "watching: exits at alpha 0.005 and first-stage stop score at alpha 0.005" in out
    assert main(base) == 0  # a rule file's calibration block holds no scores
    out = capsys.readouterr().out
    assert "watching: exits at alpha 0.01" in out and "note: score watch off" in out
    assert main([*base, "--watch", "exits", "--calibration-split", "val"]) == 0
    assert "note" not in capsys.readouterr().out

    with pytest.raises(SystemExit) as stop:  # argparse's own exit, status 2, one line
        main([*base, "--watch", "all"])
    assert stop.value.code == 2 and "--watch: invalid choice: 'all'" in _one_line(capsys)
    assert main([*base, "--watch", "score"]) == 2
    assert _one_line(capsys) == (
        "error: --watch score needs --calibration-split SPLIT: the rule file's calibration "
        "block stores no first-stage scores"
    )
    # a calibration block holding the first-stage scores lets both watches run from the file
    data_rule = json.loads(rule.read_text())
    scores = first_stage_scores(ThresholdRule("max-softmax", [0.6, 0.5]), calibration.probs)
    data_rule["calibration"]["first_stage_scores"] = scores.tolist()
    rule.write_text(json.dumps(data_rule))
    assert main(base) == 0
    assert "and first-stage stop score at alpha 0.005 (1000" in capsys.readouterr().out
    data_rule["calibration"]["first_stage_scores"] = scores[:5].tolist()
    rule.write_text(json.dumps(data_rule))
    assert main(base) == 2
    assert "first_stage_scores must hold num_samples = 1000 scores, got 5" in _one_line(capsys)
    (tmp_path / "largest").mkdir()
    largest = _rule_file(tmp_path / "largest", LargestOnlyRule(3), calibration)
    args = [str(data), "--rule", str(largest), "--calibration-split", "val", "--watch", "score"]
    assert main(args) == 2
    assert "--watch score cannot run" in _one_line(capsys)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--watch {both,exits,score}" in capsys.readouterr().out


def test_detection_helpers_take_exits_scores_or_both():
    from policycascade.watch_cli import detection_delays, false_alarm_times, segment_alarms

    rng = np.random.default_rng(8)
    watch = built(rng)
    shifted = (np.full(500, 2), rng.normal(loc=2.0, size=500))
    delays = detection_delays(watch, shifted, 3, 2000, rng)
    assert all(d is not None and d <= 60 for d in delays)
    times = false_alarm_times(watch, (np.full(300, 2), np.zeros(300)))
    assert len(times) >= 2 and times == sorted(times)
    # a fresh watch per segment: every all-last-stage segment alarms, the tail is dropped
    assert segment_alarms(watch, (np.full(350, 2), np.zeros(350)), 100) == (3, 3)
    score_only = ScoreWatch(rng.normal(size=500))
    assert detection_delays(score_only, shifted[1], 2, 2000, rng)[0] is not None
    drift = DriftWatch(SHARES, COSTS, 10)
    assert detection_delays(drift, shifted[0], 2, 2000, rng)[0] is not None
