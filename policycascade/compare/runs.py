"""Every policy on one trained run's classifiers, whatever algorithm trained them."""

from __future__ import annotations

from pathlib import Path

from policycascade.agents.thresholds import ScoreSearch
from policycascade.checkpoint import CHECKPOINT_NAME
from policycascade.compare.policies import CompareOptions, Matched, compare_outputs, rule_rows
from policycascade.compare.reference import REFERENCE, reference_outputs
from policycascade.compare.rows import Row, config_key, make_row
from policycascade.runs import LoadedRun


def expand_run_dirs(paths: list[str]) -> list[Path]:
    """Run directories given directly or as parents holding several runs; each run once."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if (p / CHECKPOINT_NAME).is_file():
            found = [p]
        elif p.is_dir() and any((c / CHECKPOINT_NAME).is_file() for c in p.iterdir()):
            found = sorted(c for c in p.iterdir() if (c / CHECKPOINT_NAME).is_file())
        else:
            raise FileNotFoundError(
                f"{p} is not a run directory (no {CHECKPOINT_NAME} in it or below)"
            )
        for run in found:
            twin = next((r for r in runs if r.resolve() == run.resolve()), None)
            if twin is not None:
                raise ValueError(
                    f"run {str(run)!r} is given twice (also as {str(twin)!r}): each run counts once"
                )
            runs.append(run)
    return runs


class RunIdentities:
    """Refuses a second run of one configuration and seed.

    It is the same run again, not a new seed, and averaging it would shrink the spread.
    """

    def __init__(self) -> None:
        self._seen: dict[str, Path] = {}

    @staticmethod
    def identity(run: LoadedRun) -> tuple[str, str, int]:
        """(what makes two runs the same run, its directory, its seed): plain values."""
        key = repr((config_key(run.config), run.config.seed, run.alpha))
        return key, str(run.run_dir), run.config.seed

    def add(self, run: LoadedRun) -> None:
        """Record ``run``; raise a ValueError naming both runs if its twin was seen."""
        self.add_identity(*self.identity(run))

    def add_identity(self, key: str, run_dir: str, seed: int) -> None:
        """Record a run by its :meth:`identity`; raise a ValueError if its twin was seen."""
        if key in self._seen:
            raise ValueError(
                f"runs {str(self._seen[key])!r} and {run_dir!r} have the same "
                f"configuration and seed {seed}: compare runs of distinct seeds"
            )
        self._seen[key] = Path(run_dir)


def run_meta(run: LoadedRun) -> dict:
    """The labels every row of a run carries."""
    return {
        "dataset": run.summary.dataset,
        "run": run.run_dir.name,
        "seed": run.config.seed,
        "trained_by": run.summary.label,
        "alpha": run.alpha,
        "config": config_key(run.config),
    }


def compare_run(
    run: LoadedRun,
    options: CompareOptions,
    reference_cache: Path | None = None,
    reference: bool = True,
) -> list[Row]:
    """The run's own rule, its score as a curve, every rule on its classifiers and on a reference.

    With ``reference``, classifiers trained independently with the run's epoch budget
    (:mod:`policycascade.compare.reference`) get the same rules: the user's alternative.
    """
    if not run.finished or run.rule is None:
        raise ValueError(
            f"run {run.run_dir} has not finished training ({run.progress}); continue it with "
            f"policycascade train --resume {run.run_dir}"
        )
    val, test = run.outputs("val"), run.outputs("test")
    meta = run_meta(run)
    own_val, own_test = run.evaluate("val"), run.evaluate("test")
    label = run.summary.label if run.alpha is None else f"a={run.alpha:g}"
    rows = [make_row(meta, meta["trained_by"], "own", label, own_test, own_val)]
    # The own rule's stop score, thresholded per stage on validation: a whole curve.
    search = ScoreSearch.for_rule(run.rule, val.probs, val.labels, val.costs)
    rows += rule_rows(f"{meta['trained_by']} score", search, val, test, options, (), meta)
    matched = Matched(
        label, own_val["accuracy"], own_val["mean_macs"], own_test["exit_distribution"], run.alpha
    )
    rows += compare_outputs(val, test, run.stage_names, options, [matched], **meta)
    # Classifiers trained as the reference trains them are the reference: no second copy.
    if reference and not run.summary.trains_like_reference:
        ref_val, ref_test, names = reference_outputs(run, reference_cache)
        ref_meta = {**meta, "trained_by": REFERENCE}
        rows += compare_outputs(ref_val, ref_test, names, options, [matched], **ref_meta)
    return rows
