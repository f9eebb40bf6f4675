"""Shared helpers for the model, gate and penalty tests: tiny models and logit control."""
import math

import pytest
import torch

from models import VGG, CifarResNet, ImageNetResNet

TINY_VGG_CFG = (8, "M", 8, "M", 16, "M", 16, "M", 16, "M")


def _build_tiny(family, **kwargs):
    """A tiny model of one family and a matching input batch (2 examples)."""
    if family == "vgg":
        return VGG(cfg=TINY_VGG_CFG, num_classes=10, **kwargs), torch.randn(2, 3, 32, 32)
    if family == "resnet56":
        return CifarResNet(blocks_per_stage=1, widths=(4, 8, 8), num_classes=10, **kwargs), torch.randn(2, 3, 32, 32)
    if family == "resnet50":
        return (ImageNetResNet(blocks=(1, 1, 1, 1), widths=(4, 4, 8, 8), num_classes=10, input_size=64, **kwargs),
                torch.randn(2, 3, 64, 64))
    raise KeyError(family)


def _set_logits(model, log_alpha):
    """Make the model's gates produce exactly ``log_alpha`` (flat, all layers).

    ``hc``: written into the free parameter. ``dep``: every Linear's weight is
    zeroed and its bias set to atanh(a / log 100), so a_i = log(100) tanh(b_i);
    with ``back_dep`` the chain's Linear i produces gated layer L-1-i (spec 2).
    """
    gates = model.gates
    log_alpha = torch.as_tensor(log_alpha, dtype=torch.float64)
    with torch.no_grad():
        if gates.net == "hc":
            gates.logits.log_alpha.copy_(log_alpha)
        elif gates.net == "dep":
            assert log_alpha.abs().max() < math.log(100.0)
            slices = list(log_alpha.split(gates.widths))
            if gates.back_dep:
                slices.reverse()
            for layer, target in zip(gates.logits.layers, slices):
                layer.weight.zero_()
                layer.bias.copy_(torch.atanh(target / math.log(100.0)))
        else:
            raise ValueError("dense model has no logits")
    assert torch.allclose(gates.log_alpha().double(), log_alpha, atol=1e-4)


def _random_logits(widths, generator=None, one_open_layer=1):
    """Logits in (-4, 4) (some closed, some fractional, some fully open), every
    layer with at least one open channel, and layer ``one_open_layer`` with exactly one."""
    total = sum(widths)
    la = torch.empty(total, dtype=torch.float64).uniform_(-4.0, 4.0, generator=generator)
    offsets = [0]
    for w in widths:
        offsets.append(offsets[-1] + w)
    for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        if i == one_open_layer:
            la[a:b] = -3.5
            la[a + (b - a) // 2] = 3.0
        else:
            la[a] = 1.5  # at least one open channel per layer
    return la


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine
    OpenMP threads waiting for each other make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def device(request):
    """A test that takes ``device`` runs on the CPU, and again on CUDA where a GPU
    is present (the CUDA-only branches: cuDNN batch norm, streams, pinned memory)."""
    return torch.device(request.param)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return _build_tiny


@pytest.fixture
def set_logits():
    return _set_logits


@pytest.fixture
def random_logits():
    return _random_logits


# ------------------------------------------------ end-to-end script helpers
# Used by tests/test_scripts.py and tests/test_resume.py, which run the real
# training scripts in subprocesses (CPU only, no network, no PYTHONPATH).
import os as _os
import struct as _struct
import subprocess as _subprocess
import sys as _sys
from pathlib import Path as _Path

REPO_ROOT = _Path(__file__).resolve().parent.parent


def script_env():
    """Environment of a script run: no CUDA, no PYTHONPATH, and any download fails at once."""
    env = dict(_os.environ)
    env.pop("PYTHONPATH", None)
    env["CUDA_VISIBLE_DEVICES"] = ""
    # A dead local proxy: torchvision's urllib download is refused immediately,
    # even on a machine that has a network.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env[var] = "http://127.0.0.1:9"
    env.pop("no_proxy", None)
    env.pop("NO_PROXY", None)
    # One intra-op thread: these runs are tiny, OpenMP threads that spin-wait
    # on a busy 2-core machine make them 5x slower, and the results must not
    # depend on how many threads the machine's load leaves (resume equality).
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    return env


def script_command(script, *args):
    return [_sys.executable, str(REPO_ROOT / script), *map(str, args)]


def run_script(script, *args, cwd, timeout=600):
    """Run ``python REPO/script args...`` in ``cwd``; returns the CompletedProcess (text)."""
    return _subprocess.run(script_command(script, *args), cwd=cwd, env=script_env(),
                           capture_output=True, text=True, timeout=timeout)


def read_tb_events(path):
    """Every summary value of a TensorBoard event file, without TensorBoard.

    Parses the TFRecord framing (u64 length, u32 crc, payload, u32 crc) and
    decodes each payload with tensorboardX's Event proto. Returns a list of
    ``(step, tag, kind, value)`` with ``kind`` the proto's oneof name
    (``simple_value``, ``histo``, ``tensor`` ...) and ``plugin`` folded into
    ``value`` for tensors as ``(plugin_name, tensor_proto)``.
    """
    from tensorboardX.proto import event_pb2

    data = _Path(path).read_bytes()
    out, i = [], 0
    while i < len(data):
        (n,) = _struct.unpack("<Q", data[i:i + 8])
        payload = data[i + 12:i + 12 + n]
        assert len(payload) == n, f"truncated event record in {path}"
        i += 12 + n + 4
        event = event_pb2.Event.FromString(payload)
        for v in event.summary.value:
            kind = v.WhichOneof("value")
            if kind == "simple_value":
                value = v.simple_value
            elif kind == "histo":
                value = v.histo
            else:
                value = (v.metadata.plugin_data.plugin_name, getattr(v, kind) if kind else None)
            out.append((event.step, v.tag, kind, value))
    return out


def run_parallel(jobs, workers=2):
    """Run ``{name: callable}`` in a thread pool (each job mostly waits on a subprocess).

    Returns ``{name: Outcome}``; ``Outcome.get()`` returns the job's value or
    re-raises its exception, so a failed job fails only the tests that use it.
    """
    from concurrent.futures import ThreadPoolExecutor

    class Outcome:
        def __init__(self, future):
            self.future = future

        def get(self):
            return self.future.result()

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        for future in futures.values():
            future.exception()  # wait for all
    return {name: Outcome(f) for name, f in futures.items()}


def assert_equal_states(a, b, where=""):
    """Recursively equal: tensors with torch.equal (same dtype and shape), the rest with ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs (max abs diff {(a.double() - b.double()).abs().max().item()})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b) if isinstance(b, dict) else b)
        for k in a:
            assert_equal_states(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_states(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def write_fake_cifar10(root, per_batch=4, val=6):
    """CIFAR-10 in the real python-batch format (it fails torchvision's md5 check)."""
    import pickle

    import numpy as np

    folder = _Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)

    def dump(name, obj):
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f)

    for i in range(1, 6):
        dump(f"data_batch_{i}", {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                                 "labels": [(i + j) % 10 for j in range(per_batch)]})
    dump("test_batch", {"data": rng.integers(0, 256, (val, 3072), dtype=np.uint8),
                        "labels": [j % 10 for j in range(val)]})
    dump("batches.meta", {"label_names": [f"class{c}" for c in range(10)]})
    return _Path(root)


def process_ids(fragment: str) -> list[int]:
    """Processes whose command line contains ``fragment`` (Linux's /proc)."""
    pids = []
    for proc in _Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and fragment in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids
