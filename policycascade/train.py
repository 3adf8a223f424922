"""``python -m policycascade.train``: train stopping policies and report them on the test split."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from policycascade.checkpoint import load_checkpoint
from policycascade.config import (
    ConfigError,
    TrainConfig,
    add_config_arguments,
    config_from_args,
    config_from_dict,
)
from policycascade.trainer import NonFiniteError, Trainer, TrainingInterrupted, write_metrics

USAGE_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    """The CLI: every config field is an option; ``--config`` and ``--resume`` come on top."""
    parser = argparse.ArgumentParser(
        prog="python -m policycascade.train",
        description=(
            "Train a stopping policy over a cascade of classifiers with REINFORCE and print "
            "its test-split accuracy and cost next to each single classifier. Every option can "
            "also come from a YAML file (--config); the command line wins. One run directory "
            "per alpha under --logdir holds TensorBoard events, checkpoint.pt, config.yaml and "
            "metrics.json."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    add_config_arguments(parser)
    return parser


def run_name(config: TrainConfig, alpha: float) -> str:
    """``<dataset>__<agent>[-frozen]__<baseline>__a<alpha>__s<seed>__<time>``."""
    agent = config.agent + ("-frozen" if config.freeze_classifiers else "")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{config.dataset}__{agent}__{config.baseline}__a{alpha:g}__s{config.seed}__{stamp}"


def _hparams_table(config: TrainConfig, alpha: float) -> str:
    rows = [("alpha", alpha)] + [(k, v) for k, v in config.to_dict().items() if k != "alpha"]
    return "|option|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in rows)


def format_table(metrics: dict[str, Any]) -> str:
    """Test-split table: the learned policy against each single classifier."""
    k = len(metrics["exit_distribution"])
    header = f"{'policy':<22}{'accuracy':>9}{'mean MACs':>12}{'MAC share':>11}  exits per stage"
    lines = [f"test split, alpha={metrics['alpha']:g}", header, "-" * len(header)]
    exits = " ".join(f"{s:5.1%}" for s in metrics["exit_distribution"])
    lines.append(
        f"{'learned policy':<22}{metrics['accuracy']:>9.2%}{metrics['mean_macs']:>12,.0f}"
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
    if resume:
        trainer.load(load_checkpoint(run_dir, map_location=trainer.device))
    else:
        run_dir.mkdir(parents=True, exist_ok=False)
        (run_dir / "config.yaml").write_text(_dump_yaml({**config.to_dict(), "alpha": [alpha]}))
    # purge_step drops events a killed run logged after its last checkpoint.
    writer = SummaryWriter(str(run_dir), purge_step=trainer.epoch + 1 if resume else None)
    try:
        if not resume:
            writer.add_text("hyperparameters", _hparams_table(config, alpha), 0)
        metrics = trainer.run(writer)
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


def _dump_yaml(values: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(values, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status (2 for a usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.resume:
            run_dir = Path(args.resume)
            checkpoint = load_checkpoint(run_dir)
            config = config_from_dict(checkpoint["config"])
            runs = [(config, float(checkpoint["alpha"]), run_dir, True)]
        else:
            config = config_from_args(args)
            logdir = Path(config.logdir)
            runs = [(config, a, logdir / run_name(config, a), False) for a in config.alpha]
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR
    for config, alpha, run_dir, resume in runs:
        try:
            metrics = train_one(config, alpha, run_dir, resume, not args.no_progress)
        except TrainingInterrupted as error:
            print(f"interrupted: {error}", file=sys.stderr)
            return 130
        except NonFiniteError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return USAGE_ERROR
        print(format_table(metrics))
        print(f"run directory: {run_dir}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
