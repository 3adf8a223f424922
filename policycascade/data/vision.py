"""Real image data sets read straight from their published files, split into train/val/test.

Every reader is written here: torchvision is used only to *download* (its CIFAR
classes verify MD5 sums, so they would reject any copy that is not byte for byte
the official one). Where each data set is looked for, under ``data_dir`` (or
directly in ``data_dir``):

| name | folder | files |
|---|---|---|
| ``mnist`` | ``MNIST/raw`` | IDX ``train-images-idx3-ubyte`` ... (or ``.gz``) as torchvision |
| ``fashion-mnist`` | ``FashionMNIST/raw`` | the same four IDX files |
| ``cifar10`` | ``cifar-10-batches-py`` | pickles ``data_batch_1..5``, ``test_batch`` |
| ``cifar100`` | ``cifar-100-python`` | pickles ``train``, ``test`` (fine labels) |
| ``imagenet32`` | ``imagenet32`` | ``train_data_batch_1..10.npz``, ``val_data.npz`` |
| ``imagenet`` | ``imagenet`` | ImageFolder trees ``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG`` |

The in-memory sets keep their images as uint8 (sample, C, H, W) tensors, a quarter
of the float32 size; :func:`to_float` with :data:`NORMALISATION` converts a batch
when it is used. The validation split is carved from the training images with a
fixed seed; the test split is always the official test set (ImageNet's val set).
"""

from __future__ import annotations

import gzip
import pickle
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from policycascade.data.splits import DataSplits, Split

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder

VISION_DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100", "imagenet32", "imagenet")
VAL_FRACTION = 0.1  # 5,000 of CIFAR's 50,000 training images, 6,000 of MNIST's 60,000

_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# Per-channel (mean, std) of the training images in [0, 1], as commonly published.
NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # The downsampled set is usually normalised with full-size ImageNet's statistics.
    "imagenet32": _IMAGENET_STATS,
    "imagenet": _IMAGENET_STATS,
}


def to_float(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Normalised float32 of uint8 (batch, C, H, W) images: apply per batch, keep sets uint8."""
    if len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise ValueError(
            f"mean and std need one value per channel ({x.shape[1]}), "
            f"got {len(mean)} and {len(std)}"
        )
    shape = (1, -1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(shape)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(shape)
    return (x.to(torch.float32) / 255.0 - mean_t) / std_t


@dataclass(frozen=True)
class _Layout:
    """Where one data set's files live and how someone without them can get them."""

    title: str
    folder: str  # under data_dir; torchvision's own folder name where it downloads
    files: tuple[str, ...]
    torchvision_class: str | None = None  # downloads it; None: manual download only
    manual_steps: str = ""  # how to fetch and unpack it by hand when torchvision cannot
    gz_ok: bool = False  # a file may also be present gzip-compressed as <name>.gz


_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_IMAGENET_TERMS = "ImageNet has no automatic download (its terms need an account at image-net.org)"
_LAYOUTS = {
    "mnist": _Layout("MNIST", "MNIST/raw", _IDX_FILES, "MNIST", gz_ok=True),
    "fashion-mnist": _Layout(
        "Fashion-MNIST", "FashionMNIST/raw", _IDX_FILES, "FashionMNIST", gz_ok=True
    ),
    "cifar10": _Layout(
        "CIFAR-10",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",),
        "CIFAR10",
    ),
    "cifar100": _Layout("CIFAR-100", "cifar-100-python", ("train", "test"), "CIFAR100"),
    "imagenet32": _Layout(
        "ImageNet 32x32",
        "imagenet32",
        tuple(f"train_data_batch_{i}.npz" for i in range(1, 11)) + ("val_data.npz",),
        manual_steps="download Imagenet32_train_npz.zip and Imagenet32_val_npz.zip "
        "('Downsampled Image Data' on image-net.org) and unzip both into {folder}",
    ),
    "imagenet": _Layout(
        "ImageNet",
        "imagenet",
        ("train", "val"),
        manual_steps="download ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and "
        "ILSVRC2012_devkit_t12.tar.gz into {folder} and run torchvision.datasets.ImageNet("
        "'{folder}', split=...) once with 'train' and once with 'val', which unpacks them "
        "into train/<wnid>/ and val/<wnid>/",
    ),
}


def _find(folder: Path, name: str, gz_ok: bool) -> Path | None:
    """The file ``name`` in ``folder`` (or its ``.gz``), None if neither exists."""
    for candidate in (folder / name, folder / f"{name}.gz") if gz_ok else (folder / name,):
        if candidate.exists():
            return candidate
    return None


def _locate(key: str, data_dir: str | Path, download: bool) -> list[Path]:
    """Paths of every file of data set ``key``, downloading first if asked and possible."""
    layout = _LAYOUTS[key]
    root = Path(data_dir).expanduser()
    folders = (root / layout.folder, root)
    if download and layout.torchvision_class is not None:
        if not any(all(_find(f, n, layout.gz_ok) for n in layout.files) for f in folders):
            _download(layout, root)
    for folder in folders:
        found = [_find(folder, name, layout.gz_ok) for name in layout.files]
        if all(found):
            return found
    missing = [n for n in layout.files if _find(folders[0], n, layout.gz_ok) is None]
    if layout.torchvision_class is not None:
        how = (
            "Point data_dir (--data-dir) at a directory that holds a copy, "
            "or add --download (download: true in a config) on a machine with internet access."
        )
    else:
        steps = layout.manual_steps.format(folder=folders[0])
        how = (
            f"{_IMAGENET_TERMS}: {steps}; or point data_dir (--data-dir) at a directory "
            "that holds a copy."
        )
    missing_text = "all of them" if len(missing) == len(layout.files) else ", ".join(missing)
    raise FileNotFoundError(
        f"{layout.title} not found: looked in {folders[0]} (and directly in {root}) for "
        f"{', '.join(layout.files)}{' (or .gz)' if layout.gz_ok else ''}; "
        f"missing: {missing_text}. {how}"
    )


class DownloadError(OSError, RuntimeError):
    """A data set could not be downloaded (no network, a server error, a bad checksum).

    An ``OSError`` (the command line prints it as one line) and, as before, a
    ``RuntimeError``.
    """


def dataset_files(name: str, data_dir: str | Path, download: bool = False) -> list[Path]:
    """The files of vision data set ``name`` under ``data_dir``, downloaded first if asked.

    Raises ``FileNotFoundError`` saying where it looked and what to do, or
    :class:`DownloadError` in one line; lets a command check before any training.
    """
    if name not in _LAYOUTS:
        raise ValueError(f"vision dataset must be one of {sorted(_LAYOUTS)}, got {name!r}")
    return _locate(name, data_dir, download)


def _download(layout: _Layout, root: Path) -> None:
    """Fetch a data set with torchvision into ``root``, where torchvision puts ``layout.folder``."""
    import torchvision.datasets

    dataset_class = getattr(torchvision.datasets, layout.torchvision_class)
    try:
        dataset_class(str(root), train=True, download=True)  # fetches train and test files
    except (OSError, RuntimeError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise DownloadError(
            f"downloading {layout.title} into {root} failed ({reason}); on a machine without "
            f"internet access copy the files into {root / layout.folder} instead"
        ) from error


def _check_labels(labels: np.ndarray, low: int, high: int, path: Path) -> np.ndarray:
    """``labels`` as int64 if every one lies in [low, high], else a ValueError naming the file."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < low or labels.max() > high):
        raise ValueError(
            f"{path}: labels must lie in [{low}, {high}], found [{labels.min()}, {labels.max()}]"
        )
    return labels


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Read one IDX file of unsigned bytes (magic 2051 images, 2049 labels), gzipped or not."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = bytearray(f.read())  # a writable buffer, so torch.from_numpy does not warn
    except (OSError, EOFError) as error:
        raise ValueError(f"{path}: cannot read the IDX file ({error})") from error
    # Magic number: two zero bytes, the type (0x08 = unsigned byte), the number of dimensions.
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else "nothing"
        raise ValueError(f"{path}: not an IDX file with magic number {magic} (found {found})")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise ValueError(
            f"{path}: its header announces shape {dims}, {expected} bytes in all, but the file "
            f"holds {len(raw)} bytes; it is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_idx_set(
    key: str, data_dir: str | Path, seed: int, download: bool, val_fraction: float
) -> DataSplits:
    """MNIST-style data: four IDX files of 28x28 grey images and labels 0-9."""
    train_x, train_y, test_x, test_y = _locate(key, data_dir, download)

    def pair(x_path: Path, y_path: Path) -> tuple[np.ndarray, np.ndarray]:
        images, labels = _read_idx(x_path, 2051), _read_idx(y_path, 2049)
        if len(images) != len(labels):
            raise ValueError(
                f"{x_path} holds {len(images)} images but {y_path} {len(labels)} labels"
            )
        return images[:, None], _check_labels(labels, 0, 9, y_path)

    images, labels = pair(train_x, train_y)
    return _assemble(key, [images], labels, pair(test_x, test_y), 10, seed, val_fraction)


def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python pickle: uint8 (sample, 3, 32, 32) images and their labels."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key])
    except Exception as error:  # unpickling garbage can raise almost any exception type
        raise ValueError(
            f"{path}: not a CIFAR python batch with keys b'data' and {label_key!r} "
            f"({type(error).__name__}: {error})"
        ) from error
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(
            f"{path}: expected data of shape (N, 3072) and N labels, "
            f"got {data.shape} and {len(labels)}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def write_cifar_batch(path: Path, images: np.ndarray, labels: np.ndarray, label_key: bytes) -> None:
    """Write one CIFAR python batch as published (the inverse of the reader above).

    Bytes keys, uint8 ``data`` of shape (N, 3072) channel-major, labels as a list;
    for tests and benchmarks that need the on-disk format without a download.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = {b"data": images.reshape(len(images), -1), label_key: labels.tolist()}
    with open(path, "wb") as f:
        pickle.dump(batch, f)


def _load_cifar_set(
    key: str, data_dir: str | Path, seed: int, download: bool, val_fraction: float
) -> DataSplits:
    """CIFAR-10 or -100: the train pickles (all but the last file) and the test pickle."""
    label_key, num_classes = (b"labels", 10) if key == "cifar10" else (b"fine_labels", 100)
    *train_paths, test_path = _locate(key, data_dir, download)
    batches = [_read_cifar_batch(p, label_key) for p in train_paths]
    top = num_classes - 1
    labels = np.concatenate(
        [_check_labels(y, 0, top, p) for (_, y), p in zip(batches, train_paths, strict=True)]
    )
    test_images, test_labels = _read_cifar_batch(test_path, label_key)
    test = (test_images, _check_labels(test_labels, 0, top, test_path))
    return _assemble(key, [x for x, _ in batches], labels, test, num_classes, seed, val_fraction)


def _read_npz(path: Path, keys: tuple[str, ...]) -> list[np.ndarray]:
    """The arrays ``keys`` of one ImageNet32 npz batch (only these are decompressed)."""
    try:
        # Our own handle: np.load leaks the one it opens when the zip is corrupt.
        with open(path, "rb") as f, np.load(f) as npz:
            arrays = [np.asarray(npz[k]) for k in keys]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(
            f"{path}: not an ImageNet32 npz batch with arrays {', '.join(keys)} "
            f"({type(error).__name__}: {error})"
        ) from error
    if "data" in keys:
        data = arrays[keys.index("data")]
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(
                f"{path}: expected uint8 data (N, 3072), got {data.dtype} {data.shape}"
            )
        arrays[keys.index("data")] = data.reshape(-1, 3, 32, 32)  # stored channel-major
    return arrays


def _assemble(
    name: str,
    train_chunks: Iterable[np.ndarray],
    train_labels: np.ndarray,
    test: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    seed: int,
    val_fraction: float,
) -> DataSplits:
    """Carve val from the training images and build the splits, copying each image only once.

    ``train_chunks`` yields the training images in file order, a file at a time;
    each chunk is written straight to its rows in one (train then val) buffer, so
    ImageNet32's 3.9 GB never needs a second copy. Train and val are views of that buffer.
    """
    train_idx, val_idx = _carve_val(train_labels, val_fraction, seed)
    n = len(train_labels)
    position = np.empty(n, dtype=np.int64)
    position[np.concatenate([train_idx, val_idx])] = np.arange(n)
    buffer, start = None, 0
    for chunk in train_chunks:
        if buffer is None:
            buffer = torch.empty((n, *chunk.shape[1:]), dtype=torch.uint8)
        rows = torch.from_numpy(position[start : start + len(chunk)])
        buffer[rows] = torch.from_numpy(chunk)
        start += len(chunk)
    labels = torch.from_numpy(train_labels)
    test_x, test_y = test
    return DataSplits(
        name,
        train=Split(buffer[: len(train_idx)], labels[train_idx]),
        val=Split(buffer[len(train_idx) :], labels[val_idx]),
        test=Split(torch.from_numpy(np.ascontiguousarray(test_x)), torch.from_numpy(test_y)),
        num_classes=num_classes,
    )


def _carve_val(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) indices; val is stratified, each class giving its share to within one.

    Each class is shuffled by ``seed`` and its samples ranked; taking the samples with
    the smallest within-class quantile walks every class at the same pace. Unlike
    scikit-learn's stratified split this also works when val has fewer images than classes.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    n = len(labels)
    if n < 2:
        raise ValueError(f"need at least 2 training images to carve a validation split, got {n}")
    n_val = min(max(round(val_fraction * n), 1), n - 1)
    shuffled = np.random.default_rng(seed).permutation(n)
    _, cls, counts = np.unique(labels[shuffled], return_inverse=True, return_counts=True)
    by_class = np.argsort(cls, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[by_class] = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
    quantile = (rank + 0.5) / counts[cls]
    in_val = np.zeros(n, dtype=bool)
    in_val[shuffled[np.argsort(quantile, kind="stable")[:n_val]]] = True
    return np.flatnonzero(~in_val), np.flatnonzero(in_val)


def load_mnist(
    data_dir: str | Path, seed: int = 0, download: bool = False, val_fraction: float = VAL_FRACTION
) -> DataSplits:
    """MNIST as uint8 (sample, 1, 28, 28): 54,000 train, 6,000 val, 10,000 test by default."""
    return _load_idx_set("mnist", data_dir, seed, download, val_fraction)


def load_fashion_mnist(
    data_dir: str | Path, seed: int = 0, download: bool = False, val_fraction: float = VAL_FRACTION
) -> DataSplits:
    """Fashion-MNIST, the same format and sizes as MNIST: 10 clothing classes."""
    return _load_idx_set("fashion-mnist", data_dir, seed, download, val_fraction)


def load_cifar10(
    data_dir: str | Path, seed: int = 0, download: bool = False, val_fraction: float = VAL_FRACTION
) -> DataSplits:
    """CIFAR-10 as uint8 (sample, 3, 32, 32): 45,000 train, 5,000 val, 10,000 test by default."""
    return _load_cifar_set("cifar10", data_dir, seed, download, val_fraction)


def load_cifar100(
    data_dir: str | Path, seed: int = 0, download: bool = False, val_fraction: float = VAL_FRACTION
) -> DataSplits:
    """CIFAR-100 with its 100 fine labels, split like CIFAR-10."""
    return _load_cifar_set("cifar100", data_dir, seed, download, val_fraction)


def load_imagenet32(
    data_dir: str | Path, seed: int = 0, download: bool = False, val_fraction: float = VAL_FRACTION
) -> DataSplits:
    """ImageNet 32x32 (Chrabaszcz et al. 2017) as uint8 (sample, 3, 32, 32), labels 0-999.

    The official val_data.npz is the test split; val is carved from the 1.28M
    training images. The images take 3.9 GB; labels are read first so every batch
    is copied straight into place. ``download=True`` cannot help (ImageNet's terms).
    """
    *train_paths, test_path = _locate("imagenet32", data_dir, download)
    # The npz files store labels 1-1000.
    labels = [_check_labels(_read_npz(p, ("labels",))[0], 1, 1000, p) - 1 for p in train_paths]

    def chunks() -> Iterator[np.ndarray]:
        for path, y in zip(train_paths, labels, strict=True):
            (data,) = _read_npz(path, ("data",))
            if len(data) != len(y):
                raise ValueError(f"{path}: {len(data)} images but {len(y)} labels")
            yield data

    test_x, test_y = _read_npz(test_path, ("data", "labels"))
    if len(test_x) != len(test_y):
        raise ValueError(f"{test_path}: {len(test_x)} images but {len(test_y)} labels")
    test = (test_x, _check_labels(test_y, 1, 1000, test_path) - 1)
    return _assemble("imagenet32", chunks(), np.concatenate(labels), test, 1000, seed, val_fraction)


def imagenet_eval_transform() -> Callable:
    """The standard ImageNet evaluation transform: resize to 256, centre-crop 224, normalise."""
    from torchvision import transforms

    mean, std = NORMALISATION["imagenet"]
    return transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def _class_folders(folder: Path) -> list[str]:
    """Names of the class subfolders of an ImageFolder tree."""
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir())


def load_imagenet_folder(
    data_dir: str | Path,
    seed: int = 0,
    download: bool = False,
    val_fraction: float = VAL_FRACTION,
    transform: Callable | None = None,
) -> dict[str, ImageFolder]:
    """ImageNet as lazy torchvision ImageFolder datasets ``{"train", "val", "test"}``.

    1.28M full-size JPEGs do not fit :class:`DataSplits`' in-memory tensors, so each
    split decodes its images on access, through ``transform`` (default
    :func:`imagenet_eval_transform`: resize 256, centre-crop 224, normalise; pass a
    training transform for augmentation). ``val`` is carved from ``train/`` by
    ``seed``; ``test`` is the official ``val/`` tree. Wrap any of them in a DataLoader.
    """
    train_dir, test_dir = _locate("imagenet", data_dir, download)
    from torchvision.datasets import ImageFolder  # after the check: a missing set fails fast

    train_classes, test_classes = _class_folders(train_dir), _class_folders(test_dir)
    if not test_classes:
        raise ValueError(
            f"{test_dir} holds no class folders: the official validation tar unpacks flat; "
            "torchvision.datasets.ImageNet(<folder>, split='val') sorts it into <wnid>/ folders"
        )
    if train_classes != test_classes:
        only = sorted(set(train_classes) ^ set(test_classes))[:5]
        raise ValueError(
            f"{train_dir} and {test_dir} must hold the same class folders so labels agree; "
            f"{len(set(train_classes) ^ set(test_classes))} differ, e.g. {only}"
        )
    transform = transform if transform is not None else imagenet_eval_transform()
    full_train = ImageFolder(str(train_dir), transform=transform)
    train_idx, val_idx = _carve_val(np.asarray(full_train.targets), val_fraction, seed)

    def subset(indices: np.ndarray) -> ImageFolder:
        # A shallow copy keeps classes, class_to_idx, loader and transform; only the samples differ.
        part = ImageFolder.__new__(ImageFolder)
        part.__dict__.update(full_train.__dict__)
        part.samples = [full_train.samples[i] for i in indices]
        part.imgs = part.samples
        part.targets = [target for _, target in part.samples]
        return part

    return {
        "train": subset(train_idx),
        "val": subset(val_idx),
        "test": ImageFolder(str(test_dir), transform=transform),
    }


_IN_MEMORY_LOADERS: dict[str, Callable[..., DataSplits]] = {
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "imagenet32": load_imagenet32,
}


def load_vision_dataset(
    name: str,
    data_dir: str | Path,
    seed: int = 0,
    download: bool = False,
    val_fraction: float = VAL_FRACTION,
) -> DataSplits:
    """Load the in-memory image data set ``name`` from ``data_dir``, val split fixed by ``seed``.

    ``imagenet`` is listed in :data:`VISION_DATASETS` but is too large for in-memory
    splits; it raises a ValueError pointing to :func:`load_imagenet_folder`.
    """
    if name == "imagenet":
        raise ValueError(
            "imagenet does not fit in-memory DataSplits (1.28M full-size images); "
            "use load_imagenet_folder(data_dir, ...), which returns lazy ImageFolder datasets"
        )
    if name not in _IN_MEMORY_LOADERS:
        raise ValueError(f"vision dataset must be one of {list(VISION_DATASETS)}, got {name!r}")
    return _IN_MEMORY_LOADERS[name](
        data_dir, seed=seed, download=download, val_fraction=val_fraction
    )
