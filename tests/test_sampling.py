"""Tests for utils/sampling.py: resumable, sharded data order and per-sample augmentation.

* :func:`crop_flip` against torchvision's PIL pipeline (pad with 0, crop, mirror)
  for every one of the 81 crop offsets and both flips;
* :class:`DeviceCifarLoader`: the distribution of its draws (offsets uniform in
  0..8, flips ~50%), read back from the images it produces, and its per-epoch
  determinism; then the ``--loader device`` path through the real engine on a
  tiny fake CIFAR-10 (on the CPU);
* :class:`ResumableSampler`: resuming after k batches yields exactly the tail of
  the epoch, per-sample seeds depend only on (seed, epoch, index), rank shards,
  reshuffling per epoch;
* :class:`SeededDataset` and :class:`ShardSampler`;
* ``--amp`` (bf16 autocast on the CPU) and ``--channels-last`` runs.

The engine runs in-process (``engine.cli.main``), as the scripts call it.
"""
import json
import math
import os

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

import train_resnet56
import train_vgg
import engine.trainer as engine
from engine import cli
from utils.distributed import Context
from conftest import write_fake_cifar10
from utils.sampling import (DeviceCifarLoader, ResumableSampler, SeededDataset, ShardSampler, crop_flip,
                            sample_seed)

PAD = 4
OFFSETS = 2 * PAD + 1  # 9 crop positions per axis


# ------------------------------------------------------------------ crop_flip


def _torchvision_crop_flip(image_chw_uint8, top, left, flip, padding=PAD):
    """torchvision on a PIL image: pad(fill=0) + crop + hflip, back to a CHW uint8 tensor."""
    _, h, w = image_chw_uint8.shape
    pil = Image.fromarray(image_chw_uint8.permute(1, 2, 0).numpy())
    pil = TF.pad(pil, padding, fill=0)
    pil = TF.crop(pil, top, left, h, w)
    if flip:
        pil = TF.hflip(pil)
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1)


@pytest.mark.parametrize("size", [(32, 32), (7, 12)], ids=["32x32", "7x12"])
def test_crop_flip_matches_torchvision_pil(size, device):
    h, w = size
    combos = [(t, l, f) for t in range(OFFSETS) for l in range(OFFSETS) for f in (False, True)]
    assert len(combos) == 162
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (len(combos), 3, h, w), dtype=torch.uint8, generator=g)
    top = torch.tensor([c[0] for c in combos])
    left = torch.tensor([c[1] for c in combos])
    flip = torch.tensor([c[2] for c in combos])
    out = crop_flip(images.to(device), top.to(device), left.to(device), flip.to(device), PAD).cpu()
    assert out.shape == images.shape and out.dtype == torch.uint8
    for n, (t, l, f) in enumerate(combos):
        expected = _torchvision_crop_flip(images[n], t, l, f)
        assert torch.equal(out[n], expected), f"top {t} left {l} flip {f}"


def test_crop_flip_matches_torchvision_random_transforms():
    """The same draws as torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip."""
    g = torch.Generator().manual_seed(1)
    images = torch.randint(1, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    for n in range(len(images)):
        torch.manual_seed(100 + n)
        pil = Image.fromarray(images[n].permute(1, 2, 0).numpy())
        top, left, _, _ = transforms.RandomCrop.get_params(TF.pad(pil, PAD), (32, 32))
        flip = bool(torch.rand(1) < 0.5)
        torch.manual_seed(100 + n)
        pipeline = transforms.Compose([transforms.RandomCrop(32, padding=PAD), transforms.RandomHorizontalFlip()])
        expected = torch.from_numpy(np.array(pipeline(pil))).permute(2, 0, 1)
        ours = crop_flip(images[n:n + 1], torch.tensor([top]), torch.tensor([left]), torch.tensor([flip]))[0]
        assert torch.equal(ours, expected), n


# --------------------------------------------------------- DeviceCifarLoader


class _Indexable:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def _coordinate_images(n):
    """HWC uint8 images whose channel 0 holds row+1, channel 1 col+1, channel 2 the index mod 251 + 1,
    so the crop offset, the flip and the source image can be read back from any output."""
    rows = torch.arange(1, 33, dtype=torch.uint8)[:, None].expand(32, 32)
    cols = torch.arange(1, 33, dtype=torch.uint8)[None, :].expand(32, 32)
    images = torch.empty(n, 32, 32, 3, dtype=torch.uint8)
    images[..., 0] = rows
    images[..., 1] = cols
    images[..., 2] = (torch.arange(n) % 251 + 1).to(torch.uint8)[:, None, None]
    return images.numpy()


def _device_loader(n, seed, batch_size=256, ctx=Context(), device=torch.device("cpu")):
    sampler = ResumableSampler(_Indexable(n), ctx, seed, batch_size)
    loader = DeviceCifarLoader(_coordinate_images(n), list(range(n)), sampler, device)
    return loader, sampler


def _decode(images, labels):
    """(index, top, left, flip) of every output image of a DeviceCifarLoader batch."""
    assert images.dtype == torch.uint8
    pix = images.long()
    centre = pix[:, :, 16, 16]  # always inside the image: |offset - 4| <= 4
    row, col = centre[:, 0] - 1, centre[:, 1] - 1
    flip = pix[:, 1, 16, 17] < pix[:, 1, 16, 16]
    top = row - 16 + PAD
    # Unflipped, output column j reads padded column left + j; flipped, left + 31 - j.
    left = torch.where(flip, col - 15 + PAD, col - 16 + PAD)
    assert torch.equal(centre[:, 2], labels % 251 + 1), "an image does not belong to its label"
    # Full check of every pixel against crop_flip with the decoded draws.
    return labels, top, left, flip


def _epoch_draws(loader, sampler, epoch):
    sampler.start_at(epoch, 0)
    batches = [(x.cpu(), y.cpu()) for x, y in loader]
    out = [_decode(x, y) for x, y in batches]
    return batches, [torch.cat(parts) for parts in zip(*out)]


def test_device_loader_draw_distribution(device):
    n = 18_000
    loader, sampler = _device_loader(n, seed=7, batch_size=2000, device=device)
    batches, (index, top, left, flip) = _epoch_draws(loader, sampler, epoch=0)
    assert sorted(index.tolist()) == list(range(n)), "an epoch visits every image once"
    assert len(batches) == len(loader) == math.ceil(n / 2000)
    if device.type != "cpu":  # the draws are made on the CPU: the same batches on any device
        cpu_batches, _ = _epoch_draws(*_device_loader(n, seed=7, batch_size=2000), epoch=0)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, cpu_batches))
    # Every output is crop_flip of its source with the decoded draws (the decoding is exact).
    images = torch.as_tensor(_coordinate_images(n)).permute(0, 3, 1, 2)
    x, y = batches[0]
    first = y.shape[0]
    redo = crop_flip(images[index[:first]], top[:first], left[:first], flip[:first])
    assert torch.equal(x, redo)

    for name, values in (("top", top), ("left", left)):
        counts = torch.bincount(values, minlength=OFFSETS)
        assert counts.numel() == OFFSETS, f"{name} outside 0..8: {counts}"
        expected = n / OFFSETS
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 40, f"{name} offsets not uniform over 0..8: {counts.tolist()} (chi2 {chi2:.1f}, 8 dof)"
        assert (counts - expected).abs().max() < 0.1 * expected, counts.tolist()
    assert abs(flip.float().mean().item() - 0.5) < 0.02, flip.float().mean()
    # The crop and the flip are drawn independently: flips ~50% at every offset.
    for t in range(OFFSETS):
        assert abs(flip[top == t].float().mean().item() - 0.5) < 0.08
    # The joint distribution covers all 81 offsets.
    assert torch.unique(top * OFFSETS + left).numel() == OFFSETS * OFFSETS


def test_device_loader_is_deterministic_per_epoch():
    n = 600
    loader_a, sampler_a = _device_loader(n, seed=3, batch_size=128)
    loader_b, sampler_b = _device_loader(n, seed=3, batch_size=128)
    batches_a, draws_a = _epoch_draws(loader_a, sampler_a, epoch=2)
    batches_b, draws_b = _epoch_draws(loader_b, sampler_b, epoch=2)
    assert len(batches_a) == len(batches_b) == 5
    for (xa, ya), (xb, yb) in zip(batches_a, batches_b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # The same loader again on the same epoch: the same batches.
    batches_again, _ = _epoch_draws(loader_a, sampler_a, epoch=2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches_a, batches_again))
    # Another epoch: another order and other draws for the same images.
    _, draws_c = _epoch_draws(loader_a, sampler_a, epoch=3)
    assert not torch.equal(draws_a[0], draws_c[0]), "same order in two epochs"
    by_index_a = {name: torch.empty(n, dtype=torch.long) for name in ("top", "left", "flip")}
    by_index_c = {name: torch.empty(n, dtype=torch.long) for name in ("top", "left", "flip")}
    for store, (index, top, left, flip) in ((by_index_a, draws_a), (by_index_c, draws_c)):
        store["top"][index], store["left"][index], store["flip"][index] = top, left, flip.long()
    for name in ("top", "left", "flip"):
        assert not torch.equal(by_index_a[name], by_index_c[name]), f"same {name} draws in two epochs"
    # Another seed: another order.
    loader_d, sampler_d = _device_loader(n, seed=4, batch_size=128)
    _, draws_d = _epoch_draws(loader_d, sampler_d, epoch=2)
    assert not torch.equal(draws_a[0], draws_d[0])


def test_device_loader_resumes_mid_epoch_and_shards():
    """Started after k batches it yields the tail of the epoch; two ranks see disjoint halves,
    each image with the draws the single-process loader gives it."""
    n, bs = 512, 64
    loader, sampler = _device_loader(n, seed=11, batch_size=bs)
    full, (index, top, left, flip) = _epoch_draws(loader, sampler, epoch=1)
    sampler.start_at(1, 3)
    tail = list(loader)
    assert len(tail) == len(loader) == len(full) - 3
    for (xa, ya), (xb, yb) in zip(full[3:], tail):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)

    draws = {int(i): (int(t), int(l), bool(f)) for i, t, l, f in zip(index, top, left, flip)}
    seen = []
    for rank in range(2):
        shard_loader, shard_sampler = _device_loader(n, seed=11, batch_size=bs // 2, ctx=Context(rank, 2))
        _, (i2, t2, l2, f2) = _epoch_draws(shard_loader, shard_sampler, epoch=1)
        seen.append(set(i2.tolist()))
        assert len(seen[-1]) == n // 2
        for i, t, l, f in zip(i2.tolist(), t2.tolist(), l2.tolist(), f2.tolist()):
            assert draws[i] == (t, l, bool(f)), f"index {i} augmented differently on rank {rank}"
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(n))


# ---------------------------------------------------------- ResumableSampler


@pytest.mark.parametrize("k", [0, 1, 3, 7, 8, 9])
def test_resumable_sampler_start_at_is_the_tail(k):
    n, bs = 61, 8  # 8 batches, the last one short
    sampler = ResumableSampler(_Indexable(n), Context(), seed=5, batch_size=bs)
    sampler.start_at(4, 0)
    full = list(sampler)
    assert len(full) == n == len(sampler) and sampler.steps() == 8
    assert sorted(i for i, _ in full) == list(range(n))
    sampler.start_at(4, k)
    tail = list(sampler)
    assert tail == full[k * bs:]
    assert len(sampler) == len(tail) == max(n - k * bs, 0)
    assert sampler.steps() == 8  # always the whole epoch's batches
    # Through a DataLoader, as the engine uses it: the batches are the tail batches.
    dataset = SeededDataset(_IndexAndSeed())
    loader = DataLoader(dataset, batch_size=bs, sampler=sampler)
    got = [pair for batch in loader for pair in zip(*[t.tolist() for t in batch])]
    assert got == full[k * bs:], "a DataLoader over the resumed sampler yields other items or seeds"


class _IndexAndSeed(Dataset):
    """Returns (index, the torch seed in force when the item is made)."""

    def __len__(self):
        return 10 ** 6

    def __getitem__(self, index):
        return index, torch.initial_seed()


def test_resumable_sampler_seeds_depend_only_on_seed_epoch_index():
    n, bs = 40, 4
    pairs = {}
    for rank, world, start in ((0, 1, 0), (0, 1, 3), (0, 2, 0), (1, 2, 0), (1, 2, 2)):
        sampler = ResumableSampler(_Indexable(n), Context(rank, world), seed=9, batch_size=bs)
        sampler.start_at(2, start)
        for index, seed in sampler:
            assert seed == sample_seed(9, 2, index)
            assert pairs.setdefault(index, seed) == seed, "an index got two seeds in one epoch"
    assert set(pairs) == set(range(n))
    assert len(set(pairs.values())) == n, "two indices share an augmentation seed"
    other_epoch = ResumableSampler(_Indexable(n), Context(), seed=9, batch_size=bs)
    other_epoch.start_at(3, 0)
    other_seed = ResumableSampler(_Indexable(n), Context(), seed=10, batch_size=bs)
    other_seed.start_at(2, 0)
    for sampler in (other_epoch, other_seed):
        changed = sum(pairs[i] != s for i, s in sampler)
        assert changed == n


def test_resumable_sampler_rank_shards_are_disjoint_and_cover():
    n = 50
    shards = []
    for rank in range(2):
        sampler = ResumableSampler(_Indexable(n), Context(rank, 2), seed=1, batch_size=5)
        sampler.start_at(0, 0)
        shards.append([i for i, _ in sampler])
        assert len(shards[-1]) == len(sampler) == 25 and sampler.steps() == 5
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(n))
    # An odd dataset: DistributedSampler pads the shards to equal length by repeating
    # one index, so every index is covered and exactly one is seen twice.
    odd = [[i for i, _ in _started(ResumableSampler(_Indexable(51), Context(r, 2), seed=1, batch_size=5))]
           for r in range(2)]
    assert len(odd[0]) == len(odd[1]) == 26
    assert set(odd[0]) | set(odd[1]) == set(range(51)) and len(set(odd[0]) & set(odd[1])) == 1


def _started(sampler, epoch=0, step=0):
    sampler.start_at(epoch, step)
    return sampler


def test_resumable_sampler_set_epoch_reshuffles():
    n = 100
    sampler = ResumableSampler(_Indexable(n), Context(), seed=2, batch_size=10)
    orders = []
    for epoch in (0, 1, 2, 0):
        sampler.set_epoch(epoch)
        sampler.skip = 0
        orders.append([i for i, _ in sampler])
    assert orders[0] == orders[3], "the same epoch must give the same order"
    assert orders[0] != orders[1] != orders[2] != orders[0]
    assert all(sorted(o) == list(range(n)) for o in orders)
    # start_at(epoch, 0) is set_epoch for the order.
    assert [i for i, _ in _started(sampler, 1)] == orders[1]
    # Another run seed: another order for the same epoch.
    other = ResumableSampler(_Indexable(n), Context(), seed=3, batch_size=10)
    assert [i for i, _ in _started(other, 0)] != orders[0]


# -------------------------------------------------------------- SeededDataset


class _RandomTransformed(Dataset):
    """A dataset whose items go through torchvision's random transforms (torch's global RNG)."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
        self.transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                             transforms.ColorJitter(0.4, 0.4, 0.4)])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(self.images[index]), torch.rand(3), index


def test_seeded_dataset_same_seed_same_result_and_rng_untouched():
    ds = SeededDataset(_RandomTransformed())
    assert len(ds) == 4
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = ds[(2, 1000)]
    assert torch.equal(torch.get_rng_state(), state), "the global RNG state changed"
    b = ds[(2, 1000)]
    assert torch.equal(torch.get_rng_state(), state), "the global RNG state changed"
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2] == 2
    # Another seed gives another draw; the global stream continues as if nothing happened.
    draws = {tuple(ds[(2, s)][1].tolist()) for s in range(1001, 1011)}
    assert len(draws) == 10
    expected_next = torch.rand(5)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(5), expected_next)
    # The same (index, seed) in a fresh process-like state: independent of what ran before.
    torch.manual_seed(999)
    torch.rand(17)
    c = ds[(2, 1000)]
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])


# --------------------------------------------------------------- ShardSampler


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("length", [0, 1, 2, 5, 16, 17])
def test_shard_sampler_covers_each_index_once(length, world):
    shards = [list(ShardSampler(length, Context(rank, world))) for rank in range(world)]
    assert [len(ShardSampler(length, Context(rank, world))) for rank in range(world)] == [len(s) for s in shards]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(length)), "no padding, no index twice, none missing"
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


# -------------------------------------------- the engine, in-process, on the CPU


@pytest.fixture
def in_process(monkeypatch):
    """Run ``engine.cli.main`` here, single-process, CPU-only; returns ``run(recipe, argv) -> exit code``."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    threads = torch.get_num_threads()
    rng_state = torch.get_rng_state()

    def run(recipe, argv):
        try:
            cli.main(recipe, [str(a) for a in argv])
        except SystemExit as e:
            return e.code
        return None

    yield run
    torch.set_num_threads(threads)
    torch.set_rng_state(rng_state)


def test_device_loader_runs_through_the_engine(tmp_path, in_process, monkeypatch, capsys):
    data = write_fake_cifar10(tmp_path / "cifar", per_batch=12, val=16)
    made = []

    class Spy(DeviceCifarLoader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(engine, "DeviceCifarLoader", Spy)
    out = tmp_path / "run"
    code = in_process(train_resnet56.RECIPE, ["--data-dir", data, "--loader", "device", "--net", "dep",
                                              "--width-mult", "0.125", "-b", "16", "--epoch", "2", "-j", "0",
                                              "--seed", "1", "-p", "1", "--out-dir", out])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert len(made) == 1 and made[0].device == torch.device("cpu")
    assert "60 training / 16 validation images" in stdout
    assert stdout.count("Epoch [1][") == 4 and stdout.count("Epoch [2][") == 4, stdout  # 60 images / 16 = 4 batches
    results = json.loads((out / "results.json").read_text())
    assert results["epochs_done"] == 2 and results["device"] == "cpu"
    assert math.isfinite(results["val_loss"]) and 0 <= results["top1"] <= 100
    assert (out / "pruned.pt").is_file()


def test_device_loader_path_is_not_taken_for_workers(tmp_path, in_process, monkeypatch, capsys):
    """--loader workers (and auto on a CPU) keep the DataLoader path."""
    data = write_fake_cifar10(tmp_path / "cifar", per_batch=12, val=16)
    made = []
    monkeypatch.setattr(engine, "DeviceCifarLoader", lambda *a, **k: made.append(a) or pytest.fail("device loader"))
    for loader in ("workers", "auto"):
        code = in_process(train_resnet56.RECIPE, ["--data-dir", data, "--loader", loader, "--width-mult", "0.125",
                                                  "-b", "16", "--epoch", "1", "--limit-batches", "1", "-j", "0",
                                                  "--seed", "1", "--out-dir", tmp_path / loader])
        assert code == 0, capsys.readouterr()
    assert not made


SPEED_FLAGS = {"amp": ["--amp"], "channels-last": ["--channels-last"], "amp+channels-last": ["--amp", "--channels-last"]}


@pytest.mark.parametrize("flags", list(SPEED_FLAGS), ids=list(SPEED_FLAGS))
def test_amp_and_channels_last_on_cpu(flags, tmp_path, in_process, capsys):
    out = tmp_path / "run"
    code = in_process(train_vgg.RECIPE, [*SPEED_FLAGS[flags], "--dummy", "--net", "dep", "--width-mult", "0.125",
                                         "-b", "8", "--epoch", "2", "--limit-batches", "2", "-j", "0", "--seed", "2",
                                         "-p", "1", "--out-dir", out])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    results = json.loads((out / "results.json").read_text())
    args = json.loads(next(line for line in stdout.splitlines() if line.startswith("arguments: "))[11:])
    assert args["amp"] == ("amp" in flags.split("+")) and args["channels_last"] == ("channels-last" in flags)
    assert results["epochs_done"] == 2
    for key in ("top1", "val_loss", "macs_pruned", "params_pruned"):
        assert math.isfinite(results[key]), (key, results[key])
    losses = [float(m) for m in _progress_losses(stdout)]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses), stdout
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    for name, tensor in state["model"].items():
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float32, f"{name} is {tensor.dtype}: autocast must not change parameters"
            assert torch.isfinite(tensor).all(), name
    assert (out / "pruned.pt").is_file()


def _progress_losses(stdout):
    import re
    return re.findall(r"Epoch \[\d+\]\[\s*\d+/\d+\]\s+loss (\S+)", stdout)
