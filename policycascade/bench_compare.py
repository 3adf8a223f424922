"""``policycascade bench-compare RUN_DIR...``: compare on stored outputs against recomputing them.

Both ways run side by side in one process, alternating rep by rep, on the same runs and
options: the stored path reads each run's ``outputs.npz`` and ``rule.pt``; the recomputing
path (what ``compare`` did before runs stored their outputs) builds each run's training
harness, loads its data set and weights and runs every classifier on val and test. The
report gives both wall times, their ratio, whether the comparison rows agree, and whether
the stored path loaded a data set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

from policycascade.cli_support import USAGE_ERROR, USER_ERRORS, OneLineParser, user_message
from policycascade.config import HelpFormatter


@contextlib.contextmanager
def recomputing_outputs() -> Iterator[None]:
    """Runs load as if they stored nothing: outputs come from the harness, as before."""
    from policycascade import runs

    stored = runs.has_stored_outputs
    runs.has_stored_outputs = lambda run_dir: False
    try:
        yield
    finally:
        runs.has_stored_outputs = stored


@contextlib.contextmanager
def counting_data_loads(counter: list[int]) -> Iterator[None]:
    """Count the data sets the harness loads in the block."""
    from policycascade import harness

    load = harness.load_dataset

    def counted(*args: Any, **kwargs: Any):
        counter[0] += 1
        return load(*args, **kwargs)

    harness.load_dataset = counted
    try:
        yield
    finally:
        harness.load_dataset = load


def bench_compare(run_dirs: list[str], reps: int = 3, sweep_points: int = 15) -> dict[str, Any]:
    """Median wall time of ``compare_runs`` over ``run_dirs``, stored against recomputed."""
    from policycascade.compare.api import compare_runs
    from policycascade.compare.policies import CompareOptions

    options = CompareOptions(sweep_points=sweep_points)
    times: dict[str, list[float]] = {"stored": [], "recomputed": []}
    loads = {"stored": [0], "recomputed": [0]}
    rows: dict[str, str] = {}
    for _ in range(reps):
        for way in ("recomputed", "stored"):
            context = recomputing_outputs() if way == "recomputed" else contextlib.nullcontext()
            with context, counting_data_loads(loads[way]):
                start = time.perf_counter()
                comparison = compare_runs(run_dirs, (), options, reference=False)
                times[way].append(time.perf_counter() - start)
            # compared as JSON text: NaN (an empty accuracy_by_exit row) equals itself there
            rows[way] = json.dumps([r.as_dict() for r in comparison.rows], sort_keys=True)
    stored, recomputed = (statistics.median(times[w]) for w in ("stored", "recomputed"))
    return {
        "runs": len(run_dirs),
        "reps": reps,
        "seconds": times,
        "median_stored_s": stored,
        "median_recomputed_s": recomputed,
        "speedup": recomputed / stored,
        "same_rows": rows["stored"] == rows["recomputed"],
        "data_sets_loaded": {way: count[0] for way, count in loads.items()},
    }


def build_parser() -> argparse.ArgumentParser:
    """CLI of the benchmark."""
    parser = OneLineParser(
        prog="policycascade bench-compare",
        description="Time `compare` over finished runs on their stored outputs against "
        "recomputing the outputs from the data set and weights (the way before outputs were "
        "stored), side by side in one process; the reference is left out of both.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished run directories")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each way")
    parser.add_argument("--sweep-points", type=int, default=15, help="as in compare")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a usage error)."""
    args = build_parser().parse_args(argv)
    try:
        if args.reps < 1:
            raise ValueError(f"--reps must be >= 1, got {args.reps}")
        report = bench_compare(args.runs, args.reps, args.sweep_points)
    except USER_ERRORS as error:
        print(f"error: {user_message(error)}", file=sys.stderr)
        return USAGE_ERROR
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(
            f"compare over {report['runs']} runs (median of {report['reps']}): "
            f"stored outputs {report['median_stored_s']:.2f} s, recomputed "
            f"{report['median_recomputed_s']:.2f} s, {report['speedup']:.1f}x faster; "
            f"same rows: {report['same_rows']}; data sets loaded: "
            f"{report['data_sets_loaded']['stored']} (stored), "
            f"{report['data_sets_loaded']['recomputed']} (recomputed)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
