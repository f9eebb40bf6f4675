"""The gated models (models/): forward/backward, structure records, dense and
pruned MACs/params, gate placement, and rebuilding from ``arch``.

Costs are checked against counts written here from the spec (section 3) and
against torch.utils.flop_counter on physically sliced convs, not against the
model's own records."""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from l0_layers import hard_concrete
from models import CifarResNet, ImageNetResNet, VGG, build_model, resnet50, resnet56, vgg16

FAMILIES = ("vgg", "resnet56", "resnet50")
NETS = ("hc", "dep", "dense")


def flops(fn, *args):
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def gate_sides(model, name):
    """(input gate, output gate) of a conv/linear, from the spec's description of
    where gates sit — written independently of the model's records."""
    if isinstance(model, VGG):
        n = len(model.features)
        if name == "classifier":
            return n - 1, None
        i = int(re.fullmatch(r"features\.(\d+)\.conv", name).group(1))
        return (i - 1 if i else None), i
    if isinstance(model, CifarResNet):
        if name == "conv1":
            return None, 0
        if name == "linear":
            return None, None
        b, part = re.fullmatch(r"layers\.(\d+)\.(conv1|conv2|shortcut\.0)", name).groups()
        b = int(b)
        stream = 0 if b == 0 else None  # only the stem's gated output feeds block 0 directly
        return {"conv1": (stream, b + 1), "conv2": (b + 1, None), "shortcut.0": (stream, None)}[part]
    if isinstance(model, ImageNetResNet):
        if name == "conv1":
            return None, 0
        if name == "fc":
            return None, None
        b, part = re.fullmatch(r"layers\.(\d+)\.(conv1|conv2|conv3|downsample\.0)", name).groups()
        b = int(b)
        stream = 0 if b == 0 else None
        return {"conv1": (stream, 1 + 2 * b), "conv2": (1 + 2 * b, 2 + 2 * b), "conv3": (2 + 2 * b, None),
                "downsample.0": (stream, None)}[part]
    raise TypeError(model)


def weight_modules(model):
    """Every conv / linear of the deployable network (the gate MLP excluded)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not n.startswith("gates.")]


def input_shapes(model, x):
    """Input shape of every conv / linear on a forward pass."""
    shapes, handles = {}, []
    for name, m in weight_modules(model):
        handles.append(m.register_forward_pre_hook(lambda mod, inp, name=name: shapes.__setitem__(name, inp[0].shape)))
    model.eval()
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return shapes


def independent_cost(model, x, kept):
    """(MACs, params) of the pruned network, counted by building each conv /
    linear with its kept channel counts and running FlopCounterMode on it."""
    shapes = input_shapes(model, x[:1])
    macs, params = 0, 0
    for name, m in weight_modules(model):
        g_in, g_out = gate_sides(model, name)
        if isinstance(m, nn.Conv2d):
            c_in = m.in_channels if g_in is None else int(kept[g_in])
            c_out = m.out_channels if g_out is None else int(kept[g_out])
            conv = nn.Conv2d(c_in, c_out, m.kernel_size, m.stride, m.padding, bias=m.bias is not None)
            macs += flops(conv, torch.zeros(1, c_in, *shapes[name][2:])) // 2
            params += sum(p.numel() for p in conv.parameters()) + 2 * c_out  # + BN affine (every conv has a BN)
        else:
            c_in = m.in_features if g_in is None else int(kept[g_in])
            lin = nn.Linear(c_in, m.out_features)
            macs += flops(lin, torch.zeros(1, c_in)) // 2
            params += sum(p.numel() for p in lin.parameters())
    return macs, params


# ------------------------------------------------------------------ forward / backward


@pytest.mark.parametrize("back_dep", [False, True])
@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward_gradients(family, net, back_dep, tiny):
    model, x = tiny(family, net=net, back_dep=back_dep)
    model.train()
    out = model(x)
    assert out.shape == (x.shape[0], 10)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([1, 7])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    gate_params = model.gate_parameters()
    if net == "dense":
        assert gate_params == []
    else:
        assert gate_params
        assert sum(p.grad.abs().sum() for p in gate_params) > 0
        assert {id(p) for p in gate_params} | {id(p) for p in model.weight_parameters()} == \
            {id(p) for p in model.parameters()}
        assert not {id(p) for p in gate_params} & {id(p) for p in model.weight_parameters()}


@pytest.mark.parametrize("back_dep", [False, True])
@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_eval_deterministic(family, net, back_dep, tiny):
    model, x = tiny(family, net=net, back_dep=back_dep)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("net", ("hc", "dep"))
@pytest.mark.parametrize("family", FAMILIES)
def test_training_forward_is_stochastic(family, net, tiny):
    model, x = tiny(family, net=net)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))


# ------------------------------------------------------------------ full-size structure


@pytest.fixture(scope="module")
def full_models():
    torch.manual_seed(0)
    return {"vgg16": vgg16(net="hc"), "resnet56": resnet56(net="hc"), "resnet50": resnet50(net="hc")}


@pytest.mark.parametrize("name,layers,channels", [("vgg16", 13, 4224), ("resnet56", 28, 1024),
                                                  ("resnet50", 33, 7616)])
def test_gated_layer_counts(full_models, name, layers, channels):
    model = full_models[name]
    assert len(model.gated_layers) == layers
    assert sum(g.width for g in model.gated_layers) == channels
    assert model.gates.widths == tuple(g.width for g in model.gated_layers)
    assert model.gates.log_alpha().numel() == channels


def test_gated_layer_widths_full(full_models):
    assert model_widths(full_models["vgg16"]) == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert model_widths(full_models["resnet56"]) == [16] + [16] * 9 + [32] * 9 + [64] * 9
    r50 = [64]
    for n, w in zip((3, 4, 6, 3), (64, 128, 256, 512)):
        r50 += [w, w] * n
    assert model_widths(full_models["resnet50"]) == r50


def model_widths(model):
    return [g.width for g in model.gated_layers]


@pytest.mark.parametrize("name,macs,params,conv_linear_params,macs_rounded,params_rounded", [
    ("vgg16", 313_201_664, 14_728_266, 14_719_818, "313.20", "14.72"),
    ("resnet56", 125_747_840, 855_770, 851_514, "125.75", "0.85"),
    ("resnet50", 4_089_184_256, 25_557_032, None, "4089.18", "25.56"),
])
def test_dense_cost_full(full_models, name, macs, params, conv_linear_params, macs_rounded, params_rounded):
    model = full_models[name]
    dense_macs, dense_params = model.cost.dense()
    assert (dense_macs, dense_params) == (macs, params)
    assert dense_params == sum(p.numel() for p in model.weight_parameters())
    cl = sum(p.numel() for _, m in weight_modules(model) for p in m.parameters())
    if conv_linear_params is not None:
        assert cl == conv_linear_params
        assert f"{cl / 1e6:.2f}" == params_rounded
    else:
        assert f"{dense_params / 1e6:.2f}" == params_rounded
    assert f"{dense_macs / 1e6:.2f}" == macs_rounded
    # pruned() with every channel kept is the dense cost
    assert model.cost.pruned(torch.tensor(model.gates.widths)) == (dense_macs, dense_params)


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_macs_match_flop_counter_tiny(family, tiny):
    model, x = tiny(family, net="dense")
    model.eval()
    with torch.no_grad():
        total = flops(model, x[:1])
    assert total // 2 == model.cost.dense()[0]
    assert total % 2 == 0


@pytest.mark.parametrize("builder,size", [(vgg16, 32), (resnet56, 32),
                                          (lambda **kw: ImageNetResNet(input_size=64, **kw), 64)],
                         ids=["vgg16", "resnet56", "resnet50@64"])
def test_dense_macs_match_flop_counter_full(builder, size):
    model = builder(net="dense")
    model.eval()
    with torch.no_grad():
        total = flops(model, torch.randn(1, 3, size, size))
    assert total // 2 == model.cost.dense()[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_records_match_modules(family, tiny):
    """The records describe the real modules (widths, kernel, output size, gates)."""
    model, x = tiny(family, net="hc")
    modules = dict(weight_modules(model))
    assert [w.name for w in model.weight_layers] == list(modules)  # every conv/linear, in order
    out_hw = {}
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: out_hw.__setitem__(n, o.shape[2] * o.shape[3]
                                                                                  if o.dim() == 4 else 1))
               for n, m in modules.items()]
    model.eval()
    with torch.no_grad():
        model(x[:1])
    for h in handles:
        h.remove()
    named = dict(model.named_modules())
    for w in model.weight_layers:
        m = modules[w.name]
        if isinstance(m, nn.Conv2d):
            assert (w.in_channels, w.out_channels, w.kernel) == (m.in_channels, m.out_channels, m.kernel_size[0])
            assert w.bias == (m.bias is not None)
            assert isinstance(named[w.bn], nn.BatchNorm2d) and named[w.bn].num_features == m.out_channels
        else:
            assert (w.in_channels, w.out_channels, w.kernel, w.bn) == (m.in_features, m.out_features, 1, None)
        assert w.out_hw == out_hw[w.name], w.name
        assert (w.in_gate, w.out_gate) == gate_sides(model, w.name), w.name


# ------------------------------------------------------------------ pruned accounting


@pytest.mark.parametrize("one_open_layer", [0, 1, 2])
@pytest.mark.parametrize("net", ("hc", "dep"))
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_cost_matches_sliced_convs(family, net, one_open_layer, tiny, set_logits, random_logits):
    model, x = tiny(family, net=net)
    gen = torch.Generator().manual_seed(17 + one_open_layer)
    la = random_logits(model.gates.widths, gen, one_open_layer=one_open_layer)
    set_logits(model, la)
    kept = model.gates.kept()
    expected_kept = [int((s > hard_concrete.PRUNE_THRESHOLD).sum()) for s in la.split(model.gates.widths)]
    assert kept.tolist() == expected_kept
    assert kept[one_open_layer] == 1
    assert (kept < torch.tensor(model.gates.widths)).sum() >= 2  # really pruned, in more than one layer
    assert model.cost.pruned(kept) == independent_cost(model, x, kept)


@pytest.mark.parametrize("builder,size", [(vgg16, 32), (resnet56, 32)], ids=["vgg16", "resnet56"])
def test_pruned_cost_full_size(builder, size, set_logits, random_logits):
    model = builder(net="hc")
    la = random_logits(model.gates.widths, torch.Generator().manual_seed(5), one_open_layer=3)
    set_logits(model, la)
    kept = model.gates.kept()
    assert model.cost.pruned(kept) == independent_cost(model, torch.randn(1, 3, size, size), kept)


def test_resnet56_stem_rule():
    """A closed stem channel removes the stem filter (+ BN entry) and one input
    channel of layers.0.conv1 only; the residual stream keeps its width."""
    model = resnet56(net="hc")
    dense_macs, dense_params = model.cost.dense()
    for closed in (1, 5, 15):
        kept = torch.tensor(model.gates.widths)
        kept[0] -= closed
        macs, params = model.cost.pruned(kept)
        hw = 32 * 32
        assert dense_macs - macs == closed * (9 * 3 * hw + 9 * 16 * hw)
        assert dense_params - params == closed * (9 * 3 + 2 + 9 * 16)


def test_resnet50_stem_rule():
    model = resnet50(net="hc")
    dense_macs, dense_params = model.cost.dense()
    kept = torch.tensor(model.gates.widths)
    kept[0] -= 1
    macs, params = model.cost.pruned(kept)
    # stem 7x7 at 112x112; layers.0.conv1 (1x1 -> 64) and downsample (1x1 -> 256) at 56x56
    assert dense_macs - macs == 49 * 3 * 112 * 112 + (64 + 256) * 56 * 56
    assert dense_params - params == 49 * 3 + 2 + 64 + 256


# ------------------------------------------------------------------ gated-layer records


def test_consumers_vgg(tiny):
    model, _ = tiny("vgg", net="hc")
    n = len(model.features)
    for i, g in enumerate(model.gated_layers):
        assert g.conv == g.name == f"features.{i}.conv"
        assert g.bn == f"features.{i}.bn"
        assert g.kernel == 3
        assert g.consumers == ((f"features.{i + 1}.conv",) if i + 1 < n else ("classifier",))


def test_consumers_full_vgg16(full_models):
    model = full_models["vgg16"]
    assert [g.in_channels for g in model.gated_layers] == [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512]
    assert model.gated_layers[-1].consumers == ("classifier",)


def test_consumers_resnet56(full_models):
    model = full_models["resnet56"]
    stem, *blocks = model.gated_layers
    assert (stem.conv, stem.bn, stem.kernel, stem.in_channels) == ("conv1", "bn1", 3, 3)
    assert stem.consumers == ("layers.0.conv1",)
    assert len(blocks) == 27
    for b, g in enumerate(blocks):
        assert g.conv == f"layers.{b}.conv1"
        assert g.bn == f"layers.{b}.bn1"
        assert g.consumers == (f"layers.{b}.conv2",)
        assert g.kernel == 3


def test_consumers_resnet50(full_models):
    model = full_models["resnet50"]
    stem, *rest = model.gated_layers
    assert (stem.conv, stem.bn, stem.kernel, stem.in_channels) == ("conv1", "bn1", 7, 3)
    assert stem.consumers == ("layers.0.conv1", "layers.0.downsample.0")
    assert len(rest) == 32
    c_in = 64
    for b in range(16):
        g1, g2 = rest[2 * b], rest[2 * b + 1]
        assert (g1.conv, g1.bn, g1.kernel) == (f"layers.{b}.conv1", f"layers.{b}.bn1", 1)
        assert g1.consumers == (f"layers.{b}.conv2",)
        assert g1.in_channels == c_in
        assert (g2.conv, g2.bn, g2.kernel) == (f"layers.{b}.conv2", f"layers.{b}.bn2", 3)
        assert g2.consumers == (f"layers.{b}.conv3",)
        assert g2.in_channels == g1.width
        c_in = 4 * g1.width


# ------------------------------------------------------------------ gates really gate


def _check_gates_applied(model, x, gate_values, training):
    """Each gated layer's first consumer reads relu(BN output * gate) (max-pooled
    where a pooling sits in between), so a closed gate gives exact zeros."""
    named = dict(model.named_modules())
    with torch.no_grad():
        # BN biases of 1: an open channel whose inputs are all non-negative (after a ReLU) and
        # whose weights happen to be all negative would otherwise be zero after the ReLU too.
        for g in model.gated_layers:
            named[g.bn].bias.fill_(1.0)
    conv_out, consumer_in, handles = {}, {}, []
    for g in model.gated_layers:
        # The conv's output, not the BN's: in training mode BN, gate and ReLU run
        # as one function and the BN module's forward is not called.
        handles.append(named[g.name].register_forward_hook(
            lambda m, i, o, n=g.name: conv_out.__setitem__(n, o.detach().clone())))
        handles.append(named[g.consumers[0]].register_forward_pre_hook(
            lambda m, i, n=g.name: consumer_in.__setitem__(n, i[0].detach().clone())))
    model.train(training)
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    for l, g in enumerate(model.gated_layers):
        z = gate_values[l]
        bn = named[g.bn]
        bn_out = F.batch_norm(conv_out[g.name], None if training else bn.running_mean,
                              None if training else bn.running_var, bn.weight, bn.bias, training, eps=bn.eps)
        expected = F.relu(bn_out * z.view(1, -1, 1, 1))
        got = consumer_in[g.name]
        if isinstance(model, VGG):
            stage = named[g.name.rsplit(".", 1)[0]]
            if isinstance(stage.pool, nn.MaxPool2d):
                expected = F.max_pool2d(expected, 2)
            got = got.view(expected.shape)
        elif isinstance(model, ImageNetResNet) and l == 0:
            expected = F.max_pool2d(expected, 3, 2, 1)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        closed = z == 0
        assert closed.any() and (~closed).any()
        assert (got[:, closed] == 0).all()
        assert (got[:, ~closed] != 0).any()


@pytest.mark.parametrize("back_dep", [False, True])
@pytest.mark.parametrize("net", ("hc", "dep"))
@pytest.mark.parametrize("family", FAMILIES)
def test_eval_closed_gate_gives_exact_zero(family, net, back_dep, tiny, set_logits):
    model, x = tiny(family, net=net, back_dep=back_dep)
    gen = torch.Generator().manual_seed(3)
    la = torch.empty(sum(model.gates.widths), dtype=torch.float64).uniform_(-4, 4, generator=gen)
    for a in torch.tensor([0] + list(model.gates.widths)).cumsum(0)[:-1].tolist():
        la[a], la[a + 1] = -3.0, 0.5  # each layer: one closed, one fractional channel
    set_logits(model, la)
    z = hard_concrete.deterministic(model.gates.log_alpha().detach())
    _check_gates_applied(model, x, z.split(model.gates.widths), training=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_closed_gate_gives_exact_zero(family, tiny, set_logits):
    """In training mode a logit of -50 samples z = 0 and +50 samples z = 1."""
    model, x = tiny(family, net="hc")
    widths = model.gates.widths
    la = torch.full((sum(widths),), 50.0, dtype=torch.float64)
    for a in torch.tensor([0] + list(widths)).cumsum(0)[:-1].tolist():
        la[a] = -50.0
    set_logits(model, la)
    z = (la > 0).float()
    _check_gates_applied(model, x, z.split(widths), training=True)


# ------------------------------------------------------------------ rebuild from arch


@pytest.mark.parametrize("back_dep", [False, True])
@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_build_model_from_arch(family, net, back_dep, tiny):
    model, x = tiny(family, net=net, back_dep=back_dep)
    with torch.no_grad():  # move BN statistics away from their defaults
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    clone = build_model(model.arch)
    assert type(clone) is type(model)
    assert clone.arch == model.arch
    assert clone.gated_layers == model.gated_layers
    assert clone.weight_layers == model.weight_layers
    assert clone.gates.net == net and clone.gates.back_dep == back_dep
    clone.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    clone.eval()
    with torch.no_grad():
        assert torch.equal(model(x), clone(x))


def test_build_model_full_size_arch():
    for builder in (vgg16, resnet56):
        model = builder(net="dep", back_dep=True, num_classes=100)
        clone = build_model(model.arch)
        assert clone.arch == model.arch
        assert clone.cost.dense() == model.cost.dense()
        clone.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_fully_closed_layer_counts_one_zero_channel(family, tiny):
    """structure.CostModel.pruned: a layer with every gate closed still counts
    the one zero channel the exported network keeps."""
    model, x = tiny(family, net="hc")
    kept = torch.tensor(model.gates.widths)
    kept[1] = 0
    one = kept.clone()
    one[1] = 1
    assert model.cost.pruned(kept) == model.cost.pruned(one) == independent_cost(model, x, one)
