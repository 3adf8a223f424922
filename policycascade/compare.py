"""``python -m policycascade.compare RUN_DIR...``: every policy on the same classifiers.

For each trained run the classifiers' softmaxes on the validation and test
splits are cached once; every policy (the run's learned REINFORCE policy,
confidence thresholds fitted on validation, random stopping at matched cost,
the oracle, each single classifier) is then evaluated on the test split by the
same function. Writes comparison.json / .csv, a trade-off plot, TensorBoard runs
(one per policy, identical tags) and prints a summary with the MACs saved.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from policycascade.agents.rules import StoppingRule, stop_decisions
from policycascade.agents.thresholds import (
    CRITERIA,
    ThresholdSearch,
    oracle_exits,
    random_exits,
)
from policycascade.cascade import CascadeOutputs
from policycascade.checkpoint import CHECKPOINT_NAME, load_checkpoint
from policycascade.config import ConfigError, HelpFormatter, config_from_dict
from policycascade.evaluation import evaluate_exits, first_stop
from policycascade.jsonio import write_json
from policycascade.ltc_run import LtcRun
from policycascade.plots import accuracy_by_exit_figure, tradeoff_figure
from policycascade.trainer import Trainer, evaluate_learned_policy

METRIC_KEYS = ("accuracy", "mean_macs", "macs_share")


def _row(policy: str, point: str, test: dict[str, Any], val: dict[str, Any] | None, **meta):
    row = {"policy": policy, "point": point, **meta}
    row.update({key: test[key] for key in (*METRIC_KEYS, "exit_distribution", "stage_accuracy")})
    row["accuracy_by_exit"] = test["accuracy_by_exit"]
    row["val_accuracy"] = None if val is None else val["accuracy"]
    row["val_mean_macs"] = None if val is None else val["mean_macs"]
    return row


def _rule_metrics(rule: StoppingRule, outputs: CascadeOutputs) -> dict[str, Any]:
    return evaluate_exits(outputs, first_stop(stop_decisions(rule, outputs.probs)))


def compare_outputs(
    val: CascadeOutputs,
    test: CascadeOutputs,
    stage_names: Sequence[str],
    criteria: Sequence[str] = CRITERIA,
    epsilons: Sequence[float] = (0.0, 0.005, 0.01, 0.02),
    budget_shares: Sequence[float] = (0.1, 0.25, 0.5),
    temperature: bool = False,
    sweep_points: int = 25,
    matched: Sequence[dict[str, Any]] = (),
    **meta,
) -> list[dict[str, Any]]:
    """Rule-based policies on one cascade's cached outputs (no training needed).

    Threshold rules are fitted on ``val`` and reported on ``test``: a sweep (the
    trade-off curve), one rule per accuracy drop ``epsilon`` from the last
    classifier, one per MACs budget (given as a share of the most expensive
    classifier), and, for each entry of ``matched`` (a learned policy's
    ``label``, ``val_accuracy``, ``val_mean_macs``, ``exit_distribution`` and
    optionally ``alpha``), the cheapest rule reaching its validation accuracy, the
    most accurate rule within its validation MACs, the rule with the best validation
    reward at its alpha, and random stopping with its exit distribution.
    Threshold rules cost no MACs of their own, so stages cost their classifiers only.
    """
    k = test.num_stages
    free = test.costs.with_policy_macs([0] * k)
    val, test = val.with_costs(free), test.with_costs(free)
    rows = []
    variants = [(c, False) for c in criteria] + ([("max-softmax", True)] if temperature else [])
    for criterion, scaled in variants:
        search = ThresholdSearch(val.probs.cpu(), val.labels.cpu(), free, criterion, scaled)
        name = search.template.name
        fitted = [(f"sweep {i:02d}", r) for i, r in enumerate(search.sweep(sweep_points))]
        fitted += [(f"eps={e:g}", search.for_accuracy_drop(e)) for e in epsilons]
        fitted += [
            (f"budget={b:g}", search.for_budget(b * free.reference_macs)) for b in budget_shares
        ]
        for m in matched:
            reference = search.for_accuracy_drop(0.0, reference_accuracy=m["val_accuracy"])
            fitted.append((f"match-accuracy {m['label']}", reference))
            fitted.append((f"match-macs {m['label']}", search.for_budget(m["val_mean_macs"])))
            if m.get("alpha") is not None:  # the rule with the best reward at the policy's alpha
                fitted.append((f"reward {m['label']}", search.for_reward(m["alpha"])))
        for point, rule in fitted:
            rows.append(
                _row(name, point, _rule_metrics(rule, test), _rule_metrics(rule, val), **meta)
            )
    generator = torch.Generator().manual_seed(0)
    for m in matched:
        exits = random_exits(test.num_samples, m["exit_distribution"], generator)
        rows.append(
            _row("random", f"matched {m['label']}", evaluate_exits(test, exits), None, **meta)
        )
    oracle = evaluate_exits(test, oracle_exits(test.probs, test.labels))
    rows.append(_row("oracle", "bound", oracle, None, **meta))
    for t, name in enumerate(stage_names):
        single = evaluate_exits(test, torch.full((test.num_samples,), t, dtype=torch.int64))
        single["mean_macs"] = float(free.alone_macs[t])  # alone: no earlier stage runs
        single["macs_share"] = free.alone_macs[t] / free.reference_macs
        single["accuracy"] = single["stage_accuracy"][t]
        single["exit_distribution"] = [float(s == t) for s in range(k)]
        rows.append(_row("single", name, single, None, **meta))
    return rows


def expand_run_dirs(paths: Sequence[str]) -> list[Path]:
    """Run directories given directly or as parents holding several runs."""
    runs = []
    for p in map(Path, paths):
        if (p / CHECKPOINT_NAME).is_file():
            runs.append(p)
        elif p.is_dir() and any((c / CHECKPOINT_NAME).is_file() for c in p.iterdir()):
            runs += sorted(c for c in p.iterdir() if (c / CHECKPOINT_NAME).is_file())
        else:
            raise FileNotFoundError(
                f"{p} is not a run directory (no {CHECKPOINT_NAME} in it or below)"
            )
    return runs


def compare_run(run_dir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """All policies on one trained run's classifiers."""
    checkpoint = load_checkpoint(run_dir)
    config = config_from_dict(checkpoint["config"])
    if checkpoint.get("agent") == "ltc":
        return compare_ltc_run(run_dir, checkpoint, config, args)
    trainer = Trainer(config, checkpoint["alpha"], run_dir, show_progress=False)
    trainer.load(checkpoint)
    val, test = trainer.outputs("val"), trainer.outputs("test")
    agent_name = config.agent + ("-frozen" if config.freeze_classifiers else "")
    meta = {
        "run": run_dir.name,
        "seed": config.seed,
        "alpha": trainer.alpha,
        "dataset": config.dataset,
        "trained_by": agent_name,
    }
    learned_val = evaluate_learned_policy(trainer.agent, val, config.ensemble)
    learned_test = evaluate_learned_policy(trainer.agent, test, config.ensemble)
    label = f"a={trainer.alpha:g}"
    rows = [_row(agent_name, label, learned_test, learned_val, **meta)]
    matched = [
        {
            "label": label,
            "alpha": trainer.alpha,
            "val_accuracy": learned_val["accuracy"],
            "val_mean_macs": learned_val["mean_macs"],
            "exit_distribution": learned_test["exit_distribution"],
        }
    ]
    rows += compare_outputs(
        val,
        test,
        trainer.cascade.names,
        args.criteria,
        args.epsilons,
        args.budgets,
        args.temperature,
        args.sweep_points,
        matched,
        **meta,
    )
    return rows


def compare_ltc_run(run_dir: Path, checkpoint, config, args) -> list[dict[str, Any]]:
    """An LtC run: its own thresholds, plus every rule on its (LtC-trained) classifiers."""
    run = LtcRun(config)
    run.load(checkpoint)
    if not run.finished:
        raise ValueError(
            "this LtC run has not finished training; continue it with "
            f"python -m policycascade.train --resume {run_dir}"
        )
    label = f"C={config.ltc_cost:g} w={config.ltc_weight:g} eps={config.ltc_epsilon:g}"
    meta = {
        "run": run_dir.name,
        "seed": config.seed,
        "alpha": None,
        "dataset": config.dataset,
        "trained_by": "ltc",
    }
    rows = [_row("ltc", label, run.evaluate("test"), run.evaluate("val"), **meta)]
    rows += compare_outputs(
        run.outputs("val"),
        run.outputs("test"),
        run.cascade.names,
        args.criteria,
        args.epsilons,
        args.budgets,
        args.temperature,
        args.sweep_points,
        (),
        **meta,
    )
    for row in rows[1:]:
        row["policy"] = f"{row['policy']} (LtC classifiers)"
    return rows


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds per (dataset, classifiers' trainer, policy, point)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        alpha = row["alpha"] if row["point"].startswith(("a=", "match", "matched")) else None
        key = (row["dataset"], row.get("trained_by"), row["policy"], row["point"], alpha)
        groups[key].append(row)
    out = []
    for (dataset, trained_by, policy, point, alpha), members in groups.items():
        entry = {
            "trained_by": trained_by,
            "dataset": dataset,
            "policy": policy,
            "point": point,
            "alpha": alpha,
            "runs": len(members),
        }
        for key in METRIC_KEYS:
            values = np.array([m[key] for m in members], dtype=float)
            entry[key] = float(values.mean())
            entry[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def savings(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per learned run: MACs saved at equal test accuracy against threshold rules and alone.

    For each threshold rule, the upper envelope of all its operating points
    (sweep, epsilon, budget and matched fits; thresholds fitted on validation,
    points measured on test) gives the fewest MACs that reach the learned
    policy's test accuracy; the best rule is the cheapest of them. "Alone" is
    the most expensive classifier by itself.
    """
    by_run = defaultdict(list)
    for row in rows:
        by_run[row["run"]].append(row)
    result = []
    for run, members in by_run.items():
        learned = [r for r in members if r["point"].startswith("a=")]
        if not learned:
            continue
        rl = learned[0]
        curves = defaultdict(list)  # every fitted operating point of each threshold rule
        for r in members:
            if r["policy"].split(" ")[0].removesuffix("+T") in CRITERIA:
                curves[r["policy"]].append((r["mean_macs"], r["accuracy"]))
        at_equal = {name: macs_at_accuracy(p, rl["accuracy"]) for name, p in curves.items()}
        reachable = {name: m for name, m in at_equal.items() if m is not None}
        largest = [r for r in members if r["policy"] == "single"][-1]
        entry = {
            "run": run,
            "seed": rl["seed"],
            "alpha": rl["alpha"],
            "dataset": rl["dataset"],
            "policy": rl["policy"],
            "accuracy": rl["accuracy"],
            "mean_macs": rl["mean_macs"],
            "threshold_macs_at_equal_accuracy": at_equal,
            "best_threshold_rule": None,
            "threshold_mean_macs": None,
            "macs_saved_vs_threshold": None,
            "largest_accuracy": largest["accuracy"],
            "largest_mean_macs": largest["mean_macs"],
            "macs_saved_vs_largest": 1.0 - rl["mean_macs"] / largest["mean_macs"],
        }
        if reachable:
            name = min(reachable, key=reachable.get)
            entry["best_threshold_rule"] = name
            entry["threshold_mean_macs"] = reachable[name]
            entry["macs_saved_vs_threshold"] = 1.0 - rl["mean_macs"] / reachable[name]
        result.append(entry)
    return result


def macs_at_accuracy(points: list[tuple[float, float]], accuracy: float) -> float | None:
    """Fewest mean MACs at which a trade-off curve reaches ``accuracy`` (linear between points).

    ``points`` are (mean MACs, accuracy) operating points; the curve is their upper
    envelope (a cheaper point at least as accurate dominates). None if no point
    reaches the accuracy.
    """
    front, best = [], -1.0
    for macs, acc in sorted(points):
        if acc > best:
            front.append((macs, acc))
            best = acc
    if not front or front[-1][1] < accuracy:
        return None
    if front[0][1] >= accuracy:
        return front[0][0]
    for (m0, a0), (m1, a1) in zip(front, front[1:], strict=False):
        if a1 >= accuracy:
            return m0 + (m1 - m0) * (accuracy - a0) / (a1 - a0)
    return None


CSV_COLUMNS = (
    "dataset",
    "run",
    "seed",
    "alpha",
    "policy",
    "point",
    "accuracy",
    "mean_macs",
    "macs_share",
    "val_accuracy",
    "val_mean_macs",
)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """One line per (run, policy, operating point); list metrics become one column per stage.

    Runs of cascades with fewer stages leave the extra stage columns empty.
    """
    k = max(len(row["exit_distribution"]) for row in rows)
    columns = list(CSV_COLUMNS) + [f"exit_share_stage{t}" for t in range(k)]
    columns += [f"stage_accuracy_stage{t}" for t in range(k)]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        for row in rows:
            flat = {c: row.get(c) for c in CSV_COLUMNS}
            flat.update({f"exit_share_stage{t}": v for t, v in enumerate(row["exit_distribution"])})
            flat.update(
                {f"stage_accuracy_stage{t}": v for t, v in enumerate(row["stage_accuracy"])}
            )
            writer.writerow(flat)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.+" else "_" for ch in name)


def write_tensorboard(out: Path, aggregated, summary_rows, figures, learned_rows) -> None:
    """One TensorBoard run per policy with identical tags; step = mean MACs per sample.

    Each point is the mean over seeds (``aggregated``), so a policy draws one curve
    rather than a zigzag through every seed's points. Rules applied to classifiers
    trained by LtC carry that in their policy name, so they get runs of their own.
    """
    tb = out / "tensorboard"
    by_policy = defaultdict(list)
    for entry in aggregated:
        by_policy[entry["policy"]].append(entry)
    for policy, members in by_policy.items():
        writer = SummaryWriter(str(tb / _safe(policy)))
        for row in sorted(members, key=lambda r: r["mean_macs"]):
            step = int(round(row["mean_macs"]))
            writer.add_scalar("compare/accuracy", row["accuracy"], step)
            writer.add_scalar("compare/macs_share", row["macs_share"], step)
        writer.close()
    writer = SummaryWriter(str(tb / "summary"))
    for tag, figure in figures.items():
        writer.add_figure(tag, figure, 0)
    writer.close()
    for row in learned_rows:
        save = next((s for s in summary_rows if s["run"] == row["run"]), None)
        writer = SummaryWriter(str(tb / "hparams" / _safe(row["run"])))
        metrics = {"hparam/accuracy": row["accuracy"], "hparam/macs_share": row["macs_share"]}
        if save is not None and save["macs_saved_vs_threshold"] is not None:
            metrics["hparam/macs_saved_vs_threshold"] = save["macs_saved_vs_threshold"]
        writer.add_hparams(
            {"alpha": float(row["alpha"]), "seed": int(row["seed"]), "policy": row["policy"]},
            metrics,
            run_name=".",
        )
        writer.close()


def _plot_reference(rows, summary_rows):
    """The run whose learned policy is best (highest accuracy, then fewest MACs)."""
    learned = [r for r in rows if r["point"].startswith("a=")]
    if not learned:
        return rows[0]["run"], None
    best = max(learned, key=lambda r: (r["accuracy"], -r["mean_macs"]))
    return best["run"], best


def make_figures(rows, aggregated) -> dict[str, Any]:
    """Trade-off plot (curves from the best run's classifiers) and Figure 4 of the best run."""
    run, best = _plot_reference(rows, aggregated)
    mine = [r for r in rows if r["run"] == run]
    curves = defaultdict(list)
    points = {}
    for r in mine:
        if r["point"].startswith("sweep"):
            curves[r["policy"]].append((r["mean_macs"], r["accuracy"]))
        elif r["policy"] in ("single", "oracle"):
            points[r["point"] if r["policy"] == "single" else "oracle"] = (
                r["mean_macs"],
                r["accuracy"],
            )
    learned = [
        (a["mean_macs"], a["accuracy"], a["mean_macs_std"], a["accuracy_std"], a["point"])
        for a in aggregated
        if a["point"].startswith("a=")
    ]
    title = (
        f"{mine[0]['dataset']}: test accuracy vs mean MACs (rules on the best run's classifiers)"
    )
    figures = {
        "compare/tradeoff": tradeoff_figure(
            dict(curves),
            points,
            sorted(learned),
            None if best is None else (best["mean_macs"], best["accuracy"]),
            title,
        )
    }
    if best is not None:
        names = [r["point"] for r in mine if r["policy"] == "single"]
        figures["compare/accuracy_by_exit"] = accuracy_by_exit_figure(
            best["accuracy_by_exit"], names, f"{best['policy']} {best['point']} ({run})"
        )
    return figures


def format_summary(aggregated, summary_rows) -> str:
    """Printed table (mean ± std over seeds) and the key numbers."""
    lines = [
        f"{'classifiers of':<18}{'policy':<32}{'point':<24}{'accuracy':>17}{'MAC share':>19}"
        f"{'runs':>6}"
    ]
    keep = [a for a in aggregated if not a["point"].startswith("sweep")]
    order = {"single": 3, "oracle": 2, "random": 1}

    def sort_key(a):
        return (str(a["trained_by"]), order.get(a["policy"], 0), a["policy"], a["point"])

    for a in sorted(keep, key=sort_key):
        lines.append(
            f"{str(a['trained_by']):<18}{a['policy'][:31]:<32}{a['point'][:23]:<24}"
            f"{a['accuracy']:>9.2%} ± {a['accuracy_std']:5.2%}"
            f"{a['macs_share']:>11.2%} ± {a['macs_share_std']:5.2%}{a['runs']:>6}"
        )
    if summary_rows:
        by_alpha = defaultdict(list)
        for s in summary_rows:
            by_alpha[(s["policy"], s["alpha"])].append(s)
        lines.append("")
        lines.append("MACs saved by the learned policy at equal test accuracy (mean over seeds):")
        for (policy, alpha), members in sorted(by_alpha.items()):

            def mean(key, members=members):
                values = [m[key] for m in members if m[key] is not None]
                return float(np.mean(values)) if values else float("nan")

            reached = sum(m["macs_saved_vs_threshold"] is not None for m in members)
            vs_rules = (
                f"{mean('macs_saved_vs_threshold'):+.1%} ({reached}/{len(members)} runs where "
                "a threshold curve reaches that accuracy)"
                if reached
                else f"n/a (no threshold rule reaches that accuracy in {len(members)} runs)"
            )
            lines.append(
                f"  {policy} alpha={alpha:g}: accuracy {mean('accuracy'):.2%}, "
                f"vs the best threshold rule's curve {vs_rules}, "
                f"vs largest classifier {mean('macs_saved_vs_largest'):+.1%} "
                f"(its accuracy {mean('largest_accuracy'):.2%})"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """CLI of the comparison."""
    parser = argparse.ArgumentParser(
        prog="python -m policycascade.compare",
        description="Evaluate trained runs under every stopping policy on the test split and "
        "write comparison.json/.csv, tradeoff.png and TensorBoard runs to --out.",
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
        choices=CRITERIA,
        help="confidence criteria of the threshold rules",
    )
    parser.add_argument(
        "--epsilons",
        nargs="+",
        type=float,
        default=[0.0, 0.005, 0.01, 0.02],
        help="accuracy drops (0.005 = half a point) below the last classifier's "
        "validation accuracy that the threshold rules may lose",
    )
    parser.add_argument(
        "--budgets",
        nargs="+",
        type=float,
        default=[0.1, 0.25, 0.5],
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
        default=25,
        help="operating points on each threshold rule's trade-off curve",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a usage error)."""
    args = build_parser().parse_args(argv)
    try:
        run_dirs = expand_run_dirs(args.runs)
        if any(not (0 <= e < 1) for e in args.epsilons):
            raise ConfigError(f"epsilons must be in [0, 1), got {args.epsilons}")
        if any(not (b > 0) for b in args.budgets):
            raise ConfigError(f"budgets must be > 0, got {args.budgets}")
    except (FileNotFoundError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = []
    for run_dir in run_dirs:
        print(f"evaluating {run_dir.name}", file=sys.stderr)
        try:
            rows += compare_run(run_dir, args)
        except (ValueError, ConfigError, FileNotFoundError) as error:
            # e.g. a run written by an older version whose checkpoint no longer fits
            print(f"error: run {run_dir}: {error}", file=sys.stderr)
            return 2
    out = Path(args.out or f"comparisons/{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    aggregated = aggregate(rows)
    summary_rows = savings(rows)
    figures = make_figures(rows, aggregated)
    figures["compare/tradeoff"].savefig(out / "tradeoff.png", dpi=120)
    if "compare/accuracy_by_exit" in figures:
        figures["compare/accuracy_by_exit"].savefig(out / "accuracy_by_exit.png", dpi=120)
    payload = {"rows": rows, "aggregated": aggregated, "savings": summary_rows}
    write_json(out / "comparison.json", payload, indent=1)
    write_csv(out / "comparison.csv", rows)
    learned_rows = [r for r in rows if r["point"].startswith("a=")]
    write_tensorboard(out, aggregated, summary_rows, figures, learned_rows)
    print(format_summary(aggregated, summary_rows))
    print(
        f"\nwrote {out}/comparison.json, comparison.csv, tradeoff.png, tensorboard/ "
        f"(tensorboard --logdir {out}/tensorboard)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
