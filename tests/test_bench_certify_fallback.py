"""bench_certify scores exactly what certified_fit returns, the largest-only fallback included."""

import pytest
import torch

from policycascade.agents.rules import LargestOnlyRule
from policycascade.bench_certify import bench_outputs, resplit_outcomes
from policycascade.cascade import CascadeOutputs
from policycascade.certify import Target, certified_fit
from policycascade.costs import StageCosts
from policycascade.evaluation import evaluate_rule


def _population(n: int, seed: int, macs: list[int]) -> CascadeOutputs:
    """3 stages, 2 classes; each stage is right with probability equal to its confidence."""
    g = torch.Generator().manual_seed(seed)
    skill = torch.tensor([0.0, 1.0, 3.0])
    conf = 0.5 + 0.5 * torch.rand(n, 3, generator=g) ** (1 / (1 + skill))
    correct = torch.rand(n, 3, generator=g) < conf
    labels = torch.randint(0, 2, (n,), generator=g)
    top = torch.where(correct, labels.unsqueeze(1), 1 - labels.unsqueeze(1))
    probs = torch.stack([1 - conf, conf], -1)
    probs = torch.where((top == 1).unsqueeze(-1), probs, probs.flip(-1))
    return CascadeOutputs(probs, labels, StageCosts(macs))


def _split(pool: CascadeOutputs, n_cal: int) -> tuple[CascadeOutputs, CascadeOutputs]:
    def part(index):
        return CascadeOutputs(pool.probs[index], pool.labels[index], pool.costs)

    return part(torch.arange(n_cal)), part(torch.arange(n_cal, pool.num_samples))


# [10, 100, 1000]: certified rules are cheaper than the largest alone (1000 of 1110);
# [600, 100, 1000]: every rule costs >= 600 and a certified one may cost more than 1000
@pytest.mark.parametrize("macs", [[10, 100, 1000], [600, 100, 1000]])
def test_every_scored_choice_is_what_certified_fit_returns(macs):
    val, test = _split(_population(700, seed=0, macs=macs), 300)
    pool_probs = torch.cat([val.probs, test.probs])
    pool_labels = torch.cat([val.labels, test.labels])
    seen = {"largest": 0, "path rule": 0, "certified largest": 0}
    outcomes = resplit_outcomes(
        val, test, 3, [0.0, 0.05], [0.1], ["betting", "exact"], ["fixed", "split:0.3", "both"]
    )
    for r, (order, _, scored) in enumerate(outcomes):
        cal = CascadeOutputs(pool_probs[order[:300]], pool_labels[order[:300]], val.costs)
        held = CascadeOutputs(pool_probs[order[300:]], pool_labels[order[300:]], val.costs)
        for (eps, delta, path, bound), got in scored.items():
            way, _, share = path.partition(":")
            fit = certified_fit(
                cal,
                Target.accuracy_drop(eps),
                delta,
                bound=bound,
                path=way,
                path_share=float(share or 0.5),
                seed=r,
            )
            mine = evaluate_rule(fit.rule, held)
            key = (r, eps, path, bound)
            assert got.largest_only == isinstance(fit.rule, LargestOnlyRule), key
            assert got.certified == fit.certified, key
            assert got.savings == pytest.approx(1 - mine["macs_share"], abs=1e-12), key
            drop = mine["stage_accuracy"][-1] - mine["accuracy"]
            assert got.violated == (drop > eps + 1e-12), key
            seen["largest" if got.largest_only else "path rule"] += 1
            seen["certified largest"] += got.largest_only and got.certified
    assert seen["largest"] and seen["path rule"], seen  # both branches exercised
    if macs[0] == 600:
        assert seen["certified largest"], seen


def test_a_fallback_costs_the_largest_classifier_alone_not_every_stage():
    # 40 calibration samples certify nothing beyond the safe end: every row falls back
    val, test = _split(_population(240, seed=1, macs=[10, 100, 1000]), 40)
    rows = bench_outputs(val, test, "tiny", 4, [0.0, 0.01], [0.05, 0.1], ["betting"], ["both"])
    assert len(rows) == 4
    for row in rows:
        assert row["largest_only_rate"] == 1.0 and row["certified_rate"] == 0.0
        # the largest classifier alone costs 1000 of 1000, not the cumulative 1110
        assert row["savings"] == 0.0
        assert row["violation_rate"] == 0.0  # it answers as the largest classifier


def test_a_bad_path_variant_is_named():
    val, test = _split(_population(100, seed=2, macs=[10, 100, 1000]), 50)
    with pytest.raises(ValueError, match="split:1.5"):
        next(resplit_outcomes(val, test, 1, [0.0], [0.1], ["betting"], ["split:1.5"]))
