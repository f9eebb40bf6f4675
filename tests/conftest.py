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
def tiny():
    torch.manual_seed(0)
    return _build_tiny


@pytest.fixture
def set_logits():
    return _set_logits


@pytest.fixture
def random_logits():
    return _random_logits
