"""Cached validation and test outputs of a shipped config's classifiers, without its rule.

Trains exactly the classifiers a continuation run of that config and seed trains first
(its unit 0: each classifier alone, kept from its best validation epoch), skipping the
cross-fitting folds and the rule, and saves ``{"val", "test"}`` outputs per seed. For
studies of rules on validation outputs when the shared runs are not there yet.

    OMP_NUM_THREADS=1 python -m policycascade.studies.classifier_outputs specialist \
        --seeds 0 1 2 3 4 --out /tmp/specialist-outputs
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from policycascade.cascade import CascadeOutputs
from policycascade.config import config_from_dict, load_config_file
from policycascade.costs import StageCosts
from policycascade.harness import RunHarness


def classifier_outputs(config_name: str, seed: int) -> dict[str, CascadeOutputs]:
    """The val and test outputs of a continuation config's classifiers at ``seed``."""
    config = config_from_dict({**load_config_file(config_name), "seed": seed, "device": "cpu"})
    if config.agent != "continuation":
        raise ValueError(f"config_name must name a continuation config, got agent {config.agent}")
    with tempfile.TemporaryDirectory() as run_dir:
        alpha = config.continuation.alpha[0]
        harness = RunHarness(config, run_dir, alpha, show_progress=False)
        harness.algorithm.train_epoch(0)
        harness.cascade.eval()
        return {split: harness.outputs(split).to("cpu") for split in ("val", "test")}


def save_outputs(outputs: dict[str, CascadeOutputs], path: Path) -> None:
    """One file of plain tensors and cost lists."""
    torch.save(
        {
            split: {"probs": o.probs, "labels": o.labels, "costs": o.costs.as_dict()}
            for split, o in outputs.items()
        },
        path,
    )


def load_outputs(path: Path) -> dict[str, CascadeOutputs]:
    """What :func:`save_outputs` wrote."""
    data = torch.load(path, weights_only=True)
    out = {}
    for split, d in data.items():
        costs = d["costs"]
        macs = StageCosts(costs["classifier_macs"], costs["policy_macs"], costs["alone_macs"])
        out[split] = CascadeOutputs(d["probs"], d["labels"], macs)
    return out


def main(argv: list[str] | None = None) -> None:
    """Train and save each seed's outputs as ``<out>/<config>-s<seed>.pt``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", help="a shipped continuation config (e.g. specialist)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, required=True, help="folder for the output files")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        path = args.out / f"{args.config}-s{seed}.pt"
        save_outputs(classifier_outputs(args.config, seed), path)
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
