"""What a CUDA run does differently from a CPU one, checked where it can be on the CPU too.

* Under ``--amp`` the evaluation computes Dep-L0's gate logits in float32: the channels it keeps
  (and the gate values) are exactly those of float32, which the kept channels, MACs and the
  export use. bf16 autocast on the CPU has the same rounding as on CUDA.
* ``ChannelGates.per_layer_sum`` takes values from another device than its index (a method
  that returns CPU gates on a CUDA model) and sums on the index's device.
* The engine turns on ``torch.backends.cudnn.benchmark`` on CUDA (fixed-shape batches) and
  leaves it alone on the CPU.
"""
import math
import os

import pytest
import torch
import torchvision

import train_resnet56
from conftest import write_fake_cifar10
from engine import trainer as engine
from engine.cli import parse_args
from l0_layers.gates import ChannelGates
from l0_layers.hard_concrete import PRUNE_THRESHOLD
from l0_layers.gates import DEP_SCALE
from models import build_model, default_arch
from utils.data import DeviceNormalize

pytestmark = pytest.mark.usefixtures("one_thread")


def _dep_model_near_threshold(device, back_dep=False):
    """VGG16 x1/4 Dep-L0 whose logits lie just around the closing threshold log(1/11): every
    generator weight 0, each bias the threshold's pre-activation plus up to +-0.01, so bf16
    rounding of the generator's arithmetic would move many of them across it."""
    torch.manual_seed(0)
    model = build_model(default_arch("vgg16", 10, 0.25, net="dep", back_dep=back_dep)).to(device).eval()
    pre = math.atanh(PRUNE_THRESHOLD / DEP_SCALE)
    with torch.no_grad():
        for layer in model.gates.logits.layers:
            layer.weight.zero_()
            layer.bias.copy_(pre + torch.empty_like(layer.bias).uniform_(-0.01, 0.01))
    return model


class GateSpy:
    """The gates each forward of ``model`` applies, flat, as the model sees them."""

    def __init__(self, model):
        self.seen = []
        model.gates.register_forward_hook(lambda module, args, out: self.seen.append(
            torch.cat([g.detach().float().flatten() for g in out])))


@pytest.mark.parametrize("back_dep", [False, True])
def test_amp_evaluation_keeps_the_float32_gates(back_dep, device):
    model = _dep_model_near_threshold(device, back_dep)
    fp32 = model.gates.test_gates()
    kept = fp32 > 0
    assert 0.2 < kept.float().mean() < 0.8  # the case is a real one: many channels near the threshold
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16):  # what bf16 logits would have given
        bf16_logits = model.gates.logits()
    assert bf16_logits.dtype == torch.bfloat16
    assert ((bf16_logits.float() > PRUNE_THRESHOLD) != kept).sum() >= 5

    spy = GateSpy(model)
    images, targets = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    stats = engine.evaluate_model(model, [(images, targets)], DeviceNormalize("cifar10", device),
                                  amp_dtype=torch.bfloat16)
    assert math.isfinite(stats["loss"])
    (seen,) = spy.seen
    assert torch.equal(seen > 0, kept)  # the same channels open ...
    assert torch.equal(seen, fp32)      # ... with the same values
    with torch.autocast(device.type, torch.bfloat16):
        assert model.gates.log_alpha().dtype == torch.float32


def test_per_layer_sum_moves_values_to_the_index_device():
    gates = ChannelGates([3, 4], net="hc").to("meta")
    out = gates.per_layer_sum(torch.ones(7))  # values on the CPU, index on another device
    assert out.device.type == "meta" and out.shape == (2,)
    cpu = ChannelGates([3, 4], net="hc")
    assert cpu.per_layer_sum(torch.arange(7.0)).tolist() == [3.0, 18.0]


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    return write_fake_cifar10(tmp_path / "cifar", per_batch=4, val=4)


def test_cudnn_benchmark_on_cuda_only(device, data, tmp_path, monkeypatch):
    if device.type == "cpu":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    args = parse_args(train_resnet56.RECIPE, ["--data-dir", str(data), "--width-mult", "0.125", "-b", "4",
                                              "--epoch", "1", "-j", "0", "--seed", "1", "--out-dir",
                                              str(tmp_path / "run")])
    trainer = engine.Trainer(args)
    trainer.log.close()
    assert trainer.device.type == device.type
    assert torch.backends.cudnn.benchmark == (device.type == "cuda")
