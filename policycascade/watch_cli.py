"""``policycascade watch``: stream a rule's exits on cached outputs through a :class:`DriftWatch`.

``policycascade watch OUTPUTS_FILE --rule RULE.json`` reads the outputs (any file
:func:`policycascade.outputs_io.load_outputs` reads), applies the rule sample by sample
in file order and reports the first sample at which each exit share or the mean cost
left its calibration interval. ``python -m policycascade.watch_cli bench RUN_DIR ...``
measures detection delays under corruptions and false alarms on clean data for trained
runs (docs/watch.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from policycascade.cli_support import OneLineParser, run_main
from policycascade.fsutil import check_new_file
from policycascade.watch import DriftWatch, exit_costs_of


def build_parser() -> argparse.ArgumentParser:
    """Options of ``policycascade watch``."""
    parser = OneLineParser(
        prog="policycascade watch",
        description="Watch a stopping rule's exit shares and mean cost on a stream of cached "
        "outputs; alarm (anytime-valid) when they leave their calibration values.",
    )
    parser.add_argument(
        "outputs", metavar="OUTPUTS_FILE", help="cached outputs (.npz/.csv/.parquet)"
    )
    parser.add_argument(
        "--rule", required=True, metavar="RULE.json", help="the rule file (policycascade fit)"
    )
    parser.add_argument(
        "--split",
        default=None,
        help="split of OUTPUTS_FILE to stream (default: the file's only split, else 'test')",
    )
    parser.add_argument(
        "--calibration-split",
        default=None,
        metavar="SPLIT",
        help="calibrate on this split of OUTPUTS_FILE instead of the rule file's calibration block",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.01,
        help="probability of any false alarm over an unbounded clean stream (default 0.01)",
    )
    parser.add_argument(
        "--shuffle",
        type=int,
        default=None,
        metavar="SEED",
        help="stream the samples in a random order drawn with SEED (default: file order)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1000,
        help="samples per update and per TensorBoard point (alarms do not depend on it)",
    )
    parser.add_argument(
        "--tensorboard",
        default=None,
        metavar="DIR",
        help="write the watched statistics (watch/...) as TensorBoard events to DIR",
    )
    parser.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="also write the report here (a new file unless --overwrite)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="let --json replace an existing file"
    )
    parser.add_argument(
        "--exit-code",
        action="store_true",
        help="exit with status 1 when an alarm was raised (for scripts; default 0)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``watch OUTPUTS_FILE --rule RULE.json`` or ``bench RUN_DIR ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return run_main(lambda: _bench_main(argv[1:]))
    args = build_parser().parse_args(argv)
    return run_main(lambda: _watch(args))


def _watch(args: argparse.Namespace) -> int:
    from policycascade.agents.rules import exit_stages
    from policycascade.outputs_io import load_outputs
    from policycascade.rule_io import load_rule

    if not 0 < args.alpha < 1:
        raise ValueError(f"--alpha must be in (0, 1), got {args.alpha}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.shuffle is not None and args.shuffle < 0:
        raise ValueError(f"--shuffle must be a seed >= 0, got {args.shuffle}")
    if args.json is not None:
        check_new_file(Path(args.json), "--json", args.overwrite)
    parts = load_outputs(args.outputs)
    stream = parts[_pick_split(parts, args.split, "--split")]
    rule = load_rule(args.rule, outputs=stream)
    if args.calibration_split is not None:
        calibration = parts[_pick_split(parts, args.calibration_split, "--calibration-split")]
        watch = DriftWatch.from_outputs(rule, calibration, args.alpha)
    else:
        block = json.loads(Path(args.rule).read_text()).get("calibration")
        if block is not None and not isinstance(block, dict):
            raise ValueError(
                f"{args.rule!r}: its calibration block must be a mapping, got {block!r}"
            )
        if not block:
            raise ValueError(
                f"{args.rule!r} has no calibration block: save the rule with calibration "
                "outputs, or pass --calibration-split SPLIT"
            )
        unit = block.get("cost_unit")
        if unit is not None and unit != stream.costs.unit:
            raise ValueError(
                f"{args.rule!r} was calibrated in {unit} but the outputs cost {stream.costs.unit}"
            )
        watch = DriftWatch.from_calibration(block, exit_costs_of(rule, stream.costs), args.alpha)
    stages = exit_stages(rule, stream.probs).cpu().numpy()
    if args.shuffle is not None:
        stages = np.random.default_rng(args.shuffle).permutation(stages)
    writer = _writer(args.tensorboard)
    try:
        for start in range(0, len(stages), args.batch_size):
            watch.update(stages[start : start + args.batch_size])
            if writer is not None:
                for tag, value in watch.statistics().items():
                    writer.add_scalar(f"watch/{tag}", value, watch.samples_seen)
    finally:
        if writer is not None:
            writer.close()
    report = {
        "samples": watch.samples_seen,
        "calibration": watch.calibration(),
        "alarms": [a.as_dict() for a in watch.alarms],
        "statistics": watch.statistics(),
    }
    print(_summary(watch))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if args.exit_code and watch.alarms else 0


def _pick_split(parts: dict, name: str | None, option: str) -> str:
    if name is None:
        if len(parts) == 1:
            return next(iter(parts))
        name = "test"
    if name not in parts:
        raise ValueError(f"{option} must be one of the file's splits {list(parts)}, got {name!r}")
    return name


def _writer(logdir: str | None):
    if logdir is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(logdir)


def _summary(watch: DriftWatch) -> str:
    expected = watch.calibration()
    lines = [
        f"calibration: {expected['num_samples']} samples, exit shares "
        + ", ".join(f"{s:.3f}" for s in expected["exit_shares"])
        + f", mean cost {expected['mean_cost']:.4g}; false-alarm bound {watch.alpha_false_alarm:g}"
    ]
    if not watch.alarms:
        lines.append(f"no drift detected in {watch.samples_seen} samples")
    lines += [f"ALARM: {alarm.what}" for alarm in watch.alarms]
    return "\n".join(lines)


# --------------------------------------------------------------------------- measurements


def detection_delays(
    watch: DriftWatch,
    stages: np.ndarray,
    streams: int,
    max_samples: int,
    rng: np.random.Generator,
    prefix: np.ndarray | None = None,
    prefix_samples: int = 0,
) -> list[int | None]:
    """Samples until the first alarm on streams drawn with replacement from ``stages``.

    With ``prefix_samples``, each stream first draws that many samples from ``prefix``
    (clean exits, say): the delay then counts from the change, and an alarm during
    the prefix counts as a false one (delay None, as for a stream that never alarms
    within ``max_samples``).
    """
    delays: list[int | None] = []
    for _ in range(streams):
        watch.reset()
        if prefix_samples:
            if watch.update(rng.choice(prefix, size=prefix_samples)):
                delays.append(None)
                continue
        delay = None
        for _ in range(0, max_samples, 500):
            if watch.update(rng.choice(stages, size=500)):
                delay = watch.alarm.samples_seen - prefix_samples
                break
        delays.append(delay if delay is not None and delay <= max_samples else None)
    return delays


def false_alarm_times(watch: DriftWatch, stages: np.ndarray) -> list[int]:
    """Stream positions of the alarms on ``stages``, the watch restarted after each alarm."""
    times, start = [], 0
    while start < len(stages):
        watch.reset()
        for chunk in range(start, len(stages), 4096):
            if watch.update(stages[chunk : chunk + 4096]):
                start += watch.alarm.samples_seen  # restart after the alarm's sample
                times.append(start)
                break
        else:
            break
    return times


def null_false_alarms(
    pool: np.ndarray,
    num_calibration: int,
    exit_costs,
    alpha: float,
    length: int,
    repeats: int,
    rng: np.random.Generator,
) -> int:
    """Streams with any alarm when a fresh calibration set and the stream share a distribution.

    Both are drawn with replacement from ``pool`` (clean exits): the calibration's own
    uncertainty is part of what is measured, unlike with one fixed calibration.
    """
    k = len(exit_costs)
    alarmed = 0
    for _ in range(repeats):
        counts = np.bincount(rng.choice(pool, size=num_calibration), minlength=k)
        watch = DriftWatch(counts / num_calibration, exit_costs, num_calibration, alpha)
        alarmed += bool(watch.update(rng.choice(pool, size=length)))
    return alarmed


def _bench_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m policycascade.watch_cli bench",
        description="Detection delay under corruptions and false alarms on clean samples, for "
        "each run's own rule calibrated on its validation split.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="trained run directories")
    parser.add_argument("--alpha", type=float, default=0.01, help="false-alarm bound of the watch")
    parser.add_argument("--streams", type=int, default=20, help="random streams per corruption")
    parser.add_argument(
        "--max-samples", type=int, default=20000, help="a stream without alarm stops here"
    )
    parser.add_argument(
        "--prefix",
        type=int,
        default=0,
        help="clean test samples streamed before the corrupted ones (a late shift)",
    )
    parser.add_argument(
        "--clean-samples",
        type=int,
        default=100000,
        help="clean samples for the false-alarm count (fresh ones for synthetic runs)",
    )
    parser.add_argument(
        "--max-test", type=int, default=10000, help="test samples corrupted per run (first N)"
    )
    parser.add_argument(
        "--null-repeats",
        type=int,
        default=200,
        help="null simulations: calibration and stream both drawn from the clean exits",
    )
    parser.add_argument(
        "--null-length", type=int, default=10000, help="stream samples per null simulation"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the stream orders")
    parser.add_argument("--json", default=None, metavar="PATH", help="write every number here")
    return parser


def _bench_main(argv: list[str]) -> int:
    args = _bench_parser().parse_args(argv)
    if not 0 < args.alpha < 1:
        raise ValueError(f"--alpha must be in (0, 1), got {args.alpha}")
    for name in ("streams", "max_samples", "clean_samples", "max_test", "null_length"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("prefix", "null_repeats"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.json:
        check_new_file(Path(args.json), "--json")
    results = [_bench_run(run_dir, args) for run_dir in args.runs]
    print(_bench_table(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _bench_run(run_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from policycascade import load_run
    from policycascade.agents.rules import exit_stages
    from policycascade.shift import corrupt

    run = load_run(run_dir, device="cpu")
    rule, h = run.rule, run.harness
    watch = DriftWatch.from_outputs(rule, run.outputs("val"), args.alpha)
    rng = np.random.default_rng(args.seed)
    x, y = h.split_on_device("test")
    x, y = x[: args.max_test], y[: args.max_test]
    value_range = (0.0, 1.0) if x.dtype == torch.uint8 else (float(x.min()), float(x.max()))
    generator = torch.Generator().manual_seed(run.config.seed)
    clean = exit_stages(rule, run.outputs("test").probs).cpu().numpy()

    def shifted_exits(kind: str, severity: int) -> np.ndarray:
        corrupted = corrupt(x, kind, severity, generator, value_range)
        shifted = run.cascade.outputs(corrupted, y, h.costs, transform=h.inputs)
        return exit_stages(rule, shifted.probs).cpu().numpy()

    rows = _shift_rows(shifted_exits, watch, clean, rng, args)
    fresh, source = _clean_stream(run, rule, args.clean_samples, rng, clean)
    times = false_alarm_times(watch, fresh)
    null = null_false_alarms(
        fresh,
        watch.num_calibration,
        watch.exit_costs,
        args.alpha,
        args.null_length,
        args.null_repeats,
        rng,
    )
    return {
        "run": Path(run_dir).name,
        "dataset": run.config.dataset,
        "alpha_rule": run.alpha,
        "calibration": watch.calibration(),
        "shift": rows,
        "clean_source": source,
        "clean_samples": int(len(fresh)),
        "false_alarms": len(times),
        "false_alarm_times": times,
        "null_streams": args.null_repeats,
        "null_streams_alarmed": null,
    }


def _shift_rows(
    shifted_exits: Callable[[str, int], np.ndarray],
    watch: DriftWatch,
    clean: np.ndarray,
    rng: np.random.Generator,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Per corruption and severity: cost ratio to clean, exit shares, detection delays.

    ``shifted_exits(kind, severity)`` gives the exit stages of the corrupted samples;
    each stream starts with ``--prefix`` of the ``clean`` exits.
    """
    from policycascade.shift import CORRUPTIONS

    costs = np.asarray(watch.exit_costs)
    rows = []
    for kind in CORRUPTIONS:
        for severity in range(1, 6):
            stages = shifted_exits(kind, severity)
            delays = detection_delays(
                watch, stages, args.streams, args.max_samples, rng, clean, args.prefix
            )
            found = [d for d in delays if d is not None]
            rows.append(
                {
                    "kind": kind,
                    "severity": severity,
                    "cost_ratio": float(costs[stages].mean() / costs[clean].mean()),
                    "exit_shares": (
                        np.bincount(stages, minlength=len(costs)) / len(stages)
                    ).tolist(),
                    "detected": len(found) / len(delays),
                    "mean_delay": float(np.mean(found)) if found else None,
                    "delays": delays,
                }
            )
    return rows


def _clean_stream(run, rule, size: int, rng: np.random.Generator, test_stages: np.ndarray):
    """Clean exits: fresh synthetic samples through the cascade, else the test exits resampled."""
    from policycascade.agents.rules import exit_stages

    if run.config.dataset != "synthetic":
        return rng.choice(test_stages, size=size), "test split resampled"
    from policycascade.data.synthetic import load_synthetic

    h, parts, seed = run.harness, [], 10_000 + run.config.seed * 100
    while sum(len(p) for p in parts) < size:
        test = load_synthetic(seed=seed).test  # the same templates; samples never seen
        out = run.cascade.outputs(test.x, test.y, h.costs, transform=h.inputs)
        parts.append(exit_stages(rule, out.probs).cpu().numpy())
        seed += 1
    return np.concatenate(parts)[:size], "fresh synthetic samples"


def _bench_table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Per dataset and rule alpha: mean delay (mean +- std over runs) per corruption."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["alpha_rule"]), []).append(r)
    lines = []
    for (dataset, alpha_rule), runs in groups.items():
        lines.append(
            f"{dataset} (rule alpha {alpha_rule}, {len(runs)} runs, watch alpha {args.alpha}, "
            f"{args.streams} streams, prefix {args.prefix}): delay in samples, mean +- std "
            "over runs; detected = share of streams alarmed within --max-samples"
        )
        lines.append("  kind      sev  cost x   delay           detected")
        for i, row in enumerate(runs[0]["shift"]):
            delays = [r["shift"][i]["mean_delay"] for r in runs]
            done = [d for d in delays if d is not None]
            detected = np.mean([r["shift"][i]["detected"] for r in runs])
            ratio = np.mean([r["shift"][i]["cost_ratio"] for r in runs])
            delay = f"{np.mean(done):8.1f} +- {np.std(done):6.1f}" if done else "       -        "
            lines.append(
                f"  {row['kind']:<9} {row['severity']}    {ratio:5.2f}  {delay}  {detected:6.0%}"
            )
        alarms = sum(r["false_alarms"] for r in runs)
        samples = sum(r["clean_samples"] for r in runs)
        lines.append(
            f"  false alarms on clean samples ({runs[0]['clean_source']}): {alarms} in {samples} "
            f"= {1e4 * alarms / samples:.3f} per 10,000 (per run: "
            + ", ".join(str(r["false_alarms"]) for r in runs)
            + ")"
        )
        streams = sum(r["null_streams"] for r in runs)
        alarmed = sum(r["null_streams_alarmed"] for r in runs)
        lines.append(
            f"  null simulations (calibration of the val size and {args.null_length}-sample "
            f"stream, both resampled from those clean exits): {alarmed} of {streams} streams "
            "alarmed"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
