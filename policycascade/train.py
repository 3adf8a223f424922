"""``python -m policycascade.train``: train stopping policies and report them on the test split."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from policycascade.checkpoint import CheckpointError, load_checkpoint
from policycascade.config import (
    ConfigError,
    HelpFormatter,
    TrainConfig,
    add_config_arguments,
    config_from_args,
    config_from_dict,
)
from policycascade.distributed import init_from_environment
from policycascade.ltc_run import train_ltc
from policycascade.trainer import NonFiniteError, Trainer, TrainingInterrupted, write_metrics

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (the full usage stays in --help)."""

    def error(self, message: str):
        """Print ``error: MESSAGE`` on one line and exit with status 2."""
        self.exit(USAGE_ERROR, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The CLI: every config field is an option; ``--config`` and ``--resume`` come on top."""
    parser = _Parser(
        prog="python -m policycascade.train",
        description=(
            "Train a stopping policy over a cascade of classifiers with REINFORCE and print "
            "its test-split accuracy and cost next to each single classifier. Every option can "
            "also come from a YAML file (--config); the command line wins. One run directory "
            "per alpha under --logdir holds TensorBoard events, checkpoint.pt, config.yaml and "
            "metrics.json."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--config",
        metavar="YAML",
        help="YAML file of options (default: the built-in values, equal to configs/digits.yaml)",
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


def run_name(config: TrainConfig, alpha: float | None) -> str:
    """``<dataset>__<agent>[-frozen]__<baseline>__a<alpha>__s<seed>__<time>`` (LtC: C, w, eps)."""
    stamp = _shared_timestamp()
    if config.agent == "ltc":
        detail = f"{config.ltc_form}__C{config.ltc_cost:g}__w{config.ltc_weight:g}"
        return f"{config.dataset}__ltc__{detail}__e{config.ltc_epsilon:g}__s{config.seed}__{stamp}"
    agent = config.agent + ("-frozen" if config.freeze_classifiers else "")
    return f"{config.dataset}__{agent}__{config.baseline}__a{alpha:g}__s{config.seed}__{stamp}"


def _shared_timestamp() -> str:
    """The current time, taken on rank 0 so that every process names the same run directory."""
    stamp = [time.strftime("%Y%m%d-%H%M%S")]
    if init_from_environment().enabled:
        torch.distributed.broadcast_object_list(stamp, src=0)
    return stamp[0]


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
    table["stopping_module_macs"] = stopping_module_macs(num_classes, config.policy_hidden)
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


def _hparams_table(config: TrainConfig, alpha: float) -> str:
    rows = [("alpha", alpha)] + [(k, v) for k, v in config.to_dict().items() if k != "alpha"]
    return "|option|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in rows)


def format_table(metrics: dict[str, Any]) -> str:
    """Test-split table: the learned policy against each single classifier."""
    k = len(metrics["exit_distribution"])
    header = f"{'policy':<22}{'accuracy':>9}{'mean MACs':>12}{'MAC share':>11}  exits per stage"
    title = "LtC" if metrics["alpha"] is None else f"alpha={metrics['alpha']:g}"
    lines = [f"test split, {title}", header, "-" * len(header)]
    exits = " ".join(f"{s:5.1%}" for s in metrics["exit_distribution"])
    lines.append(
        f"{'LtC thresholds' if metrics['alpha'] is None else 'learned policy':<22}"
        f"{metrics['accuracy']:>9.2%}{metrics['mean_macs']:>12,.0f}"
        f"{metrics['macs_share']:>11.2%}  {exits}"
    )
    for t, single in enumerate(metrics["single_classifiers"]):
        only = " ".join(f"{(1.0 if s == t else 0.0):5.0%}" for s in range(k))
        lines.append(
            f"{single['name'] + ' alone':<22}{single['accuracy']:>9.2%}"
            f"{single['mean_macs']:>12,.0f}{single['macs_share']:>11.2%}  {only}"
        )
    return "\n".join(lines)


def train_one(
    config: TrainConfig, alpha: float, run_dir: Path, resume: bool, show_progress: bool
) -> dict[str, Any]:
    """Train (or resume) one run and write its metrics; returns them."""
    trainer = Trainer(config, alpha, run_dir, show_progress=show_progress)
    main_process = trainer.dist.is_main
    if resume:
        trainer.load(load_checkpoint(run_dir, map_location=trainer.device))
    elif main_process:
        run_dir.mkdir(parents=True, exist_ok=False)
        (run_dir / "config.yaml").write_text(_dump_yaml({**config.to_dict(), "alpha": [alpha]}))
    if not main_process:  # in a distributed run only rank 0 logs and writes files
        return _run_as_bug_if_value_error(trainer, None)
    # purge_step drops events a killed run logged after its last checkpoint.
    writer = SummaryWriter(str(run_dir), purge_step=trainer.epoch + 1 if resume else None)
    try:
        if not resume:
            writer.add_text("hyperparameters", _hparams_table(config, alpha), 0)
        metrics = _run_as_bug_if_value_error(trainer, writer)
        write_metrics(run_dir, metrics)
        writer.add_hparams(
            {
                "alpha": alpha,
                "agent": config.agent,
                "baseline": config.baseline,
                "freeze_classifiers": config.freeze_classifiers,
                "seed": config.seed,
            },
            {"hparam/accuracy": metrics["accuracy"], "hparam/macs_share": metrics["macs_share"]},
            run_name=".",
        )
    finally:
        writer.close()
    return metrics


def _run_as_bug_if_value_error(trainer: Trainer, writer: SummaryWriter | None) -> dict[str, Any]:
    """``trainer.run``, with a ValueError raised while training shown as the bug it is.

    Every user input has been validated once the trainer is built, so a ValueError
    from inside the training loop is not a usage error: it surfaces as a RuntimeError
    with its traceback instead of the one-line exit status 2.
    """
    try:
        return trainer.run(writer)
    except ValueError as error:
        raise RuntimeError(f"training failed unexpectedly: {error}") from error


def _dump_yaml(values: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(values, sort_keys=False)


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
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status (2 for a usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.resume:
            given = [
                "--" + f.name.replace("_", "-")
                for f in dataclasses.fields(TrainConfig)
                if getattr(args, f.name) is not None
            ]
            if args.config or given:
                options = ", ".join((["--config"] if args.config else []) + given)
                raise ConfigError(
                    f"--resume continues a run with the config saved in it; drop {options}"
                )
            run_dir = Path(args.resume)
            if run_dir.is_file():
                raise ConfigError(
                    f"--resume expects a run directory, got the file {str(run_dir)!r}; "
                    f"pass {str(run_dir.parent)!r}"
                )
            checkpoint = load_checkpoint(run_dir)
            is_ltc = checkpoint.get("agent") == "ltc"
            needed = ("config", "progress") if is_ltc else ("config", "alpha", "epoch")
            missing = [k for k in needed if k not in checkpoint]
            if missing:
                raise ConfigError(
                    f"--resume {run_dir}: its checkpoint was not written by this version's "
                    f"{'LtC' if is_ltc else 'REINFORCE'} trainer (missing {missing})"
                )
            config = config_from_dict(checkpoint["config"])
            alpha = None if is_ltc else float(checkpoint["alpha"])
            runs = [(config, alpha, run_dir, True)]
        else:
            config = config_from_args(args)
            logdir = Path(config.logdir)
            if logdir.exists() and not logdir.is_dir():
                raise ConfigError(f"logdir {str(logdir)!r} is a file, not a directory")
            runs = [(config, a, logdir / run_name(config, a), False) for a in config.alpha]
    except (ConfigError, CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR
    if args.dry_run:
        table = dry_run_table(runs[0][0])
        print(json.dumps(table, indent=2) if args.json else format_cost_table(table))
        return 0
    if runs[0][0].agent == "ltc":
        config, _, run_dir, resume = runs[0]
        if not resume:
            run_dir = Path(config.logdir) / run_name(config, None)
            run_dir.mkdir(parents=True, exist_ok=False)
            (run_dir / "config.yaml").write_text(_dump_yaml(config.to_dict()))
        metrics = _train_or_status(lambda: train_ltc(config, run_dir, resume, not args.no_progress))
        if isinstance(metrics, int):
            return metrics
        write_metrics(run_dir, metrics)
        print(format_table(metrics))
        print(f"run directory: {run_dir}")
        return 0
    main_process = init_from_environment().is_main
    for config, alpha, run_dir, resume in runs:
        metrics = _train_or_status(
            lambda c=config, a=alpha, d=run_dir, r=resume: train_one(
                c, a, d, r, not args.no_progress
            )
        )
        if isinstance(metrics, int):
            return metrics
        if main_process:
            print(format_table(metrics))
            print(f"run directory: {run_dir}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
