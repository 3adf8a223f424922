"""Does the certified rule keep its promise on fresh data, and what does the promise cost?

For each run: pool its validation and test outputs, draw random calibration/test resplits
(calibration size = the run's validation size) and, for each accuracy-drop target epsilon
and level delta, record whether the certified rule's test drop exceeds epsilon, the same
for the plain fit (the cheapest max-softmax thresholds within epsilon on the same
calibration samples) and the MACs savings (1 - mean MACs / largest classifier's) of both.

    python -m policycascade.bench_certify RUN_DIR... --resplits 1000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.stats import beta as beta_dist

from policycascade.certify import (
    Family,
    Target,
    fixed_path,
    fixed_sequence,
    path_grid,
    path_p_values,
    split_path,
)
from policycascade.certify_bounds import BOUNDS


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval for a binomial proportion k / n."""
    tail = (1 - level) / 2
    low = 0.0 if k == 0 else float(beta_dist.ppf(tail, k, n - k + 1))
    high = 1.0 if k == n else float(beta_dist.ppf(1 - tail, k + 1, n - k))
    return low, high


def _drop_and_savings(family: Family, thresholds: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy drop vs the last stage and MACs savings of each threshold row on these samples."""
    exits = family.exits(thresholds)
    losses, _, _ = family.losses(Target.accuracy_drop(0.0), exits)
    macs = family.cumulative[exits].mean(1) / family.reference_macs
    return losses.mean(1), 1.0 - macs.numpy()


def bench_run(
    run_dir: str,
    resplits: int,
    epsilons: Sequence[float],
    deltas: Sequence[float],
    bounds: Sequence[str],
    paths: Sequence[str],
    family: str = "max-softmax",
    seed: int = 0,
) -> list[dict]:
    """One row per (epsilon, delta, path, bound) over ``resplits`` resplits of one run."""
    from policycascade.runs import load_run

    run = load_run(run_dir)
    val, test = run.outputs("val"), run.outputs("test")
    probs = torch.cat([val.probs.cpu(), test.probs.cpu()])
    labels = torch.cat([val.labels.cpu(), test.labels.cpu()])
    pool = Family.of(family, probs, labels, val.costs)
    n_cal, n_all = val.num_samples, len(labels)
    gen = torch.Generator().manual_seed(seed)
    # results[(eps, delta, path, bound)] -> lists of (violated, savings, certified)
    results: dict[tuple, list[tuple[bool, float, bool]]] = {}
    plain: dict[float, list[tuple[bool, float]]] = {e: [] for e in epsilons}
    started = time.time()
    for r in range(resplits):
        if r and r % 100 == 0:
            print(f"{Path(run_dir).name}: {r}/{resplits} resplits", file=sys.stderr, flush=True)
        order = torch.randperm(n_all, generator=gen)
        cal, held = pool.subset(order[:n_cal]), pool.subset(order[n_cal:])
        search = cal.search()
        fits = torch.tensor([search.for_accuracy_drop(e).thresholds for e in epsilons])
        for eps, drop, savings in zip(epsilons, *_drop_and_savings(held, fits), strict=True):
            plain[eps].append((bool(drop > eps), float(savings)))
        inner = torch.randperm(n_cal, generator=gen)
        for name, (testing, build) in _path_variants(cal, paths, family, inner).items():
            chosen = _chosen_rules(testing, build, epsilons, deltas, bounds)
            for key, value in _held_out(held, build, chosen, epsilons).items():
                results.setdefault((key[0], key[1], name, key[2]), []).append(value)
    seconds = time.time() - started
    summary = {"run": Path(run_dir).name, "calibration": n_cal, "test": n_all - n_cal}
    return [
        _summary_row(summary, eps, delta, name, bound, values, plain[eps], seconds)
        for (eps, delta, name, bound), values in results.items()
    ]


PathBuilder = Callable[[Target], torch.Tensor]  # a target -> its path of threshold rows


def _path_variants(
    cal: Family, paths: Sequence[str], family: str, inner: torch.Tensor
) -> dict[str, tuple[Family, PathBuilder]]:
    """Each path variant: (its testing samples, its path thresholds per target).

    ``fixed``: the data-free path, tested on every calibration sample; ``split:SHARE``:
    the path fitted on the first SHARE of ``inner`` (a permutation of the calibration
    samples), tested on the rest.
    """
    k = cal.num_stages
    variants: dict[str, tuple[Family, PathBuilder]] = {}
    for name in paths:
        if name == "fixed":
            variants[name] = (cal, lambda t: fixed_path(family, k, t))
        else:
            share = float(name.split(":")[1])
            n_path = round(share * len(inner))
            fit_on = cal.subset(inner[:n_path]).search()
            cache: dict[tuple, torch.Tensor] = {}

            def build(t, fit_on=fit_on, cache=cache):
                key = (t.kind, tuple(path_grid(t)))
                if key not in cache:
                    cache[key] = split_path(fit_on, t)
                return cache[key]

            variants[name] = (cal.subset(inner[n_path:]), build)
    return variants


def _chosen_rules(
    testing: Family,
    build: PathBuilder,
    epsilons: Sequence[float],
    deltas: Sequence[float],
    bounds: Sequence[str],
) -> dict[tuple[float, float, str], int]:
    """(eps, delta, bound) -> the index the fixed-sequence test chooses on that epsilon's path."""
    chosen = {}
    for eps in epsilons:
        target = Target.accuracy_drop(eps)
        path = build(target)
        for delta in deltas:
            for bound in bounds:
                p = path_p_values(testing, path, target, delta, bound)
                chosen[eps, delta, bound] = max(fixed_sequence(p, delta), 0)
    return chosen


def _held_out(
    held: Family,
    build: PathBuilder,
    chosen: dict[tuple[float, float, str], int],
    epsilons: Sequence[float],
) -> dict[tuple[float, float, str], tuple[bool, float, bool]]:
    """(eps, delta, bound) -> (violated, savings, certified) of the chosen rule on ``held``.

    Only the chosen rules are evaluated on the (large) held-out samples.
    """
    outcome = {}
    for eps in epsilons:
        path = build(Target.accuracy_drop(eps))
        rows = sorted({j for (e, _, _), j in chosen.items() if e == eps})
        drop, savings = _drop_and_savings(held, path[rows])
        at = dict(zip(rows, zip(drop, savings, strict=True), strict=True))
        for (e, delta, bound), j in chosen.items():
            if e == eps:
                outcome[eps, delta, bound] = (bool(at[j][0] > eps), float(at[j][1]), j > 0)
    return outcome


def _summary_row(
    summary: dict,
    eps: float,
    delta: float,
    name: str,
    bound: str,
    values: list[tuple[bool, float, bool]],
    plain: list[tuple[bool, float]],
    seconds: float,
) -> dict:
    """One (epsilon, delta, path, bound) over all resplits, next to the plain fit's numbers."""
    violated = sum(v[0] for v in values)
    low, high = clopper_pearson(violated, len(values))
    plain_savings = float(np.mean([s for _, s in plain]))
    savings = float(np.mean([v[1] for v in values]))
    return {
        **summary,
        "epsilon": eps,
        "delta": delta,
        "path": name,
        "bound": bound,
        "resplits": len(values),
        "violation_rate": violated / len(values),
        "violation_ci95": [low, high],
        "plain_violation_rate": float(np.mean([v for v, _ in plain])),
        "certified_rate": float(np.mean([v[2] for v in values])),
        "savings": savings,
        "plain_savings": plain_savings,
        "savings_kept": savings / plain_savings if plain_savings > 0 else float("nan"),
        "seconds_all_rows": seconds,
    }


def format_table(rows: list[dict]) -> str:
    """Markdown table of the rows."""
    head = (
        "| run | n_cal | eps | delta | path | bound | violations [95% CI] | plain violations "
        "| certified | savings | plain savings | kept |\n|" + "---|" * 12
    )
    lines = [head]
    for r in rows:
        low, high = r["violation_ci95"]
        lines.append(
            f"| {r['run'].split('__')[0]} | {r['calibration']} | {r['epsilon']:g} | "
            f"{r['delta']:g} | {r['path']} | {r['bound']} | {r['violation_rate']:.3f} "
            f"[{low:.3f}, {high:.3f}] | {r['plain_violation_rate']:.3f} | "
            f"{r['certified_rate']:.2f} | {r['savings']:.3f} | {r['plain_savings']:.3f} | "
            f"{100 * r['savings_kept']:.0f}% |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: bench the certified fit on one or more run directories."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (val + test outputs pooled)")
    parser.add_argument("--resplits", type=int, default=1000)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.0, 0.005, 0.01])
    parser.add_argument("--deltas", type=float, nargs="+", default=[0.05, 0.1])
    parser.add_argument("--bounds", nargs="+", default=list(BOUNDS), choices=BOUNDS)
    parser.add_argument(
        "--paths",
        nargs="+",
        default=["split:0.5"],
        help="path variants: 'split:SHARE' (fitted on SHARE of calibration) or 'fixed'",
    )
    parser.add_argument("--family", default="max-softmax")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.resplits < 1:
        parser.error(f"--resplits must be >= 1, got {args.resplits}")
    rows = []
    for run_dir in args.runs:
        rows += bench_run(
            run_dir,
            args.resplits,
            args.epsilons,
            args.deltas,
            args.bounds,
            args.paths,
            args.family,
            args.seed,
        )
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
