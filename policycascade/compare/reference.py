"""The user's alternative to a learned cascade: the same classifiers trained independently.

Every classifier of the run's cascade family is trained alone with cross-entropy for
the same number of epochs as the run's classifiers had, and keeps its weights from its
best validation epoch (per-classifier early stopping). Threshold rules of every
criterion are then fitted on validation, exactly as on the run's own classifiers.
Trained reference cascades are cached per (data set, cascade, seed, epochs) and every
training setting the reference reads (learning rate, batch size, weight decay, and the
shared options it does not read yet, so that a cached reference is never reused for
another setting).
"""

from __future__ import annotations

from pathlib import Path

import torch

from policycascade.cascade import CascadeOutputs
from policycascade.crossfit import train_reference
from policycascade.data import Split
from policycascade.models import build_cascade
from policycascade.runs import LoadedRun

REFERENCE = "reference"  # the trained_by label of the reference classifiers' rows


def reference_outputs(
    run: LoadedRun, cache_dir: Path | None = None
) -> tuple[CascadeOutputs, CascadeOutputs, list[str]]:
    """(val, test) outputs of reference classifiers for ``run``'s setting, and the stage names."""
    config, harness = run.config, run.harness
    epochs = harness.algorithm.classifier_epochs
    settings = _settings_key(config)
    key = f"{config.dataset}__{config.cascade}__s{config.seed}__e{epochs}__{settings}.pt"
    torch.manual_seed(config.seed)  # the reference's initial weights, fixed by the seed
    cascade = build_cascade(config.cascade, run.data.input_shape, run.data.num_classes)
    costs = cascade.costs()  # measured MACs: they do not depend on the weights
    cached = None if cache_dir is None else cache_dir / key
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
        config.lr,
        config.batch_size,
        config.weight_decay,
        config.seed,
    )
    outputs = []
    for split in ("val", "test"):
        x, y = harness.split_on_device(split)
        outputs.append(cascade.outputs(x, y, costs, transform=harness.inputs).to("cpu"))
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "val_probs": outputs[0].probs,
                "val_labels": outputs[0].labels,
                "test_probs": outputs[1].probs,
                "test_labels": outputs[1].labels,
            },
            cached,
        )
    return outputs[0], outputs[1], cascade.names


def _settings_key(config) -> str:
    """A short hash of the shared training settings: every top-level option but the seed.

    Where the run ran (device, folders, threads) does not count.
    """
    import hashlib
    import json

    skip = {"seed", "logdir", "device", "data_dir", "download", "threads", "agent"}
    values = {k: v for k, v in config.to_dict().items() if not isinstance(v, dict)}
    shared = {k: v for k, v in values.items() if k not in skip}
    text = json.dumps(shared, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]
