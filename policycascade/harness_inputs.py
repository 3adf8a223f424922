"""How a run harness feeds its classifiers: splits on the device, batches, inputs, precision.

A mixin of :class:`~policycascade.harness.RunHarness`, kept apart so that the harness
itself reads as the run: it expects ``config``, ``data``, ``device``, ``dist``,
``registered``, ``shuffle_generator``, ``sample_generator`` and the ``_on_device``
cache on the instance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from policycascade.augment import random_crop_flip
from policycascade.costs import eval_mode
from policycascade.data import NORMALISATION, to_float
from policycascade.supervised import batches

EVAL_BATCH = 1024


class HarnessInputs:
    """Splits copied to the device once, index batches, model inputs and the autocast."""

    def split_on_device(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A split's images and labels on the device, copied there once per run."""
        if split not in self._on_device:
            data = self.data.split(split)
            self._on_device[split] = (data.x.to(self.device), data.y.to(self.device))
        return self._on_device[split]

    def num_samples(self, split: str) -> int:
        """Samples in a split, as the algorithms see it."""
        return len(self.split_on_device(split)[1])

    @contextlib.contextmanager
    def subset(self, split: str, size: int) -> Iterator[None]:
        """Train on the first ``size`` samples of a split only (benchmark warm-ups)."""
        full = self.split_on_device(split)
        self._on_device[split] = (full[0][:size], full[1][:size])
        try:
            yield
        finally:
            self._on_device[split] = full

    def inputs(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        """Stored images -> model inputs on the device, one batch at a time.

        uint8 images are normalised here; training batches are augmented per image if
        configured (the data set stays on the device as uint8). A registered cascade's
        samples go to its classifiers as registered (tokens, tables, images of any kind).
        """
        if self.registered is not None:
            return x
        if x.dtype == torch.uint8:
            x = to_float(x, *NORMALISATION[self.config.dataset])
        if train and self.config.augment:
            x = random_crop_flip(x, pad=4, flip=True, generator=self.sample_generator)
        if self.config.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def autocast(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast of the classifiers' passes when ``precision`` is ``bf16``."""
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def classify(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Logits in fp32, the forward pass at the configured precision."""
        with self.autocast():
            return module(x).float()

    @torch.no_grad()
    def eval_logits(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``module``'s logits on stored images ``x`` in eval mode, in batches (flags restored)."""
        with eval_mode(module):
            return torch.cat(
                [
                    self.classify(module, self.inputs(x[i : i + EVAL_BATCH]))
                    for i in range(0, len(x), EVAL_BATCH)
                ]
            )

    def train_batches(
        self, num_samples: int, generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        """One shuffled epoch of index batches (the run's shuffle generator by default)."""
        return batches(num_samples, self.config.batch_size, generator or self.shuffle_generator)

    def to_device(self, idx: torch.Tensor) -> torch.Tensor:
        """This process's share of a global index batch, on the device."""
        return self.dist.shard(idx).to(self.device)
