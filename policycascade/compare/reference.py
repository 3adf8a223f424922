"""The user's alternative to a learned cascade: the same classifiers trained independently.

Every classifier of the run's cascade family is trained alone with cross-entropy for
the same number of epochs as the run's classifiers had, with the run's own training
options (optimiser, lr and schedule, weight decay, batch size, augmentation, precision),
and keeps its weights from its best validation epoch (per-classifier early stopping).
Threshold rules of every criterion are then fitted on validation, exactly as on the
run's own classifiers. Trained reference outputs are cached under a key that holds every
setting their weights depend on (:func:`reference_key`), so a cached reference is never
reused for another setting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from policycascade.cascade import CascadeOutputs
from policycascade.checkpoint import save_atomic
from policycascade.crossfit import train_reference
from policycascade.data import Split
from policycascade.models import build_cascade
from policycascade.runs import LoadedRun
from policycascade.seeding import seeded
from policycascade.supervised import TrainingOptions

REFERENCE = "reference"  # the trained_by label of the reference classifiers' rows
KEY_FORMAT = 2  # bump when the reference's training changes what the same settings give


def reference_key(
    dataset: str,
    cascade: str,
    seed: int,
    epochs: int,
    options: TrainingOptions,
    channels_last: bool = False,
) -> str:
    """The cache file name of a reference: every setting its weights depend on.

    The data split and initial weights (``dataset``, ``seed``), the family (``cascade``),
    the training length (``epochs``) and every training option; ``channels_last`` changes
    the convolution kernels' arithmetic. Where the run ran (device, folders, threads) does
    not count.
    """
    settings = {
        "format": KEY_FORMAT,
        "channels_last": bool(channels_last),
        **dataclasses.asdict(options),
    }
    text = json.dumps(settings, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"{dataset}__{cascade}__s{seed}__e{epochs}__{digest}.pt"


def reference_outputs(
    run: LoadedRun, cache_dir: Path | None = None
) -> tuple[CascadeOutputs, CascadeOutputs, list[str]]:
    """(val, test) outputs of reference classifiers for ``run``'s setting, and the stage names.

    With ``cache_dir`` the outputs are read from there, or trained once and saved there:
    processes that ask for the same reference at once (compare's helpers) take turns on a
    lock, so the second reads what the first trained instead of training it again. A
    cached reference is read without the lock, so a read-only cache still serves.
    """
    config = run.config
    epochs = run.harness.algorithm.classifier_epochs
    options = TrainingOptions.from_config(config)
    key = reference_key(
        config.dataset, config.cascade, config.seed, epochs, options, config.channels_last
    )
    if cache_dir is None:
        return _trained_outputs(run, epochs, options, None)
    cache_dir = Path(cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise ValueError(
            f"reference cache {str(cache_dir)!r} is a file, not a folder (compare keeps the "
            "reference's outputs there)"
        )
    if (cache_dir / key).is_file():  # written whole (save_atomic): read, even where read-only
        return _trained_outputs(run, epochs, options, cache_dir / key)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _held(cache_dir / f"{key}.lock"):
        return _trained_outputs(run, epochs, options, cache_dir / key)


def _trained_outputs(
    run: LoadedRun, epochs: int, options: TrainingOptions, cached: Path | None
) -> tuple[CascadeOutputs, CascadeOutputs, list[str]]:
    """The reference's outputs: from ``cached`` where it exists, else trained (and saved there)."""
    config, harness = run.config, run.harness
    with seeded(config.seed):  # the reference's initial weights (and dropout), fixed by the seed
        cascade = build_cascade(config.cascade, run.data.input_shape, run.data.num_classes)
        costs = cascade.costs()  # measured MACs: they do not depend on the weights
        if cached is not None and cached.is_file():
            saved = torch.load(cached, weights_only=True)
            return (
                CascadeOutputs(saved["val_probs"], saved["val_labels"], costs),
                CascadeOutputs(saved["test_probs"], saved["test_labels"], costs),
                cascade.names,
            )
        cascade.to(harness.device)

        def as_inputs(split: Split) -> Split:
            return Split(harness.inputs(split.x.to(harness.device)), split.y.to(harness.device))

        train_reference(
            cascade,
            as_inputs(run.data.train),
            as_inputs(run.data.val),
            epochs,
            seed=config.seed,
            options=options,
        )
    outputs = []
    for split in ("val", "test"):
        x, y = harness.split_on_device(split)
        with harness.autocast():  # at the run's precision, as the run's own outputs
            outputs.append(cascade.outputs(x, y, costs, transform=harness.inputs).to("cpu"))
    if cached is not None:
        save_atomic(
            {
                "val_probs": outputs[0].probs,
                "val_labels": outputs[0].labels,
                "test_probs": outputs[1].probs,
                "test_labels": outputs[1].labels,
            },
            cached,
        )
    return outputs[0], outputs[1], cascade.names


@contextlib.contextmanager
def _held(lock: Path) -> Iterator[None]:
    """An exclusive lock on the file ``lock`` while the body runs (where flock exists).

    The file is removed before the lock is let go: a process still waiting on it then
    finds the cache written, and a later one makes a new lock file.
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): at worst two processes train the same reference
        yield
        return
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)
