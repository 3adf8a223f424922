"""``policycascade fit OUTPUTS_FILE``: fit a stopping rule on cached outputs from any framework."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from policycascade.agents.thresholds import ALL_CRITERIA
from policycascade.cli_support import USAGE_ERROR, USER_ERRORS, OneLineParser, user_message
from policycascade.config import HelpFormatter
from policycascade.fsutil import check_new_file

FIT_SPLITS = ("val", "calibration", "fit", "all")  # in order of preference


def build_parser() -> argparse.ArgumentParser:
    """CLI of the fit."""
    parser = OneLineParser(
        prog="policycascade fit",
        description="Fit a stopping rule on cached outputs (.npz, .csv or .parquet in the layout "
        "of docs/outputs-format.md) to one target, print it with its metrics on the fitting "
        "split and, once, on the file's 'test' split if it has one, and save it as JSON for "
        "serving with numpy alone (policycascade.serving).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("outputs", metavar="OUTPUTS_FILE", help="the cached outputs")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--alpha", type=float, help="best mean reward: accuracy - ALPHA * cost share"
    )
    target.add_argument(
        "--accuracy-drop",
        type=float,
        metavar="EPSILON",
        help="cheapest rule within EPSILON accuracy of the last classifier (0.005 = half a point)",
    )
    target.add_argument(
        "--accuracy", type=float, help="cheapest rule with at least this accuracy (0..1)"
    )
    target.add_argument(
        "--budget",
        type=float,
        metavar="SHARE",
        help="most accurate rule whose mean cost is at most SHARE of the largest classifier's",
    )
    parser.add_argument(
        "--family",
        default="max-softmax",
        choices=[*ALL_CRITERIA, "class-aware"],
        help="rule family: a confidence criterion thresholded per stage, or per-stage and "
        "per-class max-softmax thresholds",
    )
    parser.add_argument(
        "--temperature",
        action="store_true",
        help="fit per-stage temperature scaling first (max-softmax only)",
    )
    parser.add_argument(
        "--split",
        default=None,
        choices=FIT_SPLITS,
        help="the split to fit on (default: the first of val, calibration, fit, all that the "
        "file holds); 'test' is never fitted on",
    )
    parser.add_argument(
        "--guarantee",
        type=float,
        default=None,
        metavar="DELTA",
        help="certify the target (--accuracy-drop, --accuracy or --budget) with probability "
        "at least 1 - DELTA over the draw of the fitting split (Learn-then-Test); a target that "
        "cannot be certified falls back to the largest classifier and says so",
    )
    parser.add_argument(
        "--out", default=None, help="write the fitted rule to this JSON file (a new file)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a usage error)."""
    args = build_parser().parse_args(argv)
    try:
        report = run_fit(args)
    except USER_ERRORS as error:
        print(f"error: {user_message(error)}", file=sys.stderr)
        return USAGE_ERROR
    print(report)
    return 0


def run_fit(args: argparse.Namespace) -> str:
    """Fit, print-ready report; writes ``--out``. Every check runs before the fit."""
    from policycascade.fitting import certify_target, evaluate, fit_rule
    from policycascade.outputs_io import load_outputs

    out = None if args.out is None else Path(args.out)
    if out is not None:
        check_new_file(out, "--out", args.overwrite)
        if out.resolve() == Path(args.outputs).resolve():
            raise ValueError(f"--out {str(out)!r} is the outputs file itself; give a new path")
        if args.family == "class-aware":
            raise ValueError(
                "--out: class-aware rules have no JSON form yet; fit without --out, or use a "
                "criterion family"
            )
    if args.temperature and args.family != "max-softmax":
        raise ValueError(f"--temperature goes with --family max-softmax, got {args.family!r}")
    splits = load_outputs(args.outputs)
    split = args.split or next((s for s in FIT_SPLITS if s in splits), None)
    if split is None or split not in splits:
        raise ValueError(
            f"{args.outputs!r} has no split to fit on (it holds {sorted(splits)}); fitting "
            f"uses one of {list(FIT_SPLITS)} and never 'test'"
        )
    fit_on = splits[split]
    target = _target(args)
    certificate = None
    if args.guarantee is not None:
        if args.family == "class-aware" or args.temperature:
            raise ValueError("--guarantee certifies the criterion families without --temperature")
        certified = certify_target(fit_on, args.family, target, args.guarantee)
        rule, certificate = certified.rule, certified.describe()
    else:
        rule = fit_rule(fit_on, args.family, temperature=args.temperature, **target)
    lines = [f"fitted {_describe(rule)} on {split!r} ({fit_on.num_samples} samples)"]
    if certificate is not None:
        lines.append(f"guarantee: {certificate['message']}")
        lines.append(
            f"  (certified: {certificate['certified']}, bound {certificate['bound']}, path "
            f"{certificate['path']}, {certificate['num_samples']} samples tested, p-value "
            f"{certificate['p_value']:.3g}, delta {certificate['delta']:g})"
        )
    lines.append(_metrics_line(split, evaluate(rule, fit_on)))
    if "test" in splits:
        lines.append(_metrics_line("test", evaluate(rule, splits["test"])))
    if out is not None:
        from policycascade.rule_io import save_rule

        extra = None if certificate is None else {"guarantee": certificate}
        save_rule(rule, out, outputs=fit_on, extra=extra, overwrite=args.overwrite)
        lines.append(f"wrote {out}")
    return "\n".join(lines)


def _target(args: argparse.Namespace) -> dict[str, float]:
    for name in ("alpha", "accuracy_drop", "accuracy", "budget"):
        value = getattr(args, name)
        if value is not None:
            return {name: value}
    raise ValueError("give one of --alpha, --accuracy-drop, --accuracy, --budget")


def _describe(rule) -> str:
    thresholds = getattr(rule, "thresholds", None)
    name = getattr(rule, "name", type(rule).__name__)
    if thresholds is None:
        return name
    return f"{name} thresholds {_rounded(thresholds)}"


def _rounded(values):
    """Thresholds rounded for printing, per stage (and per class for class-aware rules)."""
    if isinstance(values, (list, tuple)):
        return [_rounded(v) for v in values]
    return round(float(values), 6)


def _metrics_line(split: str, result) -> str:
    exits = " ".join(f"{s:.1%}" for s in result.exit_distribution)
    return (
        f"{split:>12}: accuracy {result.accuracy:.2%}, cost share {result.cost_share:.2%} of "
        f"the largest classifier, exits per stage {exits}"
    )


if __name__ == "__main__":
    sys.exit(main())
