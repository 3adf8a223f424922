"""``policycascade compare RUN_DIR...``: every policy on the same classifiers, test split once."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from policycascade.agents.thresholds import ALL_CRITERIA, CRITERIA
from policycascade.cli_support import USAGE_ERROR, USER_ERRORS, OneLineParser, user_message
from policycascade.compare.api import compare_runs
from policycascade.compare.extras import parse_shift
from policycascade.compare.policies import DEFAULT_BUDGETS, DEFAULT_EPSILONS, CompareOptions
from policycascade.compare.runs import expand_run_dirs
from policycascade.config import HelpFormatter
from policycascade.fsutil import nearest_existing
from policycascade.runs import read_config


def build_parser() -> argparse.ArgumentParser:
    """CLI of the comparison."""
    parser = OneLineParser(
        prog="policycascade compare",
        description="Evaluate trained runs under every stopping policy: rules are fitted on each "
        "run's validation split and every policy is measured once on its test split. Writes "
        "comparison.json/.csv, tradeoff.png, accuracy_by_exit.png and TensorBoard runs to --out "
        "and prints a one-screen summary.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "runs",
        nargs="*",
        metavar="RUN_DIR",
        help="run directories (or directories that hold run directories); each run is given "
        "once, and runs of one configuration need distinct seeds",
    )
    parser.add_argument(
        "--outputs",
        nargs="+",
        default=[],
        metavar="FILE",
        help="also compare cached outputs from any framework (.npz, .csv or .parquet in the "
        "layout of docs/outputs-format.md) that hold a 'val' and a 'test' split: every rule is "
        "fitted on val and reported on test, with no model in sight",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output directory (default: comparisons/<time>); it must be new or empty unless "
        "--overwrite is given",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out: replaces the files compare writes there "
        "(comparison.json/.csv, the figures, its TensorBoard runs) and reuses its cached "
        "reference; nothing else in the folder is touched",
    )
    parser.add_argument(
        "--criteria",
        nargs="+",
        default=list(CRITERIA),
        choices=ALL_CRITERIA,
        help="confidence criteria of the threshold rules ('ensemble': the running ensemble's "
        "max-softmax, answering with the ensemble)",
    )
    parser.add_argument(
        "--epsilons",
        nargs="+",
        type=float,
        default=list(DEFAULT_EPSILONS),
        help="accuracy drops (0.005 = half a point) below the last classifier's validation "
        "accuracy that the threshold rules may lose",
    )
    parser.add_argument(
        "--budgets",
        nargs="+",
        type=float,
        default=list(DEFAULT_BUDGETS),
        help="mean MACs budgets per sample, as shares of the largest classifier",
    )
    parser.add_argument(
        "--temperature",
        action="store_true",
        help="also fit per-stage temperature scaling (max-softmax+T)",
    )
    parser.add_argument(
        "--class-aware",
        action="store_true",
        help="also fit max-softmax thresholds per stage and per predicted class, shrunk toward "
        "the shared threshold (helps where a stage is confidently wrong on some classes)",
    )
    parser.add_argument(
        "--guarantee",
        nargs="+",
        default=[],
        metavar="EPSILON:DELTA",
        help="also fit each criterion's rule certified on validation to lose at most EPSILON "
        "accuracy against the largest classifier with probability >= 1 - DELTA over the "
        "validation draw (Learn-then-Test; docs/certify.md), reported on test; a target the "
        "validation samples cannot certify falls back to the largest classifier",
    )
    parser.add_argument(
        "--sweep-points",
        type=int,
        default=15,
        help="operating points on each rule's trade-off curve",
    )
    parser.add_argument(
        "--subsets",
        action="store_true",
        help="also find each run's best sub-cascade (subsets ending with its largest "
        "classifier): the one whose max-softmax rule reaches the last classifier's validation "
        "accuracy with the fewest validation MACs, reported on test",
    )
    parser.add_argument(
        "--shift",
        nargs="+",
        default=[],
        metavar="KIND:SEVERITY",
        help="also measure every run's own rule and the max-softmax rule on corrupted test "
        "images (noise, blur or contrast, severity 1..5), before and after refitting each "
        "rule to its clean exit shares on corrupted validation images (no labels)",
    )
    parser.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the reference: the run's classifier family trained independently with the "
        "same epoch budget and per-classifier early stopping, with every rule fitted on it "
        "(cached under OUT/reference/)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        metavar="N",
        help="runs compared at once in forked processes, this one included, and the figures "
        "drawn in a helper while the tables are written (default 0: the free CPU cores; 1: "
        "everything in this process); every file is the same for every N",
    )
    return parser


def parse_guarantee(text: str) -> tuple[float, float]:
    """``EPSILON:DELTA`` (e.g. ``0.01:0.1``) -> (epsilon, delta), or a ValueError naming it."""
    epsilon, _, delta = text.partition(":")
    try:
        pair = (float(epsilon), float(delta))
    except ValueError:
        pair = None
    if pair is None or not (0 <= pair[0] < 1 and 0 < pair[1] < 1):
        raise ValueError(
            f"--guarantee must be EPSILON:DELTA with EPSILON in [0, 1) and DELTA in (0, 1), "
            f"got {text!r}"
        )
    return pair


def _output_dir(path: str | None, overwrite: bool) -> Path:
    """The output directory, checked before any work: new, empty, or ``--overwrite``.

    It is created only when there is something to write into it.
    """
    out = Path(path or f"comparisons/{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(
            f"--out {str(out)!r} is not empty: compare writes into a new or empty folder; pass "
            "--overwrite to replace an earlier comparison's files there (nothing else is touched)"
        )
    parent = nearest_existing(out)
    if not parent.is_dir():
        raise ValueError(f"--out {str(out)!r} cannot be created: {str(parent)!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):  # found now, not after the whole comparison
        raise ValueError(f"--out {str(out)!r} cannot be written: {str(parent)!r} is read-only")
    return out


_FLAGS = {  # CompareOptions fields as the command line names them
    "criteria": "--criteria",
    "epsilons": "--epsilons",
    "budget_shares": "--budgets",
    "sweep_points": "--sweep-points",
}


def _options(args: argparse.Namespace) -> CompareOptions:
    """The validated options; a bad value's message names its command-line flag."""
    try:
        return CompareOptions(
            tuple(args.criteria),
            tuple(args.epsilons),
            tuple(args.budgets),
            args.temperature,
            args.sweep_points,
            args.class_aware,
            tuple(parse_guarantee(text) for text in args.guarantee),
        ).validate()
    except (TypeError, ValueError) as error:
        message = str(error)
        for field, flag in _FLAGS.items():
            if message.startswith(field + " "):
                message = flag + message[len(field) :]
        raise ValueError(message) from None


def _choose_threads(runs: list[str]) -> None:
    """Threads for the comparison's work: the first run's training setting, else one thread.

    Fitting rules on cached outputs is small work; only a reference trained for a large
    cascade gains from more threads. The choice is silent: stderr is kept for errors.
    """
    from policycascade.outputs_io import stored_stage_costs
    from policycascade.run_store import OUTPUTS_NAME, has_stored_outputs
    from policycascade.runtime import configure_threads, resolve_device
    from policycascade.train import thread_choice

    config, stored = None, None
    for path in expand_run_dirs(runs)[:1]:
        config = read_config(path)
        if has_stored_outputs(Path(path)):  # the stored costs say how large the classifiers are
            stored = max(stored_stage_costs(Path(path) / OUTPUTS_NAME))
    if config is not None and not config.env and stored is not None:  # no cascade is built
        work = f"a reference for classifiers of up to {stored} MACs"
        device = resolve_device(config.device)
        configure_threads(config.threads or None, stored * config.batch_size, device, work, None)
    elif config is None or config.env:  # outputs only, or frozen classifiers: no training
        configure_threads(None, 0, "cpu", "rule fits on cached outputs", log=None)
    else:
        thread_choice(config, log=None)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a usage error)."""
    args = build_parser().parse_args(argv)
    try:
        options = _options(args)
        shifts = [parse_shift(text) for text in args.shift]
        if args.processes < 0:
            raise ValueError(f"--processes must be an integer >= 0, got {args.processes}")
        if not args.runs and not args.outputs:
            raise ValueError("give at least one RUN_DIR or --outputs FILE")
        out = _output_dir(args.out, args.overwrite)
        _choose_threads(args.runs)
        comparison = compare_runs(
            args.runs,
            args.outputs,
            options,
            reference=not args.no_reference,
            reference_cache=out / "reference",
            subsets=args.subsets,
            shift=shifts,
            show_progress=True,
            processes=args.processes,
        )
        written = comparison.write(out, overwrite=args.overwrite, processes=args.processes)
    except USER_ERRORS as error:
        print(f"error: {user_message(error)}", file=sys.stderr)
        return USAGE_ERROR
    print(comparison.summary())
    print(f"\nwrote {', '.join(str(p) for p in written[:-1])}")
    print(f"TensorBoard: tensorboard --logdir {written[-1]}")
    return 0
