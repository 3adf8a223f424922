"""Batched, per-sample image augmentation on the device: zero-pad, random crop, random flip.

torchvision's transforms draw one set of random parameters per call, so on a
batch every image would get the same crop; here each sample gets its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(
    images: torch.Tensor, pad: int, flip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero-pad, randomly crop back and optionally mirror every image of a batch independently.

    ``images`` is (batch, C, H, W); each is padded by ``pad`` zero pixels, cropped
    back to H x W at its own random offset, and mirrored left-right with
    probability 1/2 if ``flip``.
    """
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    b, _, h, w = images.shape
    device = images.device
    out = images
    if pad > 0:
        padded = F.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=device)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=device)
        rows = (dy.view(b, 1) + torch.arange(h, device=device)).view(b, 1, h, 1)
        cols = (dx.view(b, 1) + torch.arange(w, device=device)).view(b, 1, 1, w)
        batch = torch.arange(b, device=device).view(b, 1, 1, 1)
        channels = torch.arange(images.shape[1], device=device).view(1, -1, 1, 1)
        out = padded[batch, channels, rows, cols]
    if flip:
        mirror = torch.rand(b, generator=generator, device=device) < 0.5
        out = torch.where(mirror.view(b, 1, 1, 1), out.flip(-1), out)
    return out
