"""The L0 penalty (pruning/penalty.py) against hand computations (spec section 4)."""
import re

import pytest
import torch
from torch import nn

from l0_layers import hard_concrete
from pruning.penalty import L0Penalty
from models import CifarResNet, ImageNetResNet, VGG, resnet50, resnet56, vgg16

TEMP = 0.5  # not the default, so a penalty that ignores the model's temperature fails
LAMBA = 3e-4


def make(tiny, set_logits, family, net, back_dep=False, seed=0):
    model, x = tiny(family, net=net, back_dep=back_dep, temperature=TEMP)
    gen = torch.Generator().manual_seed(seed)
    la = torch.empty(sum(model.gates.widths), dtype=torch.float64).uniform_(-4, 4, generator=gen)
    set_logits(model, la)
    return model, x


def expected_open(model):
    """S_l by hand: sum of P(z != 0) over each layer's slice of log_alpha."""
    la = model.gates.log_alpha()
    p = torch.sigmoid(la - TEMP * torch.log(torch.tensor(0.1 / 1.1)))
    return torch.stack([piece.sum() for piece in p.split(model.gates.widths)])


# ------------------------------------------------------------------ paper form


@pytest.mark.parametrize("back_dep", [False, True])
@pytest.mark.parametrize("net", ("hc", "dep"))
@pytest.mark.parametrize("family", ("vgg", "resnet56"))
def test_paper_chain_form(family, net, back_dep, tiny, set_logits):
    model, _ = make(tiny, set_logits, family, net, back_dep)
    assert model.paper_penalty == "chain"
    s = expected_open(model).tolist()
    prev, expected = 3.0, 0.0
    for s_l in s:  # every gated conv of VGG and ResNet56 is 3x3
        expected += 9 * prev * s_l
        prev = s_l
    got = L0Penalty(model)(LAMBA)
    assert got.item() == pytest.approx(LAMBA * expected, rel=1e-5)
    assert L0Penalty(model, "paper")(LAMBA).item() == pytest.approx(got.item(), rel=1e-7)


def test_paper_chain_is_vgg_conv_weight_count_when_open():
    """Spec: for VGG the chain form is the expected conv parameter count."""
    model = vgg16(net="hc")
    with torch.no_grad():
        model.gates.logits.log_alpha.fill_(40.0)
    conv_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    assert L0Penalty(model)(1.0).item() == pytest.approx(conv_weights, rel=1e-6)


@pytest.mark.parametrize("back_dep", [False, True])
@pytest.mark.parametrize("net", ("hc", "dep"))
def test_paper_static_input_form(net, back_dep, tiny, set_logits):
    model, _ = make(tiny, set_logits, "resnet50", net, back_dep)
    assert model.paper_penalty == "static_input"
    s = expected_open(model).tolist()
    # tiny ImageNetResNet: blocks (1,1,1,1), widths (4,4,8,8), stem width 4
    coeffs = [3 * 7 ** 4]
    c_in = 4
    for width in (4, 4, 8, 8):
        coeffs += [c_in * 1 ** 4, width * 3 ** 4]
        c_in = 4 * width
    assert len(coeffs) == len(s)
    expected = sum(c * s_l for c, s_l in zip(coeffs, s))
    assert L0Penalty(model)(LAMBA).item() == pytest.approx(LAMBA * expected, rel=1e-5)


def test_paper_static_input_form_full_resnet50():
    model = resnet50(net="hc")
    with torch.no_grad():
        model.gates.logits.log_alpha.fill_(40.0)  # S_l = width
    expected = 3 * 7 ** 4 * 64
    c_in = 64
    for n, width in zip((3, 4, 6, 3), (64, 128, 256, 512)):
        for _ in range(n):
            expected += c_in * 1 * width + width * 81 * width
            c_in = 4 * width
    assert L0Penalty(model)(1.0).item() == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------ macs / params forms


def sides(model, name):
    """(input gate, output gate) of a conv/linear, written from the spec."""
    if isinstance(model, VGG):
        if name == "classifier":
            return len(model.features) - 1, None
        i = int(name.split(".")[1])
        return (i - 1 if i > 0 else None), i
    if name in ("conv1",):
        return None, 0
    if name in ("linear", "fc"):
        return None, None
    b, part = re.fullmatch(r"layers\.(\d+)\.(.+)", name).groups()
    b = int(b)
    stream = 0 if b == 0 else None
    if isinstance(model, CifarResNet):
        return {"conv1": (stream, b + 1), "conv2": (b + 1, None), "shortcut.0": (stream, None)}[part]
    return {"conv1": (stream, 2 * b + 1), "conv2": (2 * b + 1, 2 * b + 2), "conv3": (2 * b + 2, None),
            "downsample.0": (stream, None)}[part]


def expected_cost(model, x, s):
    """E[MACs], E[params] by looping over the convs / linears with widths s
    (expected open counts) on gated sides and dense widths elsewhere."""
    modules = [(n, m) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and not n.startswith("gates.")]
    hw, handles = {}, []
    for n, m in modules:
        handles.append(m.register_forward_hook(
            lambda mod, i, o, n=n: hw.__setitem__(n, o.shape[2] * o.shape[3] if o.dim() == 4 else 1)))
    model.eval()
    with torch.no_grad():
        model(x[:1])
    for h in handles:
        h.remove()
    macs = params = 0.0
    for n, m in modules:
        g_in, g_out = sides(model, n)
        if isinstance(m, nn.Conv2d):
            c_in, c_out, k = m.in_channels, m.out_channels, m.kernel_size[0]
            extra = (1 if m.bias is not None else 0) + 2  # bias, BN weight and bias
        else:
            c_in, c_out, k, extra = m.in_features, m.out_features, 1, 1
        e_in = c_in if g_in is None else s[g_in]
        e_out = c_out if g_out is None else s[g_out]
        macs += k * k * e_in * e_out * hw[n]
        params += k * k * e_in * e_out + extra * e_out
    return macs, params


@pytest.mark.parametrize("back_dep", [False, True])
@pytest.mark.parametrize("net", ("hc", "dep"))
@pytest.mark.parametrize("family", ("vgg", "resnet56", "resnet50"))
def test_macs_and_params_forms(family, net, back_dep, tiny, set_logits):
    model, x = make(tiny, set_logits, family, net, back_dep, seed=1)
    s = expected_open(model).tolist()
    macs, params = expected_cost(model, x, s)
    assert L0Penalty(model, "macs")(LAMBA).item() == pytest.approx(LAMBA * macs, rel=1e-5)
    assert L0Penalty(model, "params")(LAMBA).item() == pytest.approx(LAMBA * params, rel=1e-5)
    # an explicit expected_open argument is used instead of the gates' own
    s2 = torch.tensor(s) * 0.5
    macs2, params2 = expected_cost(model, x, s2.tolist())
    assert L0Penalty(model, "macs")(LAMBA, s2).item() == pytest.approx(LAMBA * macs2, rel=1e-5)
    assert L0Penalty(model, "params")(LAMBA, s2).item() == pytest.approx(LAMBA * params2, rel=1e-5)


@pytest.mark.parametrize("family", ("vgg", "resnet56", "resnet50"))
def test_open_gates_approach_dense_cost(family, tiny):
    model, _ = tiny(family, net="hc")
    with torch.no_grad():
        model.gates.logits.log_alpha.fill_(30.0)
    dense_macs, dense_params = model.cost.dense()
    assert L0Penalty(model, "macs")(1.0).item() == pytest.approx(dense_macs, rel=1e-6)
    assert L0Penalty(model, "params")(1.0).item() == pytest.approx(dense_params, rel=1e-6)
    with torch.no_grad():
        model.gates.logits.log_alpha.fill_(3.0)  # init: P ~ 0.99, a little below dense
    assert 0.9 * dense_macs < L0Penalty(model, "macs")(1.0).item() < dense_macs


@pytest.mark.parametrize("builder,macs,params", [(vgg16, 313_201_664, 14_728_266),
                                                 (resnet56, 125_747_840, 855_770),
                                                 (resnet50, 4_089_184_256, 25_557_032)],
                         ids=["vgg16", "resnet56", "resnet50"])
def test_open_gates_full_size(builder, macs, params):
    model = builder(net="hc")
    with torch.no_grad():
        model.gates.logits.log_alpha.fill_(30.0)
    assert L0Penalty(model, "macs")(1.0).item() == pytest.approx(macs, rel=1e-5)
    assert L0Penalty(model, "params")(1.0).item() == pytest.approx(params, rel=1e-5)


@pytest.mark.parametrize("family", ("vgg", "resnet56", "resnet50"))
def test_dense_model_penalty_is_dense_cost(family, tiny):
    model, _ = tiny(family, net="dense")
    macs, params = model.cost.dense()
    assert L0Penalty(model, "macs")(1.0).item() == pytest.approx(macs, rel=1e-6)
    assert L0Penalty(model, "params")(1.0).item() == pytest.approx(params, rel=1e-6)


# ------------------------------------------------------------------ gradients


@pytest.mark.parametrize("reg", ("paper", "macs", "params"))
@pytest.mark.parametrize("family", ("vgg", "resnet56", "resnet50"))
def test_gradient_pushes_logits_down_hc(family, reg, tiny, set_logits):
    model, x = make(tiny, set_logits, family, "hc", seed=2)
    leaf = model.gates.logits.log_alpha
    L0Penalty(model, reg)(LAMBA).backward()
    grad = leaf.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert (grad > 0).all()
    # and it is the gradient of the hand-computed penalty
    s = expected_open(model)
    if reg == "paper" and family != "resnet50":
        prev = torch.cat([s.new_full((1,), 3.0), s[:-1]])
        hand = LAMBA * (9 * prev * s).sum()
    elif reg == "paper":
        coeffs = [3 * 7 ** 4]
        c_in = 4
        for width in (4, 4, 8, 8):
            coeffs += [c_in, width * 81]
            c_in = 4 * width
        hand = LAMBA * (torch.tensor(coeffs, dtype=s.dtype) * s).sum()
    else:
        macs, params = expected_cost(model, x, list(s.unbind()))
        hand = LAMBA * (macs if reg == "macs" else params)
    (expected,) = torch.autograd.grad(hand, leaf)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("back_dep", [False, True])
@pytest.mark.parametrize("reg", ("paper", "macs", "params"))
@pytest.mark.parametrize("family", ("vgg", "resnet56", "resnet50"))
def test_gradient_dep(family, reg, back_dep, tiny):
    model, _ = tiny(family, net="dep", back_dep=back_dep)
    penalty = L0Penalty(model, reg)
    with torch.no_grad():  # keep tanh off saturation so every logit has a gradient
        for layer in model.gates.logits.layers:
            layer.weight.mul_(0.1)
            layer.bias.uniform_(-1, 1)
    la = model.gates.log_alpha()
    s = model.gates.per_layer_sum(hard_concrete.prob_nonzero(la, model.gates.temperature))
    (grad,) = torch.autograd.grad(penalty(LAMBA, s), la)
    assert (grad > 0).all()
    penalty(LAMBA).backward()
    for p in model.gate_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
        assert p.grad.abs().sum() > 0


def test_invalid_reg():
    model = CifarResNet(blocks_per_stage=1, widths=(4, 8, 8))
    with pytest.raises(ValueError):
        L0Penalty(model, "flops")


def test_no_batch_scaling_or_l2(tiny):
    """R is linear in lambda and independent of anything but the logits."""
    model, _ = tiny("vgg", net="hc")
    pen = L0Penalty(model)
    r1, r2 = pen(1e-6).item(), pen(2e-6).item()
    assert r2 == pytest.approx(2 * r1, rel=1e-6)
    with torch.no_grad():
        for p in model.weight_parameters():
            p.mul_(10.0)
    assert pen(1e-6).item() == pytest.approx(r1, rel=1e-6)


def test_imagenet_resnet_penalty_coeff_uses_block_inputs():
    """ImageNetResNet with a stem wider than its first stage: conv1 of block 0 reads the stem."""
    model = ImageNetResNet(blocks=(2, 1, 1, 1), widths=(4, 4, 8, 8), input_size=64, stem_width=6, net="hc")
    with torch.no_grad():
        model.gates.logits.log_alpha.fill_(40.0)
    expected = 3 * 7 ** 4 * 6
    c_in = 6
    for width in (4, 4, 4, 8, 8):
        expected += c_in * width + width * 81 * width
        c_in = 4 * width
    assert L0Penalty(model)(1.0).item() == pytest.approx(expected, rel=1e-6)
