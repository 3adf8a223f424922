"""``policycascade watch``: stream a rule's exits and stop scores through a :class:`RuleWatch`.

``policycascade watch OUTPUTS_FILE --rule RULE.json`` reads the outputs (any file
:func:`policycascade.outputs_io.load_outputs` reads), applies the rule sample by sample
in file order and reports the first sample at which each exit share or the mean cost
left its calibration interval (:class:`DriftWatch`), or at which the rule's first-stage
stop score stopped following its calibration distribution (:class:`ScoreWatch`); by
default both, at half the false-alarm level each. ``python -m policycascade.watch_cli
bench RUN_DIR ...`` measures detection delays under corruptions and false alarms on
clean data for trained runs, for each watch (docs/watch.md).
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
from policycascade.watch import DriftWatch, ScoreWatch, exit_costs_of, first_stage_scores
from policycascade.watch_combined import (
    MIN_SCORE_CALIBRATION,
    WATCHES,
    RuleWatch,
    rule_exit_stages,
)


def build_parser() -> argparse.ArgumentParser:
    """Options of ``policycascade watch``."""
    parser = OneLineParser(
        prog="policycascade watch",
        description="Watch a stopping rule on a stream of cached outputs, without labels: its "
        "exit shares and mean cost, and its first-stage stop score; alarm (anytime-valid) when "
        "they leave their calibration values.",
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
        help="calibrate on this split of OUTPUTS_FILE (exit shares and first-stage scores) "
        "instead of the rule file's calibration block",
    )
    parser.add_argument(
        "--watch",
        default="both",
        choices=WATCHES,
        help="what to watch: 'exits' (exit shares and mean cost), 'score' (the rule's "
        "first-stage stop score; needs --calibration-split unless the rule file's calibration "
        "block holds first_stage_scores), "
        "or 'both' (default: each at alpha/2, so any false alarm of either stays <= alpha; "
        "exits alone at alpha when the score cannot be watched, and the output says why)",
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
        try:
            watch = RuleWatch.from_outputs(rule, calibration, args.alpha, args.watch)
        except ValueError as err:  # name the option, not the argument
            raise ValueError(str(err).replace("watch='score'", "--watch score")) from None
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
        costs = exit_costs_of(rule, stream.costs)
        scores = block.get("first_stage_scores")  # where a rule file stores them (not yet)
        if scores is not None and len(scores) != block.get("num_samples"):
            raise ValueError(
                f"{args.rule!r}: calibration.first_stage_scores must hold num_samples = "
                f"{block.get('num_samples')} scores, got {len(scores)}"
            )
        if args.watch == "score" and scores is None:
            raise ValueError(
                "--watch score needs --calibration-split SPLIT: the rule file's calibration "
                "block stores no first-stage scores"
            )
        watch = RuleWatch.from_calibration(rule, block, costs, args.alpha, args.watch, scores)
        if watch.note:
            watch.note += "; pass --calibration-split SPLIT to watch the score too"
    stages = rule_exit_stages(rule, stream.probs) if watch.exits else None
    scores = first_stage_scores(rule, stream.probs) if watch.scores else None
    if args.shuffle is not None:
        order = np.random.default_rng(args.shuffle).permutation(stream.num_samples)
        stages = None if stages is None else stages[order]
        scores = None if scores is None else scores[order]
    writer = _writer(args.tensorboard)
    try:
        for start in range(0, stream.num_samples, args.batch_size):
            part = slice(start, start + args.batch_size)
            watch.update(
                None if stages is None else stages[part], None if scores is None else scores[part]
            )
            if writer is not None:
                for tag, value in watch.statistics().items():
                    writer.add_scalar(f"watch/{tag}", value, watch.samples_seen)
    finally:
        if writer is not None:
            writer.close()
    report = {
        "samples": watch.samples_seen,
        "watch": watch.describe(),
        "calibration": watch.exits.calibration() if watch.exits else None,
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


def _summary(watch: RuleWatch) -> str:
    lines = []
    if watch.exits is not None:
        expected = watch.exits.calibration()
        lines.append(
            f"calibration: {expected['num_samples']} samples, exit shares "
            + ", ".join(f"{s:.3f}" for s in expected["exit_shares"])
            + f", mean cost {expected['mean_cost']:.4g}; false-alarm bound "
            f"{watch.alpha_false_alarm:g}"
        )
    levels = [f"exits at alpha {watch.exits.alpha_false_alarm:g}"] if watch.exits else []
    if watch.scores is not None:
        levels.append(
            f"{watch.scores.name} at alpha {watch.scores.alpha_false_alarm:g} "
            f"({watch.scores.num_calibration} calibration scores)"
        )
    lines.append("watching: " + " and ".join(levels))
    if watch.note:
        lines.append(f"note: {watch.note}")
    if not watch.alarms:
        lines.append(f"no drift detected in {watch.samples_seen} samples")
    lines += [f"ALARM: {alarm.what}" for alarm in watch.alarms]
    return "\n".join(lines)


# --------------------------------------------------------------------------- measurements


Samples = np.ndarray | tuple[np.ndarray, ...]  # what a watch's update takes, per sample


def _take(samples: Samples, index: np.ndarray) -> tuple[np.ndarray, ...]:
    """The rows ``index`` of one array or of each of a tuple of arrays: update's arguments."""
    return tuple(a[index] for a in samples) if isinstance(samples, tuple) else (samples[index],)


def _size(samples: Samples) -> int:
    return len(samples[0]) if isinstance(samples, tuple) else len(samples)


def detection_delays(
    watch,
    samples: Samples,
    streams: int,
    max_samples: int,
    rng: np.random.Generator,
    prefix: Samples | None = None,
    prefix_samples: int = 0,
) -> list[int | None]:
    """Samples until the first alarm on streams drawn with replacement from ``samples``.

    ``samples``: what ``watch.update`` takes per sample (exit stages for a DriftWatch,
    scores for a ScoreWatch), or a tuple of such arrays (exit stages and scores for a
    RuleWatch), drawn together. With ``prefix_samples``, each stream first draws that
    many samples from ``prefix`` (clean ones, say): the delay then counts from the
    change, and an alarm during the prefix counts as a false one (delay None, as for a
    stream that never alarms within ``max_samples``).
    """
    delays: list[int | None] = []
    for _ in range(streams):
        watch.reset()
        if prefix_samples:
            index = rng.integers(0, _size(prefix), size=prefix_samples)
            if watch.update(*_take(prefix, index)):
                delays.append(None)
                continue
        delay = None
        for _ in range(0, max_samples, 500):
            if watch.update(*_take(samples, rng.integers(0, _size(samples), size=500))):
                delay = watch.alarm.samples_seen - prefix_samples
                break
        delays.append(delay if delay is not None and delay <= max_samples else None)
    return delays


def false_alarm_times(watch, samples: Samples) -> list[int]:
    """Stream positions of the alarms on ``samples``, the watch restarted after each alarm."""
    times, start, n = [], 0, _size(samples)
    while start < n:
        watch.reset()
        for chunk in range(start, n, 4096):
            if watch.update(*_take(samples, np.arange(chunk, min(chunk + 4096, n)))):
                start += watch.alarm.samples_seen  # restart after the alarm's sample
                times.append(start)
                break
        else:
            break
    return times


def segment_alarms(watch, samples: Samples, segment: int) -> tuple[int, int]:
    """(segments alarmed, segments): a fresh watch (reset) on each ``segment`` samples in turn.

    Unlike :func:`false_alarm_times`, every segment starts from the calibration alone:
    a score watch whose reference has absorbed a long clean stream sees little, so
    restarting only after alarms would undercount its false alarms.
    """
    count = _size(samples) // segment
    alarmed = 0
    for i in range(count):
        watch.reset()
        alarmed += bool(watch.update(*_take(samples, np.arange(i * segment, (i + 1) * segment))))
    return alarmed, count


def null_false_alarms(
    pool: tuple[np.ndarray, np.ndarray],
    num_calibration: int,
    exit_costs,
    alpha: float,
    length: int,
    repeats: int,
    rng: np.random.Generator,
    min_score_calibration: int = MIN_SCORE_CALIBRATION,
) -> dict[str, Any]:
    """Streams with any alarm, per watch, when calibration and stream share a distribution.

    ``pool``: clean (exit stages, first-stage scores) of the same samples. Each repeat
    draws a calibration set of ``num_calibration`` samples and a ``length``-sample stream
    from it: without replacement (a random permutation) when the pool holds enough
    samples, else with replacement (i.i.d. draws from the pool's empirical
    distribution); both are exchangeable, so each watch's bound is exact here.
    """
    stages, scores = pool
    replace = len(stages) < num_calibration + length
    alarmed = dict.fromkeys(("exits", "score", "both"), 0)
    for _ in range(repeats):
        if replace:
            index = rng.integers(0, len(stages), size=num_calibration + length)
        else:
            index = rng.permutation(len(stages))[: num_calibration + length]
        cal, stream = index[:num_calibration], index[num_calibration:]
        shares = np.bincount(stages[cal], minlength=len(exit_costs)) / num_calibration
        block = {"num_samples": num_calibration, "exit_shares": shares.tolist()}
        seed = int(rng.integers(2**32))
        watches = {
            "exits": DriftWatch.from_calibration(block, exit_costs, alpha),
            "score": ScoreWatch(scores[cal], alpha, seed),
            "both": RuleWatch.from_calibration(
                None,
                block,
                exit_costs,
                alpha,
                "both",
                scores[cal],
                seed,
                min_score_calibration=min_score_calibration,
            ),
        }
        alarmed["exits"] += bool(watches["exits"].update(stages[stream]))
        alarmed["score"] += watches["score"].update(scores[stream]) is not None
        alarmed["both"] += bool(watches["both"].update(stages[stream], scores[stream]))
    return {"repeats": repeats, "with_replacement": replace, **alarmed}


def clopper_pearson(hits: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial confidence interval for hits / trials."""
    from scipy.stats import beta

    tail = (1 - level) / 2
    low = 0.0 if hits == 0 else float(beta.ppf(tail, hits, trials - hits + 1))
    high = 1.0 if hits == trials else float(beta.ppf(1 - tail, hits + 1, trials - hits))
    return low, high


def _bench_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m policycascade.watch_cli bench",
        description="Detection delay under corruptions and false alarms on clean samples, for "
        "each run's own rule calibrated on its validation split: DriftWatch (exits), "
        "ScoreWatch (first-stage stop score) and RuleWatch (both, at alpha/2 each).",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="trained run directories")
    parser.add_argument("--alpha", type=float, default=0.01, help="false-alarm bound of each watch")
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
        default=2000,
        help="null simulations: calibration and stream both drawn from one pool of clean samples",
    )
    parser.add_argument(
        "--null-length", type=int, default=2000, help="stream samples per null simulation"
    )
    parser.add_argument(
        "--min-score-calibration",
        type=int,
        default=MIN_SCORE_CALIBRATION,
        help="fewest calibration scores for which the combined watch runs the score watch "
        f"(default {MIN_SCORE_CALIBRATION}; 0: always)",
    )
    parser.add_argument(
        "--segment",
        type=int,
        default=10000,
        help="also count alarms with a fresh watch on each SEGMENT clean samples in turn",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the stream orders")
    parser.add_argument("--json", default=None, metavar="PATH", help="write every number here")
    return parser


def _bench_main(argv: list[str]) -> int:
    args = _bench_parser().parse_args(argv)
    if not 0 < args.alpha < 1:
        raise ValueError(f"--alpha must be in (0, 1), got {args.alpha}")
    for name in ("streams", "max_samples", "clean_samples", "max_test", "null_length", "segment"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("prefix", "null_repeats", "seed", "min_score_calibration"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.json:
        check_new_file(Path(args.json), "--json")
    results = [_bench_run(run_dir, args) for run_dir in args.runs]
    print(_bench_table(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


BENCH_WATCHES = ("exits", "score", "both")  # DriftWatch, ScoreWatch, RuleWatch


def _bench_run(run_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from policycascade import load_run
    from policycascade.shift import corrupt

    run = load_run(run_dir, device="cpu")
    rule, h, val = run.rule, run.harness, run.outputs("val")
    watches = {
        "exits": DriftWatch.from_outputs(rule, val, args.alpha),
        "score": ScoreWatch.from_outputs(rule, val, args.alpha),
        "both": RuleWatch.from_outputs(
            rule, val, args.alpha, min_score_calibration=args.min_score_calibration
        ),
    }
    rng = np.random.default_rng(args.seed)
    x, y = h.split_on_device("test")
    x, y = x[: args.max_test], y[: args.max_test]
    value_range = (0.0, 1.0) if x.dtype == torch.uint8 else (float(x.min()), float(x.max()))
    generator = torch.Generator().manual_seed(run.config.seed)
    test = run.outputs("test")
    clean = (rule_exit_stages(rule, test.probs), first_stage_scores(rule, test.probs))

    def shifted(kind: str, severity: int) -> tuple[np.ndarray, np.ndarray]:
        corrupted = corrupt(x, kind, severity, generator, value_range)
        out = run.cascade.outputs(corrupted, y, h.costs, transform=h.inputs)
        return rule_exit_stages(rule, out.probs), first_stage_scores(rule, out.probs)

    rows = _shift_rows(shifted, watches, clean, rng, args)
    fresh, source = _clean_stream(run, rule, args.clean_samples, rng, clean)
    times = {name: false_alarm_times(w, _inputs(name, fresh)) for name, w in watches.items()}
    segments = {
        name: segment_alarms(w, _inputs(name, fresh), args.segment) for name, w in watches.items()
    }
    pool = tuple(
        np.concatenate([a, b])
        for a, b in zip(
            (rule_exit_stages(rule, val.probs), first_stage_scores(rule, val.probs)),
            fresh if source.startswith("fresh") else clean,
            strict=True,
        )
    )
    exits = watches["exits"]
    null = null_false_alarms(
        pool,
        exits.num_calibration,
        exits.exit_costs,
        args.alpha,
        args.null_length,
        args.null_repeats,
        rng,
        args.min_score_calibration,
    )
    return {
        "run": Path(run_dir).name,
        "dataset": run.config.dataset,
        "alpha_rule": run.alpha,
        "calibration": exits.calibration(),
        "watches": watches["both"].describe(),
        "shift": rows,
        "clean_source": source,
        "clean_samples": int(len(fresh[0])),
        "false_alarms": {name: len(t) for name, t in times.items()},
        "false_alarm_times": times,
        "segment": args.segment,
        "segments_alarmed": {name: alarmed for name, (alarmed, _) in segments.items()},
        "segments": segments["exits"][1],
        "null": {**null, "pool": int(len(pool[0])), "length": args.null_length},
    }


def _inputs(watch: str, samples: tuple[np.ndarray, np.ndarray]) -> Samples:
    """What each bench watch's update takes: exit stages, scores, or both."""
    return {"exits": samples[0], "score": samples[1], "both": samples}[watch]


def _shift_rows(
    shifted: Callable[[str, int], tuple[np.ndarray, np.ndarray]],
    watches: dict[str, Any],
    clean: tuple[np.ndarray, np.ndarray],
    rng: np.random.Generator,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Per corruption and severity: cost ratio to clean, exit shares, each watch's delays.

    ``shifted(kind, severity)`` gives the corrupted samples' exit stages and first-stage
    scores; each stream starts with ``--prefix`` of the ``clean`` ones. The watches see
    the same streams (one seed per row).
    """
    from policycascade.shift import CORRUPTIONS

    costs = np.asarray(watches["exits"].exit_costs)
    rows = []
    for kind in CORRUPTIONS:
        for severity in range(1, 6):
            samples = shifted(kind, severity)
            stages, row_seed = samples[0], int(rng.integers(2**32))
            row: dict[str, Any] = {
                "kind": kind,
                "severity": severity,
                "cost_ratio": float(costs[stages].mean() / costs[clean[0]].mean()),
                "exit_shares": (np.bincount(stages, minlength=len(costs)) / len(stages)).tolist(),
            }
            for name, watch in watches.items():
                delays = detection_delays(
                    watch,
                    _inputs(name, samples),
                    args.streams,
                    args.max_samples,
                    np.random.default_rng(row_seed),
                    _inputs(name, clean),
                    args.prefix,
                )
                found = [d for d in delays if d is not None]
                row[name] = {
                    "detected": len(found) / len(delays),
                    "mean_delay": float(np.mean(found)) if found else None,
                    "delays": delays,
                }
            rows.append(row)
    return rows


def _clean_stream(run, rule, size: int, rng: np.random.Generator, test: tuple):
    """Clean (exits, scores): fresh synthetic samples, else the test split's resampled."""
    if run.config.dataset != "synthetic":
        index = rng.integers(0, len(test[0]), size=size)
        return (test[0][index], test[1][index]), "test split resampled with replacement"
    from policycascade.data.synthetic import load_synthetic

    h, stages, scores, seed = run.harness, [], [], 10_000 + run.config.seed * 100
    while sum(len(p) for p in stages) < size:
        split = load_synthetic(seed=seed).test  # the same templates; samples never seen
        out = run.cascade.outputs(split.x, split.y, h.costs, transform=h.inputs)
        stages.append(rule_exit_stages(rule, out.probs))
        scores.append(first_stage_scores(rule, out.probs))
        seed += 1
    fresh = (np.concatenate(stages)[:size], np.concatenate(scores)[:size])
    return fresh, "fresh synthetic samples"


def _delay_cell(runs: list[dict], i: int, watch: str) -> str:
    """Mean delay (+- std over runs) of row ``i`` for ``watch``, with the share detected."""
    delays = [r["shift"][i][watch]["mean_delay"] for r in runs]
    done = [d for d in delays if d is not None]
    detected = float(np.mean([r["shift"][i][watch]["detected"] for r in runs]))
    if not done:
        return "- (0%)"
    cell = f"{np.mean(done):.0f}" + (f" ± {np.std(done):.0f}" if len(done) > 1 else "")
    return cell + ("" if detected == 1 else f" ({detected:.0%})")


def _bench_table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Per dataset and rule alpha: each watch's mean delay (mean +- std over runs) per row."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["alpha_rule"]), []).append(r)
    lines = []
    for (dataset, alpha_rule), runs in groups.items():
        lines += [
            f"{dataset} (rule alpha {alpha_rule}, {len(runs)} runs, alpha {args.alpha} per watch, "
            f"{args.streams} streams, prefix {args.prefix}): delay in samples, mean ± std over "
            "runs (share of streams alarmed within --max-samples when not all)",
            "| corruption | cost x | exits (DriftWatch) | score (ScoreWatch) | both (RuleWatch) |",
            "|---|---|---|---|---|",
        ]
        for i, row in enumerate(runs[0]["shift"]):
            ratio = np.mean([r["shift"][i]["cost_ratio"] for r in runs])
            cells = " | ".join(_delay_cell(runs, i, w) for w in BENCH_WATCHES)
            lines.append(f"| {row['kind']} {row['severity']} | {ratio:.2f} | {cells} |")
        samples = sum(r["clean_samples"] for r in runs)
        lines.append(f"  watches: {runs[0]['watches']['mode']}; {runs[0]['watches']['note']}")
        for watch in BENCH_WATCHES:
            alarms = [r["false_alarms"][watch] for r in runs]
            seg = sum(r["segments_alarmed"][watch] for r in runs)
            segs = sum(r["segments"] for r in runs)
            null = sum(r["null"][watch] for r in runs)
            repeats = sum(r["null"]["repeats"] for r in runs)
            low, high = clopper_pearson(null, repeats) if repeats else (0.0, 1.0)
            lines.append(
                f"  {watch}: false alarms on clean samples ({runs[0]['clean_source']}): "
                f"{sum(alarms)} in {samples} = {1e4 * sum(alarms) / samples:.3f} per 10,000 "
                f"(per run: {', '.join(map(str, alarms))}); a fresh watch per "
                f"{runs[0]['segment']} of them: {seg} of {segs} segments alarmed; "
                f"null streams alarmed: {null} of "
                f"{repeats} = {null / max(repeats, 1):.4f} [95% CI {low:.4f}, {high:.4f}]"
            )
        lines.append(
            f"  null streams: calibration of the val size and a {args.null_length}-sample stream "
            f"drawn from a pool of {runs[0]['null']['pool']} clean samples (val + the clean "
            "stream's source), "
            + ("with" if runs[0]["null"]["with_replacement"] else "without")
            + " replacement"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
