"""The comparison's outputs: a one-screen summary, figures, and TensorBoard runs."""

from __future__ import annotations

import math
import struct
from collections import defaultdict
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from policycascade.compare.rows import Aggregate, Row
from policycascade.compare.savings import RunSavings
from policycascade.fsutil import claim_new_dir, written_whole
from policycascade.plots import OwnPoint, TradeoffData, accuracy_by_exit_figure, tradeoff_figure
from policycascade.protocol import mean_std

FIGURE_DPI = 130
_SUMMARY_POINTS = ("eps=0", "budget=0.25")  # rule points worth a line besides the matched ones


def _pm(mean: float, std: float, runs: int, scale: float = 100.0, unit: str = "%") -> str:
    if runs < 2 or not math.isfinite(std):
        return f"{mean * scale:6.2f}{unit}"
    return f"{mean * scale:6.2f} ± {std * scale:.2f}{unit}"


def _summary_rows(aggregated: list[Aggregate]) -> list[Aggregate]:
    def keep(a: Aggregate) -> bool:
        if a.kind in ("own", "oracle", "single", "random", "certified"):
            return True
        if a.policy != "max-softmax":
            return False
        return a.point in _SUMMARY_POINTS or a.point.startswith(("reward ", "match-accuracy "))

    order = {
        "own": 0,
        "matched": 1,
        "curve": 2,
        "certified": 3,
        "random": 4,
        "oracle": 5,
        "single": 6,
    }
    chosen = [a for a in aggregated if keep(a)]

    def rank(a: Aggregate) -> tuple:
        return (a.dataset, a.config, a.trained_by, str(a.alpha), order[a.kind], a.policy, a.point)

    return sorted(chosen, key=rank)


def format_summary(aggregated: list[Aggregate], savings: list[RunSavings]) -> str:
    """The key rows (mean ± std over seeds) and the MACs saved; the full table is in the files."""
    header = (
        f"{'classifiers':<17}{'policy':<20}{'point':<24}{'accuracy':>16}{'MAC share':>18}"
        f"{'runs':>5}"
    )
    lines = [header, "-" * len(header)]
    several = len({a.group for a in aggregated}) > 1
    current = None
    for a in _summary_rows(aggregated):
        if several and a.group != current:
            current = a.group
            lines.append(f"{a.group} (runs: {', '.join(sorted(set(a.run_names)))})"[:160])
        policy = a.policy if a.kind != "single" else "alone"
        lines.append(
            f"{a.trained_by[:16]:<17}{policy[:19]:<20}{a.point[:23]:<24}"
            f"{_pm(a.accuracy, a.accuracy_std, a.runs):>16}"
            f"{_pm(a.macs_share, a.macs_share_std, a.runs):>18}{a.runs:>5}"
        )
    run_config = {name: a.config for a in aggregated for name in a.run_names}
    groups: dict[tuple, list[RunSavings]] = defaultdict(list)
    for s in savings:
        groups[(s.dataset, s.trained_by, s.alpha, run_config.get(s.run, ""), s.against)].append(s)
    if groups:
        lines += [
            "",
            "MACs saved by each run's own curve against the rule family chosen on validation",
            "(mean ± std over seeds; n = runs where both curves reach the accuracy):",
        ]
    for (dataset, trained_by, alpha, config, against), members in sorted(groups.items(), key=str):
        name = f"{dataset} {trained_by}" + ("" if alpha is None else f" a={alpha:g}")
        name += f" [{config}]" if config else ""

        def saved(key: str, members=members) -> str:
            return _saved(mean_std(getattr(m, key) for m in members), len(members))

        own_area = mean_std(m.own_area for m in members)
        rules_area = mean_std(m.rules_area for m in members)
        chosen = sorted({m.rule_criterion for m in members})
        lines += [
            f"  {name}, best rule on validation ({'/'.join(chosen)}) on {against}:",
            f"    at its own accuracy {saved('macs_saved_vs_rules')}",
            "    its curve at the largest classifier's accuracy "
            f"{saved('curve_saved_at_largest')}, 0.5 points below "
            f"{saved('curve_saved_below_largest')}",
            f"    normalised area {own_area.mean:.3f} (rules: {rules_area.mean:.3f})",
        ]
    return "\n".join(lines)


def _saved(stat, total: int) -> str:
    if stat.n == 0:
        return f"n/a (no rule reaches it in {total} runs)"
    std = "" if stat.n < 2 else f" ± {stat.std:.1%}"
    return f"{stat.mean:+.1%}{std} (n={stat.n}/{total})"


def best_run(rows: list[Row]) -> str:
    """The run whose own policy is most accurate (then cheapest); the first run if none."""
    own = [r for r in rows if r.kind == "own"]
    if not own:
        return rows[0].run
    return max(own, key=lambda r: (r.accuracy, -r.mean_macs)).run


def figure_groups(rows: list[Row]) -> dict[str, list[Row]]:
    """Rows per figure: one figure per data set and configuration (its alphas side by side).

    A run's rows all go to its group; the group is named by :func:`~policycascade.compare.rows.
    group_label` without alpha, so runs of one configuration at several alphas share a figure
    while configurations (epochs, options, data sets) never do.
    """
    config_of = {}
    for r in rows:
        if r.kind == "own" or r.run not in config_of:
            config_of[r.run] = (r.dataset, r.config, r.trained_by if r.kind == "own" else None)
    groups: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        dataset, config, trainer = config_of[r.run]
        label = f"{dataset} {trainer or r.trained_by}" + (f" [{config}]" if config else "")
        groups[label].append(r)
    return dict(sorted(groups.items()))


def _tradeoff(rows: list[Row], aggregated: list[Aggregate], title_prefix: str) -> dict[str, Any]:
    """The trade-off figure and Figure 4 of one figure group's rows."""
    run = best_run(rows)
    own = next((r for r in rows if r.run == run and r.kind == "own"), None)
    trained_by = own.trained_by if own is not None else rows[0].trained_by
    mine = [r for r in rows if r.run == run and r.trained_by == trained_by]
    data = TradeoffData(
        f"{title_prefix}test accuracy vs mean MACs (rule curves on the classifiers of {run})"
    )
    for r in rows:
        if r.run != run or not r.point.startswith("sweep"):
            continue
        if r.trained_by == trained_by:
            data.curves.setdefault(r.policy, []).append((r.mean_macs, r.accuracy))
        elif r.policy == "max-softmax":  # the reference: independent classifiers, best rule
            data.curves.setdefault(f"max-softmax ({r.trained_by})", []).append(
                (r.mean_macs, r.accuracy)
            )
    for r in mine:
        if r.kind == "single":
            data.points[r.point + " alone"] = (r.mean_macs, r.accuracy)
        elif r.kind == "oracle":
            data.points["oracle"] = (r.mean_macs, r.accuracy)
        elif r.kind == "random":
            data.random.append((r.mean_macs, r.accuracy))
    runs = {r.run for r in rows}
    for a in aggregated:
        if a.kind == "own" and set(a.run_names) <= runs:
            spread = a.runs > 1
            data.own.setdefault(a.policy, []).append(
                OwnPoint(
                    a.point,
                    a.mean_macs,
                    a.accuracy,
                    a.mean_macs_std if spread else 0.0,
                    a.accuracy_std if spread else 0.0,
                    a.runs,
                )
            )
    figures = {"compare/tradeoff": tradeoff_figure(data)}
    if own is not None:
        names = [r.point for r in mine if r.kind == "single"]
        counts = [round(share * own.num_samples) for share in own.exit_distribution]
        figures["compare/accuracy_by_exit"] = accuracy_by_exit_figure(
            own.accuracy_by_exit, names, counts, f"{own.policy} {own.point} on {own.run}"
        )
    return figures


def make_figures(rows: list[Row], aggregated: list[Aggregate]) -> dict[str, Any]:
    """Trade-off plot (rule curves on the best run's classifiers, its reference) and Figure 4.

    One pair per :func:`figure_groups` group: with one group the tags are
    ``compare/tradeoff`` and ``compare/accuracy_by_exit``; with several, each group's are
    ``compare/tradeoff/<group>`` and ``compare/accuracy_by_exit/<group>``, and the plain
    tags name the first group's figures (the same objects).
    """
    groups = figure_groups(rows)
    several = len(groups) > 1
    figures: dict[str, Any] = {}
    for label, members in groups.items():
        prefix = f"{label}: " if several else f"{members[0].dataset}: "
        for name, figure in _tradeoff(members, aggregated, prefix).items():
            for tag in _figure_tags(name, label, several):
                figures.setdefault(tag, figure)  # a plain tag: the first group's figure
    return figures


def _figure_names(rows: list[Row]) -> list[str]:
    """One group's figures: the trade-off, and Figure 4 where its best run has its own rule."""
    run = best_run(rows)
    has_own = any(r.run == run and r.kind == "own" for r in rows)
    return ["compare/tradeoff", *(["compare/accuracy_by_exit"] if has_own else [])]


def _figure_tags(name: str, label: str, several: bool) -> list[str]:
    """The tags of one group's figure ``name``: the plain one, and its group's with several."""
    return [name, f"{name}/{_safe(label)}"] if several else [name]


def figure_path(out: Path, tag: str) -> Path:
    """The PNG of a figure tag: ``compare/tradeoff/g`` -> ``out/tradeoff__g.png``."""
    return out / (tag.split("/", 1)[-1].replace("/", "__") + ".png")


def figure_paths(out: Path, rows: list[Row]) -> list[Path]:
    """The PNGs :func:`draw_figures` writes for ``rows``, known before drawing anything."""
    groups = figure_groups(rows)
    tags = [
        tag
        for label, members in groups.items()
        for name in _figure_names(members)
        for tag in _figure_tags(name, label, len(groups) > 1)
    ]
    return list(dict.fromkeys(figure_path(out, tag) for tag in tags))


def save_figures(out: Path, figures: dict[str, Any], overwrite: bool = False) -> list[Path]:
    """Write each figure as PNG under ``out`` (``compare/tradeoff/g`` -> ``tradeoff__g.png``).

    An existing file is replaced only with ``overwrite``; otherwise ``ValueError`` names it.
    Each PNG is drawn into a temporary file renamed into place: a kill leaves the old
    file whole, and a link at the path is replaced, never written through.
    """
    paths = {tag: figure_path(out, tag) for tag in figures}
    folders = [str(path) for path in paths.values() if path.is_dir()]
    if folders:
        raise ValueError(f"{folders[0]} is a folder: compare writes a file of that name there")
    taken = [str(path) for path in paths.values() if path.exists() or path.is_symlink()]
    if taken and not overwrite:
        raise ValueError(
            f"{taken[0]} already exists: compare writes only files of its own (choose "
            "another output directory)"
        )
    for tag, path in paths.items():
        with written_whole(path) as tmp:
            figures[tag].savefig(tmp, dpi=FIGURE_DPI, format="png")
    return list(paths.values())


def draw_figures(
    out: Path, rows: list[Row], aggregated: list[Aggregate], overwrite: bool = False
) -> list[tuple[str, str, bool]]:
    """:func:`make_figures` saved by :func:`save_figures`: (tag, PNG path, first of its figure).

    The third value is False for a plain tag that repeats a group's figure, so TensorBoard
    shows each picture once (:func:`add_pictures`). Plain data, so a helper process can
    draw while the tables are written.
    """
    import matplotlib.pyplot as plt  # after policycascade.plots chose its backend

    figures = make_figures(rows, aggregated)
    try:
        paths = save_figures(out, figures, overwrite=overwrite)
    finally:  # pyplot keeps every figure it made until it is closed
        for figure in figures.values():
            plt.close(figure)
    seen: set[int] = set()
    pictures = []
    for (tag, figure), path in zip(figures.items(), paths, strict=True):
        pictures.append((tag, str(path), id(figure) not in seen))
        seen.add(id(figure))
    return pictures


def add_pictures(tensorboard: Path, pictures: list[tuple[str, str, bool]]) -> None:
    """The saved PNGs as TensorBoard images (run ``summary``), each figure once, at step 0.

    The PNG bytes go in as they are: no second rendering of the figures.
    """
    from tensorboard.compat.proto.summary_pb2 import Summary

    writer = SummaryWriter(str(tensorboard / "summary"))
    for tag, path, first in pictures:
        if not first:
            continue
        data = Path(path).read_bytes()
        width, height = struct.unpack(">II", data[16:24])  # the PNG header's IHDR chunk
        image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=data)
        summary = Summary(value=[Summary.Value(tag=tag, image=image)])
        writer._get_file_writer().add_summary(summary, 0)  # what add_image does, pre-encoded
    writer.close()


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.+=" else "_" for ch in name)


def tensorboard_run_names(aggregated: list[Aggregate]) -> list[str]:
    """One TensorBoard run per configuration group and policy, for each aggregate.

    ``<data set>/<trainer>/<policy>``, with ``_a<alpha>`` and ``_<config>`` added to the
    trainer where one data set and trainer hold several alphas or configurations, so that
    each group's curve is a run of its own.
    """
    alphas: dict[tuple, set] = defaultdict(set)
    configs: dict[tuple, set] = defaultdict(set)
    for a in aggregated:
        alphas[(a.dataset, a.trained_by)].add(a.alpha)
        configs[(a.dataset, a.trained_by)].add(a.config)
    names = []
    for a in aggregated:
        group = a.trained_by
        if len(alphas[(a.dataset, a.trained_by)]) > 1:
            group += "_a-" if a.alpha is None else f"_a{a.alpha:g}"
        if len(configs[(a.dataset, a.trained_by)]) > 1:
            group += f"_{a.config or 'unknown'}"
        names.append("/".join(_safe(part) for part in (a.dataset, group, a.policy)))
    return names


def write_tensorboard(
    out: Path,
    aggregated: list[Aggregate],
    savings: list[RunSavings],
    rows: list[Row],
) -> Path:
    """One TensorBoard run per (configuration group, policy) with identical tags; step = MACs.

    Each point is the mean over one configuration's seeds, so a policy draws one curve per
    group (alpha, options) rather than a zigzag through every group's points. Writes into a
    new directory, ``out/tensorboard`` or, if that exists, ``out/tensorboard-2`` ... (what
    is already there is never touched); returns it. The figures join it through
    :func:`add_pictures`.
    """
    tb = claim_new_dir(out, "tensorboard")
    by_run: dict[str, list[Aggregate]] = defaultdict(list)
    for name, a in zip(tensorboard_run_names(aggregated), aggregated, strict=True):
        by_run[name].append(a)
    for name, members in by_run.items():
        writer = SummaryWriter(str(tb / name))
        for a in sorted(members, key=lambda a: a.mean_macs):
            step = int(round(a.mean_macs))
            writer.add_scalar("compare/accuracy", a.accuracy, step)
            writer.add_scalar("compare/macs_share", a.macs_share, step)
        writer.close()
    saved = {s.run: s for s in savings}
    for row in (r for r in rows if r.kind == "own"):
        writer = SummaryWriter(str(tb / "hparams" / _safe(row.run)))
        metrics = {"hparam/accuracy": row.accuracy, "hparam/macs_share": row.macs_share}
        s = saved.get(row.run)
        if s is not None and s.macs_saved_vs_rules is not None:
            metrics["hparam/macs_saved_vs_threshold"] = s.macs_saved_vs_rules
        hparams = {"seed": int(row.seed), "policy": row.policy, "dataset": row.dataset}
        if row.alpha is not None:
            hparams["alpha"] = float(row.alpha)
        if row.config:
            hparams["config"] = row.config
        writer.add_hparams(hparams, metrics, run_name=".")
        writer.close()
    return tb


def format_extras(extras: dict[str, list[dict[str, Any]]]) -> str:
    """One line per best sub-cascade and per shifted policy."""
    lines = []
    for s in extras.get("subsets", []):
        best, saved = s["best"], s["macs_saved"]
        saved_text = "n/a" if saved is None else f"{saved:+.1%}"
        lines.append(
            f"best sub-cascade of {s['run']}: {'+'.join(best['names'])} (chosen on validation); "
            f"test MACs saved vs the full cascade at equal accuracy {saved_text}"
        )
    for shift in extras.get("shift", []):
        for name, r in shift["policies"].items():
            lines.append(
                f"{shift['shift']} {shift['run'][:40]} {name}: accuracy "
                f"{r['in_accuracy']:.2%} -> {r['shifted_accuracy']:.2%}, MACs "
                f"{r['in_mean_macs']:,.0f} -> {r['shifted_mean_macs']:,.0f}, exit drift "
                f"{r['exit_drift_tv']:.3f} (total variation)"
            )
    return "\n".join(lines)
