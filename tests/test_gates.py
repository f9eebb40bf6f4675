"""Hard-concrete gate math (l0_layers/hard_concrete.py) and the logit sources
and gate module (l0_layers/gates.py), against spec sections 1 and 2."""
import math

import pytest
import torch
import torch.nn.functional as F

from l0_layers import DEFAULT_TEMPERATURE, hard_concrete
from l0_layers.gates import ChannelGates, DependencyMLP, FreeLogits
from models import VGG, CifarResNet, ImageNetResNet, resnet50, resnet56, vgg16

GAMMA, ZETA = -0.1, 1.1
BETA = 2.0 / 3.0
LOGITS = (-3.0, -1.0, 0.0, 1.0, 3.0)


def test_constants():
    assert hard_concrete.GAMMA == GAMMA
    assert hard_concrete.ZETA == ZETA
    assert DEFAULT_TEMPERATURE == pytest.approx(BETA)
    assert hard_concrete.PRUNE_THRESHOLD == pytest.approx(math.log(1.0 / 11.0))


# ---------------------------------------------------------------- distribution


def _p_nonzero_from_cdf(log_alpha, beta):
    """1 - Q(0) from the binary-concrete CDF, independent of the library.

    s ~ BinConcrete(alpha, beta) has CDF Q_s(t) = sigmoid(beta * logit(t) - log_alpha);
    the stretched gate s*(zeta-gamma)+gamma is <= 0 iff s <= -gamma/(zeta-gamma).
    """
    t = -GAMMA / (ZETA - GAMMA)
    q0 = 1.0 / (1.0 + math.exp(-(beta * math.log(t / (1.0 - t)) - log_alpha)))
    return 1.0 - q0


def _p_one_from_cdf(log_alpha, beta):
    t = (1.0 - GAMMA) / (ZETA - GAMMA)
    return 1.0 - 1.0 / (1.0 + math.exp(-(beta * math.log(t / (1.0 - t)) - log_alpha)))


def _mean_by_quadrature(log_alpha, beta, n=2_000_000):
    """E[z] = integral over u in (0,1) of z(u), midpoint rule in float64."""
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1).mean().item()


@pytest.mark.parametrize("beta", [BETA, 0.4])
def test_closed_form_matches_cdf(beta):
    for la in LOGITS + (-5.0, 5.0, 0.37):
        expected = _p_nonzero_from_cdf(la, beta)
        got = hard_concrete.prob_nonzero(torch.tensor([la], dtype=torch.float64), beta).item()
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-14)
        # and the spec's formula sigmoid(log_alpha - beta log(-gamma/zeta))
        assert got == pytest.approx(1 / (1 + math.exp(-(la - beta * math.log(-GAMMA / ZETA)))), rel=1e-12)


@pytest.mark.parametrize("beta", [BETA, 0.4])
def test_monte_carlo_matches_prob_nonzero(beta):
    torch.manual_seed(1234)
    n = 200_000
    la = torch.tensor(LOGITS)
    z = hard_concrete.sample(la, n, beta)
    assert z.shape == (n, len(LOGITS))
    freq_nonzero = (z > 0).double().mean(0)
    freq_one = (z == 1).double().mean(0)
    mean = z.double().mean(0)
    p = hard_concrete.prob_nonzero(la.double(), beta)
    for i, a in enumerate(LOGITS):
        se = math.sqrt(p[i] * (1 - p[i]) / n)
        assert abs(freq_nonzero[i].item() - p[i].item()) < 5 * se, (a, freq_nonzero[i], p[i])
        assert abs(freq_nonzero[i].item() - _p_nonzero_from_cdf(a, beta)) < 5 * se
        p1 = _p_one_from_cdf(a, beta)
        se1 = math.sqrt(p1 * (1 - p1) / n)
        assert abs(freq_one[i].item() - p1) < 5 * se1, (a, freq_one[i], p1)
        m = _mean_by_quadrature(a, beta)
        se_m = z[:, i].double().std().item() / math.sqrt(n)
        assert abs(mean[i].item() - m) < 5 * se_m + 1e-6, (a, mean[i], m)


def test_sample_shape_range_and_exact_endpoints():
    torch.manual_seed(0)
    la = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0, -1.0, 1.0])
    z = hard_concrete.sample(la, 4000, BETA)
    assert z.shape == (4000, 7)
    assert z.dtype == la.dtype
    assert z.min() >= 0 and z.max() <= 1
    assert (z == 0).any() and (z == 1).any()
    assert ((z > 0) & (z < 1)).any()
    # each channel's logit acts on its own column: a very negative logit is always 0,
    # a very positive one always 1
    z = hard_concrete.sample(torch.tensor([-60.0, 60.0, 0.0]), 1000, BETA)
    assert (z[:, 0] == 0).all() and (z[:, 1] == 1).all()


def test_sample_2d_logits_shape():
    z = hard_concrete.sample(torch.zeros(3, 5), 2, BETA)
    assert z.shape == (2, 3, 5)


def test_sample_noise_independent_per_example_and_channel():
    torch.manual_seed(0)
    z = hard_concrete.sample(torch.zeros(16), 8, BETA)
    for i in range(8):
        for j in range(i + 1, 8):
            assert not torch.equal(z[i], z[j])
    # the same logit in different channels gets different noise too
    assert len(torch.unique(z[0])) > 8
    # and the samples are random: two calls differ
    assert not torch.equal(hard_concrete.sample(torch.zeros(16), 8, BETA), z)


def test_sample_differentiable():
    la = torch.zeros(32, requires_grad=True)
    torch.manual_seed(0)
    hard_concrete.sample(la, 64, BETA).sum().backward()
    assert la.grad is not None and torch.isfinite(la.grad).all() and (la.grad > 0).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_equals_the_plain_composition_bit_for_bit(dtype):
    """The sample with its in-place passes gives the plain formula's gates and
    logit gradients exactly, with and without autograd."""
    def plain(la, n):
        u = torch.empty((n, *la.shape), dtype=la.dtype).uniform_(hard_concrete.EPS, 1.0 - hard_concrete.EPS)
        s = torch.sigmoid((torch.logit(u) + la) / BETA)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    for shape in ((300,), (3, 5)):
        la = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(2)) * 3
        la[0] = 60.0  # always 1: no gradient through the clamp
        grads, outs = [], []
        for fn in (plain, lambda a, n: hard_concrete.sample(a, n, BETA)):
            leaf = la.clone().requires_grad_()
            torch.manual_seed(5)
            z = fn(leaf, 97)
            z.backward(torch.linspace(-1, 1, z.numel(), dtype=dtype).view_as(z))
            outs.append(z.detach())
            grads.append(leaf.grad)
        assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])
        torch.manual_seed(5)
        assert torch.equal(hard_concrete.sample(la, 97, BETA), outs[0])  # no autograd


# ---------------------------------------------------------------- test gate


def test_deterministic_gate_threshold():
    t = hard_concrete.PRUNE_THRESHOLD
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor([t, t - 1e-4, t - 1.0, -50.0, t + 1e-4, t + 1e-2], dtype=dtype)
        z = hard_concrete.deterministic(x)
        assert (z[:4] == 0).all(), z
        assert (z[4:] > 0).all(), z


def test_deterministic_gate_values():
    la = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 2.3], dtype=torch.float64)
    z = hard_concrete.deterministic(la)
    assert ((z > 0) & (z < 1)).all()
    expected = (torch.sigmoid(la) * 1.2 - 0.1).clamp(0, 1)
    torch.testing.assert_close(z, expected)
    big = hard_concrete.deterministic(torch.tensor([math.log(11.0) + 1e-3, 2.5, 5.0, 100.0]))
    assert (big == 1).all()
    assert hard_concrete.deterministic(torch.tensor([0.0])).item() == pytest.approx(0.5)


def test_test_gate_has_no_temperature():
    la = torch.linspace(-4, 4, 11)
    outs = []
    for temp in (0.1, BETA, 2.0):
        g = ChannelGates([5, 6], "hc", temperature=temp)
        with torch.no_grad():
            g.logits.log_alpha.copy_(la)
        g.eval()
        outs.append(torch.cat([z.flatten() for z in g(3)]))
        torch.testing.assert_close(g.test_gates(), hard_concrete.deterministic(la))
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[2])
    torch.testing.assert_close(outs[0], hard_concrete.deterministic(la))


# ---------------------------------------------------------------- ChannelGates

WIDTHS = (3, 5, 2)


@pytest.mark.parametrize("net,back_dep", [("hc", False), ("dep", False), ("dep", True)])
def test_channel_gates_shapes_and_modes(net, back_dep):
    torch.manual_seed(0)
    g = ChannelGates(WIDTHS, net, back_dep)
    g.train()
    zs = g(4)
    assert len(zs) == 3
    assert [tuple(z.shape) for z in zs] == [(4, w, 1, 1) for w in WIDTHS]
    assert all(z.requires_grad for z in zs)
    g.eval()
    z1, z2 = g(4), g(4)
    assert [tuple(z.shape) for z in z1] == [(1, w, 1, 1) for w in WIDTHS]
    for a, b in zip(z1, z2):
        assert torch.equal(a, b)
    flat = torch.cat([z.flatten() for z in z1])
    torch.testing.assert_close(flat, hard_concrete.deterministic(g.log_alpha()))
    torch.testing.assert_close(flat, g.test_gates())


def test_channel_gates_split_order():
    g = ChannelGates(WIDTHS, "hc")
    with torch.no_grad():
        g.logits.log_alpha.copy_(torch.tensor([-60.0] * 3 + [60.0] * 5 + [0.0, -60.0]))
    g.train()
    z0, z1, z2 = g(6)
    assert (z0 == 0).all() and (z1 == 1).all() and (z2[:, 1] == 0).all()
    assert (z2[:, 0] > 0).any()


def test_channel_gates_dense():
    g = ChannelGates(WIDTHS, "dense")
    assert g(4) == (None, None, None)
    g.eval()
    assert g(1) == (None, None, None)
    assert list(g.parameters()) == []
    assert g.expected_open().tolist() == list(WIDTHS)
    assert g.kept().tolist() == list(WIDTHS)
    with pytest.raises(RuntimeError):
        g.log_alpha()


def test_channel_gates_bad_net():
    with pytest.raises(ValueError):
        ChannelGates(WIDTHS, "l0")


@pytest.mark.parametrize("net,back_dep", [("hc", False), ("dep", False), ("dep", True)])
def test_expected_open_and_kept(net, back_dep, set_logits):
    torch.manual_seed(0)
    g = ChannelGates(WIDTHS, net, back_dep, temperature=0.5)
    la = torch.tensor([-3.0, 0.2, 2.0, -2.5, -2.3, 1.0, 4.0, -4.0, -2.0, -2.4])

    class Holder:
        gates = g
    set_logits(Holder, la)
    s = g.expected_open()
    p = hard_concrete.prob_nonzero(g.log_alpha().detach(), 0.5)
    expected = torch.stack([p[0:3].sum(), p[3:8].sum(), p[8:10].sum()])
    torch.testing.assert_close(s, expected)
    assert s.requires_grad
    # test gates > 0 iff log_alpha > log(1/11) ~ -2.398
    assert g.kept().tolist() == [2, 3, 1]
    assert g.kept().dtype == torch.long


@pytest.mark.parametrize("net,back_dep", [("hc", False), ("dep", False), ("dep", True)])
def test_frozen_gates(net, back_dep):
    torch.manual_seed(0)
    model = CifarResNet(blocks_per_stage=1, widths=(4, 8, 8), net=net, back_dep=back_dep)
    if net == "hc":
        with torch.no_grad():
            model.gates.logits.log_alpha.uniform_(-3, 3)
    model.gates.freeze()
    assert model.gates.frozen
    assert all(not p.requires_grad for p in model.gate_parameters())
    model.train()
    zs = model.gates(5)
    flat = torch.cat([z.flatten() for z in zs])
    assert [tuple(z.shape) for z in zs] == [(1, w, 1, 1) for w in model.gates.widths]
    torch.testing.assert_close(flat, model.gates.test_gates())
    assert not any(z.requires_grad for z in zs)
    # deterministic even in training mode
    for a, b in zip(zs, model.gates(5)):
        assert torch.equal(a, b)
    out = model(torch.randn(3, 3, 32, 32))
    F.cross_entropy(out, torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is None for p in model.gate_parameters())
    assert all(p.grad is not None for p in model.weight_parameters())


# ---------------------------------------------------------------- logit sources


def test_free_logits_init():
    torch.manual_seed(0)
    f = FreeLogits([4000, 6000])
    la = f()
    assert la.shape == (10000,)
    assert isinstance(f.log_alpha, torch.nn.Parameter)
    assert la.mean().item() == pytest.approx(3.0, abs=1e-3)
    assert la.std().item() == pytest.approx(0.01, rel=0.05)


@pytest.mark.parametrize("backward", [False, True])
def test_dependency_mlp_dims(backward):
    widths = (3, 5, 2, 7)
    m = DependencyMLP(widths, backward=backward)
    dims = [(layer.in_features, layer.out_features) for layer in m.layers]
    if backward:
        assert dims == [(7, 7), (7, 2), (2, 5), (5, 3)]
    else:
        assert dims == [(3, 3), (3, 5), (5, 2), (2, 7)]
    out = m()
    assert out.shape == (sum(widths),)
    # the per-layer slices of log_alpha come from the Linear with the layer's width
    pieces = out.split(widths)
    producers = list(reversed(m.layers)) if backward else list(m.layers)
    for piece, layer, w in zip(pieces, producers, widths):
        assert layer.out_features == w == piece.numel()


@pytest.mark.parametrize("backward", [False, True])
def test_dependency_mlp_input_dim(backward):
    m = DependencyMLP((3, 5, 2), backward=backward, input_dim=11)
    assert m.layers[0].in_features == 11
    assert m.layers[0].out_features == (2 if backward else 3)
    assert m().shape == (10,)


def test_dependency_mlp_init():
    torch.manual_seed(0)
    m = DependencyMLP((200, 300, 500))
    biases = torch.cat([layer.bias.detach() for layer in m.layers])
    assert biases.mean().item() == pytest.approx(3.0, abs=2e-3)
    assert biases.std().item() == pytest.approx(0.01, rel=0.1)
    for layer in m.layers:
        bound = 1 / math.sqrt(layer.in_features)
        w = layer.weight.detach()
        assert w.abs().max() <= bound  # PyTorch's default kaiming-uniform bound
        assert w.abs().max() > 0.9 * bound and abs(w.mean().item()) < 0.1 * bound
    out = m().detach()
    # the bound log(100) itself is reachable in float32 when tanh saturates
    assert (out.abs() <= torch.tensor(math.log(100))).all()
    assert (out.abs() > 0).all()


@pytest.mark.parametrize("backward", [False, True])
def test_dependency_mlp_hand_computation(backward):
    torch.manual_seed(3)
    widths = (3, 4, 2)
    m = DependencyMLP(widths, backward=backward)
    with torch.no_grad():
        for layer in m.layers:  # make the chain non-trivial (default biases saturate tanh)
            layer.weight.normal_(0, 0.2)
            layer.bias.normal_(0, 0.3)
    chain = list(reversed(widths)) if backward else list(widths)
    a = torch.ones(chain[0], dtype=torch.float64)
    outs = []
    for layer in m.layers:
        W = layer.weight.detach().double()
        b = layer.bias.detach().double()
        a = math.log(100.0) * torch.tanh(W @ a + b)
        outs.append(a)
    if backward:
        outs = outs[::-1]
    expected = torch.cat(outs)
    got = m().double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the slice of the first gated layer has the first layer's width in both directions
    assert [t.numel() for t in got.split(widths)] == list(widths)
    assert (got.abs() < math.log(100)).all()
    assert got.abs().min() > 0.05  # not a trivial (zero) chain


@pytest.mark.parametrize("backward", [False, True])
def test_dependency_mlp_gradients_reach_all_layers(backward):
    torch.manual_seed(0)
    m = DependencyMLP((3, 4, 2), backward=backward)
    with torch.no_grad():
        for layer in m.layers:
            layer.bias.zero_()
    m().sum().backward()
    for layer in m.layers:
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
        assert layer.bias.grad is not None and layer.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("builder,forward_dim,backward_dim", [
    (vgg16, 64, 64),
    (resnet56, 16, 64),
    (resnet50, 64, 512),
], ids=["vgg16", "resnet56", "resnet50"])
def test_reference_dep_input_dims(builder, forward_dim, backward_dim):
    for back_dep, dim in ((False, forward_dim), (True, backward_dim)):
        model = builder(net="dep", back_dep=back_dep)
        layers = model.gates.logits.layers
        widths = model.gates.widths
        assert len(layers) == len(widths)
        assert layers[0].in_features == dim
        chain = list(reversed(widths)) if back_dep else list(widths)
        assert [layer.out_features for layer in layers] == chain
        assert [layer.in_features for layer in layers[1:]] == chain[:-1]
        assert model.gates.log_alpha().shape == (sum(widths),)


def test_channel_gates_dep_small_models_dims():
    # without an override, d_0 is the first (forward) or last (backward) gated width
    m = ImageNetResNet(blocks=(1, 1, 1, 1), widths=(4, 4, 8, 8), input_size=64, net="dep", back_dep=True)
    assert m.gates.logits.layers[0].in_features == 8
    m = CifarResNet(blocks_per_stage=1, widths=(4, 8, 8), net="dep", back_dep=True)
    assert m.gates.logits.layers[0].in_features == 8
    m = CifarResNet(blocks_per_stage=1, widths=(4, 8, 8), net="dep")
    assert m.gates.logits.layers[0].in_features == 4
    # VGG feeds the first layer's width both ways
    m = VGG(cfg=(8, "M", 8, "M", 16, "M", 16, "M", 32, "M"), net="dep", back_dep=True)
    assert m.gates.logits.layers[0].in_features == 8
    assert m.gates.logits.layers[0].out_features == 32
