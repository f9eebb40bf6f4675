"""Host synchronisations per training step, counted on the CPU.

On a GPU every read of a device value by the host (``.item()``, ``bool(t)``, ``.tolist()``,
``.cpu()``, ``.nonzero()``, a boolean-mask index, ``torch.unique`` ...) waits until the stream has
run up to it: the host stops queueing work and the GPU idles for the gap. No GPU is needed to find
them: :func:`count_host_syncs` counts, while a step runs on the CPU, every Python-level call that
reads a tensor's value on the host and every ATen operator whose output size depends on the data
(which forces the same wait on CUDA). The CPU has no separate device memory, so the count is an
upper bound of a CUDA run's: a read of a tensor that would live on the host there counts here too.
The data loader's work between steps is not counted (:class:`PausedLoader`; on CUDA it runs on
pinned host memory, or on the GPU without syncs, see the device-loader case).

What is asserted, per step of the real engine (engine/trainer.py's ``train_epoch``):

- dense, L0-HC, Dep-L0, Dep-L0 backward, static sparse: at most 1 (they need none; the progress
  line every ``--print-freq`` steps reads the averages, and its step is not counted);
- DeepR: at most 1 (the number of sign flips per tensor, one transfer);
- GReg-1 and GReg-2 (both phases): at most 1 per coefficient update (here every step updates);
- DSR and SET: at most 1 on steps that do not rewire; their rewiring steps (every few hundred
  steps) are reported, not limited.

The code before these limits made 126-154 syncs per DeepR step and 217-244 per GReg update here
(ResNet56 x1/8; per-tensor counts, boolean masks and per-layer ``float()``). On a GPU,
:class:`CudaSyncCounter` counts the same steps from the CUDA runtime's own record
(``test_cuda_syncs_per_step``, part of bench/gpu_check.py's CUDA tests).
"""
import contextlib
import os
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

import train_resnet56
from conftest import write_fake_cifar10
from engine import trainer as engine
from engine.cli import parse_args
from pruning.greg import GReg
from pruning.selection import layer_ratios

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
aten = torch.ops.aten


def _overloads(*names):
    out = set()
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(aten, packet, None), overload or "default", None)
        if op is not None:
            out.add(op)
    return out


# ATen operators whose output size or value the host must know: on CUDA each waits for the stream.
SYNC_OPS = _overloads("nonzero", "_local_scalar_dense", "masked_select", "is_nonzero", "equal", "allclose",
                      "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave.Tensor", "multinomial",
                      "bincount", "nonzero_numpy")
# Indexing with a boolean mask computes the mask's nonzero positions first.
INDEX_OPS = _overloads("index.Tensor", "index_put", "index_put_", "_index_put_impl_")
# Python-level reads of a tensor's value by the host.
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu", "nonzero", "__array__")


class SyncCounter(TorchDispatchMode):
    """Counts host reads of tensor values (see the module docstring); ``events`` names where each
    happened (the innermost frame of the project's code)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.events = []
        self.paused = 0
        self.local = threading.local()

    def record(self, what):
        if self.paused or getattr(self.local, "inside", False):
            return
        frame, where = sys._getframe(2), "?"
        if frame.f_code.co_name == "_get_value" and frame.f_code.co_filename.endswith("optimizer.py"):
            # torch.optim's step counter of an optimiser neither fused nor capturable: it lives on
            # the host on CUDA too, so reading it waits for nothing.
            return
        self.count += 1
        while frame is not None:
            path = frame.f_code.co_filename
            if path.startswith(str(REPO)) and not path.endswith("test_host_syncs.py"):
                where = f"{os.path.relpath(path, REPO)}:{frame.f_lineno} ({frame.f_code.co_name})"
                break
            frame = frame.f_back
        self.events.append(f"{what} at {where}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS:
            self.record(str(func))
        elif func in INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
                self.record(f"{func} with a boolean mask")
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


@contextlib.contextmanager
def count_host_syncs():
    """``with count_host_syncs() as counter: ...``: ``counter.count`` host syncs happened inside."""
    counter = SyncCounter()
    originals = {name: getattr(torch.Tensor, name) for name in READS if hasattr(torch.Tensor, name)}

    def wrap(name, original):
        def read(self, *args, **kwargs):
            counter.record(f"Tensor.{name}")
            inside, counter.local.inside = getattr(counter.local, "inside", False), True
            try:
                return original(self, *args, **kwargs)
            finally:
                counter.local.inside = inside
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        with counter:
            yield counter
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


class PausedLoader:
    """The training loader with the counter paused while it makes a batch."""

    def __init__(self, loader, counter):
        self.loader, self.counter = loader, counter

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        iterator = iter(self.loader)
        while True:
            with self.counter.pause():
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
            yield batch


def test_the_counter_sees_what_syncs_and_not_what_does_not():
    x = torch.arange(6.0)
    with count_host_syncs() as counter:
        y = (x * 2).sum() + x.max()           # device work: nothing
        _ = torch.where(x > 2, x, 0.0).cumsum(0)
    assert counter.count == 0, counter.events
    with count_host_syncs() as counter:
        x.sum().item()                         # 1
        bool(x.max() > 3)                      # 1
        x[x > 2]                               # 1 (a boolean mask)
        x.nonzero()                            # 1
        x.tolist()                             # 1
        torch.unique(x)                        # 1
        float(y)                               # 1
    assert counter.count == 7, counter.events


# -------------------------------------------------------------- the engine's steps, per method


@pytest.fixture
def engine_env(monkeypatch):
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rng = torch.get_rng_state()
    yield
    torch.set_rng_state(rng)


def _greg(variant):
    def build(model, args):
        ratios = layer_ratios(model, [0.0, 0.5, 0.5, 0.5, 0.0])
        # Every step updates; GReg-2 picks at its second update (then runs its second phase).
        return GReg(model, ratios, variant, update_interval=1, stabilize_interval=1000, granularity_pick=6e-3,
                    upper_limit_pick=1e-2)
    return build


STEPS = 6
# name: (extra arguments, method builder or None, the limit per step or None to report only)
CASES = {
    "dense": (["--net", "dense"], None, 1),
    "hc": (["--net", "hc"], None, 1),
    "dep": (["--net", "dep"], None, 1),
    "dep-back": (["--net", "dep", "--back_dep"], None, 1),
    "dep-amp": (["--net", "dep", "--amp", "--channels-last"], None, 1),
    "dep-budget": (["--net", "dep", "--target-macs", "0.6"], None, 1),
    "static": (["--sparse", "static", "--density", "0.3"], None, 1),
    "deepr": (["--sparse", "deepr", "--density", "0.3", "--lr", "0.5"], None, 1),
    "dsr": (["--sparse", "dsr", "--density", "0.3", "--n-prune-params", "50"], None, None),
    "set": (["--sparse", "set", "--density", "0.3"], None, None),
    "greg1": (["--net", "dense"], _greg(1), 1),
    "greg2": (["--net", "dense"], _greg(2), 1),
}
REWIRING_PERIOD = 100  # the CIFAR schedule's first period: DSR and SET rewire at iteration 100


class CudaSyncCounter:
    """The same count on CUDA, from the CUDA runtime's own record: ``torch.cuda.set_sync_debug_mode``
    warns at every synchronising call (a stream or device sync, a blocking copy)."""

    def __init__(self):
        self.records = None

    @property
    def count(self):
        return len(self.events)

    @property
    def events(self):
        return [str(w.message) for w in self.records if "synchronizing CUDA operation" in str(w.message)]

    @contextlib.contextmanager
    def pause(self):
        yield

    def __enter__(self):
        self.catcher = warnings.catch_warnings(record=True)
        self.records = self.catcher.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        self.catcher.__exit__(*exc)


def per_step_syncs(tmp_path, argv, method=None, start_iteration=0, counting=count_host_syncs):
    """Host syncs of each training step of one epoch of the engine (ResNet56 x1/8, batch 8, the
    device CIFAR loader on fake data), the last step, which writes the progress line, left out;
    and the iterations they ran at. ``counting``: :func:`count_host_syncs` (any device) or
    :class:`CudaSyncCounter` (CUDA)."""
    data = write_fake_cifar10(tmp_path / "cifar", per_batch=12, val=8)
    args = parse_args(train_resnet56.RECIPE, ["--data-dir", str(data), "--loader", "device", "--width-mult", "0.125",
                                              "-b", "8", "--epoch", "1", "--limit-batches", str(STEPS + 1),
                                              "-j", "0", "--seed", "1", "-p", "1000", "--out-dir",
                                              str(tmp_path / "run"), *argv])
    trainer = engine.Trainer(args, method=method)
    assert isinstance(trainer.train_loader, engine.DeviceCifarLoader)
    method = trainer.method
    marks, iterations = [], []
    before_step = method.before_step

    def marked(iteration):
        marks.append(counter.count)
        iterations.append(iteration)
        before_step(iteration)

    method.before_step = marked
    if start_iteration:  # DSR and SET: a run that reaches their first rewiring step
        trainer.step = 0
        method.before_step = lambda it: marked(it + start_iteration)
        after_step = method.after_step
        method.after_step = lambda it: after_step(it + start_iteration)
    with counting() as counter:
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            with engine.distributed.LaggedAny(trainer.ctx, trainer.device) as vote:
                from utils.run import StopSignals
                with StopSignals() as stop:
                    trainer.train_epoch(stop, vote)
        marks.append(counter.count)
    trainer.log.close()
    counts = [b - a for a, b in zip(marks, marks[1:])]
    return counts[:-1], iterations[:-1], counter.events, method


@pytest.mark.parametrize("name", list(CASES))
def test_host_syncs_per_step(name, tmp_path, engine_env, capsys):
    argv, method, limit = CASES[name]
    start = REWIRING_PERIOD - 2 if name in ("dsr", "set") else 0
    counts, iterations, events, method = per_step_syncs(tmp_path, argv, method, start)
    assert len(counts) == STEPS, counts
    with capsys.disabled():
        print(f"\n  host syncs per step, {name}: {counts} (iterations {iterations[0]}-{iterations[-1]})")
    if limit is None:
        quiet = [c for c, it in zip(counts, iterations) if it % REWIRING_PERIOD]
        assert max(quiet) <= 1, (counts, events[:40])
        assert any(c > 1 for c, it in zip(counts, iterations) if not it % REWIRING_PERIOD), counts  # it rewired
        return
    assert max(counts) <= limit, (counts, events[:40])
    if name == "greg2":
        assert method.picked_at == 2 and any(method.picked)  # both phases ran
    if name == "deepr":
        assert method.reallocated_epoch > 0  # weights were dropped and regrown


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["dense", "dep", "dep-amp", "deepr", "greg1", "greg2"])
def test_cuda_syncs_per_step(name, tmp_path, monkeypatch):
    """The same limits on a GPU, counted by the CUDA runtime (the CUDA run of the GPU check)."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    argv, method, limit = CASES[name]
    counts, _, events, _ = per_step_syncs(tmp_path, argv, method, counting=CudaSyncCounter)
    print(f"CUDA host syncs per step, {name}: {counts}")
    assert max(counts) <= limit, (counts, events[:10])
