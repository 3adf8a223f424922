"""Optional parts of a comparison: the best sub-cascade, and every rule under distribution shift."""

from __future__ import annotations

from typing import Any

import torch

from policycascade.agents.thresholds import ThresholdSearch
from policycascade.runs import LoadedRun
from policycascade.shift import CORRUPTIONS, corrupt, refit_to_exit_shares, shift_report
from policycascade.subsets import best_subset


def parse_shift(text: str) -> tuple[str, int]:
    """``KIND:SEVERITY`` (e.g. ``noise:3``) -> (kind, severity), or a ValueError naming it."""
    kind, _, severity = text.partition(":")
    if kind not in CORRUPTIONS or not severity.isdigit() or not 1 <= int(severity) <= 5:
        raise ValueError(
            f"--shift must be KIND:SEVERITY with KIND in {list(CORRUPTIONS)} and SEVERITY in "
            f"1..5, got {text!r}"
        )
    return kind, int(severity)


def subset_report(run: LoadedRun, sweep_points: int) -> dict[str, Any]:
    """The sub-cascade whose max-softmax rule is cheapest at the last classifier's val accuracy."""
    choice = best_subset(
        run.outputs("val").to("cpu"),
        run.outputs("test").to("cpu"),
        "max-softmax",
        stage_names=run.stage_names,
        sweep_points=sweep_points,
    )
    return {"run": run.run_dir.name, "dataset": run.config.dataset, **choice.as_dict()}


def shift_reports(run: LoadedRun, kind: str, severity: int) -> dict[str, Any]:
    """The run's own rule and the validation-fitted max-softmax rule on corrupted test images.

    Each rule is also refitted, without labels, to its clean validation exit shares on the
    corrupted validation images (the remedy), and measured again.
    """
    h = run.harness
    generator = torch.Generator(device=h.device).manual_seed(run.config.seed)

    def shifted(split: str):
        x, y = h.split_on_device(split)
        # float images are corrupted within the range they are stored in (normalised or not)
        value_range = (0.0, 1.0) if x.dtype == torch.uint8 else (float(x.min()), float(x.max()))
        noisy = corrupt(x, kind, severity, generator, value_range)
        return run.cascade.outputs(noisy, y, h.costs, transform=h.inputs)

    val, test = run.outputs("val"), run.outputs("test")
    val_shifted, test_shifted = shifted("val"), shifted("test")
    free = val.costs.with_policy_macs([0] * val.num_stages)
    threshold = ThresholdSearch(val.probs, val.labels, free, "max-softmax").for_accuracy_drop(0.0)
    reports = {}
    for name, rule in (("own", run.rule), ("max-softmax eps=0", threshold)):
        clean_val = shift_report(rule, val, test, test_shifted)
        refit = refit_to_exit_shares(rule, val_shifted.probs, clean_val.val_exit_shares)
        reports[name] = clean_val.as_dict()
        reports[f"{name} refitted to its exit shares"] = shift_report(
            refit, val, test, test_shifted
        ).as_dict()
    return {"run": run.run_dir.name, "shift": f"{kind}:{severity}", "policies": reports}
