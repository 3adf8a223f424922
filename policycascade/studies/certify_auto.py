"""Violation rate and savings kept of ``certified_fit`` with its default path, over resplits.

``python -m policycascade.studies.certify_auto RUN_DIR RESPLITS [EPSILON DELTA]
[--targets drop:0 drop:0.005 accuracy:0.97 budget:0.3 ...] [--deltas 0.05 0.1]``: the run's
validation and test outputs are pooled; each resplit draws a calibration set of the
validation size and tests on the rest (the same resplits for every target and delta). Each
line gives the certified rule's violation rate with its Clopper-Pearson 95% interval, the
plain fit's (on the same calibration samples: the cheapest max-softmax thresholds within
epsilon or at the accuracy, the most accurate ones within the budget), the mean MAC savings
and test accuracy of both, "kept" (the mean over resplits of the certified rule's savings
over the plain fit's) and the paths chosen.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from policycascade.agents.thresholds import ThresholdSearch
from policycascade.bench_certify import clopper_pearson
from policycascade.cascade import CascadeOutputs
from policycascade.certify import LargestOnlyRule, Target, certified_fit
from policycascade.evaluation import evaluate_rule
from policycascade.runs import load_run

MAKERS = {"drop": Target.accuracy_drop, "accuracy": Target.accuracy, "budget": Target.budget}


def parse_target(text: str) -> Target:
    """``KIND:VALUE`` (drop:0.01, accuracy:0.97, budget:0.3) -> a Target."""
    kind, _, value = text.partition(":")
    if kind not in MAKERS or not value:
        raise ValueError(f"target must be KIND:VALUE with KIND in {list(MAKERS)}, got {text!r}")
    return MAKERS[kind](float(value))


TOLERANCE = 1e-9  # float noise: a drop of exactly 500 / 50,000 meets epsilon 0.01


def _violated(target: Target, metrics: dict) -> bool:
    """Whether the rule's held-out metrics miss the target (beyond float noise)."""
    if target.kind == "drop":
        return metrics["stage_accuracy"][-1] - metrics["accuracy"] > target.value + TOLERANCE
    if target.kind == "accuracy":
        return metrics["accuracy"] < target.value - TOLERANCE
    return metrics["macs_share"] > target.value + TOLERANCE


def _plain(search: ThresholdSearch, target: Target, reference_macs: float):
    """The plain fit of the target on the calibration samples (no guarantee)."""
    if target.kind == "drop":
        return search.for_accuracy_drop(target.value)
    if target.kind == "accuracy":
        return search.for_accuracy(target.value)
    return search.for_budget(target.value * reference_macs)


def resplit_rows(
    run_dir: str, resplits: int, targets: Sequence[Target], deltas: Sequence[float]
) -> list[dict]:
    """One row per (target, delta): violation rates, savings, accuracies and paths chosen."""
    run = load_run(run_dir)
    val, test = run.outputs("val").to("cpu"), run.outputs("test").to("cpu")
    probs = torch.cat([val.probs, test.probs])
    labels = torch.cat([val.labels, test.labels])
    costs = val.costs.with_policy_macs([0] * val.num_stages)
    n_cal, g = val.num_samples, torch.Generator().manual_seed(0)
    keys = [(t, d) for t in targets for d in deltas]
    outcomes: dict = {k: [] for k in keys}  # (violated, savings, accuracy, path, fit)
    plains: dict = {t: [] for t in targets}  # (violated, savings, accuracy)
    start = time.time()
    for i in range(resplits):
        if i and i % 100 == 0:
            print(f"{i}/{resplits} resplits, {time.time() - start:.0f} s", file=sys.stderr)
        order = torch.randperm(len(labels), generator=g)
        cal = CascadeOutputs(probs[order[:n_cal]], labels[order[:n_cal]], costs)
        held = CascadeOutputs(probs[order[n_cal:]], labels[order[n_cal:]], costs)
        search = ThresholdSearch(cal.probs, cal.labels, costs)
        for target in targets:
            theirs = evaluate_rule(_plain(search, target, costs.reference_macs), held)
            plains[target].append(
                (_violated(target, theirs), 1 - theirs["macs_share"], theirs["accuracy"])
            )
            for delta in deltas:
                fit = certified_fit(cal, target, delta, seed=i)
                mine = evaluate_rule(fit.rule, held)
                outcomes[target, delta].append(
                    (_violated(target, mine), 1 - mine["macs_share"], mine["accuracy"], fit.path)
                    + (fit.certified, isinstance(fit.rule, LargestOnlyRule))
                )
    seconds = time.time() - start
    return [
        _row(run_dir, target, delta, outcomes[target, delta], plains[target], seconds)
        for target, delta in keys
    ]


def _row(run_dir, target, delta, mine, plain, seconds) -> dict:
    """Summary of one (target, delta) over all resplits."""
    n = len(mine)
    violated = sum(m[0] for m in mine)
    low, high = clopper_pearson(violated, n)
    paths: dict[str, int] = {}
    for m in mine:
        name = m[3].split("(")[-1].split(" ")[0] if "(" in m[3] else m[3]
        paths[name] = paths.get(name, 0) + 1
    kept = [m[1] / max(1e-9, p[1]) for m, p in zip(mine, plain, strict=True)]
    return {
        "run": Path(run_dir).name,
        "target": str(target),
        "delta": delta,
        "resplits": n,
        "violation_rate": violated / n,
        "violation_ci95": [low, high],
        "plain_violation_rate": sum(p[0] for p in plain) / n,
        "savings": sum(m[1] for m in mine) / n,
        "plain_savings": sum(p[1] for p in plain) / n,
        "kept_mean_of_ratios": sum(kept) / n,
        "accuracy": sum(m[2] for m in mine) / n,
        "plain_accuracy": sum(p[2] for p in plain) / n,
        "paths": paths,
        "certified_rate": sum(m[4] for m in mine) / n,
        "largest_only_rate": sum(m[5] for m in mine) / n,
        "seconds_all_rows": seconds,
    }


def format_row(r: dict) -> str:
    """One markdown table line (see HEADER)."""
    low, high = r["violation_ci95"]
    paths = " / ".join(f"{r['paths'].get(k, 0)}" for k in ("fixed", "split"))
    return (
        f"| {r['run'][:40]} | {r['target']} | {r['delta']:g} | {r['violation_rate']:.3f} "
        f"[{low:.3f}, {high:.3f}] | {r['plain_violation_rate']:.3f} | {r['savings']:.3f} | "
        f"{r['plain_savings']:.3f} | {r['kept_mean_of_ratios']:.0%} | {r['accuracy']:.4f} | "
        f"{r['plain_accuracy']:.4f} | {r.get('certified_rate', float('nan')):.3f} | "
        f"{r.get('largest_only_rate', float('nan')):.3f} | {paths} |"
    )


HEADER = (
    "| run | target | delta | violations [95% CI] | plain violations | savings | plain savings"
    " | kept | accuracy | plain accuracy | certified | largest alone"
    " | path of the returned rule (fixed / split) |\n|" + "---|" * 13
)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: one table line per (target, delta)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("resplits", type=int)
    parser.add_argument("epsilon", type=float, nargs="?", help="one drop target (old form)")
    parser.add_argument("delta", type=float, nargs="?", help="one delta (old form)")
    parser.add_argument("--targets", nargs="+", default=["drop:0", "drop:0.005", "drop:0.01"])
    parser.add_argument("--deltas", type=float, nargs="+", default=[0.05, 0.1])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.resplits < 1:
        parser.error(f"resplits must be >= 1, got {args.resplits}")
    if (args.epsilon is None) != (args.delta is None):
        parser.error("give both EPSILON and DELTA, or neither")
    try:
        targets = [parse_target(t) for t in args.targets]
        if args.epsilon is not None:
            targets, args.deltas = [Target.accuracy_drop(args.epsilon)], [args.delta]
    except ValueError as error:
        parser.error(str(error))
    rows = resplit_rows(args.run_dir, args.resplits, targets, args.deltas)
    print(HEADER)
    for r in rows:
        print(format_row(r), flush=True)
    print(f"{rows[0]['seconds_all_rows']:.0f} s for all rows", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
