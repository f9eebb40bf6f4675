"""MNIST in utils/data.py: torchvision's MNIST layout (DIR/MNIST/raw, the four idx files, plain or
gzipped) with DSR's preprocessing (ToTensor + Normalize((0.1307,), (0.3081,)), no augmentation), and
its --dummy stand-in. The tests write tiny data sets in the real idx format."""
import gzip

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from models import build_model, default_arch
from utils.data import DATASETS, MNIST_FILES, MNIST_STATS, DeviceNormalize, build_datasets, read_idx
from utils.errors import UsageError

SIZES = {True: 12, False: 5}  # train, test


def idx_bytes(array: np.ndarray) -> bytes:
    """An idx file of unsigned bytes: magic 0x0000080N, N big-endian uint32 sizes, the data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(root, compressed=False, sizes=SIZES):
    folder = root / "MNIST" / "raw"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = {}
    for train, (image_name, label_name) in MNIST_FILES.items():
        images = rng.integers(0, 256, (sizes[train], 28, 28), dtype=np.uint8)
        labels = np.arange(sizes[train], dtype=np.uint8) % 10
        for name, array in ((image_name, images), (label_name, labels)):
            raw = idx_bytes(array)
            if compressed:
                (folder / (name + ".gz")).write_bytes(gzip.compress(raw))
            else:
                (folder / name).write_bytes(raw)
        data[train] = (images, labels)
    return folder, data


def one_line(err, *parts):
    message = str(err.value)
    assert "\n" not in message, message
    for part in parts:
        assert str(part) in message, message


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gz"])
def test_mnist_loads_in_torchvisions_layout(tmp_path, compressed):
    _, data = write_mnist(tmp_path, compressed)
    train, val, num_classes = build_datasets("mnist", str(tmp_path))
    assert num_classes == 10 and (len(train), len(val)) == (SIZES[True], SIZES[False])
    for dataset, train_split in ((train, True), (val, False)):
        images, labels = data[train_split]
        for i in range(len(dataset)):
            x, y = dataset[i]
            assert x.dtype == torch.uint8 and x.shape == (1, 28, 28) and isinstance(y, int)
            assert torch.equal(x[0], torch.from_numpy(images[i])) and y == labels[i]
    # No augmentation (DSR's code has none for MNIST): a training item is the same every time.
    assert all(torch.equal(train[3][0], train[3][0]) for _ in range(5))
    # On the device: ToTensor + Normalize((0.1307,), (0.3081,)) of the PIL image, bit for bit.
    reference = transforms.Compose([transforms.ToTensor(), transforms.Normalize(*MNIST_STATS)])
    batch = torch.stack([val[i][0] for i in range(len(val))])
    expected = torch.stack([reference(Image.fromarray(data[False][0][i])) for i in range(len(val))])
    assert MNIST_STATS == ((0.1307,), (0.3081,))
    assert torch.equal(DeviceNormalize("mnist", torch.device("cpu"))(batch), expected)


def test_mnist_feeds_lenet(tmp_path):
    write_mnist(tmp_path)
    train, _, num_classes = build_datasets("mnist", str(tmp_path))
    batch = torch.stack([train[i][0] for i in range(4)])
    model = build_model(default_arch("lenet300_100", num_classes, 0.1, net="hc"))
    out = model(DeviceNormalize("mnist", torch.device("cpu"))(batch))
    assert out.shape == (4, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("missing", [name for names in MNIST_FILES.values() for name in names])
def test_a_missing_mnist_file_is_one_line(tmp_path, missing):
    folder, _ = write_mnist(tmp_path)
    (folder / missing).unlink()
    with pytest.raises(UsageError) as err:
        build_datasets("mnist", str(tmp_path))
    one_line(err, folder / missing, "--data-dir", "--dummy", "download=True")


def test_no_mnist_folder_is_one_line(tmp_path):
    with pytest.raises(UsageError) as err:
        build_datasets("mnist", str(tmp_path / "nowhere"))
    one_line(err, tmp_path / "nowhere" / "MNIST" / "raw" / "train-images-idx3-ubyte", "--data-dir")
    assert not (tmp_path / "nowhere").exists()  # nothing is created or downloaded


@pytest.mark.parametrize("damage, message", [
    ("magic", "not an MNIST idx file"),
    ("truncated", "truncated or damaged"),
    ("count", "the two files of a split must match"),
    ("label", "MNIST's are 0-9"),
    ("size", "not MNIST's 28x28"),
    ("gzip", "unreadable"),
])
def test_damaged_mnist_is_one_line(tmp_path, damage, message):
    folder, data = write_mnist(tmp_path)
    images_path, labels_path = (folder / name for name in MNIST_FILES[True])
    if damage == "magic":
        raw = bytearray(images_path.read_bytes())
        raw[2] = 0x0D  # float data
        images_path.write_bytes(bytes(raw))
    elif damage == "truncated":
        images_path.write_bytes(images_path.read_bytes()[:-10])
    elif damage == "count":
        labels_path.write_bytes(idx_bytes(data[True][1][:-1]))
    elif damage == "label":
        labels = data[True][1].copy()
        labels[0] = 10
        labels_path.write_bytes(idx_bytes(labels))
    elif damage == "size":
        images_path.write_bytes(idx_bytes(np.zeros((SIZES[True], 32, 32), dtype=np.uint8)))
    else:
        images_path.unlink()
        (folder / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UsageError) as err:
        build_datasets("mnist", str(tmp_path))
    one_line(err, message, folder)


def test_read_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(array))
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(array)))
    for name in ("a", "a.gz"):
        assert torch.equal(read_idx(str(tmp_path / name), 3), torch.from_numpy(array))
    with pytest.raises(UsageError, match="1-d"):
        read_idx(str(tmp_path / "a"), 1)


def test_dummy_mnist():
    assert "mnist" in DATASETS
    train, val, num_classes = build_datasets("mnist", None, dummy=True)
    assert num_classes == 10 and (len(train), len(val)) == (512, 256)
    x, y = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= y < 10
    assert DeviceNormalize("mnist", torch.device("cpu"))(x[None]) is not None
    with pytest.raises(UsageError, match="10 classes"):
        build_datasets("mnist", None, dummy=True, num_classes=100)
    # The three-channel stand-ins are unchanged by the channel count's new parameter.
    cifar = build_datasets("cifar10", None, dummy=True)[0][0][0]
    assert cifar.shape == (3, 32, 32)
