"""Tests for utils/data.py: CIFAR, image-folder trees and the dummy data.

The CIFAR tests write tiny datasets in the real on-disk pickle format and read
them through the real torchvision classes. torchvision 0.29 checks each file
against the md5 of the official release (``torchvision.datasets.cifar``
imports ``check_integrity`` and calls it for every batch and the meta file),
so the ``no_md5`` fixture replaces that one function with a plain existence
check; the corrupt-data tests run without it.
"""

import os
import pickle
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
from PIL import Image
from torchvision import transforms

from utils import data
from utils.data import (
    CIFAR_STATS,
    DATASETS,
    DeviceNormalize,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_STATS,
    SyntheticImages,
    build_datasets,
)
from utils.errors import UsageError

PER_BATCH = 4  # CIFAR-10 images per data_batch_i, so 20 train images
VAL_SIZE = 6

# ----------------------------------------------------------------- fixtures


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _images(n, seed):
    # Values 1..255 so the zero padding of RandomCrop is recognisable.
    return np.random.default_rng(seed).integers(1, 256, size=(n, 3072), dtype=np.uint8)


def write_cifar10(root):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        labels = [(i + j) % 10 for j in range(PER_BATCH)]
        _pickle(folder / f"data_batch_{i}", {"data": _images(PER_BATCH, i), "labels": labels})
    _pickle(folder / "test_batch", {"data": _images(VAL_SIZE, 0), "labels": list(range(VAL_SIZE))})
    _pickle(folder / "batches.meta", {"label_names": [f"class{c}" for c in range(10)]})
    return folder


def write_cifar100(root):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n, seed in (("train", 12, 1), ("test", VAL_SIZE, 0)):
        fine = [(7 * j + seed) % 100 for j in range(n)]
        _pickle(folder / name, {"data": _images(n, seed), "fine_labels": fine, "coarse_labels": [f // 5 for f in fine]})
    _pickle(folder / "meta", {"fine_label_names": [f"f{c}" for c in range(100)],
                              "coarse_label_names": [f"c{c}" for c in range(20)]})
    return folder


@pytest.fixture
def no_md5(monkeypatch):
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


@pytest.fixture
def no_network(monkeypatch):
    """Make any download fail at once, even on a machine with a network."""

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def write_tree(root, splits=("train", "val"), classes=("cat", "dog", "fish")):
    """A tiny image-folder tree with images of mixed sizes, modes and formats."""
    sizes = [(40, 30), (17, 64), (300, 260)]
    for split in splits:
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k, size in enumerate(sizes):
                img = Image.new("RGB", size, (40 * c, 100 + 20 * k, 200))
                ext = "png" if k % 2 else "jpg"
                img.convert("L" if k == 2 else "RGB").save(folder / f"img{k}.{ext}")
    return root


def assert_one_line_mentions(err, *parts):
    msg = str(err.value)
    assert "\n" not in msg
    for part in parts:
        assert str(part) in msg, msg


# -------------------------------------------------------------------- CIFAR


@pytest.mark.usefixtures("no_md5")
@pytest.mark.parametrize("name, classes, train_len", [("cifar10", 10, 5 * PER_BATCH), ("cifar100", 100, 12)])
def test_cifar_loads_through_torchvision(tmp_path, name, classes, train_len):
    folder = (write_cifar10 if classes == 10 else write_cifar100)(tmp_path)
    train, val, num_classes = build_datasets(name, str(tmp_path), download=False)
    assert num_classes == classes
    assert (len(train), len(val)) == (train_len, VAL_SIZE)
    for ds in (train, val):
        labels = [ds[i][1] for i in range(len(ds))]
        assert all(isinstance(y, int) and 0 <= y < classes for y in labels)
        assert ds[0][0].shape == (3, 32, 32) and ds[0][0].dtype == torch.uint8

    # The val image is the raw pixels; on the device they are scaled and normalised with the CIFAR stats.
    raw_name = "test_batch" if classes == 10 else "test"
    with open(folder / raw_name, "rb") as f:
        raw = pickle.load(f)["data"][0].reshape(3, 32, 32)
    assert torch.equal(val[0][0], torch.from_numpy(raw))
    mean, std = (np.array(s).reshape(3, 1, 1) for s in CIFAR_STATS[classes])
    expected = torch.from_numpy((raw.astype(np.float64) / 255 - mean) / std).float()
    normalized = DeviceNormalize(name, torch.device("cpu"))(val[0][0][None])[0]
    torch.testing.assert_close(normalized, expected)


@pytest.mark.usefixtures("no_md5")
def test_cifar_train_transform_crops_and_flips(tmp_path):
    write_cifar10(tmp_path)
    train, _, _ = build_datasets("cifar10", str(tmp_path), download=False)
    torch.manual_seed(0)
    draws = [train[0][0] for _ in range(20)]
    assert all(d.shape == (3, 32, 32) and d.dtype == torch.uint8 for d in draws)
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    # RandomCrop(padding=4) shows the zero padding along some edge, which the image itself lacks.
    def has_padding(img):
        return any((edge == 0).all() for edge in (img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]))

    assert not has_padding(torch.from_numpy(train.data[0]).permute(2, 0, 1))
    assert any(has_padding(d) for d in draws)


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_device_normalize_is_torchvisions_arithmetic(dataset, channels_last, device):
    """Pixels normalised on the device equal ToTensor + Normalize of the same image, bit for bit,
    in the batch's memory format; float (synthetic) batches pass through untouched."""
    g = torch.Generator().manual_seed(0)
    channels = 1 if dataset == "mnist" else 3
    pixels = torch.randint(0, 256, (4, channels, 9, 7), dtype=torch.uint8, generator=g)
    pixels[0, :, 0, 0] = torch.tensor([0, 255, 128][:channels], dtype=torch.uint8)
    mean, std = CIFAR_STATS[100] if dataset == "cifar100" else CIFAR_STATS[10] if dataset == "cifar10" else (
        MNIST_STATS if dataset == "mnist" else (IMAGENET_MEAN, IMAGENET_STD))
    reference = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    # A one-channel image is PIL's mode L, which fromarray makes of an (H, W) array.
    expected = torch.stack([reference(Image.fromarray(p.permute(1, 2, 0).squeeze(-1).numpy())) for p in pixels])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    normalize = DeviceNormalize(dataset, device)
    out = normalize(pixels.to(device, memory_format=fmt))
    assert out.dtype == torch.float32 and out.device == device and out.is_contiguous(memory_format=fmt)
    assert torch.equal(out.cpu(), expected)
    ready = torch.randn(2, 3, 4, 4, device=device)
    assert normalize(ready) is ready


@pytest.mark.parametrize("download", [False, True])
@pytest.mark.usefixtures("no_network")
def test_missing_cifar_is_a_usage_error(tmp_path, download):
    root = tmp_path / "nowhere"
    with pytest.raises(UsageError) as err:
        build_datasets("cifar10", str(root), download=download)
    assert_one_line_mentions(err, root, "cifar-10-batches-py", "--dummy", "--data-dir")
    assert ("download failed" in str(err.value)) == download
    assert not root.exists()  # a failed download leaves no empty folder behind


@pytest.mark.usefixtures("no_network")
def test_missing_cifar100_reports_its_own_folder(tmp_path):
    with pytest.raises(UsageError) as err:
        build_datasets("cifar100", str(tmp_path), download=True)
    assert_one_line_mentions(err, "CIFAR-100", "cifar-100-python", "no network in tests")


def test_corrupt_cifar_is_a_usage_error(tmp_path):
    # The tiny files are not the official ones, so the real md5 check rejects them.
    write_cifar10(tmp_path)
    with pytest.raises(UsageError) as err:
        build_datasets("cifar10", str(tmp_path), download=False)
    assert_one_line_mentions(err, "corrupt", tmp_path / "cifar-10-batches-py", "--dummy")


@pytest.mark.usefixtures("no_md5", "no_network")
def test_partial_cifar_is_a_usage_error(tmp_path):
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(UsageError) as err:
        build_datasets("cifar10", str(tmp_path), download=True)
    assert_one_line_mentions(err, "incomplete", "data_batch_3", "download failed", "--dummy")


@pytest.mark.usefixtures("no_md5")
def test_num_classes_must_match_real_data(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(UsageError, match="--num-classes 7"):
        build_datasets("cifar10", str(tmp_path), num_classes=7, download=False)


# ------------------------------------------------------------- image folders


@pytest.mark.parametrize("kind, size", [("folder", 32), ("imagenet", 224)])
def test_image_folder_kinds(tmp_path, kind, size):
    write_tree(tmp_path)
    train, val, num_classes = build_datasets(kind, str(tmp_path))
    assert num_classes == 3
    assert (len(train), len(val)) == (9, 9)
    for ds in (train, val):
        for i in range(len(ds)):
            image, label = ds[i]
            assert image.shape == (3, size, size) and 0 <= label < 3


def test_folder_val_is_normalised_with_imagenet_stats(tmp_path):
    colour = (10, 128, 250)
    for split in ("train", "val"):
        (tmp_path / split / "flat").mkdir(parents=True)
        Image.new("RGB", (50, 40), colour).save(tmp_path / split / "flat" / "img.png")
    _, val, num_classes = build_datasets("folder", str(tmp_path))
    assert num_classes == 1
    # A flat colour stays flat through Resize and CenterCrop, so every pixel
    # is the colour, normalised on the device with the ImageNet statistics.
    assert torch.equal(val[0][0], torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1).expand(3, 32, 32))
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, IMAGENET_MEAN, IMAGENET_STD)])
    normalized = DeviceNormalize("folder", torch.device("cpu"))(val[0][0][None])[0]
    torch.testing.assert_close(normalized, expected.view(3, 1, 1).expand(3, 32, 32))


def test_broken_image_is_not_skipped(tmp_path):
    write_tree(tmp_path)
    (tmp_path / "val" / "cat" / "broken.png").write_bytes(b"not a png")
    _, val, _ = build_datasets("folder", str(tmp_path))
    assert len(val) == 10
    broken = next(i for i, (path, _) in enumerate(val.samples) if path.endswith("broken.png"))
    with pytest.raises(Exception, match="cannot identify image file"):
        val[broken]


def test_missing_folder(tmp_path):
    with pytest.raises(UsageError) as err:
        build_datasets("folder", str(tmp_path / "absent"))
    assert_one_line_mentions(err, tmp_path / "absent", "does not exist", "--dummy")
    with pytest.raises(UsageError, match="needs --data-dir"):
        build_datasets("imagenet", None)


def test_folder_without_val(tmp_path):
    write_tree(tmp_path, splits=("train",))
    with pytest.raises(UsageError) as err:
        build_datasets("imagenet", str(tmp_path))
    assert_one_line_mentions(err, tmp_path / "val", "does not exist")


@pytest.mark.parametrize("layout", ["empty class", "no class folders", "only non-images"])
def test_folder_without_images(tmp_path, layout):
    write_tree(tmp_path, splits=("val",))
    train = tmp_path / "train"
    if layout == "empty class":
        write_tree(tmp_path, splits=("train",), classes=("cat", "dog"))
        (train / "fish").mkdir()
    elif layout == "no class folders":
        train.mkdir()
    else:
        (train / "cat").mkdir(parents=True)
        (train / "cat" / "notes.txt").write_text("hello")
    with pytest.raises(UsageError) as err:
        build_datasets("folder", str(tmp_path))
    assert_one_line_mentions(err, "no images found", train)


def test_train_val_class_mismatch(tmp_path):
    write_tree(tmp_path, splits=("train",), classes=("cat", "dog", "fish"))
    write_tree(tmp_path, splits=("val",), classes=("cat", "dog", "bird"))
    with pytest.raises(UsageError) as err:
        build_datasets("folder", str(tmp_path))
    assert_one_line_mentions(err, tmp_path / "train", tmp_path / "val", "only in train: fish", "only in val: bird")


def test_unknown_dataset_name():
    with pytest.raises(UsageError, match="cifar10, cifar100, folder, imagenet, mnist"):
        build_datasets("svhn", None)


# ---------------------------------------------------------------- dummy data


@pytest.mark.parametrize("name, num_classes, expected", [
    ("cifar10", None, (32, 10, 512, 256)),
    ("cifar100", None, (32, 100, 512, 256)),
    ("folder", None, (32, 10, 512, 256)),
    ("folder", 4, (32, 4, 512, 256)),
    ("imagenet", None, (224, 1000, 64, 32)),
    ("imagenet", 5, (224, 5, 64, 32)),
])
def test_dummy_shapes(tmp_path, name, num_classes, expected):
    size, classes, train_len, val_len = expected
    absent = tmp_path / "absent"
    train, val, found = build_datasets(name, str(absent), dummy=True, num_classes=num_classes)
    assert not absent.exists()  # no disk access at all
    assert found == classes
    assert isinstance(train, SyntheticImages) and isinstance(val, SyntheticImages)
    assert (len(train), len(val)) == (train_len, val_len)
    for ds in (train, val):
        for i in (0, len(ds) - 1):
            image, label = ds[i]
            assert image.shape == (3, size, size) and image.dtype == torch.float32
            assert isinstance(label, int) and 0 <= label < classes


def test_dummy_is_deterministic():
    train, val, _ = build_datasets("cifar10", None, dummy=True)
    again, _, _ = build_datasets("cifar10", None, dummy=True)
    for i in (0, 7, 511):
        assert torch.equal(train[i][0], train[i][0]) and train[i][1] == train[i][1]
        assert torch.equal(train[i][0], again[i][0]) and train[i][1] == again[i][1]
    assert not torch.equal(train[0][0], val[0][0])
    with pytest.raises(IndexError):
        train[512]
    assert sum(1 for _ in val) == 256  # plain iteration stops


def test_dummy_is_learnable():
    train, val, classes = build_datasets("cifar10", None, dummy=True)
    images = torch.stack([train[i][0] for i in range(len(train))])
    labels = torch.tensor([train[i][1] for i in range(len(train))])
    assert set(labels.tolist()) == set(range(classes))
    # Roughly normalised, like real inputs after Normalize.
    assert abs(images.mean().item()) < 0.5 and 0.5 < images.std().item() < 2
    means = torch.stack([images[labels == c].mean(0) for c in range(classes)]).flatten(1)
    gaps = torch.cdist(means, means) + torch.eye(classes) * 1e9
    assert gaps.min().item() > 10  # class means far apart (noise per pixel is 0.5)
    # The train class means classify the val samples almost perfectly.
    val_images = torch.stack([val[i][0] for i in range(len(val))]).flatten(1)
    val_labels = torch.tensor([val[i][1] for i in range(len(val))])
    predicted = torch.cdist(val_images, means).argmin(1)
    assert (predicted == val_labels).float().mean().item() > 0.95


def test_dummy_num_classes_checks():
    with pytest.raises(UsageError, match="10 classes"):
        build_datasets("cifar10", None, dummy=True, num_classes=100)
    with pytest.raises(UsageError, match="at least 1"):
        build_datasets("folder", None, dummy=True, num_classes=0)
    assert build_datasets("cifar100", None, dummy=True, num_classes=100)[2] == 100


def test_dataset_names():
    """The command lines' names (utils.cli, no torchvision) are the readers' (utils.data)."""
    assert DATASETS == ("cifar10", "cifar100", "folder", "imagenet", "mnist") == tuple(data._KINDS)
