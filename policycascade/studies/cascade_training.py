r"""Study: classifiers trained for the cascade against the same classifiers trained alone.

For each data set and seed, the reference (compare's: the run's cascade family trained
alone for the run's epochs, each classifier kept from its best validation epoch) and each
weighting of :mod:`policycascade.cascade_training` at the same total epochs (the first
three quarters alone, the last quarter for the cascade): ``<weighting>`` keeps each stage
from its best weighted-validation epoch, ``<weighting>-last`` the last epoch's weights
(``plain`` and ``plain-last`` are the controls: the same epochs unweighted). Every rule is fitted on
validation (:func:`~policycascade.compare.compare_outputs`); each cascade's rule family
is the one with the best validation curve. Reported on test: MACs saved against the
reference's validation-chosen family at the reference's largest classifier's accuracy
minus half a point (and at that accuracy; None where either envelope never reaches it),
the normalised area of the chosen family's envelope on the reference's scale (0 its
cheapest classifier, 1 its oracle) and its gain over the reference's, the half-point
rule's accuracy and MAC share, and each stage's accuracy.

    OMP_NUM_THREADS=1 python -m policycascade.studies.cascade_training \\
        --datasets digits specialist --seeds 0 1 2 3 4 --out cascade-training-study

Each trained cascade's outputs are cached in ``--out`` (``<dataset>-s<seed>-<method>.pt``),
so a stopped study continues where it stopped and the table is rebuilt from the cache.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from policycascade.cascade import CascadeOutputs
from policycascade.cascade_training import WEIGHTINGS, CascadeTraining, train_for_cascade
from policycascade.compare.policies import CompareOptions, compare_outputs
from policycascade.compare.rows import Row
from policycascade.compare.savings import HALF_POINT, best_criterion_on_validation
from policycascade.crossfit import train_reference
from policycascade.data import load_dataset
from policycascade.models import build_cascade
from policycascade.protocol import macs_saved, mean_std, normalised_area
from policycascade.seeding import seeded
from policycascade.supervised import TrainingOptions

REFERENCE = "reference"
# data set -> (cascade family, epochs): the shipped configs' settings (configs/*.yaml)
SETTINGS = {"digits": ("digits", 40), "specialist": ("specialist", 20), "synthetic": ("digits", 60)}
POINT = f"eps={HALF_POINT:g}"
LAST = "-last"  # a method name's suffix: keep the last epoch's weights (no selection)
METHODS = (*WEIGHTINGS, *(w + LAST for w in WEIGHTINGS))


def train_outputs(
    dataset: str, seed: int, method: str, rounds: int = 2
) -> tuple[CascadeOutputs, CascadeOutputs, dict[str, Any]]:
    """(val, test) outputs of one cascade trained by ``method`` (reference or a weighting)."""
    name, epochs = SETTINGS[dataset]
    data = load_dataset(dataset, seed)
    options = TrainingOptions()
    info: dict[str, Any] = {"epochs": epochs}
    start = time.perf_counter()
    with seeded(seed):  # the initial weights, as compare's reference draws them
        cascade = build_cascade(name, data.input_shape, data.num_classes)
        if method == REFERENCE:
            train_reference(cascade, data.train, data.val, epochs, seed=seed, options=options)
        else:
            config = CascadeTraining(
                weighting=method.removesuffix(LAST),
                cascade_epochs=epochs // 4,
                rounds=rounds,
                keep="last" if method.endswith(LAST) else "best",
            )
            result = train_for_cascade(
                cascade, data.train, data.val, epochs, config, seed, options=options
            )
            info.update(
                cascade_epochs=config.cascade_epochs,
                best_epoch=result.best_epoch,
                history=result.history,
            )
    info["train_seconds"] = time.perf_counter() - start
    costs = cascade.costs()
    val = cascade.outputs(data.val.x, data.val.y, costs)
    test = cascade.outputs(data.test.x, data.test.y, costs)
    info["names"] = list(cascade.names)
    return val, test, info


def cached_outputs(
    out: Path, dataset: str, seed: int, method: str
) -> tuple[CascadeOutputs, CascadeOutputs, dict[str, Any]]:
    """:func:`train_outputs`, read from ``out`` when this cascade was trained before."""
    path = out / f"{dataset}-s{seed}-{method}.pt"
    name = SETTINGS[dataset][0]
    if not path.is_file():
        val, test, info = train_outputs(dataset, seed, method)
        saved = {"val": (val.probs, val.labels), "test": (test.probs, test.labels), "info": info}
        torch.save(saved, path)
        print(f"trained {path.name} in {info['train_seconds']:.0f} s", flush=True)
    saved = torch.load(path, weights_only=False)
    data = load_dataset(dataset, seed)
    costs = build_cascade(name, data.input_shape, data.num_classes).costs()
    val = CascadeOutputs(*saved["val"], costs)
    test = CascadeOutputs(*saved["test"], costs)
    return val, test, saved["info"]


def chosen_family(rows: list[Row]) -> tuple[str, list[Row]]:
    """The rule family with the best validation curve, and its rows."""
    criterion = best_criterion_on_validation(rows)
    return criterion, [r for r in rows if r.policy == criterion]


def study_seed(out: Path, dataset: str, seed: int, methods: Sequence[str]) -> dict[str, Any]:
    """Every method's numbers on one seed, against the reference's rule envelope."""
    results: dict[str, Any] = {"dataset": dataset, "seed": seed, "methods": {}}
    reference_curve: list[tuple[float, float]] = []
    largest_accuracy = 0.0
    area_args: tuple = ()
    for method in (REFERENCE, *methods):
        val, test, info = cached_outputs(out, dataset, seed, method)
        meta = {"dataset": dataset, "run": f"{dataset}-s{seed}", "seed": seed}
        rows = compare_outputs(
            val, test, info["names"], CompareOptions(), trained_by=method, **meta
        )
        criterion, family = chosen_family(rows)
        curve = [(r.accuracy, r.mean_macs) for r in family]
        singles = [r for r in rows if r.kind == "single"]
        if method == REFERENCE:
            reference_curve = curve
            largest = max(singles, key=lambda r: r.mean_macs)
            largest_accuracy = largest.accuracy
            cheapest = min(singles, key=lambda r: r.mean_macs)
            oracle = next(r for r in rows if r.kind == "oracle")
            area_args = (
                (cheapest.accuracy, cheapest.mean_macs),
                (oracle.accuracy, oracle.mean_macs),
                largest.mean_macs,
            )
        point = next(r for r in family if r.point == POINT)
        results["methods"][method] = {
            "criterion": criterion,
            "saved_below_largest": macs_saved(
                curve, reference_curve, largest_accuracy - HALF_POINT
            ),
            "saved_at_largest": macs_saved(curve, reference_curve, largest_accuracy),
            # on the reference's scale: 0 its cheapest classifier, 1 its oracle
            "area": normalised_area(curve, *area_args),
            "point_accuracy": point.accuracy,
            "point_macs_share": point.macs_share,
            "stage_accuracy": [r.accuracy for r in singles],
            "best_epoch": info.get("best_epoch"),
            "train_seconds": info["train_seconds"],
        }
    results["reference_largest_accuracy"] = largest_accuracy
    for entry in results["methods"].values():
        entry["area_gain"] = entry["area"] - results["methods"][REFERENCE]["area"]
    return results


FIELDS = (
    ("saved_below_largest", "MACs saved at largest − 0.5 pt %"),
    ("saved_at_largest", "MACs saved at largest %"),
    ("area", "area x100"),
    ("area_gain", "area gain x100"),
    ("point_accuracy", "eps=0.005 rule: test acc %"),
    ("point_macs_share", "eps=0.005 rule: MAC share %"),
)


def _cell(values: list[float | None]) -> str:
    stats = mean_std(None if v is None else 100 * v for v in values)
    if stats.n == 0:
        return "never reached (n=0)"
    missing = "" if stats.n == len(values) else f" (n={stats.n})"
    return f"{stats.mean:.1f} ± {stats.std:.1f}{missing}"


def summary(results: list[dict[str, Any]]) -> str:
    """Markdown tables: mean ± std over seeds of every method's numbers, per data set."""
    lines = []
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        runs = [r for r in results if r["dataset"] == dataset]
        methods = list(runs[0]["methods"])
        k = len(runs[0]["methods"][REFERENCE]["stage_accuracy"])
        header = [f[1] for f in FIELDS] + [f"stage {t} acc %" for t in range(k)]
        lines += [
            f"\n{dataset} ({len(runs)} seeds: {sorted(r['seed'] for r in runs)})\n",
            "| method | families chosen | " + " | ".join(header) + " |",
            "|---" * (len(header) + 2) + "|",
        ]
        for method in methods:
            entries = [r["methods"][method] for r in runs]
            cells = [_cell([e[key] for e in entries]) for key, _ in FIELDS]
            cells += [_cell([e["stage_accuracy"][t] for e in entries]) for t in range(k)]
            chosen = ", ".join(sorted({e["criterion"] for e in entries}))
            lines.append(f"| {method} | {chosen} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Train what is not cached, then print the tables and write results.json into ``--out``.

    ``--table-only`` reads only what is cached (a seed missing a method is skipped).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["digits"], choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", type=Path, required=True, help="folder for the cache and JSON")
    parser.add_argument("--table-only", action="store_true", help="train nothing: cached only")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for dataset in args.datasets:
        for seed in args.seeds:
            names = [REFERENCE, *args.methods]
            cached = all((args.out / f"{dataset}-s{seed}-{m}.pt").is_file() for m in names)
            if args.table_only and not cached:
                continue
            results.append(study_seed(args.out, dataset, seed, args.methods))
            if not args.table_only:
                (args.out / "results.json").write_text(json.dumps(results, indent=1))
                print(summary(results), flush=True)
    if args.table_only:
        (args.out / "results-table.json").write_text(json.dumps(results, indent=1))
        print(summary(results), flush=True)


if __name__ == "__main__":
    main()
