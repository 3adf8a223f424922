"""Detection delay and false alarms of ScoreWatch (first-stage stop score) beside DriftWatch.

``python -m policycascade.studies.score_watch RUN_DIR [STREAMS] [CLEAN_SAMPLES]``: the run's
rule, both watches calibrated on its clean validation outputs (alpha 0.01). Delays: streams
of the first 10,000 test inputs corrupted as ``compare --shift`` does (severity 1 to 5),
resampled with replacement, from the first sample. False alarms: CLEAN_SAMPLES fresh
synthetic samples through the cascade (restarted after each alarm), and null simulations
where calibration and a 2,000-sample stream are drawn from one pool of clean scores.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from policycascade.agents.rules import exit_stages
from policycascade.runs import load_run
from policycascade.shift import corrupt
from policycascade.watch import DriftWatch, ScoreWatch, first_stage_scores

MAX_LEN = 5000  # stream length per delay measurement


def delays(watch, values: np.ndarray, streams: int, rng) -> list[float]:
    """Samples to the first alarm of each stream (nan: none within MAX_LEN)."""
    out = []
    for _ in range(streams):
        watch.reset()
        watch.update(values[rng.integers(0, len(values), size=MAX_LEN)])
        out.append(watch.alarm.samples_seen if watch.alarm else np.nan)
    return out


def clean_scores(run, rule, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Fresh synthetic samples' first-stage scores and exits (unseen generator seeds)."""
    from policycascade.data.synthetic import load_synthetic

    h, scores, stages, seed = run.harness, [], [], 10_000 + run.config.seed * 100
    while sum(len(p) for p in scores) < size:
        test = load_synthetic(seed=seed).test
        out = run.cascade.outputs(test.x, test.y, h.costs, transform=h.inputs)
        scores.append(first_stage_scores(rule, out.probs))
        stages.append(exit_stages(rule, out.probs).numpy())
        seed += 1
    return np.concatenate(scores)[:size], np.concatenate(stages)[:size]


def false_alarms(watch, values: np.ndarray) -> int:
    """Alarms over one long clean stream, restarted at the next 1,000 samples after each."""
    count = 0
    watch.reset()
    for begin in range(0, len(values), 1000):
        watch.update(values[begin : begin + 1000])
        if watch.alarm is not None:
            count += 1
            watch.reset()
    return count


def main(run_dir: str, streams: int = 20, clean: int = 100_000) -> None:
    """Print delays per corruption and false alarms for one run (module docstring)."""
    torch.set_num_threads(1)
    run = load_run(run_dir, device="cpu")
    rule, h, val = run.rule, run.harness, run.outputs("val")
    scores = ScoreWatch.from_outputs(rule, val)
    exits = DriftWatch.from_outputs(rule, val)
    x, y = h.split_on_device("test")
    x, y = x[:10000], y[:10000]
    value_range = (float(x.min()), float(x.max()))
    g, rng = torch.Generator().manual_seed(run.config.seed), np.random.default_rng(0)
    print(f"{run_dir.rstrip('/').split('/')[-1]}: calibration n = {val.num_samples}")
    for kind in ("blur", "contrast", "noise"):
        for severity in range(1, 6):
            out = run.cascade.outputs(
                corrupt(x, kind, severity, g, value_range), y, h.costs, transform=h.inputs
            )
            z, stages = first_stage_scores(rule, out.probs), exit_stages(rule, out.probs).numpy()
            row = []
            for watch, values in ((scores, z), (exits, stages)):
                d = np.array(delays(watch, values, streams, rng))
                seen = ~np.isnan(d)
                row.append(f"{np.nanmean(d):.0f} ({seen.mean():.0%})" if seen.any() else "- (0%)")
            print(f"  {kind} {severity}: ScoreWatch {row[0]}, DriftWatch {row[1]}", flush=True)
    z_clean, s_clean = clean_scores(run, rule, clean)
    print(
        f"  false alarms in {clean} fresh clean samples: ScoreWatch "
        f"{false_alarms(scores, z_clean)}, DriftWatch {false_alarms(exits, s_clean)}"
    )
    pool, hits = np.concatenate([first_stage_scores(rule, val.probs), z_clean]), 0
    for _ in range(200):
        perm = rng.permutation(len(pool))
        null = ScoreWatch(pool[perm[: val.num_samples]])
        null.update(pool[perm[val.num_samples : val.num_samples + 2000]])
        hits += null.alarm is not None
    print(f"  null simulations: {hits} of 200 ScoreWatch streams (2,000 samples) alarmed")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:4]))
