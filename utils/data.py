"""Datasets for the training scripts.

:func:`build_datasets` is the single entry point. It turns a dataset name and a
directory into ``(train_set, val_set, num_classes)``:

* ``cifar10`` / ``cifar100``: torchvision's CIFAR readers, downloaded on demand;
* ``mnist``: torchvision's MNIST reader on ``DIR/MNIST/raw/`` (the four idx files, plain or
  ``.gz``), never downloaded; DSR's preprocessing (ToTensor + Normalize(0.1307, 0.3081), no
  augmentation);
* ``folder``: any ``DIR/train/<class>/*`` + ``DIR/val/<class>/*`` image tree,
  brought to CIFAR's 32x32 so the CIFAR models can train on it;
* ``imagenet``: the same tree layout with the usual 224x224 ImageNet pipeline;
* ``dummy=True``: :class:`SyntheticImages`, learnable data of the right shape
  that touches no disk, for trying the code without any dataset.

Real images leave the datasets as uint8 ``(C, H, W)`` pixels (C = 3; 1 for MNIST), augmented but
not yet normalised: :class:`DeviceNormalize` scales and normalises whole
batches after the copy to the device (see there for why).

Every user mistake (missing or damaged data, a bad folder tree) raises
:class:`~utils.errors.UsageError` with a one-line message naming the path and
the fix.
"""

import contextlib
import copy
import gzip
import os
import tarfile
import zlib
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import transforms
from torchvision.datasets import CIFAR10, CIFAR100, MNIST, ImageFolder
from torchvision.datasets.utils import download_and_extract_archive

from utils.cli import DATASETS
from utils.errors import UsageError

# Per-channel statistics of the training images, keyed by number of classes.
CIFAR_STATS = MappingProxyType({
    10: (
        (125.3 / 255, 123.0 / 255, 113.9 / 255),
        (63.0 / 255, 62.1 / 255, 66.7 / 255),
    ),
    100: (
        (129.3 / 255, 124.1 / 255, 112.4 / 255),
        (68.2 / 255, 65.4 / 255, 70.4 / 255),
    ),
})
# MNIST's (mean, std) as DSR's code (and torchvision's MNIST example) normalises it.
MNIST_STATS = ((0.1307,), (0.3081,))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Where CIFAR is looked for (and downloaded to) when no directory is given.
DEFAULT_DATA_DIR = "./data"

_DUMMY_HINT = "or try the code without data with --dummy"


@dataclass(frozen=True)
class _Kind:
    """What differs between the dataset names."""

    image_size: int
    # The dataset's class count; for the folder kinds only the default of the
    # synthetic stand-in, as real trees count their class folders.
    num_classes: int
    # (1000 train, 100 val) would make a dummy ImageNet epoch take minutes on
    # a CPU, so the 224x224 stand-in is kept much smaller than the CIFAR one.
    dummy_sizes: tuple[int, int]
    cifar_reader: type[CIFAR10] | None = None
    title: str = ""
    # Per-channel (mean, std) of the pixels scaled to [0, 1].
    stats: tuple[tuple[float, ...], tuple[float, ...]] = (IMAGENET_MEAN, IMAGENET_STD)
    channels: int = 3
    # The data set has its own class count (CIFAR, MNIST), which --num-classes cannot change.
    fixed_classes: bool = False


# The one place that maps dataset names (utils.cli.DATASETS, in its order) to everything about them.
_KINDS = MappingProxyType({
    "cifar10": _Kind(32, 10, (512, 256), CIFAR10, "CIFAR-10", CIFAR_STATS[10], fixed_classes=True),
    "cifar100": _Kind(32, 100, (512, 256), CIFAR100, "CIFAR-100", CIFAR_STATS[100], fixed_classes=True),
    "folder": _Kind(32, 10, (512, 256)),
    "imagenet": _Kind(224, 1000, (64, 32)),
    "mnist": _Kind(28, 10, (512, 256), None, "MNIST", MNIST_STATS, channels=1, fixed_classes=True),
})


def build_datasets(
    dataset: str,
    data_dir: str | None,
    *,
    dummy: bool = False,
    num_classes: int | None = None,
    download: bool = True,
    augment: bool = True,
) -> tuple[Dataset, Dataset, int]:
    """Return ``(train_set, val_set, num_classes)`` for a dataset name.

    ``dataset`` is one of :data:`DATASETS`. ``data_dir`` is the CIFAR or MNIST root
    (default ``./data``) or the root of a ``train/`` + ``val/`` image tree.
    ``dummy=True`` returns synthetic data without touching the disk; there
    ``num_classes`` sets the class count of the folder kinds. For real data a
    given ``num_classes`` must match the data. ``download`` lets a missing CIFAR
    be fetched from the internet. ``augment=False`` trains CIFAR on the plain images (no random
    crop or flip: DSR's ``--no-augment``); the other data sets ignore it.
    """
    kind = _KINDS.get(dataset)
    if kind is None:
        raise UsageError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    if dummy:
        return _build_dummy(dataset, kind, num_classes)
    if dataset == "mnist":
        train_set, val_set = _build_mnist(data_dir)
        where = _mnist_folder(data_dir)
    elif kind.cifar_reader is not None:
        train_set, val_set = _build_cifar(kind, data_dir, download, augment)
        where = os.path.join(_cifar_root(data_dir), kind.cifar_reader.base_folder)
    else:
        train_set, val_set = _build_folder(dataset, data_dir)
        where = data_dir
    found = len(train_set.classes)
    if num_classes is not None and num_classes != found:
        raise UsageError(
            f"--num-classes {num_classes} does not match the {found} classes of {where}: "
            "drop --num-classes or point --data-dir at the intended data"
        )
    return train_set, val_set, found


# DSR's --validate-set: the last images of its training set held out for validation (main.py: split_dataset).
HELD_OUT = MappingProxyType({"cifar10": 5000, "cifar100": 5000, "mnist": 10000, "imagenet": 10000})


def hold_out(dataset: str, train_set: Dataset, val_set: Dataset, *, dummy: bool = False) -> tuple[Dataset, Dataset]:
    """DSR's ``--validate-set``: ``(train, held_out)``, the training set's first N - k images and its
    last k (CIFAR 5,000, MNIST 10,000, ImageNet 10,000, by dataset index as the code's split; a
    tenth of ``--dummy``'s). The held-out images get the evaluation transform (``val_set``'s); the
    code's keep the training augmentation. Other data sets are refused (one line)."""
    n = len(train_set)
    if dummy:
        k = n // 10
    elif dataset in HELD_OUT:
        k = HELD_OUT[dataset]
    else:
        raise UsageError(f"--validate-set: DSR's code holds out part of CIFAR, MNIST and ImageNet only, not "
                         f"--dataset {dataset}")
    if not 0 < k < n:
        raise UsageError(f"--validate-set holds out {k} images, and the training set has {n}")
    if dummy or not hasattr(train_set, "transform"):
        return Subset(train_set, range(n - k)), Subset(train_set, range(n - k, n))
    train, held = copy.copy(train_set), copy.copy(train_set)
    for name in ("data", "targets", "samples", "imgs"):
        values = getattr(train_set, name, None)
        if values is not None:
            setattr(train, name, values[:n - k])
            setattr(held, name, values[n - k:])
    held.transform = val_set.transform
    return train, held


class DeviceNormalize:
    """The model's input from a batch of uint8 pixels, computed on the device.

    The loaders hand over real images as uint8 rather than normalised float32:
    a quarter of the bytes through the workers' shared memory, the pinned
    buffers and the host-to-device copy, and no float arithmetic in the
    workers (1.2-1.3x the images/s of float32 batches with 1-2 loader
    processes on a 2-core CPU, ``bench/input_pipeline.py``). The arithmetic is
    torchvision's ``ToTensor`` + ``Normalize``, elementwise and in the same
    order (``x / 255``, ``- mean``, ``/ std``, in float32), so the model sees
    the same values bit for bit. The memory format of the batch is kept.
    ``--dummy`` batches are already normalised floats and pass through
    unchanged.
    """

    def __init__(self, dataset: str, device: torch.device):
        mean, std = _KINDS[dataset].stats
        self.device = device
        # 255 as a tensor on the device: CUDA divides by a CPU scalar through
        # its reciprocal, which can differ from ToTensor's division in the last bit.
        self.max_value = torch.tensor(255.0, device=device)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images
        return images.float().div_(self.max_value).sub_(self.mean).div_(self.std)


# --------------------------------------------------------------------- dummy


class SyntheticImages(Dataset):
    """Deterministic, learnable stand-in images, already normalised.

    Sample ``i`` of a split is a pure function of ``(split, i)``: its own
    seeded generator draws the label and the noise, so items are reproducible
    in any order and in any DataLoader worker without stored state. The image
    is a smooth class pattern (a random 4x4 colour grid seeded by the label
    alone, hence shared by the splits) plus Gaussian noise, so a model can
    learn the classes and what it learns on ``train`` carries over to ``val``.
    """

    def __init__(self, split: str, length: int, num_classes: int, image_size: int, noise: float = 0.5,
                 channels: int = 3):
        self.split = split
        self.length = length
        self.num_classes = num_classes
        self.image_size = image_size
        self.noise = noise
        self.channels = channels

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # Without this bound, iterating the dataset directly would never stop.
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        gen = _generator(f"{self.split}/{index}")
        label = int(torch.randint(self.num_classes, (), generator=gen))
        size = self.image_size
        noise = torch.randn(self.channels, size, size, generator=gen)
        return self._pattern(label) + self.noise * noise, label

    def _pattern(self, label: int) -> torch.Tensor:
        # Recomputed per item instead of cached: 1000 ImageNet-sized patterns
        # would take 600 MB, while one is a cheap interpolation of 48 numbers.
        grid = torch.randn(1, self.channels, 4, 4, generator=_generator(f"class/{label}"))
        size = (self.image_size, self.image_size)
        return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[0]


def _generator(key: str) -> torch.Generator:
    # crc32, unlike hash(), gives the same seed in every process.
    return torch.Generator().manual_seed(zlib.crc32(key.encode()))


def _build_dummy(dataset: str, kind: _Kind, num_classes: int | None) -> tuple[Dataset, Dataset, int]:
    if num_classes is None:
        num_classes = kind.num_classes
    elif kind.fixed_classes and num_classes != kind.num_classes:
        raise UsageError(
            f"--num-classes {num_classes} does not fit {dataset}, which has {kind.num_classes} classes: "
            "drop --num-classes or use --dataset folder"
        )
    elif num_classes < 1:
        raise UsageError(f"--num-classes must be at least 1, got {num_classes}")
    train_len, val_len = kind.dummy_sizes
    train_set = SyntheticImages("train", train_len, num_classes, kind.image_size, channels=kind.channels)
    val_set = SyntheticImages("val", val_len, num_classes, kind.image_size, channels=kind.channels)
    return train_set, val_set, num_classes


# --------------------------------------------------------------------- CIFAR


def _cifar_root(data_dir: str | None) -> str:
    return os.path.expanduser(data_dir or DEFAULT_DATA_DIR)


def _cifar_transforms(augment: bool = True) -> tuple[transforms.Compose, transforms.Compose]:
    if not augment:
        return transforms.PILToTensor(), transforms.PILToTensor()
    train = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.PILToTensor(),
    ])
    return train, transforms.PILToTensor()


def _build_cifar(kind: _Kind, data_dir: str | None, download: bool,
                 augment: bool = True) -> tuple[CIFAR10, CIFAR10]:
    """Read CIFAR from ``data_dir``, downloading it first if it is missing."""
    root = _cifar_root(data_dir)
    folder = os.path.join(root, kind.cifar_reader.base_folder)
    try:
        return _read_cifar(kind, root, augment)
    # torchvision checks every file's md5 before unpickling it, so missing and
    # damaged data both surface as RuntimeError; OSError is an unreadable file.
    except (RuntimeError, OSError) as err:
        problem = _describe_cifar_problem(kind, root, err)
    fix = f"put the dataset there, point --data-dir at it, {_DUMMY_HINT}"
    if not download:
        raise UsageError(f"{problem} and downloading is off: {fix}")
    try:
        _download_cifar(kind, root)
    except (OSError, RuntimeError, tarfile.TarError) as err:
        raise UsageError(f"{problem} and the download failed ({_reason(err)}): {fix}") from err
    try:
        return _read_cifar(kind, root, augment)
    except (RuntimeError, OSError) as err:
        raise UsageError(
            f"{kind.title} in {folder} is unreadable even after downloading it ({_reason(err)}): "
            f"delete {folder} and run again, {_DUMMY_HINT}"
        ) from err


def _download_cifar(kind: _Kind, root: str) -> None:
    reader = kind.cifar_reader
    created = not os.path.exists(root)
    try:
        download_and_extract_archive(reader.url, root, filename=reader.filename, md5=reader.tgz_md5)
    except Exception:
        # torchvision creates root before downloading; a failed attempt should
        # not leave an empty folder behind (a mistyped --data-dir, say).
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(root)
        raise


def _read_cifar(kind: _Kind, root: str, augment: bool = True) -> tuple[CIFAR10, CIFAR10]:
    train_tf, val_tf = _cifar_transforms(augment)
    train_set = kind.cifar_reader(root, train=True, transform=train_tf, download=False)
    val_set = kind.cifar_reader(root, train=False, transform=val_tf, download=False)
    return train_set, val_set


def _describe_cifar_problem(kind: _Kind, root: str, err: Exception) -> str:
    """Say whether CIFAR is absent, incomplete or damaged, for the error line."""
    reader = kind.cifar_reader
    folder = os.path.join(root, reader.base_folder)
    if not os.path.isdir(folder):
        return f"{kind.title} not found in {root} (expected {folder})"
    files = [name for name, _ in reader.train_list + reader.test_list] + [reader.meta["filename"]]
    missing = [name for name in files if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        return f"{kind.title} in {folder} is incomplete (missing {', '.join(missing)})"
    if isinstance(err, RuntimeError):
        return f"{kind.title} in {folder} is corrupt (a file fails its md5 check)"
    return f"{kind.title} in {folder} is unreadable ({_reason(err)})"


def _reason(err: Exception) -> str:
    """The gist of an exception, short enough for a one-line message."""
    # URLError keeps the useful part ("Name or service not known") in .reason.
    text = str(getattr(err, "reason", None) or err).strip()
    first_line = text.splitlines()[0] if text else type(err).__name__
    return first_line[:120]


# --------------------------------------------------------------------- MNIST

# Each split's (images, labels) file in torchvision's MNIST/raw folder; either may be gzipped.
MNIST_FILES = MappingProxyType({
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
})
_MNIST_FILE_LIST = ", ".join(name for names in MNIST_FILES.values() for name in names)


def _mnist_folder(data_dir: str | None) -> str:
    return os.path.join(os.path.expanduser(data_dir or DEFAULT_DATA_DIR), "MNIST", "raw")


def _idx_file(folder: str, name: str) -> str | None:
    """The file ``name`` or ``name.gz`` in ``folder`` (the plain one first), or None."""
    for candidate in (name, name + ".gz"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def read_idx(path: str, ndim: int) -> torch.Tensor:
    """An idx file of unsigned bytes with ``ndim`` dimensions (MNIST's format: magic 0x0000080N,
    then N big-endian uint32 sizes, then the bytes), plain or gzipped; a damaged file is a one-line
    :class:`UsageError`."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise UsageError(f"MNIST file {path} is unreadable ({_reason(err)}): replace it, {_DUMMY_HINT}") from err
    header = 4 + 4 * ndim
    if len(data) < header or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
        raise UsageError(f"{path} is not an MNIST idx file of {ndim}-d unsigned bytes (its header is wrong): "
                         f"replace it, {_DUMMY_HINT}")
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    size = 1
    for n in shape:
        size *= n
    if len(data) != header + size:
        raise UsageError(f"MNIST file {path} holds {len(data) - header} bytes of data where its header says "
                         f"{size} (truncated or damaged): replace it, {_DUMMY_HINT}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header).view(*shape)


class _MnistReader(MNIST):
    """torchvision's MNIST (its items: a PIL 'L' image through ``transform``, an int label) reading
    ``root/MNIST/raw`` with each idx file plain or gzipped (torchvision itself reads only the
    unpacked files its download leaves)."""

    @property
    def raw_folder(self) -> str:
        return os.path.join(self.root, "MNIST", "raw")

    @property
    def processed_folder(self) -> str:
        return os.path.join(self.root, "MNIST", "processed")

    def _check_exists(self) -> bool:
        return all(_idx_file(self.raw_folder, name) for names in MNIST_FILES.values() for name in names)

    def _load_data(self):
        image_name, label_name = MNIST_FILES[self.train]
        images = read_idx(_idx_file(self.raw_folder, image_name), 3)
        labels = read_idx(_idx_file(self.raw_folder, label_name), 1)
        where = os.path.join(self.raw_folder, image_name)
        if images.shape[1:] != (28, 28):
            raise UsageError(f"{where} holds {images.shape[1]}x{images.shape[2]} images, not MNIST's 28x28")
        if len(images) != len(labels):
            raise UsageError(f"{where} holds {len(images)} images but {label_name} {len(labels)} labels: "
                             "the two files of a split must match")
        if len(labels) and int(labels.max()) > 9:
            raise UsageError(f"{os.path.join(self.raw_folder, label_name)} has a label {int(labels.max())}; "
                             "MNIST's are 0-9")
        return images, labels.long()


def _build_mnist(data_dir: str | None) -> tuple[MNIST, MNIST]:
    """Read MNIST from ``data_dir/MNIST/raw`` (default ./data); a missing file is a one-line UsageError."""
    folder = _mnist_folder(data_dir)
    for names in MNIST_FILES.values():
        for name in names:
            if _idx_file(folder, name) is None:
                raise UsageError(f"MNIST not found: {os.path.join(folder, name)}[.gz] does not exist; put MNIST's "
                                 f"four idx files ({_MNIST_FILE_LIST}, plain or .gz) in {folder} "
                                 "(torchvision.datasets.MNIST(DIR, download=True) writes them in DIR/MNIST/raw) and "
                                 f"point --data-dir at DIR, {_DUMMY_HINT}")
    root = os.path.dirname(os.path.dirname(folder))
    # DSR's preprocessing: no augmentation; ToTensor + Normalize happen on the device (DeviceNormalize).
    to_pixels = transforms.PILToTensor()
    return (_MnistReader(root, train=True, transform=to_pixels, download=False),
            _MnistReader(root, train=False, transform=to_pixels, download=False))


# ---------------------------------------------------------- image-folder trees


def _folder_transforms(dataset: str) -> tuple[transforms.Compose, transforms.Compose]:
    if dataset == "imagenet":
        train = [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip()]
        val = [transforms.Resize(256), transforms.CenterCrop(224)]
    else:
        # Any image becomes a 32x32 square first, then gets CIFAR's augmentation.
        to_32 = [transforms.Resize(32), transforms.CenterCrop(32)]
        train = to_32 + [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
        val = to_32
    to_pixels = transforms.PILToTensor()
    return transforms.Compose(train + [to_pixels]), transforms.Compose(val + [to_pixels])


def _build_folder(dataset: str, data_dir: str | None) -> tuple[ImageFolder, ImageFolder]:
    """Read ``data_dir/train`` and ``data_dir/val`` as ImageFolder trees."""
    layout = "a folder with train/<class>/<image> and val/<class>/<image>"
    if data_dir is None:
        raise UsageError(f"--dataset {dataset} needs --data-dir: point it at {layout}, {_DUMMY_HINT}")
    root = os.path.expanduser(data_dir)
    if not os.path.isdir(root):
        raise UsageError(f"dataset folder {root} does not exist: point --data-dir at {layout}, {_DUMMY_HINT}")
    train_tf, val_tf = _folder_transforms(dataset)
    train_set = _read_image_folder(os.path.join(root, "train"), train_tf)
    val_set = _read_image_folder(os.path.join(root, "val"), val_tf)
    if train_set.classes != val_set.classes:
        raise UsageError(
            f"class folders differ between {train_set.root} and {val_set.root} "
            f"(only in train: {_names(set(train_set.classes) - set(val_set.classes))}; "
            f"only in val: {_names(set(val_set.classes) - set(train_set.classes))}): "
            "give both splits the same class folders"
        )
    return train_set, val_set


def _read_image_folder(path: str, transform: transforms.Compose) -> ImageFolder:
    if not os.path.isdir(path):
        raise UsageError(f"{path} does not exist: the dataset folder needs train/<class>/ and val/<class>/ subfolders")
    try:
        return ImageFolder(path, transform=transform, loader=_load_image)
    except FileNotFoundError as err:
        # ImageFolder's own text ends in a long list of extensions; keep its first sentence.
        reason = str(err).split(". ")[0].rstrip(".")
        raise UsageError(
            f"no images found in {path} ({reason}): put images (.jpg, .png, ...) in one subfolder per class"
        ) from err


def _load_image(path: str):
    """PIL's loader, but an image that fails to decode stops the run with its
    file name (a dataset with broken files should be fixed, not trained on
    with silently fewer images)."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise UsageError(f"cannot decode image {path} ({err}); remove or replace the file") from err


def _names(names: set[str], limit: int = 5) -> str:
    """A short, sorted listing of class names for an error line."""
    ordered = sorted(names)
    shown = ", ".join(ordered[:limit]) or "none"
    return shown + (f" and {len(ordered) - limit} more" if len(ordered) > limit else "")
