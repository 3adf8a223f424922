"""``compare_runs(...)``: every policy on trained runs and on users' cached outputs, as one call.

The command line (:mod:`policycascade.compare.cli`) parses its options into this call and
writes what it returns; Python users call it directly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from policycascade.cli_support import USER_ERRORS, user_message
from policycascade.compare.extras import shift_reports, subset_report
from policycascade.compare.outputs_files import read_outputs_file, stage_names, unique_paths
from policycascade.compare.policies import CompareOptions, compare_outputs
from policycascade.compare.rows import Aggregate, Row, aggregate, write_csv
from policycascade.compare.runs import RunIdentities, compare_run, expand_run_dirs
from policycascade.compare.savings import RunSavings, run_savings
from policycascade.fold_processes import UnitPool, choose_processes
from policycascade.fsutil import nearest_existing, temporary_path, written_whole
from policycascade.jsonio import write_json
from policycascade.runtime import resolve_device


@dataclass
class Comparison:
    """Every row of a comparison, their mean ± std over seeds, MACs saved, and the extras."""

    rows: list[Row]
    aggregated: list[Aggregate]
    savings: list[RunSavings]
    extras: dict[str, list] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        """What comparison.json holds."""
        return {
            "rows": [r.as_dict() for r in self.rows],
            "aggregated": [vars(a) for a in self.aggregated],
            "savings": [s.as_dict() for s in self.savings],
            **{key: value for key, value in self.extras.items() if value},
        }

    def summary(self) -> str:
        """The one-screen summary the command line prints."""
        from policycascade.compare.report import format_extras, format_summary

        return format_summary(self.aggregated, self.savings) + "\n" + format_extras(self.extras)

    def write(self, out: str | Path, overwrite: bool = False, processes: int = 0) -> list[Path]:
        """comparison.json/.csv, the figures and TensorBoard runs into ``out``; returns them.

        Files of an earlier comparison are replaced only with ``overwrite``; TensorBoard
        runs go to a new ``tensorboard`` (or ``tensorboard-2``, ...) folder, so nothing that
        compare did not write in this call is touched. With a free core (``processes`` 0)
        or ``processes`` >= 2, a forked helper draws the figures while this process writes
        the tables; the files do not depend on it. Every path is checked before anything is
        written, and each file is written whole through a temporary file (an interrupted
        write leaves the earlier file, never half of one, and replaces a link at the path
        instead of writing through it).
        """
        from policycascade.compare.report import (
            add_pictures,
            draw_figures,
            figure_paths,
            write_tensorboard,
        )

        out = _check_out(out, overwrite)
        count, _ = choose_processes(processes, 2, resolve_device("auto"))
        tables = [out / "comparison.json", out / "comparison.csv"]
        own = [*tables, *figure_paths(out, self.rows)]  # every file this call may replace
        # checked before anything is written: an error leaves ``out`` as it was
        folders = [p for p in own if p.is_dir()]
        if folders:
            raise ValueError(f"{folders[0]} is a folder: compare writes a file of that name there")
        taken = [p for p in own if not overwrite and (p.exists() or p.is_symlink())]
        if taken:
            raise ValueError(f"{taken[0]} already exists: pass overwrite=True to replace it")
        temporaries = [temporary_path(p) for p in own if not temporary_path(p).exists()]
        out.mkdir(parents=True, exist_ok=True)

        def draw(_unit: int) -> list[tuple[str, str, bool]]:
            return draw_figures(out, self.rows, self.aggregated, overwrite=overwrite)

        pool = UnitPool([1], draw, 1) if count > 1 else None
        try:
            write_json(tables[0], self.payload(), indent=1)  # (through a temporary file)
            with written_whole(tables[1]) as tmp:
                write_csv(tmp, self.rows)
            tensorboard = write_tensorboard(out, self.aggregated, self.savings, self.rows)
            pictures = None if pool is None else pool.take(1)
            if pictures is None:  # no helper, or it failed: draw here (and see any error)
                pictures = draw(1)
        finally:
            if pool is not None:
                pool.close()
            for tmp in temporaries:  # what an interrupted write (or a stopped helper) left
                tmp.unlink(missing_ok=True)
        add_pictures(tensorboard, pictures)
        return [*tables, *(Path(path) for _, path, _ in pictures), tensorboard]


def _check_out(out: object, overwrite: object) -> Path:
    """``out`` as a folder path that is or can become a folder; TypeError for wrong types."""
    if not isinstance(out, str | os.PathLike):
        raise TypeError(f"out must be a folder path, got {out!r}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"out {str(path)!r} is a file, not a folder")
    parent = nearest_existing(path)
    if not parent.is_dir():
        raise ValueError(f"out {str(path)!r} cannot be created: {str(parent)!r} is a file")
    return path


def _run_pool(runs: int, one_run, processes: int) -> UnitPool | None:
    """Helpers that compare the last runs while this process compares the first ones."""
    # runs load on CUDA where there is one: no fork then
    count, _ = choose_processes(processes, runs, resolve_device("auto"))
    if count < 2:
        return None
    return UnitPool(list(range(runs)), one_run, count - 1)


def compare_runs(
    runs: Sequence[str | Path] = (),
    outputs: Sequence[str | Path] = (),
    options: CompareOptions | None = None,
    *,
    reference: bool = True,
    reference_cache: str | Path | None = None,
    subsets: bool = False,
    shift: Sequence[tuple[str, int]] = (),
    show_progress: bool = False,
    processes: int = 0,
) -> Comparison:
    """Compare every policy on trained run directories and on cached-outputs files.

    Rules are fitted on each run's (or file's) validation split and measured once on its
    test split. ``reference`` adds classifiers of the run's family trained independently
    (cached under ``reference_cache``); ``subsets`` the best sub-cascade; ``shift`` pairs
    ``(kind, severity)`` of corrupted test inputs (these three need the run's data).
    ``processes`` compares that many runs at once in forked processes (0: the free CPU
    cores; 1: this process alone); the result does not depend on it.
    """
    options = (options or CompareOptions()).validate()
    if isinstance(runs, (str, Path)) or isinstance(outputs, (str, Path)):
        raise TypeError("runs and outputs take lists of paths, not one path")
    if not runs and not outputs:
        raise ValueError("give at least one run directory or outputs file")
    if reference_cache is not None and not isinstance(reference_cache, str | os.PathLike):
        raise TypeError(f"reference_cache must be a folder path or None, got {reference_cache!r}")
    choose_processes(processes, 0, "cpu")  # a bad value is refused before any work
    run_dirs = expand_run_dirs([str(r) for r in runs])
    files = [read_outputs_file(p) for p in unique_paths([str(o) for o in outputs], "outputs")]
    rows: list[Row] = []
    extras: dict[str, list] = {"subsets": [], "shift": []}
    for name, val, test in files:
        rows += compare_outputs(val, test, stage_names(test), options, dataset=name, run=name)
    seen = RunIdentities()
    cache = None if reference_cache is None else Path(reference_cache)
    bar = tqdm(run_dirs, desc="runs", leave=False, disable=None if show_progress else True)

    def one_run(index: int) -> tuple[list[Row], tuple[str, str, int], dict[str, list]]:
        from policycascade.runs import load_run

        run = load_run(run_dirs[index])
        found = compare_run(run, options, cache, reference=reference)  # unfinished: refused
        more = {
            "subsets": [subset_report(run, options.sweep_points)] if subsets else [],
            "shift": [shift_reports(run, kind, level) for kind, level in shift],
        }
        return found, RunIdentities.identity(run), more

    pool = _run_pool(len(run_dirs), one_run, processes)
    try:
        for index, run_dir in enumerate(bar):
            try:
                done = None if pool is None else pool.take(index)
                found, identity, more = one_run(index) if done is None else done
                rows += found
                seen.add_identity(*identity)
                for key, values in more.items():
                    extras[key] += values
            except USER_ERRORS as error:
                message = user_message(error)
                if str(run_dir) not in message:
                    message = f"run {run_dir}: {message}"
                raise ValueError(message) from None
    finally:
        if pool is not None:
            pool.close()
    return Comparison(rows, aggregate(rows), run_savings(rows), extras)
