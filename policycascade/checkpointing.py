"""The harness's one checkpoint format: config, algorithm state, epoch, history and RNG states.

A mixin of :class:`~policycascade.harness.RunHarness`; every algorithm is saved and
restored the same way, atomically, after every epoch.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from policycascade.checkpoint import CHECKPOINT_NAME, save_atomic

CHECKPOINT_FORMAT = 2  # {format, config, alpha, algorithm, epoch, history, state, rng}


@contextlib.contextmanager
def preserved_global_state() -> Iterator[None]:
    """Run the block, then give back every global random state and torch flag it may set.

    A run seeds Python's, NumPy's and torch's generators and may switch on deterministic
    algorithms; a library call (``train_policy``, ``load_run``) must leave the caller's as
    they were.
    """
    python, numpy_state = random.getstate(), np.random.get_state()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


class Checkpointing:
    """``state_dict``/``save``/``load`` of a run harness."""

    def state_dict(self) -> dict[str, Any]:
        """The one checkpoint format of every algorithm."""
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "alpha": self.alpha,
            "algorithm": self.config.agent,
            "epoch": self.epoch,
            "history": self.history,
            "classifier_macs": self.costs.classifier_macs,
            "state": self.algorithm.state_dict(),
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "shuffle": self.shuffle_generator.get_state(),
                "sample": self.sample_generator.get_state(),
            },
        }

    def save(self) -> None:
        """Write the checkpoint atomically (main process only), creating ``run_dir`` if needed."""
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_atomic(self.state_dict(), self.run_dir / CHECKPOINT_NAME)

    def load(self, checkpoint: dict[str, Any]) -> None:
        """Restore a checkpoint of this configuration (see ``policycascade.runs`` for checks).

        The global random states are restored only for a harness that trains on (a resumed
        run): a run that is only loaded leaves the caller's generators alone.
        """
        if checkpoint["classifier_macs"] != self.costs.classifier_macs:
            raise ValueError(
                f"checkpoint in {self.run_dir} is of another cascade: its classifiers cost "
                f"{checkpoint['classifier_macs']} MACs, this config's {self.costs.classifier_macs}"
            )
        trains = getattr(self, "trains", True)
        with contextlib.nullcontext() if trains else preserved_global_state():
            self.algorithm.load_state_dict(checkpoint["state"])  # (may build modules)
        self.history = list(checkpoint["history"])
        self.epoch = int(checkpoint["epoch"])
        if not trains:  # only loaded (load_run, compare): the caller's generators stay
            return
        rng = checkpoint["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        # Generator states are CPU byte tensors whatever the device (a checkpoint loaded
        # with map_location="cuda" has moved them there).
        torch.set_rng_state(rng["torch"].cpu())
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([state.cpu() for state in rng["cuda"]])
        self.shuffle_generator.set_state(rng["shuffle"].cpu())
        self.sample_generator.set_state(rng["sample"].cpu())

    @property
    def finished(self) -> bool:
        """Whether every epoch of the algorithm has been trained."""
        return self.epoch >= self.algorithm.num_epochs
