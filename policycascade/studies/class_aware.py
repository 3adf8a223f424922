"""Study: class-aware thresholds against the shared ones, fitted on validation, read on test.

For every finished run under the given folders, every confidence criterion is fitted
as a shared threshold rule (as ``compare`` does), as a class-aware rule shrunk with
each prior weight asked for, and as the class-aware fit with an infinite prior (the
shared rule found by the class-aware search: it separates the gain of the per-class
thresholds from that of the search). In each group the criterion with the largest
validation area is kept, then read on test:

- the point fitted at the largest classifier's validation accuracy minus half a point:
  its test accuracy, MAC share and MACs saved against the shared group's point;
- the test curves: MACs saved against the shared envelope half a point below the largest
  classifier's test accuracy (as ``compare`` reports), and the normalised area.

    OMP_NUM_THREADS=1 python -m policycascade.studies.class_aware /work/shared-runs/specialist

A folder may instead hold ``<config>-s<seed>.pt`` files of cached outputs
(:mod:`policycascade.studies.classifier_outputs`).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from policycascade.agents.class_aware import DEFAULT_PRIOR_SAMPLES, ClassAwareSearch
from policycascade.agents.thresholds import CRITERIA
from policycascade.cascade import CascadeOutputs
from policycascade.compare.policies import CompareOptions, compare_outputs, rule_rows
from policycascade.compare.rows import Row
from policycascade.compare.savings import (
    HALF_POINT,
    best_criterion_on_validation,
    is_threshold_rule,
)
from policycascade.protocol import macs_saved, mean_std, normalised_area
from policycascade.runs import LoadedRun
from policycascade.studies.classifier_outputs import load_outputs

SHARED = "shared"
POINT = f"eps={HALF_POINT:g}"


def group_name(prior_samples: float) -> str:
    """The label of the class-aware group with this prior weight."""
    return (
        "class-aware m=inf (shared, searched)"
        if math.isinf(prior_samples)
        else (f"class-aware m={prior_samples:g}")
    )


def study_outputs(
    val: CascadeOutputs,
    test: CascadeOutputs,
    priors: Sequence[float] = (DEFAULT_PRIOR_SAMPLES, math.inf),
    criteria: Sequence[str] = CRITERIA,
    **meta: Any,
) -> dict[str, Any]:
    """Every group's validation-chosen criterion on one cascade's outputs, read on test."""
    k = test.num_stages
    meta = {
        "dataset": "custom",
        "run": "outputs",
        "seed": 0,
        "trained_by": "study",
        "alpha": None,
        **meta,
    }
    names = [f"stage{t}" for t in range(k)]
    base = compare_outputs(val, test, names, CompareOptions(criteria=tuple(criteria)), **meta)
    free = val.costs.with_policy_macs([0] * k)
    options = CompareOptions(criteria=tuple(criteria))
    groups = {SHARED: [r for r in base if is_threshold_rule(r)]}
    for m in priors:
        rows: list[Row] = []
        for criterion in criteria:
            search = ClassAwareSearch(val.probs, val.labels, free, criterion, prior_samples=m)
            rows += rule_rows(criterion, search, val, test, options, (), meta)
        groups[group_name(m)] = rows
    singles = [r for r in base if r.kind == "single"]
    largest = max(singles, key=lambda r: r.mean_macs)
    cheapest = min(singles, key=lambda r: r.mean_macs)
    oracle = next(r for r in base if r.kind == "oracle")
    area_args = ((cheapest.accuracy, cheapest.mean_macs), (oracle.accuracy, oracle.mean_macs))
    chosen = {}
    for name, rows in groups.items():
        criterion = best_criterion_on_validation(rows)
        family = [r for r in rows if r.policy == criterion]
        chosen[name] = (criterion, family, next(r for r in family if r.point == POINT))
    shared_curve = [(r.accuracy, r.mean_macs) for r in chosen[SHARED][1]]
    shared_point = chosen[SHARED][2]
    result = {**meta, "largest_test_accuracy": largest.accuracy, "groups": {}}
    for name, (criterion, family, point) in chosen.items():
        curve = [(r.accuracy, r.mean_macs) for r in family]
        result["groups"][name] = {
            "criterion": criterion,
            "val_accuracy": point.val_accuracy,
            "test_accuracy": point.accuracy,
            "test_macs_share": point.macs_share,
            "point_macs_saved_vs_shared": 1.0 - point.mean_macs / shared_point.mean_macs,
            "curve_macs_saved_vs_shared": macs_saved(
                curve, shared_curve, largest.accuracy - HALF_POINT
            ),
            "area": normalised_area(curve, *area_args, largest.mean_macs),
        }
    return result


def study_run(run: LoadedRun, priors: Sequence[float], criteria: Sequence[str]) -> dict[str, Any]:
    """One trained run's study."""
    meta = {"dataset": run.config.dataset, "run": run.run_dir.name, "seed": run.config.seed}
    return study_outputs(run.outputs("val"), run.outputs("test"), priors, criteria, **meta)


FIELDS = (
    ("val_accuracy", 100, "val acc %"),
    ("test_accuracy", 100, "test acc %"),
    ("test_macs_share", 100, "MAC share %"),
    ("point_macs_saved_vs_shared", 100, "saved vs shared, point %"),
    ("curve_macs_saved_vs_shared", 100, "saved vs shared, curve %"),
    ("area", 1, "area"),
)


def summary(results: list[dict[str, Any]]) -> str:
    """A markdown table: mean ± std over runs of every group's numbers, per data set."""
    lines = []
    for dataset in sorted({r["dataset"] for r in results}):
        runs = [r for r in results if r["dataset"] == dataset]
        lines += [
            f"\n{dataset} ({len(runs)} runs; seeds {sorted(r['seed'] for r in runs)})",
            "| group | criteria chosen | " + " | ".join(f[2] for f in FIELDS) + " |",
            "|---" * (len(FIELDS) + 2) + "|",
        ]
        for name in runs[0]["groups"]:
            groups = [r["groups"][name] for r in runs]
            cells = []
            for key, scale, _ in FIELDS:
                stats = mean_std(None if g[key] is None else g[key] * scale for g in groups)
                fmt = ".3f" if scale == 1 else ".1f"
                cell = f"{stats.mean:{fmt}} ± {stats.std:{fmt}}"
                cells.append(cell + ("" if stats.n == len(groups) else f" (n={stats.n})"))
            chosen = ",".join(sorted({g["criterion"] for g in groups}))
            lines.append(f"| {name} | {chosen} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the study on every finished run under the folders; print the table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "folders",
        nargs="*",
        type=Path,
        help="folders of run directories, or of output files written by classifier_outputs",
    )
    parser.add_argument(
        "--priors",
        nargs="+",
        type=float,
        default=[DEFAULT_PRIOR_SAMPLES, math.inf],
        help="prior weights m of the class-aware groups (inf: the shared rule, searched)",
    )
    parser.add_argument(
        "--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA, help="rule families"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON file for per-run results")
    args = parser.parse_args(argv)
    for folder in args.folders:
        if not folder.is_dir():
            raise ValueError(f"folders must be directories of runs, got {str(folder)!r}")
    results, seen = [], set()
    for folder in args.folders:
        for path in sorted(folder.glob("*.pt")):  # cached outputs: <config>-s<seed>.pt
            dataset, seed = path.stem.rsplit("-s", 1)
            outputs = load_outputs(path)
            meta = {"dataset": dataset, "run": path.name, "seed": int(seed)}
            results.append(
                study_outputs(outputs["val"], outputs["test"], args.priors, args.criteria, **meta)
            )
            print(f"done {path.name}", flush=True)
        for run_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            run = LoadedRun(run_dir)
            key = (run.config.dataset, run.config.seed)
            if not run.finished or key in seen:  # the runs of one seed share their classifiers
                continue
            seen.add(key)
            results.append(study_run(run, args.priors, args.criteria))
            print(f"done {run_dir.name}", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))
    print(summary(results))


if __name__ == "__main__":
    main()
