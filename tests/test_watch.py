"""The drift watch: its false-alarm bound, its detections, batching, arguments and CLI."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import beta as beta_dist

from conftest import random_outputs
from policycascade.agents.rules import exit_stages
from policycascade.agents.thresholds import ThresholdRule
from policycascade.watch import (
    MAX_BET,
    PRIOR_SAMPLES,
    DriftWatch,
    bernoulli_kl,
    exit_costs_of,
    kl_bounds,
)
from policycascade.watch_cli import detection_delays, false_alarm_times, main

SHARES = [0.5, 0.3, 0.2]
COSTS = [10.0, 40.0, 140.0]  # cumulative MACs of exiting at each stage


def calibrated(rng: np.random.Generator, n: int, p=SHARES, **options) -> DriftWatch:
    """A watch calibrated on n exits drawn from ``p`` (its shares are estimates, not ``p``)."""
    counts = np.bincount(rng.choice(len(p), size=n, p=p), minlength=len(p))
    return DriftWatch(counts / n, COSTS, n, **options)


def binomial_upper(trials: int, p: float, tail: float = 1e-4) -> int:
    """Smallest x with P(Binomial(trials, p) > x) <= tail (exact)."""
    total = 0.0
    for x in range(trials + 1):
        total += math.comb(trials, x) * p**x * (1 - p) ** (trials - x)
        if 1 - total <= tail:
            return x
    return trials


def test_kl_bound_misses_at_most_its_level_exactly():
    # P(upper bound < p) summed exactly over the binomial outcomes, for several n and p
    level = 0.05
    for n in (10, 40, 200):
        for p in (0.05, 0.3, 0.5, 0.9):
            miss_high = sum(
                math.comb(n, c) * p**c * (1 - p) ** (n - c)
                for c in range(n + 1)
                if kl_bounds(c / n, n, level)[1] < p
            )
            miss_low = sum(
                math.comb(n, c) * p**c * (1 - p) ** (n - c)
                for c in range(n + 1)
                if kl_bounds(c / n, n, level)[0] > p
            )
            assert miss_high <= level and miss_low <= level, (n, p, miss_high, miss_low)


def test_kl_bound_is_where_n_kl_reaches_log_one_over_level():
    low, high = kl_bounds(0.3, 100, 0.01)
    assert low < 0.3 < high
    assert 100 * bernoulli_kl(0.3, high) == pytest.approx(math.log(100), rel=1e-9)
    assert 100 * bernoulli_kl(0.3, low) == pytest.approx(math.log(100), rel=1e-9)
    assert kl_bounds(0.0, 50, 0.01)[0] == 0.0 and kl_bounds(1.0, 50, 0.01)[1] == 1.0


def test_false_alarm_rate_under_the_null_is_within_alpha():
    # calibration and stream i.i.d. from one distribution; a generous alpha so that the
    # check can fail: the rate must stay below the binomial upper limit of alpha
    rng = np.random.default_rng(0)
    alpha, repeats = 0.2, 200
    alarms = 0
    for _ in range(repeats):
        watch = calibrated(rng, 100, alpha_false_alarm=alpha)
        alarms += bool(watch.update(rng.choice(3, size=3000, p=SHARES)))
    assert alarms <= binomial_upper(repeats, alpha)


def test_stream_test_at_its_null_boundary_crosses_at_most_its_level():
    # the stream's share of stage 1 equals the calibration upper bound: the worst case of
    # the up-test's null. Its martingale may cross with probability <= its share of alpha;
    # a bet that peeked at the sample it bets on would cross far more often.
    rng = np.random.default_rng(7)
    watch = DriftWatch([0.7, 0.3], [1.0, 3.0], 200, alpha_false_alarm=0.9, calibration_share=0.1)
    level = 0.9 * 0.9 / (2 * watch.num_quantities)
    p = watch.expected_high[1]
    crossed, repeats = 0, 300
    for _ in range(repeats):
        watch.reset()
        alarms = watch.update(rng.choice(2, size=1500, p=[1 - p, p]))
        crossed += any((a.stage, a.direction) == (1, "up") for a in alarms)
    assert crossed <= binomial_upper(repeats, level)


def test_without_calibration_uncertainty_the_same_streams_alarm_more():
    # the same stream test against the calibration *estimates* (no bounds) alarms far more
    # often: the finite calibration set is what the bounds are for
    rng = np.random.default_rng(1)
    raised_bounded = raised_naive = 0
    for _ in range(100):
        counts = np.bincount(rng.choice(3, size=100, p=SHARES), minlength=3)
        stream = rng.choice(3, size=3000, p=SHARES)
        watch = DriftWatch(counts / 100, COSTS, 100, alpha_false_alarm=0.2)
        raised_bounded += bool(watch.update(stream))
        # the same estimates taken as exact: as if measured on 100,000 times more samples
        naive = DriftWatch(counts / 100, COSTS, 100 * 100_000, alpha_false_alarm=0.2)
        raised_naive += bool(naive.update(stream))
    assert raised_naive > 2 * raised_bounded
    assert raised_naive > 20


def test_detects_a_known_shift_and_names_what_moved():
    rng = np.random.default_rng(2)
    watch = calibrated(rng, 2000)
    shifted = [0.2, 0.3, 0.5]  # fewer early exits, more late ones: the cost goes up
    for _ in range(20):
        watch.reset()
        alarms = watch.update(rng.choice(3, size=400, p=shifted))
        assert alarms and alarms[0].samples_seen <= 200
        moved = {(a.quantity, a.stage, a.direction) for a in alarms}
        assert moved <= {
            ("exit_share", 0, "down"),
            ("exit_share", 2, "up"),
            ("mean_cost", None, "up"),
        }
        assert ("mean_cost", None, "up") in moved
        cost = next(a for a in alarms if a.quantity == "mean_cost")
        assert cost.observed > cost.expected_high > cost.expected > 40
        assert "mean cost went up" in cost.what


def test_detects_a_late_shift_after_a_long_clean_stream():
    # windowed bets do not pile up losses on a clean stream: a shift after 50,000 clean
    # samples is caught about as fast as one at the start
    rng = np.random.default_rng(3)
    watch = calibrated(rng, 2000)
    assert watch.update(rng.choice(3, size=50_000, p=SHARES)) == []
    alarms = watch.update(rng.choice(3, size=2000, p=[0.2, 0.3, 0.5]))
    assert alarms and alarms[0].samples_seen - 50_000 <= 400
    assert alarms[0].recent > alarms[0].observed  # the recent window shows the shift


def test_batched_updates_equal_one_at_a_time():
    rng = np.random.default_rng(4)
    stream = np.concatenate(
        [rng.choice(3, size=2000, p=SHARES), rng.choice(3, size=2000, p=[0.35, 0.3, 0.35])]
    )
    one = calibrated(np.random.default_rng(5), 500)
    batched = calibrated(np.random.default_rng(5), 500)
    alarms_one = [a for x in stream for a in one.update([x])]
    cuts = np.sort(rng.choice(len(stream), size=7, replace=False))
    alarms_batched = [a for part in np.split(stream, cuts) for a in batched.update(part)]
    assert alarms_one and alarms_one == alarms_batched
    assert one.statistics() == batched.statistics()
    assert one.alarm == alarms_one[0] and one.samples_seen == len(stream)


def test_first_two_bets_worked_out_by_hand():
    watch = DriftWatch([0.5, 0.5], [1.0, 2.0], 100, alpha_false_alarm=0.1)
    high = watch.expected_high[0]  # the up-test of stage 0's share bets against this bound
    watch.update([0])  # the first bet is 0: the shrunk window mean sits at the bound
    assert watch.statistics()["evidence/exit_share_stage0_up"] == 0.0
    watch.update([0])
    mean = (1 + PRIOR_SAMPLES * high) / (1 + PRIOR_SAMPLES)
    bet = min((mean - high) / (high * (1 - high)), MAX_BET / high)
    expected = math.log10(1 + bet * (1 - high))  # every window holds both samples
    assert watch.statistics()["evidence/exit_share_stage0_up"] == pytest.approx(expected)


def test_reset_forgets_the_stream_not_the_calibration():
    watch = DriftWatch(SHARES, COSTS, 1000)
    bounds = watch.calibration()
    assert watch.update([2] * 200)
    watch.reset()
    assert watch.alarm is None and watch.samples_seen == 0 and watch.calibration() == bounds


def test_from_outputs_counts_the_rule_exits_and_costs():
    outputs = random_outputs(300, 3, 4, seed=0)
    rule = ThresholdRule("max-softmax", [0.6, 0.5])
    watch = DriftWatch.from_outputs(rule, outputs)
    counts = torch.bincount(exit_stages(rule, outputs.probs), minlength=3).numpy()
    assert watch.calibration_counts.tolist() == counts.tolist()
    assert exit_costs_of(rule, outputs.costs) == [10.0, 40.0, 130.0]  # policy MACs 0 for rules
    assert watch.calibration()["mean_cost"] == pytest.approx(counts @ [10, 40, 130] / 300)
    other = random_outputs(500, 3, 4, seed=1).probs
    by_probs = watch.update_probs(other)
    assert watch.samples_seen == 500
    assert watch.counts.tolist() == torch.bincount(exit_stages(rule, other), minlength=3).tolist()
    assert by_probs == []  # the same distribution of random softmaxes
    with pytest.raises(ValueError, match="rule"):
        DriftWatch(SHARES, COSTS, 10).update_probs(other)


def test_from_calibration_block_checks_the_mean_cost():
    block = {"num_samples": 10, "exit_shares": [0.5, 0.3, 0.2], "mean_cost": 45.0}
    watch = DriftWatch.from_calibration(block, COSTS)  # 5 + 12 + 28 = 45
    assert watch.calibration_counts.tolist() == [5, 3, 2]
    with pytest.raises(ValueError, match="mean_cost"):
        DriftWatch.from_calibration({**block, "mean_cost": 0.45}, COSTS)
    with pytest.raises(ValueError, match="num_samples"):
        DriftWatch.from_calibration({"exit_shares": SHARES}, COSTS)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"exit_shares": [0.5, 0.6, 0.2]}, "exit_shares"),
        ({"exit_shares": [1.0]}, "exit_shares"),
        ({"exit_costs": [1.0, 2.0]}, "exit_costs"),
        ({"exit_costs": [0.0, 0.0, 0.0]}, "exit_costs"),
        ({"num_calibration": 0}, "num_calibration"),
        ({"num_calibration": 7}, "whole counts"),
        ({"alpha_false_alarm": 1.5}, "alpha_false_alarm"),
        ({"alpha_false_alarm": 0}, "alpha_false_alarm"),
        ({"calibration_share": 1}, "calibration_share"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    args = {"exit_shares": SHARES, "exit_costs": COSTS, "num_calibration": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        DriftWatch(**args)


def test_bad_streams_are_refused():
    watch = DriftWatch(SHARES, COSTS, 10)
    with pytest.raises(ValueError, match="exit_stages"):
        watch.update([0, 3])
    with pytest.raises(ValueError, match="exit_stages"):
        watch.update([[0, 1]])
    with pytest.raises(TypeError, match="exit_stages"):
        watch.update([0.5])
    with pytest.raises(TypeError, match="num_calibration"):
        DriftWatch(SHARES, COSTS, 10.0)
    assert watch.update([]) == [] and watch.samples_seen == 0


def test_measurement_helpers_count_delays_and_restarts():
    rng = np.random.default_rng(6)
    watch = calibrated(rng, 2000)
    shifted = rng.choice(3, size=1000, p=[0.0, 0.0, 1.0])
    delays = detection_delays(watch, shifted, 5, 2000, rng)
    assert all(d is not None and d <= 50 for d in delays)
    # every restart on an all-last-stage stream alarms again after the same few samples
    times = false_alarm_times(watch, np.full(300, 2))
    gaps = np.diff([0, *times])
    assert len(times) >= 3 and len(set(gaps.tolist())) == 1


def test_cli_watches_a_saved_rule_and_reports_alarms(tmp_path, capsys):
    outputs_io = pytest.importorskip("policycascade.outputs_io")
    rule_io = pytest.importorskip("policycascade.rule_io")
    calibration = random_outputs(400, 3, 4, seed=1)
    rule = ThresholdRule("max-softmax", [0.6, 0.5])
    rule_path = tmp_path / "rule.json"
    rule_io.save_rule(rule, rule_path, outputs=calibration)
    flat = calibration.probs.clone()
    flat[:, :2] = 0.25  # the early stages lose all confidence: everything runs to the end
    shifted = type(calibration)(flat, calibration.labels, calibration.costs)
    data = tmp_path / "outputs.npz"
    outputs_io.save_outputs({"val": calibration, "test": shifted}, data)
    assert main([str(data), "--rule", str(rule_path), "--exit-code"]) == 1
    out = capsys.readouterr().out
    assert "ALARM: exit share of stage 2 went up" in out or "ALARM: mean cost went up" in out
    report = tmp_path / "r.json"
    args = [str(data), "--rule", str(rule_path), "--split", "val", "--json", str(report)]
    board = tmp_path / "board"
    assert (
        main([*args, "--calibration-split", "val", "--shuffle", "0", "--tensorboard", str(board)])
        == 0
    )
    assert json.loads(report.read_text())["alarms"] == []
    assert any(board.glob("events.out.tfevents.*"))
    assert main([str(data), "--rule", str(rule_path), "--alpha", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --alpha must be in (0, 1), got 2.0"
    ]
    assert main([str(data), "--rule", str(rule_path), "--split", "train"]) == 2
    assert "--split must be one of" in capsys.readouterr().err
    assert main(["bench", "run", "--streams", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --streams must be >= 1, got 0"


# --- ScoreWatch: a conformal two-sample test on a per-sample score -----------------------


def test_score_watch_false_alarm_rate_under_exchangeability_is_within_alpha():
    from policycascade.watch import ScoreWatch

    rng = np.random.default_rng(11)
    alarms, draws, alpha = 0, 150, 0.2
    for i in range(draws):
        pool = rng.normal(size=500)  # calibration and stream: one exchangeable sequence
        watch = ScoreWatch(pool[:200], alpha_false_alarm=alpha, seed=i)
        alarms += watch.update(pool[200:]) is not None
    # Ville: P(ever alarm) <= alpha; the one-sided 99.9% lower CP bound must not exceed it
    assert alarms == 0 or float(beta_dist.ppf(0.001, alarms, draws - alarms + 1)) <= alpha


def test_score_watch_finds_a_shift_names_its_direction_and_resets():
    from policycascade.watch import ScoreWatch

    rng = np.random.default_rng(12)
    watch = ScoreWatch(rng.normal(size=1000))
    assert watch.update(rng.normal(size=300)) is None
    alarm = watch.update(rng.normal(loc=1.0, size=2000))
    assert alarm is not None and alarm.direction == "up" and alarm.recent_rank < 0.5
    assert 300 < alarm.samples_seen < 800 and "moved up" in alarm.what
    watch.reset()
    down = watch.update(rng.normal(loc=-1.0, size=2000))
    assert down is not None and down.direction == "down" and down.samples_seen < 500
    assert all(0 < p <= 1 for p in watch.p_values)
    with pytest.raises(ValueError, match="alpha_false_alarm"):
        ScoreWatch([0.0, 1.0], alpha_false_alarm=1.0)
    with pytest.raises(ValueError, match="calibration_scores"):
        ScoreWatch([np.nan])
