"""Data order and augmentation randomness that survive interruption and sharding.

Every random choice of an epoch is a pure function of ``(seed, epoch)`` and
the sample's dataset index, never of the process, the worker or the position
in the epoch:

- :class:`ResumableSampler` is a ``DistributedSampler`` (so ``set_epoch``
  shuffles as usual and each torchrun rank takes its shard) that can start
  after the first k batches of an epoch, and hands each index the seed of its
  augmentation;
- :class:`SeededDataset` applies the transforms under that seed;
- :class:`DeviceCifarLoader` keeps CIFAR on the GPU as uint8 and draws the
  crop offsets and flips of the whole epoch at once, per dataset index.

So a run stopped mid-epoch and resumed sees exactly the batches, crops and
flips it would have seen, with any number of loader workers.
"""
import math

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler, Sampler

from .distributed import Context


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 1_000_000_007 + index * 7919) % (2 ** 63)


class ResumableSampler(DistributedSampler):
    """Shuffled, sharded indices paired with per-sample augmentation seeds."""

    def __init__(self, dataset, ctx: Context, seed: int, batch_size: int):
        super().__init__(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed)
        self.batch_size = batch_size
        self.skip = 0

    def start_at(self, epoch: int, step: int) -> None:
        """Begin ``epoch`` after its first ``step`` batches (0: from the start)."""
        self.set_epoch(epoch)
        self.skip = step * self.batch_size

    def __iter__(self):
        for index in list(super().__iter__())[self.skip:]:
            yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return max(self.num_samples - self.skip, 0)

    def steps(self) -> int:
        """Batches in a whole epoch of this rank."""
        return math.ceil(self.num_samples / self.batch_size)


class SeededDataset(Dataset):
    """Runs the wrapped dataset's random transforms under a given seed."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class ShardSampler(Sampler):
    """Every world_size-th index from rank on: val shards without padding, so
    summed statistics over ranks are exact per-example averages."""

    def __init__(self, length: int, ctx: Context):
        self.indices = range(ctx.rank, length, ctx.world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def crop_flip(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor,
              padding: int = 4) -> torch.Tensor:
    """Batched ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip`` with given draws.

    ``images`` is ``(N, C, H, W)``; sample n is zero-padded by ``padding``,
    cropped at ``(top[n], left[n])`` back to ``H x W`` and mirrored where
    ``flip[n]``, exactly as torchvision does on a PIL image (fill 0) for the
    same draws. One gather for the whole batch.
    """
    n, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    rows = top[:, None] + torch.arange(h, device=images.device)
    cols = left[:, None] + torch.arange(w, device=images.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


class DeviceCifarLoader:
    """CIFAR training batches made on the GPU: no DataLoader, no PIL.

    Holds the uint8 images (50k x 3 x 32 x 32 = 150 MB) on the device;
    per batch it gathers, crops and flips in a few tensor ops and yields uint8
    pixels, normalised by the engine like every loader's
    (:class:`utils.data.DeviceNormalize`).
    The crop offsets (uniform in [0, 2*padding]) and flips (p = 0.5) of the
    epoch are drawn per dataset index from a generator seeded by
    ``(seed, epoch)``: the distribution of torchvision's pipeline.
    """

    def __init__(self, images_hwc_uint8, labels, sampler: ResumableSampler, device, padding: int = 4,
                 augment: bool = True):
        self.images = torch.as_tensor(images_hwc_uint8).permute(0, 3, 1, 2).contiguous().to(device)
        self.augment = augment  # False: the plain images (DSR's --no-augment)
        self.labels = torch.as_tensor(labels, dtype=torch.long).to(device)
        self.sampler = sampler
        self.padding = padding
        self.device = device

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.sampler.batch_size)

    def __iter__(self):
        n = self.images.shape[0]
        g = torch.Generator().manual_seed(sample_seed(self.sampler.seed, self.sampler.epoch, -1))
        top = torch.randint(0, 2 * self.padding + 1, (n,), generator=g).to(self.device)
        left = torch.randint(0, 2 * self.padding + 1, (n,), generator=g).to(self.device)
        flip = (torch.rand(n, generator=g) < 0.5).to(self.device)
        order = torch.tensor([index for index, _ in self.sampler], dtype=torch.long, device=self.device)
        for batch in order.split(self.sampler.batch_size):
            if not self.augment:
                yield self.images[batch], self.labels[batch]
                continue
            yield crop_flip(self.images[batch], top[batch], left[batch], flip[batch], self.padding), self.labels[batch]
