"""Does the certified rule keep its promise on fresh data, and what does the promise cost?

For each run: pool its validation and test outputs, draw random calibration/test resplits
(calibration size = the run's validation size) and, for each accuracy-drop target epsilon
and level delta, record whether the certified rule's test drop exceeds epsilon, the same
for the plain fit (the cheapest max-softmax thresholds within epsilon on the same
calibration samples) and the MACs savings (1 - mean MACs / largest classifier's) of both.
What it scores is what ``certified_fit`` returns on each calibration split: the cheapest
certified path rule on the calibration samples, or the largest classifier alone
(``LargestOnlyRule``, 100% of its MACs, the last stage's answers) where nothing beyond the
safe end passes or where it is cheaper than every certified rule.

    python -m policycascade.bench_certify RUN_DIR... --resplits 1000 --paths both fixed
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from scipy.stats import beta as beta_dist

from policycascade.cascade import CascadeOutputs
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
from policycascade.certify_paths import answers_with_last_classifier


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval for a binomial proportion k / n."""
    tail = (1 - level) / 2
    low = 0.0 if k == 0 else float(beta_dist.ppf(tail, k, n - k + 1))
    high = 1.0 if k == n else float(beta_dist.ppf(1 - tail, k + 1, n - k))
    return low, high


LARGEST = -1  # a chosen "row" that is the largest classifier alone (LargestOnlyRule)


class Scored(NamedTuple):
    """What one certified choice did on the held-out samples of one resplit."""

    violated: bool  # test drop > epsilon
    savings: float  # 1 - mean MACs / largest classifier's MACs
    certified: bool  # certified_fit's flag: a rule beyond the safe end passed
    largest_only: bool  # the returned rule is the largest classifier alone


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
    return bench_outputs(
        val, test, Path(run_dir).name, resplits, epsilons, deltas, bounds, paths, family, seed
    )


def bench_outputs(
    val: CascadeOutputs,
    test: CascadeOutputs,
    name: str,
    resplits: int,
    epsilons: Sequence[float],
    deltas: Sequence[float],
    bounds: Sequence[str],
    paths: Sequence[str],
    family: str = "max-softmax",
    seed: int = 0,
) -> list[dict]:
    """:func:`bench_run` on outputs already loaded (``name`` labels the rows)."""
    results: dict[tuple, list[Scored]] = {}
    plain: dict[float, list[tuple[bool, float]]] = {e: [] for e in epsilons}
    started = time.time()
    outcomes = resplit_outcomes(val, test, resplits, epsilons, deltas, bounds, paths, family, seed)
    for r, (_, fitted, chosen) in enumerate(outcomes):
        if r and r % 100 == 0:
            print(f"{name}: {r}/{resplits} resplits", file=sys.stderr, flush=True)
        for eps, value in fitted.items():
            plain[eps].append(value)
        for key, value in chosen.items():
            results.setdefault(key, []).append(value)
    seconds = time.time() - started
    summary = {"run": name, "calibration": val.num_samples, "test": test.num_samples}
    return [
        _summary_row(summary, eps, delta, path, bound, values, plain[eps], seconds)
        for (eps, delta, path, bound), values in results.items()
    ]


def resplit_outcomes(
    val: CascadeOutputs,
    test: CascadeOutputs,
    resplits: int,
    epsilons: Sequence[float],
    deltas: Sequence[float],
    bounds: Sequence[str],
    paths: Sequence[str],
    family: str = "max-softmax",
    seed: int = 0,
) -> Iterator[tuple[torch.Tensor, dict, dict]]:
    """Per resplit: (pooled order, plain fit's {eps: (violated, savings)}, {key: Scored}).

    The first ``val.num_samples`` of the order calibrate; keys are (eps, delta, path, bound).

    Each Scored is what ``certified_fit(calibration, Target.accuracy_drop(eps), delta,
    family, bound, path, path_share, seed=r)`` returns for resplit r (path ``fixed``,
    ``split:SHARE`` or ``both``, the default for max-softmax: fixed and split:0.5 at
    delta / 2 each), scored on the held-out samples: the largest classifier alone where it
    falls back or where it is cheaper than every certified path rule.
    """
    _check_paths(paths)
    probs = torch.cat([val.probs.cpu(), test.probs.cpu()])
    labels = torch.cat([val.labels.cpu(), test.labels.cpu()])
    pool = Family.of(family, probs, labels, val.costs)
    largest = float(val.costs.alone_macs[-1])
    safe_is_largest = answers_with_last_classifier(family)
    n_cal, n_all = val.num_samples, len(labels)
    gen = torch.Generator().manual_seed(seed)
    for r in range(resplits):
        order = torch.randperm(n_all, generator=gen)
        cal, held = pool.subset(order[:n_cal]), pool.subset(order[n_cal:])
        search = cal.search()
        fits = torch.tensor([search.for_accuracy_drop(e).thresholds for e in epsilons])
        drops, savings = _drop_and_savings(held, fits)
        fitted = {
            e: (bool(d > e), float(s)) for e, d, s in zip(epsilons, drops, savings, strict=True)
        }
        inner = torch.randperm(n_cal, generator=torch.Generator().manual_seed(r))
        ways = {w for p in paths for w in (("fixed", "split:0.5") if p == "both" else (p,))}
        choose = _Chooser(cal, _path_variants(cal, ways, family, inner), largest, safe_is_largest)
        choices = {
            (eps, delta, path, bound): choose(eps, delta, path, bound)
            for eps in epsilons
            for delta in deltas
            for path in paths
            for bound in bounds
        }
        yield order, fitted, _score(held, choose, choices, largest)


def _check_paths(paths: Sequence[str]) -> None:
    for name in paths:
        if name in ("fixed", "both"):
            continue
        kind, _, share = name.partition(":")
        try:
            ok = kind == "split" and 0 < float(share) < 1
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"paths must be 'fixed', 'both' or 'split:SHARE', got {name!r}")


class _Chooser:
    """certified_fit's choice on one resplit's calibration samples, as (way, path row).

    Row LARGEST is the largest classifier alone; certification flags come along.
    """

    def __init__(self, cal: Family, variants: dict, largest: float, safe_is_largest: bool):
        self.cal, self.variants = cal, variants
        self.largest, self.safe_is_largest = largest, safe_is_largest
        self.paths: dict[tuple[str, float], torch.Tensor] = {}
        self.macs: dict[tuple[str, float], torch.Tensor] = {}

    def path(self, way: str, eps: float) -> torch.Tensor:
        """The path of ``way`` for this epsilon (cached)."""
        if (way, eps) not in self.paths:
            self.paths[way, eps] = self.variants[way][1](Target.accuracy_drop(eps))
        return self.paths[way, eps]

    def cal_macs(self, way: str, eps: float) -> torch.Tensor:
        """Mean MACs of every path rule on all calibration samples (cached)."""
        if (way, eps) not in self.macs:
            exits = self.cal.exits(self.path(way, eps))
            self.macs[way, eps] = self.cal.cumulative[exits].mean(1)
        return self.macs[way, eps]

    def one_path(self, way: str, eps: float, level: float, bound: str) -> tuple[int, bool]:
        """(row, certified) of fixed-sequence testing at ``level`` along one path."""
        target = Target.accuracy_drop(eps)
        p = path_p_values(self.variants[way][0], self.path(way, eps), target, level, bound)
        last = fixed_sequence(p, level)
        certified = last >= 1
        if not self.safe_is_largest:
            return max(last, 0), certified
        if not certified:
            return LARGEST, False
        macs = self.cal_macs(way, eps)
        cheapest = int(torch.argmin(macs[1 : last + 1]))
        if float(macs[1 + cheapest]) >= self.largest:
            return LARGEST, True
        return 1 + cheapest, True

    def cost(self, way: str, eps: float, row: int) -> float:
        """Mean MACs of a choice on the calibration samples."""
        return self.largest if row == LARGEST else float(self.cal_macs(way, eps)[row])

    def __call__(self, eps: float, delta: float, path: str, bound: str) -> tuple[str, int, bool]:
        """(way, row, certified) that certified_fit returns for this path variant."""
        if path != "both":
            return (path, *self.one_path(path, eps, delta, bound))
        fits = [(w, *self.one_path(w, eps, delta / 2, bound)) for w in ("fixed", "split:0.5")]
        certified = [f for f in fits if f[2]]
        if not certified:
            return fits[0]
        return min(certified, key=lambda f: self.cost(f[0], eps, f[1]))


def _score(
    held: Family, choose: _Chooser, choices: dict[tuple, tuple[str, int, bool]], largest: float
) -> dict[tuple, Scored]:
    """Each choice scored on the (large) held-out samples; each path row evaluated once."""
    rows: dict[tuple[str, float], set[int]] = {}
    for (eps, *_), (way, row, _) in choices.items():
        if row != LARGEST:
            rows.setdefault((way, eps), set()).add(row)
    at: dict[tuple[str, float, int], tuple[float, float]] = {}
    for (way, eps), wanted in rows.items():
        index = sorted(wanted)
        drop, savings = _drop_and_savings(held, choose.path(way, eps)[index])
        for j, d, s in zip(index, drop, savings, strict=True):
            at[way, eps, j] = (float(d), float(s))
    alone = 1.0 - largest / held.reference_macs  # its answers are the last stage's: drop 0
    scored = {}
    for key, (way, row, certified) in choices.items():
        drop, savings = (0.0, alone) if row == LARGEST else at[way, key[0], row]
        scored[key] = Scored(drop > key[0], savings, certified, row == LARGEST)
    return scored


PathBuilder = Callable[[Target], torch.Tensor]  # a target -> its path of threshold rows


def _path_variants(
    cal: Family, ways: Iterable[str], family: str, inner: torch.Tensor
) -> dict[str, tuple[Family, PathBuilder]]:
    """Each path variant: (its testing samples in test order, its path per target).

    As in certified_fit with ``inner`` its permutation of the calibration samples:
    ``fixed`` is the data-free path, tested on every calibration sample (in ``inner``
    order); ``split:SHARE`` is fitted on the first SHARE of ``inner`` and tested on the rest.
    """
    k = cal.num_stages
    variants: dict[str, tuple[Family, PathBuilder]] = {}
    for name in ways:
        if name == "fixed":
            variants[name] = (cal.subset(inner), lambda t: fixed_path(family, k, t))
        else:
            share = float(name.split(":")[1])
            n_path = min(max(1, round(share * len(inner))), len(inner) - 1)
            fit_on = cal.subset(inner[:n_path]).search()
            cache: dict[tuple, torch.Tensor] = {}

            def build(t, fit_on=fit_on, cache=cache):
                key = (t.kind, tuple(path_grid(t)))
                if key not in cache:
                    cache[key] = split_path(fit_on, t)
                return cache[key]

            variants[name] = (cal.subset(inner[n_path:]), build)
    return variants


def _summary_row(
    summary: dict,
    eps: float,
    delta: float,
    name: str,
    bound: str,
    values: list[Scored],
    plain: list[tuple[bool, float]],
    seconds: float,
) -> dict:
    """One (epsilon, delta, path, bound) over all resplits, next to the plain fit's numbers."""
    violated = sum(v.violated for v in values)
    low, high = clopper_pearson(violated, len(values))
    plain_savings = float(np.mean([s for _, s in plain]))
    savings = float(np.mean([v.savings for v in values]))
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
        "certified_rate": float(np.mean([v.certified for v in values])),
        "largest_only_rate": float(np.mean([v.largest_only for v in values])),
        "savings": savings,
        "plain_savings": plain_savings,
        "savings_kept": savings / plain_savings if plain_savings > 0 else float("nan"),
        "seconds_all_rows": seconds,
    }


def format_table(rows: list[dict]) -> str:
    """Markdown table of the rows."""
    head = (
        "| run | n_cal | eps | delta | path | bound | violations [95% CI] | plain violations "
        "| certified | largest alone | savings | plain savings | kept |\n|" + "---|" * 13
    )
    lines = [head]
    for r in rows:
        low, high = r["violation_ci95"]
        lines.append(
            f"| {r['run'].split('__')[0]} | {r['calibration']} | {r['epsilon']:g} | "
            f"{r['delta']:g} | {r['path']} | {r['bound']} | {r['violation_rate']:.3f} "
            f"[{low:.3f}, {high:.3f}] | {r['plain_violation_rate']:.3f} | "
            f"{r['certified_rate']:.2f} | {r['largest_only_rate']:.2f} | "
            f"{r['savings']:.3f} | {r['plain_savings']:.3f} | "
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
        help="path variants: 'split:SHARE' (fitted on SHARE of calibration), 'fixed', or "
        "'both' (certified_fit's default for max-softmax: fixed and split:0.5 at delta/2 each)",
    )
    parser.add_argument("--family", default="max-softmax")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.resplits < 1:
        parser.error(f"--resplits must be >= 1, got {args.resplits}")
    try:
        _check_paths(args.paths)
    except ValueError as error:
        parser.error(str(error))
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
