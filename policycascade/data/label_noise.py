"""Built-in data sets with label noise on two classes: where confidence misleads, and where not.

Jitkrittum et al. (NeurIPS 2023, "When does confidence-based cascade deferral
suffice?") name label noise as a setting where deferring on confidence fails. Two
settings ship here; both replace a fixed share of the labels of the classes in
``FLIPS`` by a fixed other class, drawn per split and fixed by the seed.

* ``f"{base}-noisy"`` (``splits="train"``): only the *training* labels are flipped;
  validation and test stay clean. With a share below one half the larger stages still
  answer the true class, just at a confidence near ``1 - share``, so deferring those
  samples is useful and confidence only under-rates it (above one half the stages answer
  the flip target, confidently and wrongly).
* ``f"{base}-noisy-all"`` (``splits="all"``): the same flips in *every* split, so the
  noise is in p(y|x) itself, the case the paper analyses. No stage can be right on a
  flipped validation or test sample, every stage is unconfident on those classes, and a
  confidence threshold defers them for nothing: the stopping rule is fitted and measured
  against the noisy labels, as a deployed cascade would meet them.

The train split's flips are the same in both settings; validation and test use their own
random streams, so each split's flips are an independent draw. ``"digits-noisy[-all]"`` and
``"synthetic-noisy[-all]"`` are the digits and synthetic sets with 40% of the labels of
classes 1 and 3 flipped to 7 and 8.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping

import numpy as np
import torch

from policycascade.data.digits import load_digits
from policycascade.data.splits import DataSplits, Split
from policycascade.data.synthetic import load_synthetic

FLIPS = {1: 7, 3: 8}  # noisy class -> the class its flipped labels become
NOISE_SHARE = 0.4  # share of each noisy class's labels that is flipped
NOISE_STREAM = 0x1AB3  # mixed into the seed, so the flips do not reuse the data's draws
# one random stream per split, so the splits' flips are independent; train's is the original
SPLIT_STREAMS = {"train": NOISE_STREAM, "val": NOISE_STREAM + 1, "test": NOISE_STREAM + 2}
NOISY_SPLITS = {"train": ("train",), "all": ("train", "val", "test")}  # splits= -> flipped
BASES: dict[str, Callable[[int], DataSplits]] = {"digits": load_digits, "synthetic": load_synthetic}
NOISY_DATASETS = tuple(f"{base}-noisy" for base in BASES)  # training labels flipped
NOISY_ALL_DATASETS = tuple(f"{base}-noisy-all" for base in BASES)  # every split's flipped


def flip_labels(
    labels: torch.Tensor,
    flips: Mapping[int, int],
    share: float,
    seed: int,
    stream: int = NOISE_STREAM,
) -> torch.Tensor:
    """A copy of ``labels`` with ``round(share * n_c)`` labels of each class c in ``flips`` changed.

    The flipped samples of class c are drawn without replacement, fixed by ``seed`` and
    ``stream`` (another stream draws independently), and get label ``flips[c]``; every
    other label is kept.
    """
    if isinstance(share, bool) or not (isinstance(share, int | float) and 0.0 <= share <= 1.0):
        raise ValueError(f"share must be in [0, 1], got {share!r}")
    for source, target in flips.items():
        if source == target:
            raise ValueError(f"flips must send a class to another class, got {source}: {target}")
    rng = np.random.default_rng([seed, stream])
    original = labels.numpy()
    noisy = original.copy()
    for source in sorted(flips):
        members = np.flatnonzero(original == source)
        chosen = rng.choice(members, size=int(round(share * len(members))), replace=False)
        noisy[chosen] = flips[source]
    return torch.from_numpy(noisy).to(labels.dtype)


def load_label_noise(
    base: str,
    seed: int = 0,
    share: float = NOISE_SHARE,
    flips: Mapping[int, int] = FLIPS,
    splits: str = "train",
) -> DataSplits:
    """Data set ``base`` (digits or synthetic) with labels flipped per ``flips``.

    ``splits="train"`` flips the training labels only (named ``f"{base}-noisy"``);
    ``splits="all"`` flips validation and test too, each split by its own stream (named
    ``f"{base}-noisy-all"``). Inputs and the split itself are ``base``'s for ``seed``.
    """
    if not isinstance(base, str) or base not in BASES:
        raise ValueError(f"base must be one of {list(BASES)}, got {base!r}")
    if not isinstance(splits, str) or splits not in NOISY_SPLITS:
        raise ValueError(f"splits must be one of {list(NOISY_SPLITS)}, got {splits!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    seed = int(seed)
    if not isinstance(flips, Mapping):
        raise TypeError(f"flips must be a mapping of class -> class, got {flips!r}")
    data = BASES[base](seed)
    for c in (*flips, *flips.values()):
        if isinstance(c, bool) or not (isinstance(c, int) and 0 <= c < data.num_classes):
            raise ValueError(f"flips must name classes 0..{data.num_classes - 1}, got {c!r}")
    noisy = {}
    for name in ("train", "val", "test"):
        split = data.split(name)
        if name in NOISY_SPLITS[splits]:
            y = flip_labels(split.y, flips, share, seed, stream=SPLIT_STREAMS[name])
            split = Split(split.x, y)
        noisy[name] = split
    name = f"{base}-noisy" if splits == "train" else f"{base}-noisy-all"
    return DataSplits(name, noisy["train"], noisy["val"], noisy["test"], data.num_classes)
