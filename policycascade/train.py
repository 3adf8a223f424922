"""``policycascade train``: train stopping policies and report them on the test split."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from policycascade.cli_support import (
    USAGE_ERROR,
    USER_ERRORS,
    OneLineParser,
    import_user_module,
    user_message,
)
from policycascade.config import (
    ConfigError,
    HelpFormatter,
    TrainConfig,
    add_config_arguments,
    config_from_args,
    given_options,
)
from policycascade.distributed import init_from_environment
from policycascade.fsutil import nearest_existing
from policycascade.harness import NonFiniteError, TrainingInterrupted
from policycascade.runs import (
    claim_run_dir,
    per_run_configs,
    read_run,
    run_name,
    train_run,
)
from policycascade.runtime import ThreadChoice, configure_threads, resolve_device


def build_parser() -> argparse.ArgumentParser:
    """The CLI: every config field is an option; ``--config`` and ``--resume`` come on top."""
    parser = OneLineParser(
        prog="policycascade train",
        description=(
            "Train a cascade's classifiers and fit its stopping rule (the continuation-value "
            "learner by default; REINFORCE with --agent reinforce; Learning to Cascade with "
            "--agent ltc), or fit the rule on a registered cascade's frozen classifiers "
            "(--env), and print the rule's test-split accuracy and cost next to the best "
            "validation-fitted threshold rule and each single classifier. Every option can "
            "also come from a YAML file or a shipped config's name (--config); the command "
            "line wins. One run directory per run (per alpha) under --logdir holds "
            "TensorBoard events, checkpoint.pt, config.yaml, metrics.json and the stored "
            "outputs and rule (outputs.npz, rule.pt, run.json). `python -m "
            "policycascade.train` is the same command."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--config",
        metavar="YAML",
        help="YAML file of options, or the name of a shipped config such as cifar10-resnet "
        "(default: the built-in values, equal to the digits config)",
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint (its config is reused)",
    )
    parser.add_argument("--no-progress", action="store_true", help="do not draw progress bars")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the cascade's measured cost table (no data, no training) and exit",
    )
    parser.add_argument("--json", action="store_true", help="with --dry-run: print JSON")
    add_config_arguments(parser)
    return parser


def dry_run_table(config: TrainConfig) -> dict[str, Any]:
    """Measured MACs of every stage of the configured cascade, without data or training."""
    from policycascade.agents.stopping_policy import stopping_module_macs
    from policycascade.models import PAPER_CASCADES, build_cascade, cost_table

    if config.cascade in PAPER_CASCADES:
        table = cost_table(config.cascade)
        num_classes = PAPER_CASCADES[config.cascade].num_classes
    else:
        cascade = build_cascade(config.cascade, (1, 8, 8), 10)
        macs = cascade.classifier_macs()
        num_classes = 10
        table = {
            "cascade": config.cascade,
            "input_shape": [1, 8, 8],
            "stages": [
                {"name": n, "macs": m, "share": m / max(macs), "paper_share": None}
                for n, m in zip(cascade.names, macs, strict=True)
            ],
        }
    table["stopping_module_macs"] = stopping_module_macs(
        num_classes, config.reinforce.policy_hidden
    )
    return table


def format_cost_table(table: dict[str, Any]) -> str:
    """The dry-run table as text."""
    lines = [
        f"cascade {table['cascade']}, input {tuple(table['input_shape'])}",
        f"{'stage':<20}{'MACs':>16}{'share':>9}{'paper':>9}",
    ]
    for s in table["stages"]:
        paper = "" if s["paper_share"] is None else f"{s['paper_share']:.2%}"
        lines.append(f"{s['name']:<20}{s['macs']:>16,}{s['share']:>9.2%}{paper:>9}")
    lines.append(f"stopping module: {table['stopping_module_macs']:,} MACs per stage")
    return "\n".join(lines)


def format_table(metrics: dict[str, Any]) -> str:
    """Test-split table: the run's rule, the best validation-fitted threshold rule, singles."""
    k = len(metrics["exit_distribution"])
    header = f"{'policy':<30}{'accuracy':>9}{'mean MACs':>12}{'MAC share':>11}  exits per stage"
    alpha = metrics["alpha"]
    title = metrics["agent"] if alpha is None else f"{metrics['agent']}, alpha={alpha:g}"
    lines = [f"test split, {title}", header, "-" * len(header)]

    def line(name: str, m: dict[str, Any], exits: list[float]) -> str:
        shares = " ".join(f"{s:5.1%}" for s in exits)
        return (
            f"{name:<30}{m['accuracy']:>9.2%}{m['mean_macs']:>12,.0f}{m['macs_share']:>11.2%}"
            f"  {shares}"
        )

    own = "learned policy" if alpha is not None else f"{metrics['agent']} thresholds"
    lines.append(line(own, metrics, metrics["exit_distribution"]))
    rule = metrics.get("best_threshold_rule")
    if rule is not None:
        name = f"best threshold ({rule['criterion']})"
        lines.append(line(name, rule, rule["exit_distribution"]))
    for t, single in enumerate(metrics["single_classifiers"]):
        lines.append(line(single["name"] + " alone", single, [float(s == t) for s in range(k)]))
    if rule is not None:
        lines.append(
            "best threshold: the threshold rule of any criterion with the best validation "
            "reward at this alpha, measured on test"
        )
    return "\n".join(lines)


def _train_or_status(train: Callable[[], dict[str, Any]]) -> dict[str, Any] | int:
    """``train()``'s metrics, or the exit status of its failure with one line on stderr."""
    try:
        return train()
    except TrainingInterrupted as error:
        print(f"interrupted: {error}", file=sys.stderr)
        return 130
    except NonFiniteError as error:  # the run failed; the user's input was not malformed
        print(f"error: {error}", file=sys.stderr)
        return 1
    except USER_ERRORS as error:
        print(f"error: {user_message(error)}", file=sys.stderr)
        return USAGE_ERROR


def _planned_runs(args: argparse.Namespace) -> list[tuple[TrainConfig, Path, bool]]:
    """(config, run directory, resume?) of every run the command line asks for."""
    if args.resume:
        given = given_options(args)
        if args.config or given:
            options = ", ".join((["--config"] if args.config else []) + given)
            raise ConfigError(
                f"--resume continues a run with the config saved in it; drop {options}"
            )
        try:
            config, _ = read_run(args.resume)
        except USER_ERRORS as error:
            raise ConfigError(f"--resume: {user_message(error)}") from None
        if not args.dry_run:
            preflight(config)
        return [(config, Path(args.resume), True)]
    if args.json and not args.dry_run:
        raise ConfigError("--json applies to --dry-run only (a training run writes metrics.json)")
    config = config_from_args(args)
    if args.dry_run:
        check_dry_run(args, config)
        return [(config, Path(config.logdir), False)]
    logdir = Path(config.logdir)
    if logdir.exists() and not logdir.is_dir():
        raise ConfigError(f"logdir {str(logdir)!r} is a file, not a directory")
    check_writable(logdir, "logdir")
    preflight(config)
    # the name only: the directory (or the first free name-N) is claimed when the run starts
    return [(c, logdir / run_name(c), False) for c in per_run_configs(config)]


# What --dry-run reads: the cascade family (and the stopping module's size for its MACs).
DRY_RUN_OPTIONS = ("--cascade", "--policy-hidden", "--agent")


def check_dry_run(args: argparse.Namespace, config: TrainConfig) -> None:
    """Refuse what ``--dry-run`` would ignore: it measures a built-in cascade, nothing else."""
    if config.env:
        raise ConfigError(
            f"--dry-run measures a built-in cascade; env {config.env!r} would be ignored "
            "(its costs are in metrics.json of a run, or registered_cascade(id).cascade.costs())"
        )
    unused = [flag for flag in given_options(args) if flag not in DRY_RUN_OPTIONS]
    if unused:
        raise ConfigError(
            f"--dry-run prints the cascade's cost table without data or training: "
            f"{', '.join(unused)} would be ignored; drop {'it' if len(unused) == 1 else 'them'} "
            "or drop --dry-run"
        )


def preflight(config: TrainConfig) -> None:
    """Check, before any run directory or training, what can fail without training.

    The device, the ``--env`` module and id (imported as ``gymnasium.make`` users expect,
    the working directory included) and the data set's files (downloaded here if asked).
    """
    resolve_device(config.device)
    if config.env:
        check_env(config.env, config)
        return
    from policycascade.data.vision import VISION_DATASETS, dataset_files

    if config.dataset in VISION_DATASETS and config.dataset != "imagenet":
        dataset_files(config.dataset, config.data_dir, config.download)


def check_env(env: str, config: TrainConfig | None = None) -> None:
    """Import ``module:`` of an env id (cwd on the path), find it, check ``config`` can use it."""
    from policycascade.cascade_registry import registered_cascade
    from policycascade.harness import check_trainable

    if ":" in env:
        module = env.split(":", 1)[0]
        import_user_module(module, f"env {env!r}")
    try:
        registered = registered_cascade(env)
        if config is not None:
            check_trainable(config, registered)
    except ValueError as error:
        raise ConfigError(f"env {env!r}: {user_message(error)}") from None


def thread_choice(config: TrainConfig, log: Callable[[str], None] | None = print) -> ThreadChoice:
    """Set torch's intra-op threads for ``config``'s work and say which and why (one line)."""
    from policycascade.models import PAPER_CASCADES, build_cascade

    device = resolve_device(config.device)
    if config.env:
        from policycascade.cascade_registry import registered_cascade

        macs = max(registered_cascade(config.env).cascade.classifier_macs())
        batch, work = 1024, f"env {config.env!r} (outputs in batches of 1024)"
    elif config.cascade in PAPER_CASCADES:
        return configure_threads(config.threads or None, None, device, config.cascade, log)
    else:
        macs = max(build_cascade(config.cascade, (1, 8, 8), 10).classifier_macs())
        batch, work = config.batch_size, f"cascade {config.cascade!r}"
    return configure_threads(config.threads or None, macs * batch, device, work, log)


def _print_now(line: str) -> None:
    print(line, flush=True)


def check_writable(folder: Path, what: str) -> None:
    """Make sure ``folder`` exists or can be created, and takes files, before any work.

    Nothing is created here: the nearest existing folder above it must be a writable folder.
    """
    existing = nearest_existing(folder)
    if not existing.is_dir():
        raise ConfigError(
            f"{what} {str(folder)!r} cannot be created: {str(existing)!r} is not a directory"
        )
    unwritable = ConfigError(
        f"{what} {str(folder)!r} cannot be written: {str(existing)!r} is read-only or "
        "permission is denied"
    )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise unwritable
    try:  # a real write (access() says yes to root on read-only file systems such as /sys)
        os.rmdir(tempfile.mkdtemp(prefix=".policycascade-probe-", dir=existing))
    except OSError:
        raise unwritable from None


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status (2 for a usage error)."""
    args = build_parser().parse_args(argv)
    try:
        runs = _planned_runs(args)
    except USER_ERRORS as error:
        print(f"error: {user_message(error)}", file=sys.stderr)
        return USAGE_ERROR
    if args.dry_run:
        table = dry_run_table(runs[0][0])
        print(json.dumps(table, indent=2) if args.json else format_cost_table(table))
        return 0
    main_process = init_from_environment().is_main
    thread_choice(runs[0][0], _print_now if main_process else None)
    for config, run_dir, resume in runs:
        if main_process and not resume:  # claimed now: a run started meanwhile keeps its own
            run_dir = claim_run_dir(run_dir.parent, run_dir.name)
        metrics = _train_or_status(
            lambda c=config, d=run_dir, r=resume: train_run(c, d, r, not args.no_progress)
        )
        if isinstance(metrics, int):
            return metrics
        if main_process:
            print(format_table(metrics))
            print(f"run directory: {run_dir}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
