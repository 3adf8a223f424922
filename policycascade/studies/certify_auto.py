"""Violation rate and savings kept of ``certified_fit`` with its default path, over resplits.

``python -m policycascade.studies.certify_auto RUN_DIR RESPLITS EPSILON DELTA``: the run's
validation and test outputs are pooled; each resplit draws a calibration set of the
validation size and tests on the rest. "savings kept" is the mean over resplits of the
certified rule's MAC savings over the plain fit's (the cheapest max-softmax thresholds
within epsilon on the same calibration samples).
"""

from __future__ import annotations

import sys
import time

import torch

from policycascade.agents.thresholds import ThresholdSearch
from policycascade.cascade import CascadeOutputs
from policycascade.certify import Target, certified_fit
from policycascade.evaluation import evaluate_rule
from policycascade.runs import load_run


def resplit_check(run_dir: str, resplits: int, epsilon: float, delta: float) -> str:
    """One line: violation rates (certified, plain), savings kept and the paths chosen."""
    run = load_run(run_dir)
    val, test = run.outputs("val").to("cpu"), run.outputs("test").to("cpu")
    probs = torch.cat([val.probs, test.probs])
    labels = torch.cat([val.labels, test.labels])
    costs = val.costs.with_policy_macs([0] * val.num_stages)
    n_cal, g = val.num_samples, torch.Generator().manual_seed(0)
    violated, plain_violated, kept, chosen = 0, 0, [], {}
    start = time.time()
    for i in range(resplits):
        order = torch.randperm(len(labels), generator=g)
        cal = CascadeOutputs(probs[order[:n_cal]], labels[order[:n_cal]], costs)
        held = CascadeOutputs(probs[order[n_cal:]], labels[order[n_cal:]], costs)
        fit = certified_fit(cal, Target.accuracy_drop(epsilon), delta, seed=i)
        plain = ThresholdSearch(cal.probs, cal.labels, costs).for_accuracy_drop(epsilon)
        mine, theirs = evaluate_rule(fit.rule, held), evaluate_rule(plain, held)
        last = mine["stage_accuracy"][-1]
        violated += (last - mine["accuracy"]) > epsilon
        plain_violated += (last - theirs["accuracy"]) > epsilon
        kept.append((1 - mine["macs_share"]) / max(1e-9, 1 - theirs["macs_share"]))
        chosen[fit.path] = chosen.get(fit.path, 0) + 1
    return (
        f"{run_dir.rstrip('/').split('/')[-1][:30]} eps={epsilon} delta={delta} "
        f"resplits={resplits}: violations {violated / resplits:.3f}, plain "
        f"{plain_violated / resplits:.3f}, savings kept (mean) {sum(kept) / len(kept):.0%}, "
        f"paths {chosen}, {time.time() - start:.0f} s"
    )


if __name__ == "__main__":
    run_dir, resplits, epsilon, delta = sys.argv[1:5]
    print(resplit_check(run_dir, int(resplits), float(epsilon), float(delta)))
