"""``python -m policycascade.bench_epoch``: what one training epoch of a paper setting costs.

Times, in one run, the trainer's own epochs of a config (default: the CIFAR-10
ResNet cascade) on the chosen device:

- one cross-entropy pre-training epoch with the device-resident pipeline (the
  whole uint8 training split on the device, batched per-image crop and flip
  there), in fp32, bf16 autocast, and bf16 with channels-last;
- the same epoch fed by a torchvision ``DataLoader`` (PIL images through
  ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``,
  ``Normalize``, worker processes, pinned memory), as torchvision's CIFAR
  examples do it;
- one joint REINFORCE epoch and one validation pass;

and extrapolates the config's whole run from them. ``--fake`` writes random images of
the real size in the data set's exact on-disk format first, so the timing needs no
download (the accuracy of such a run means nothing; its cost is the real one).
Each variant runs a short warm-up (kernel selection, allocator) before it is timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policycascade.bench import print_report
from policycascade.cli_support import USAGE_ERROR, USER_ERRORS, OneLineParser, user_message
from policycascade.config import ConfigError, TrainConfig, config_from_dict, load_config_file
from policycascade.data import NORMALISATION
from policycascade.data.vision import write_cifar_batch
from policycascade.harness import RunHarness
from policycascade.runs import per_run_configs
from policycascade.supervised import cross_entropy_all_stages

DEFAULT_CONFIG = "cifar10-resnet"  # a shipped config, by name
VARIANTS = {  # name -> (precision, channels_last)
    "device-fp32": ("fp32", False),
    "device-bf16": ("bf16", False),
    "device-bf16-channels-last": ("bf16", True),
}
WARMUP_BATCHES = 20


def write_fake_cifar10(root: Path, train_images: int = 50_000, test_images: int = 10_000) -> None:
    """Random 32x32 images in CIFAR-10's on-disk layout (five train batches and a test batch)."""
    folder, label_key, num_classes = "cifar-10-batches-py", b"labels", 10
    rng = np.random.default_rng(0)

    def images(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        return x, rng.integers(0, num_classes, n)

    per_batch = -(-train_images // 5)
    for i in range(5):
        n = min(per_batch, train_images - i * per_batch)
        write_cifar_batch(root / folder / f"data_batch_{i + 1}", *images(n), label_key)
    write_cifar_batch(root / folder / "test_batch", *images(test_images), label_key)


class _PilImages(torch.utils.data.Dataset):
    """In-memory uint8 images served the way ``torchvision.datasets.CIFAR10`` serves them."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable):
        self.images = images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C) for PIL
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def torchvision_loader(harness: RunHarness, workers: int) -> torch.utils.data.DataLoader:
    """The training split through torchvision transforms and a ``DataLoader``."""
    from torchvision import transforms

    mean, std = NORMALISATION[harness.config.dataset]
    steps = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if harness.config.augment:
        steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), *steps]
    train = harness.data.train
    return torch.utils.data.DataLoader(
        _PilImages(train.x, train.y, transforms.Compose(steps)),
        batch_size=harness.config.batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=harness.device.type == "cuda",
    )


def dataloader_epoch(harness: RunHarness, loader: Any, max_batches: int | None = None) -> None:
    """One cross-entropy epoch with batches from ``loader``; the step is the trainer's."""
    harness.cascade.train()
    for step, (x, y) in enumerate(loader):
        if max_batches is not None and step >= max_batches:
            break
        x = x.to(harness.device, non_blocking=True)
        if harness.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = harness.classify(harness.algorithm.train_cascade, x)
        loss = cross_entropy_all_stages(logits, y.to(harness.device, non_blocking=True))
        harness.algorithm.classifier_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        harness.algorithm.classifier_optimizer.step()


def _timed(device: torch.device, work: Callable[[], Any]) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _warm_up(harness: RunHarness, epoch: Callable[[], Any]) -> None:
    """Run ``epoch`` on the first few training batches only (kernels chosen, memory pooled)."""
    with harness.subset("train", WARMUP_BATCHES * harness.config.batch_size):
        epoch()


def measure(config: TrainConfig, variants: Sequence[str], workers: int) -> dict[str, Any]:
    """Seconds per epoch of each variant, the joint epoch and a validation pass."""
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as run_dir:
        for name in variants:
            precision, channels_last = VARIANTS.get(name, ("fp32", False))
            variant = dataclasses.replace(config, precision=precision, channels_last=channels_last)
            harness = RunHarness(variant, run_dir, variant.reinforce.alpha[0], show_progress=False)
            trainer = harness.algorithm
            device = harness.device
            if name == "dataloader-fp32":
                loader = torchvision_loader(harness, workers)
                dataloader_epoch(harness, loader, WARMUP_BATCHES)
                seconds = _timed(device, lambda: dataloader_epoch(harness, loader))  # noqa: B023
                rows[name] = {"pretrain_epoch_s": seconds, "workers": workers}
                del loader  # its worker processes end here
                continue
            _warm_up(harness, trainer._pretrain_epoch)
            row = {"pretrain_epoch_s": _timed(device, trainer._pretrain_epoch)}
            if name == variants[0] or name == "device-bf16-channels-last":
                _warm_up(harness, trainer._reinforce_epoch)
                row["joint_epoch_s"] = _timed(device, trainer._reinforce_epoch)
                row["validation_s"] = _timed(device, lambda: harness.evaluate("val"))  # noqa: B023
            rows[name] = row
        data = harness.data
    train_images = len(data.train)
    for row in rows.values():
        row["pretrain_images_per_s"] = train_images / row["pretrain_epoch_s"]
        if "joint_epoch_s" in row:
            per_epoch_eval = row["validation_s"]
            row["estimated_run_s"] = config.reinforce.pretrain_epochs * (
                row["pretrain_epoch_s"] + per_epoch_eval
            ) + config.reinforce.epochs * (row["joint_epoch_s"] + per_epoch_eval)
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dataset": config.dataset,
        "cascade": config.cascade,
        "train_images": train_images,
        "batch_size": config.batch_size,
        "pretrain_epochs": config.reinforce.pretrain_epochs,
        "joint_epochs": config.reinforce.epochs,
        "variants": rows,
    }


def format_table(report: dict[str, Any]) -> str:
    """The report as a text table."""
    lines = [
        f"{report['cascade']} on {report['dataset']} ({report['train_images']:,} training images, "
        f"batch {report['batch_size']}), {report['device_name']}, torch {report['torch']}",
        f"{'variant':<28} {'pre-train epoch':>16} {'images/s':>10} {'joint epoch':>12} "
        f"{'val pass':>9} {'whole run (est.)':>17}",
    ]
    for name, row in report["variants"].items():
        joint = f"{row['joint_epoch_s']:.1f} s" if "joint_epoch_s" in row else "-"
        val = f"{row['validation_s']:.1f} s" if "validation_s" in row else "-"
        run = f"{row['estimated_run_s'] / 3600:.2f} h" if "estimated_run_s" in row else "-"
        label = name + (f" ({row['workers']} workers)" if "workers" in row else "")
        lines.append(
            f"{label:<28} {row['pretrain_epoch_s']:>14.1f} s "
            f"{row['pretrain_images_per_s']:>10,.0f} {joint:>12} {val:>9} {run:>17}"
        )
    lines.append(
        f"whole run = {report['pretrain_epochs']} pre-training + {report['joint_epochs']} joint "
        "epochs, each followed by a validation pass"
    )
    return "\n".join(lines)


def build_parser() -> OneLineParser:
    """Options of ``policycascade bench-epoch``."""
    parser = OneLineParser(
        prog="policycascade bench-epoch",
        description="Time one training epoch of a paper setting: device-resident data in fp32, "
        "bf16 and bf16 + channels-last, against a torchvision DataLoader; estimate the whole "
        "run from it.",
    )
    parser.add_argument(
        "--config",
        default=str(DEFAULT_CONFIG),
        help="config file or shipped config name (default: cifar10-resnet)",
    )
    parser.add_argument("--data-dir", help="where the data set lies (default: the config's)")
    parser.add_argument(
        "--fake",
        action="store_true",
        help="write random CIFAR-10 images of the real size and format to a temporary folder "
        "and time on those (no download needed)",
    )
    parser.add_argument(
        "--train-images",
        type=int,
        default=50_000,
        help="with --fake: training images written (default: %(default)s, CIFAR-10's size)",
    )
    parser.add_argument("--batch-size", type=int, help="override the config's batch size")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=[*VARIANTS, "dataloader-fp32"],
        default=[*VARIANTS, "dataloader-fp32"],
        help="what to time (default: all)",
    )
    parser.add_argument(
        "--workers", type=int, default=8, help="DataLoader worker processes (default: 8)"
    )
    parser.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:N]'")
    parser.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options, run the measurement, print it; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, least in (("train_images", 5), ("batch_size", 1), ("workers", 0)):
        value = getattr(args, name)
        if value is not None and value < least:
            parser.error(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    try:
        report = _measure_from_args(args)
    except USER_ERRORS as error:
        print(f"error: {user_message(error)}", file=sys.stderr)
        return USAGE_ERROR
    print_report(report, format_table(report), args.json)
    return 0


def _measure_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The options' config (on fake CIFAR-10 images with ``--fake``), measured."""
    overrides: dict[str, Any] = {"device": args.device}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    config = per_run_configs(config_from_dict({**load_config_file(args.config), **overrides}))[0]
    with tempfile.TemporaryDirectory() as fake_root:
        if args.fake:
            if config.dataset != "cifar10":
                raise ConfigError(f"--fake writes cifar10 only; the config is {config.dataset!r}")
            write_fake_cifar10(
                Path(fake_root), args.train_images, min(10_000, args.train_images // 5)
            )
            config = dataclasses.replace(config, data_dir=fake_root)
        elif args.data_dir:
            config = dataclasses.replace(config, data_dir=args.data_dir)
        return measure(config, args.variants, args.workers)


if __name__ == "__main__":
    sys.exit(main())
