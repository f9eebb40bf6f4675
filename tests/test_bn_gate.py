"""BN -> gate -> ReLU (models/common.py): the one-function training path
against the plain composition ``relu(bn(x) * z)``.

The plain composition is what PyTorch's autograd computes from the ops
themselves; a ``BatchNorm2d`` subclass takes it (the fused path is only for
exactly ``nn.BatchNorm2d``), so the two can run side by side on equal state.
"""
import copy

import pytest
import torch
from torch import nn

from models import VGG, CifarResNet, ImageNetResNet
from models import common
from models.common import bn_gate_relu

pytestmark = pytest.mark.usefixtures("one_thread")


class PlainBN(nn.BatchNorm2d):
    """Same module, but not exactly ``nn.BatchNorm2d``: takes the plain composition."""


def _pair(channels, seed=0):
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    plain = PlainBN(channels)
    plain.load_state_dict(bn.state_dict())
    return bn, plain


def _gates(n, c, per_example=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(n if per_example else 1, c, 1, 1, generator=g)
    z[z < 0.3] = 0.0  # closed gates
    z[z > 0.9] = 1.0  # fully open ones
    return z


def _run(bn, x0, z0, grad, z_grad=True, conv=None, autocast=False, x_grad=True):
    """One forward and backward on the BN module's device."""
    device = bn.weight.device
    x = x0.to(device, copy=True).requires_grad_(x_grad)
    z = z0.to(device, copy=True).requires_grad_(z_grad)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        y = bn_gate_relu(bn, conv(x) if conv else x, z)
    y.backward(grad.to(device, y.dtype))
    return dict(y=y.detach(), x=x.grad, z=z.grad, weight=bn.weight.grad, bias=bn.bias.grad,
                running_mean=bn.running_mean.clone(), running_var=bn.running_var.clone(),
                tracked=bn.num_batches_tracked.clone(), channels_last=y.is_contiguous(memory_format=torch.channels_last))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("per_example", [True, False])
def test_fused_matches_plain_composition(channels_last, per_example, device):
    """Forward bit for bit (the same BN kernel and elementwise ops); gradients to rounding. On the
    CPU, NCHW takes the backward from per-example sums and channels-last BN's own backward."""
    bn, plain = (m.to(device) for m in _pair(6))
    x0 = torch.randn(8, 6, 5, 7) * 2 + 0.3
    if channels_last:
        x0 = x0.to(memory_format=torch.channels_last)
    z0 = _gates(8, 6, per_example)
    grad = torch.randn(8, 6, 5, 7)
    fused, ref = _run(bn, x0, z0, grad), _run(plain, x0, z0, grad)
    for key in ("y", "running_mean", "running_var", "tracked", "channels_last"):
        torch.testing.assert_close(fused[key], ref[key], rtol=0, atol=0, msg=key)  # bit for bit
    for key in ("x", "weight", "bias", "z"):
        torch.testing.assert_close(fused[key], ref[key], rtol=1e-5, atol=1e-5, msg=key)
    assert fused["z"].shape == z0.shape
    closed = (z0.expand(8, 6, 1, 1) == 0 if per_example else z0 == 0).to(device)
    assert (fused["z"][closed] == ref["z"][closed]).all()


def test_frozen_gates_get_no_gradient_and_match(device):
    bn, plain = (m.to(device) for m in _pair(4))
    x0, z0, grad = torch.randn(5, 4, 3, 3), _gates(5, 4, per_example=False), torch.randn(5, 4, 3, 3)
    fused, ref = _run(bn, x0, z0, grad, z_grad=False), _run(plain, x0, z0, grad, z_grad=False)
    assert fused["z"] is None
    torch.testing.assert_close(fused["y"], ref["y"], rtol=0, atol=0)
    for key in ("x", "weight", "bias"):
        torch.testing.assert_close(fused[key], ref[key], rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("offset", [0.0, 30.0])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_autocast_matches_to_bf16_precision(channels_last, offset, device):
    """An offset makes BN's input mean large against its spread, where an affine
    stored in bf16 before its constant cancels would lose the input gradient's
    accuracy (most visibly with an output gradient correlated with BN's xhat)."""
    bn, plain = (m.to(device) for m in _pair(6))
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 6, 3, padding=1).to(device)
    with torch.no_grad():
        conv.bias.add_(offset)
    x0, z0 = torch.randn(8, 3, 6, 6), _gates(8, 6)
    with torch.no_grad():
        features = conv(x0.to(device)).cpu()
    grad = (features - features.mean((0, 2, 3), keepdim=True)) / features.std((0, 2, 3), keepdim=True)
    grad += 0.1 * torch.randn(8, 6, 6, 6)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
        x0 = x0.to(memory_format=torch.channels_last)
    fused = _run(bn, x0, z0, grad, conv=conv, autocast=True)
    conv.zero_grad()
    ref = _run(plain, x0, z0, grad, conv=conv, autocast=True)
    assert fused["y"].dtype == ref["y"].dtype == torch.bfloat16
    assert fused["z"].dtype == torch.float32  # the gate's own dtype, like the composition's
    for key in ("y", "running_mean", "running_var", "channels_last"):
        torch.testing.assert_close(fused[key], ref[key], rtol=0, atol=0, msg=key)
    for key in ("x", "weight", "bias", "z"):  # to bf16 precision
        scale = ref[key].abs().max()
        assert (fused[key] - ref[key]).abs().max() <= 1e-2 * scale, key


@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_backward_path(channels_last, monkeypatch):
    """On the CPU an NCHW batch takes the backward from per-example sums; channels-last, BN's own."""
    calls = []
    for name in ("_backward_from_sums", "_backward_through_bn"):
        original = getattr(common, name)
        monkeypatch.setattr(common, name, lambda *args, _name=name, _f=original: calls.append(_name) or _f(*args))
    bn, _ = _pair(4)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x0, grad = (t.contiguous(memory_format=layout) for t in (torch.randn(5, 4, 3, 3), torch.randn(5, 4, 3, 3)))
    _run(bn, x0, _gates(5, 4), grad)
    assert calls == ["_backward_through_bn" if channels_last else "_backward_from_sums"]


def test_eval_mode_uses_running_statistics_and_leaves_them():
    bn, _ = _pair(4)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.eval()
    before = copy.deepcopy(bn.state_dict())
    x, z = torch.randn(3, 4, 5, 5), _gates(1, 4, per_example=False)
    y = bn_gate_relu(bn, x, z)
    expected = torch.relu(nn.functional.batch_norm(x, before["running_mean"], before["running_var"], bn.weight,
                                                   bn.bias, False, eps=bn.eps) * z)
    torch.testing.assert_close(y, expected)
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_dense_path_is_bn_then_relu():
    bn, plain = _pair(3)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(bn_gate_relu(bn, x, None), torch.relu(plain(x)), rtol=0, atol=0)


def _saved_activation_count(bn, x, z):
    """How many tensors of the feature map's size autograd keeps for backward."""
    count = 0

    def pack(t):
        nonlocal count
        count += t.numel() == x.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        bn_gate_relu(bn, x, z)
    return count


def test_fused_path_keeps_one_activation_less():
    """The plain composition also keeps the BN output for the gate gradient."""
    bn, plain = _pair(4)
    x = torch.randn(3, 4, 6, 6, requires_grad=True)
    z = _gates(3, 4).requires_grad_()
    assert _saved_activation_count(bn, x, z) == 2  # BN's input and the output
    assert _saved_activation_count(plain, x, z) == 3


def test_compiling_takes_the_plain_composition(monkeypatch):
    """Under torch.compile inductor fuses the plain ops itself: no custom function in the graph."""
    bn, plain = _pair(4)
    x0, z0, grad = torch.randn(5, 4, 3, 3), _gates(5, 4), torch.randn(5, 4, 3, 3)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x = x0.clone().requires_grad_()
    y = bn_gate_relu(bn, x, z0.clone().requires_grad_())
    assert "BatchNormGateReLU" not in type(y.grad_fn).__name__
    ref = _run(plain, x0, z0, grad)
    y.backward(grad)
    torch.testing.assert_close(x.grad, ref["x"], rtol=0, atol=0)


def _model_pair(family):
    torch.manual_seed(0)
    if family == "vgg":  # unpooled convs too: the tiny config in conftest pools after every conv
        model, x = VGG(cfg=(8, 8, "M", 16, 16, "M", 16, "M", 16, "M", 16, "M"), num_classes=10), torch.randn(4, 3, 32, 32)
    elif family == "resnet56":
        model, x = CifarResNet(blocks_per_stage=1, widths=(4, 8, 8), num_classes=10), torch.randn(4, 3, 32, 32)
    else:
        model = ImageNetResNet(blocks=(1, 1, 1, 1), widths=(4, 4, 8, 8), num_classes=10, input_size=64)
        x = torch.randn(4, 3, 64, 64)
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = PlainBN
    return model, plain, x


@pytest.mark.parametrize("family", ["vgg", "resnet56", "resnet50"])
def test_models_train_alike_on_either_path(family, device, monkeypatch):
    """A whole training step: same loss, same gradient for every parameter, same BN state. The
    convolutions run in full float32: with TF32 (cuDNN's default on CUDA, 10-bit mantissas) the
    two paths' rounding differences grow through the convs beyond this test's tolerance."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model, plain, x = _model_pair(family)
    model, plain, x = model.to(device).train(), plain.to(device).train(), x.to(device)
    grads = []
    for m in (model, plain):
        torch.manual_seed(5)  # the same gate noise
        loss = m(x).square().mean()
        loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert grads[0][name] is not None, name
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_one_value_per_channel_raises_like_batchnorm():
    """Batch statistics of a single value are undefined: BN's own error, and no NaN running stats."""
    bn, _ = _pair(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn_gate_relu(bn, torch.randn(1, 3, 1, 1), _gates(1, 3))
    assert torch.isfinite(bn.running_var).all()


@pytest.mark.parametrize("gated", [True, False])
def test_forward_hooks_on_bn_still_fire_and_see_bn_output(gated):
    bn, plain = _pair(4)
    seen = []
    bn.register_forward_hook(lambda module, args, out: seen.append(out))
    x = torch.randn(3, 4, 5, 5)
    z = _gates(3, 4).requires_grad_() if gated else None
    y = bn_gate_relu(bn, x, z)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], plain(x))  # BN's output, not overwritten by the ReLU
    assert (seen[0] < 0).any() and (y >= 0).all()


def test_gradients_in_float64_are_float64_accurate():
    bn, plain = _pair(4)
    bn.double(), plain.double()
    x0, z0, grad = torch.randn(5, 4, 6, 6).double(), _gates(5, 4).double(), torch.randn(5, 4, 6, 6).double()
    fused, ref = _run(bn, x0, z0, grad), _run(plain, x0, z0, grad)
    for key in ("x", "z", "weight", "bias"):
        torch.testing.assert_close(fused[key], ref[key], rtol=1e-12, atol=1e-12, msg=key)


@pytest.mark.parametrize("shape", [(1, 4, 5, 3), (6, 4, 1, 1)], ids=["one-example", "one-pixel"])
@pytest.mark.parametrize("frozen", ["none", "x", "bn"])
def test_small_shapes_and_inputs_without_gradient(shape, frozen):
    """One example per batch, 1x1 maps; x, or BN's weight and bias, not requiring gradients."""
    bn, plain = _pair(4)
    for module in (bn, plain):
        module.weight.requires_grad_(frozen != "bn")
        module.bias.requires_grad_(frozen != "bn")
    x0, z0, grad = torch.randn(shape) + 2.0, _gates(shape[0], 4), torch.randn(shape)
    fused, ref = (_run(module, x0, z0, grad, x_grad=frozen != "x") for module in (bn, plain))
    for key in ("x", "z", "weight", "bias"):
        assert (fused[key] is None) == (ref[key] is None), key
        if ref[key] is not None:
            torch.testing.assert_close(fused[key], ref[key], rtol=1e-5, atol=1e-6, msg=key)
