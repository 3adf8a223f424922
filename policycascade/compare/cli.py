"""``policycascade compare RUN_DIR...``: every policy on the same classifiers, test split once."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from policycascade.agents.thresholds import ALL_CRITERIA, CRITERIA
from policycascade.cli_support import USAGE_ERROR, USER_ERRORS, OneLineParser, user_message
from policycascade.compare.extras import parse_shift, shift_reports, subset_report
from policycascade.compare.policies import DEFAULT_BUDGETS, DEFAULT_EPSILONS, CompareOptions
from policycascade.compare.report import (
    format_extras,
    format_summary,
    make_figures,
    write_tensorboard,
)
from policycascade.compare.rows import aggregate, write_csv
from policycascade.compare.runs import compare_run, expand_run_dirs
from policycascade.compare.savings import run_savings
from policycascade.config import HelpFormatter
from policycascade.jsonio import write_json
from policycascade.runs import load_run


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
        nargs="+",
        metavar="RUN_DIR",
        help="run directories (or directories that hold run directories)",
    )
    parser.add_argument(
        "--out", default=None, help="output directory (default: comparisons/<time>)"
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
    return parser


def _output_dir(path: str | None) -> Path:
    """The output directory, created (or reused) before any evaluation work."""
    out = Path(path or f"comparisons/{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a usage error)."""
    args = build_parser().parse_args(argv)
    try:
        options = CompareOptions(
            tuple(args.criteria),
            tuple(args.epsilons),
            tuple(args.budgets),
            args.temperature,
            args.sweep_points,
        ).validate()
        shifts = [parse_shift(text) for text in args.shift]
        run_dirs = expand_run_dirs(args.runs)
        out = _output_dir(args.out)
        rows, extras = [], {"subsets": [], "shift": []}
        for run_dir in tqdm(run_dirs, desc="runs", leave=False, disable=None):  # off without a tty
            try:
                run = load_run(run_dir)
                rows += compare_run(
                    run, options, out / "reference", reference=not args.no_reference
                )
                if args.subsets:
                    extras["subsets"].append(subset_report(run, options.sweep_points))
                extras["shift"] += [shift_reports(run, kind, level) for kind, level in shifts]
            except USER_ERRORS as error:
                message = user_message(error)
                if str(run_dir) not in message:
                    message = f"run {run_dir}: {message}"
                raise ValueError(message) from None
    except USER_ERRORS as error:
        print(f"error: {user_message(error)}", file=sys.stderr)
        return USAGE_ERROR
    aggregated = aggregate(rows)
    savings = run_savings(rows)
    payload = {
        "rows": [r.as_dict() for r in rows],
        "aggregated": [vars(a) for a in aggregated],
        "savings": [s.as_dict() for s in savings],
        **{key: value for key, value in extras.items() if value},
    }
    write_json(out / "comparison.json", payload, indent=1)
    write_csv(out / "comparison.csv", rows)
    figures = make_figures(rows, aggregated)
    figures["compare/tradeoff"].savefig(out / "tradeoff.png", dpi=130)
    if "compare/accuracy_by_exit" in figures:
        figures["compare/accuracy_by_exit"].savefig(out / "accuracy_by_exit.png", dpi=130)
    write_tensorboard(out, aggregated, savings, figures, rows)
    print(format_summary(aggregated, savings))
    print(format_extras(extras))
    print(
        f"\nwrote {out}/comparison.json, comparison.csv, tradeoff.png, accuracy_by_exit.png, "
        f"tensorboard/ (tensorboard --logdir {out}/tensorboard)"
    )
    return 0
