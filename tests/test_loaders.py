"""The image loaders read each data set's published on-disk format, written here in miniature."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from policycascade.data import vision
from policycascade.data.vision import (
    NORMALISATION,
    VISION_DATASETS,
    load_cifar10,
    load_imagenet_folder,
    load_vision_dataset,
    to_float,
    write_cifar_batch,
)

IN_MEMORY = ("mnist", "fashion-mnist", "cifar10", "cifar100", "imagenet32")
N_TRAIN, N_TEST = 20, 10


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    """IDX: magic (0, 0, 0x08 = unsigned byte, ndim), big-endian int32 sizes, then the bytes."""
    magic = 0x0800 + array.ndim  # 2051 for images, 2049 for labels
    header = b"".join(int(v).to_bytes(4, "big") for v in (magic, *array.shape))
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def write_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """An ImageNet32 batch: data uint8 (N, 3072) channel-major, labels 1-based."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, data=images.reshape(len(images), -1), labels=(labels + 1).tolist())


def fake_dataset(name: str, root: Path, seed: int = 0):
    """Write ``name`` in its exact format under ``root``; return the (0-based) arrays written."""
    rng = np.random.default_rng(seed)
    shape = (1, 28, 28) if "mnist" in name else (3, 32, 32)
    num_classes = {"cifar100": 100, "imagenet32": 1000}.get(name, 10)
    train_x = rng.integers(0, 256, (N_TRAIN, *shape), dtype=np.uint8)
    test_x = rng.integers(0, 256, (N_TEST, *shape), dtype=np.uint8)
    # Two images of each of ten classes, the top class included to check the label range.
    classes = np.linspace(0, num_classes - 1, 10).astype(np.int64)
    train_y, test_y = np.repeat(classes, 2), rng.permutation(classes)
    if name in ("mnist", "fashion-mnist"):
        raw = root / ("MNIST" if name == "mnist" else "FashionMNIST") / "raw"
        gz = name == "fashion-mnist"  # torchvision keeps the .gz files; accept them alone
        write_idx(raw / "train-images-idx3-ubyte", train_x[:, 0], gz)
        write_idx(raw / "train-labels-idx1-ubyte", train_y, gz)
        write_idx(raw / "t10k-images-idx3-ubyte", test_x[:, 0], gz)
        write_idx(raw / "t10k-labels-idx1-ubyte", test_y, gz)
    elif name == "cifar10":
        for i in range(5):
            part = slice(4 * i, 4 * i + 4)
            path = root / "cifar-10-batches-py" / f"data_batch_{i + 1}"
            write_cifar_batch(path, train_x[part], train_y[part], b"labels")
        write_cifar_batch(root / "cifar-10-batches-py" / "test_batch", test_x, test_y, b"labels")
    elif name == "cifar100":
        write_cifar_batch(root / "cifar-100-python" / "train", train_x, train_y, b"fine_labels")
        write_cifar_batch(root / "cifar-100-python" / "test", test_x, test_y, b"fine_labels")
    elif name == "imagenet32":
        for i in range(10):
            part = slice(2 * i, 2 * i + 2)
            path = root / "imagenet32" / f"train_data_batch_{i + 1}.npz"
            write_npz(path, train_x[part], train_y[part])
        write_npz(root / "imagenet32" / "val_data.npz", test_x, test_y)
    return train_x, train_y, test_x, test_y, num_classes


def row_ids(images: torch.Tensor, originals: np.ndarray) -> list[int]:
    """Index in ``originals`` of every image (the random images are all distinct)."""
    index = {img.tobytes(): i for i, img in enumerate(originals)}
    return [index[img.numpy().tobytes()] for img in images]


@pytest.mark.parametrize("name", IN_MEMORY)
def test_loader_returns_the_written_images_and_labels(name, tmp_path):
    train_x, train_y, test_x, test_y, num_classes = fake_dataset(name, tmp_path)
    data = load_vision_dataset(name, tmp_path)
    assert data.name == name and data.num_classes == num_classes
    assert data.input_shape == train_x.shape[1:]
    for split in (data.train, data.val, data.test):
        assert split.x.dtype == torch.uint8 and split.y.dtype == torch.int64
    assert len(data.val) == round(vision.VAL_FRACTION * N_TRAIN)
    assert len(data.train) + len(data.val) == N_TRAIN
    # The test split is the official test file, untouched and in order.
    assert torch.equal(data.test.x, torch.from_numpy(test_x))
    assert torch.equal(data.test.y, torch.from_numpy(test_y))
    # Train and val are disjoint, together give the training file, and keep each label.
    train_ids = row_ids(data.train.x, train_x)
    val_ids = row_ids(data.val.x, train_x)
    assert not set(train_ids) & set(val_ids)
    assert sorted(train_ids + val_ids) == list(range(N_TRAIN))
    assert data.train.y.tolist() == train_y[train_ids].tolist()
    assert data.val.y.tolist() == train_y[val_ids].tolist()


@pytest.mark.parametrize("name", IN_MEMORY)
def test_same_seed_same_split_different_seed_different(name, tmp_path):
    train_x = fake_dataset(name, tmp_path)[0]
    first, again, other = (load_vision_dataset(name, tmp_path, seed=s) for s in (0, 0, 1))
    assert row_ids(first.val.x, train_x) == row_ids(again.val.x, train_x)
    assert torch.equal(first.train.x, again.train.x)
    assert row_ids(first.val.x, train_x) != row_ids(other.val.x, train_x)


def test_val_fraction_is_configurable_and_stratified(tmp_path):
    _, train_y, *_ = fake_dataset("cifar10", tmp_path)
    data = load_cifar10(tmp_path, val_fraction=0.5)
    # Two images per class: a stratified half holds exactly one of each.
    assert sorted(data.val.y.tolist()) == sorted(set(train_y.tolist()))
    assert sorted(data.train.y.tolist()) == sorted(set(train_y.tolist()))


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_val_fraction_outside_zero_one_is_rejected(fraction, tmp_path):
    fake_dataset("cifar10", tmp_path)
    with pytest.raises(ValueError, match="val_fraction"):
        load_cifar10(tmp_path, val_fraction=fraction)


def test_files_directly_in_data_dir_are_found(tmp_path):
    fake_dataset("mnist", tmp_path)
    flat = tmp_path / "MNIST" / "raw"
    assert len(load_vision_dataset("mnist", flat).test) == N_TEST


@pytest.mark.parametrize("name", VISION_DATASETS)
def test_missing_dataset_error_names_folder_files_and_remedy(name, tmp_path):
    layout = vision._LAYOUTS[name]
    loader = load_imagenet_folder if name == "imagenet" else vision._IN_MEMORY_LOADERS[name]
    with pytest.raises(FileNotFoundError) as error:
        loader(tmp_path / "nowhere")
    message = str(error.value)
    assert str(tmp_path / "nowhere" / layout.folder) in message
    assert layout.files[0] in message and layout.files[-1] in message
    assert "--data-dir" in message
    if name.startswith("imagenet"):
        assert "image-net.org" in message
    else:
        assert "--download" in message  # the CLI flag, as a user types it


def test_missing_single_file_is_named(tmp_path):
    fake_dataset("cifar10", tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing: data_batch_3\."):
        load_cifar10(tmp_path)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a data file")


@pytest.mark.parametrize(
    ("name", "relative", "damage"),
    [
        ("mnist", "MNIST/raw/train-images-idx3-ubyte", _truncate),
        ("mnist", "MNIST/raw/t10k-labels-idx1-ubyte", _garbage),
        ("fashion-mnist", "FashionMNIST/raw/train-labels-idx1-ubyte.gz", _truncate),
        ("cifar10", "cifar-10-batches-py/data_batch_2", _truncate),
        ("cifar100", "cifar-100-python/test", _garbage),
        ("imagenet32", "imagenet32/train_data_batch_4.npz", _garbage),
        ("imagenet32", "imagenet32/val_data.npz", _truncate),
    ],
)
def test_corrupt_file_raises_value_error_naming_it(name, relative, damage, tmp_path):
    fake_dataset(name, tmp_path)
    damage(tmp_path / relative)
    with pytest.raises(ValueError) as error:
        load_vision_dataset(name, tmp_path)
    assert str(tmp_path / relative) in str(error.value)


def test_wrong_pickle_keys_and_label_range_are_reported(tmp_path):
    fake_dataset("cifar10", tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    images = np.zeros((4, 3, 32, 32), dtype=np.uint8)
    write_cifar_batch(folder / "data_batch_1", images, np.zeros(4, np.int64), b"fine_labels")
    with pytest.raises(ValueError, match="data_batch_1.*b'labels'"):
        load_cifar10(tmp_path)
    write_cifar_batch(folder / "data_batch_1", images, np.array([0, 1, 2, 10]), b"labels")
    with pytest.raises(ValueError, match=r"data_batch_1: labels must lie in \[0, 9\]"):
        load_cifar10(tmp_path)


def test_mismatched_idx_counts_are_reported(tmp_path):
    fake_dataset("mnist", tmp_path)
    write_idx(tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte", np.zeros(N_TEST - 1, np.uint8))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte holds 10 images"):
        load_vision_dataset("mnist", tmp_path)


def test_download_goes_through_torchvision_into_its_folder(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            fake_dataset("cifar10", Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    assert len(load_cifar10(tmp_path, download=True).test) == N_TEST
    assert calls == [(str(tmp_path), True, True)]
    load_cifar10(tmp_path, download=True)  # already there: no second download
    assert len(calls) == 1


def test_failed_download_says_where_to_copy_the_files(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(root, train, download):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(RuntimeError, match="network is unreachable.*MNIST/raw"):
        load_vision_dataset("mnist", tmp_path, download=True)


def test_imagenet32_download_is_refused_with_instructions(tmp_path):
    with pytest.raises(FileNotFoundError, match="no automatic download.*image-net.org"):
        load_vision_dataset("imagenet32", tmp_path, download=True)


def test_to_float_normalises_each_channel():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 2, 1, 2)
    out = to_float(x, (0.5, 0.0), (0.5, 0.25))
    assert out.dtype == torch.float32 and out.shape == (1, 2, 1, 2)
    assert torch.allclose(out[0, 0, 0], torch.tensor([-1.0, 1.0]))
    assert torch.allclose(out[0, 1, 0], torch.tensor([0.0, 4.0]))
    with pytest.raises(ValueError, match="one value per channel"):
        to_float(x, (0.5,), (0.5,))


def test_normalisation_has_one_value_per_channel_for_every_dataset():
    assert set(NORMALISATION) == set(VISION_DATASETS)
    for name, (mean, std) in NORMALISATION.items():
        channels = 1 if "mnist" in name else 3
        assert len(mean) == len(std) == channels
        assert all(0 < m < 1 for m in mean) and all(0 < s < 1 for s in std)


def test_dispatcher_names_the_choices_and_points_imagenet_to_the_folder_loader(tmp_path):
    with pytest.raises(ValueError, match="cifar10"):
        load_vision_dataset("svhn", tmp_path)
    with pytest.raises(ValueError, match="load_imagenet_folder"):
        load_vision_dataset("imagenet", tmp_path)


COLOURS = {"n01440764": (200, 30, 90), "n01443537": (10, 240, 128), "n01484850": (90, 90, 250)}


def write_image_folder(root: Path, per_class: dict[str, int]) -> None:
    """Solid-colour JPEGs in ``root/<wnid>/``, like an unpacked ImageNet split."""
    for wnid, count in per_class.items():
        (root / wnid).mkdir(parents=True)
        for i in range(count):
            image = Image.new("RGB", (40, 30), COLOURS[wnid])
            image.save(root / wnid / f"{wnid}_{i}.JPEG", quality=95)


def test_imagenet_folder_is_lazy_eval_transformed_and_split(tmp_path):
    root = tmp_path / "imagenet"
    write_image_folder(root / "train", dict.fromkeys(COLOURS, 4))
    write_image_folder(root / "val", dict.fromkeys(COLOURS, 2))
    splits = load_imagenet_folder(tmp_path, val_fraction=0.25)
    assert set(splits) == {"train", "val", "test"}
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (9, 3, 6)
    assert splits["train"].classes == sorted(COLOURS)
    train_files = {p for p, _ in splits["train"].samples}
    val_files = {p for p, _ in splits["val"].samples}
    assert not train_files & val_files
    assert train_files | val_files == {str(p) for p in (root / "train").rglob("*.JPEG")}
    assert sorted(splits["val"].targets) == [0, 1, 2]  # stratified: one of each class
    image, label = splits["test"][0]
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32
    wnid = splits["test"].classes[label]
    mean, std = NORMALISATION["imagenet"]
    expected = [(c / 255 - m) / s for c, m, s in zip(COLOURS[wnid], mean, std, strict=True)]
    assert torch.allclose(image.mean((1, 2)), torch.tensor(expected), atol=0.05)
    again = load_imagenet_folder(tmp_path, val_fraction=0.25)
    assert again["val"].samples == splits["val"].samples


def test_imagenet_folder_rejects_flat_or_mismatched_val(tmp_path):
    root = tmp_path / "imagenet"
    write_image_folder(root / "train", dict.fromkeys(COLOURS, 2))
    (root / "val").mkdir()
    Image.new("RGB", (8, 8)).save(root / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(ValueError, match="no class folders"):
        load_imagenet_folder(tmp_path)
    write_image_folder(root / "val", {"n01440764": 1})
    with pytest.raises(ValueError, match="same class folders"):
        load_imagenet_folder(tmp_path)
