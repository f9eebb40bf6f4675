"""The peers' own networks (models/resnet_cifar_a.py, models/vgg_apib.py, models/googlenet.py): their
dense cost tables, where their gates sit, export, and every method on each.

Costs are checked against numbers written here from the authors' code and papers and against an
independent counter (forward hooks on every conv and Linear: output elements x in/groups x k x k,
and in x out), never against the model's own records alone. Gate placement is written here from
each network's description, independently of its records. Method checks run tiny widths
(``width_mult`` 0.125) for one or two steps, in-process.
"""
import copy
import json
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine import cli
from engine.cli import Recipe
import models
from models import build_model, default_arch, export_pruned, load_pruned, save_pruned
from pruning import hsic
from pruning.greg import GReg
from pruning.penalty import L0Penalty
from pruning.selection import decision, layer_ratios, macs_fraction, parse_ratio_list, ratios_for_macs, uniform_layers
from pruning.sparse import StaticSparse, sparse_layers
from utils.errors import UsageError

NETWORKS = ("resnet20a", "resnet32a", "resnet56a", "resnet110a", "vgg16_apib", "googlenet")
TINY = 0.125
BLOCKS = {"resnet20a": 3, "resnet32a": 5, "resnet56a": 9, "resnet110a": 18}
GOOGLENET_BLOCKS = ("a3", "b3", "a4", "b4", "c4", "d4", "e4", "a5", "b5")

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(name, **gate_args):
    torch.manual_seed(0)
    return build_model(default_arch(name, 10, TINY, **gate_args))


def weight_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
            and not n.startswith("gates.")]


def hook_macs(model, size=32) -> int:
    """Conv and Linear MACs of one forward, counted by hooks on the modules themselves."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output[0].numel() * module.in_channels // module.groups * kh * kw
        else:
            total += output[0].numel() * module.in_features

    handles = [m.register_forward_hook(count) for _, m in weight_modules(model)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def param_count(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("gates."))


# ------------------------------------------------------------------ the dense cost tables

# name: gated layers, gated channels, MACs, params (BN included), conv + linear params, the table's rounding
TABLE = {
    # akamaster's table: 0.27 M, 0.46 M, 0.85 M, 1.7 M; the issue: option-A ResNet56 125.49 M
    "resnet20a": (9, 336, 40_551_040, 269_722, 268_346, "40.55 M", "0.27 M"),
    "resnet32a": (15, 560, 68_862_592, 464_154, 461_882, "68.86 M", "0.46 M"),
    "resnet56a": (27, 1008, 125_485_696, 853_018, 848_954, "125.49 M", "0.85 M"),
    "resnet110a": (54, 2016, 252_887_680, 1_727_962, 1_719_866, "252.89 M", "1.73 M"),
    # the papers' VGG16: 14.98 M parameters
    "vgg16_apib": (13, 4224, 313_463_808, 14_986_698, 14_978_250, "313.46 M", "14.99 M"),
    # HRank's and HSIC-Lasso's GoogLeNet: 1.52 B FLOPs, 6.15 M parameters
    "googlenet": (27, 2224, 1_521_756_160, 6_166_250, 6_150_442, "1521.76 M", "6.17 M"),
}


def macs_by_hand(name) -> int:
    """The dense MACs from the layer list, written out here (3x3 convs, no bias terms)."""
    if name in BLOCKS:
        n, hw = BLOCKS[name], 32 * 32
        macs = 3 * 16 * 9 * hw + 16 * 16 * 9 * hw * 2 * n
        for c_in, c, hw in ((16, 32, 16 * 16), (32, 64, 8 * 8)):
            macs += (c_in * c + c * c) * 9 * hw + c * c * 9 * hw * 2 * (n - 1)
        return macs + 64 * 10
    if name == "vgg16_apib":
        plan = [(3, 64, 32), (64, 64, 32), (64, 128, 16), (128, 128, 16), (128, 256, 8), (256, 256, 8), (256, 256, 8),
                (256, 512, 4), (512, 512, 4), (512, 512, 4), (512, 512, 2), (512, 512, 2), (512, 512, 2)]
        return sum(a * b * 9 * s * s for a, b, s in plan) + 512 * 512 + 512 * 10
    blocks = [(64, 96, 128, 16, 32, 32, 32), (128, 128, 192, 32, 96, 96, 64), (192, 96, 208, 16, 48, 48, 64),
              (160, 112, 224, 24, 64, 64, 64), (128, 128, 256, 24, 64, 64, 64), (112, 144, 288, 32, 64, 64, 64),
              (256, 160, 320, 32, 128, 128, 128), (256, 160, 320, 32, 128, 128, 128), (384, 192, 384, 48, 128, 128, 128)]
    macs, c_in, size = 3 * 192 * 9 * 32 * 32, 192, 32
    for i, (n1, r3, n3, r5, m5, n5, pool) in enumerate(blocks):
        macs += (c_in * (n1 + r3 + r5 + pool) + 9 * (r3 * n3 + r5 * m5 + m5 * n5)) * size * size
        c_in = n1 + n3 + n5 + pool
        size = size // 2 if i in (1, 6) else size
    return macs + 1024 * 10


@pytest.mark.parametrize("name", NETWORKS)
def test_dense_cost_table(name):
    gated, channels, macs, params, conv_linear, macs_text, params_text = TABLE[name]
    model = build_model(default_arch(name, 10, net="dense"))
    assert (len(model.gated_layers), sum(model.gates.widths)) == (gated, channels)
    assert model.cost.dense() == (macs, params) and macs == macs_by_hand(name)
    assert param_count(model) == params
    assert sum(p.numel() for _, m in weight_modules(model) for p in m.parameters()) == conv_linear
    assert hook_macs(model.to("meta")) == macs
    # The module's docstring table says the same.
    doc = sys.modules[type(model).__module__].__doc__
    row = next(line for line in doc.splitlines() if line.startswith(name + " "))
    assert macs_text in row and params_text in row, row
    assert f"{macs / 1e6:.2f} M" == macs_text and f"{params / 1e6:.2f} M" == params_text


def test_greg_published_ratios_on_option_a_resnet56():
    """GReg's --stage_pr [0,0.75,0.75,0.32,0]: conv1 of every block keeps 4 / 8 / 43 filters; the authors
    count 49.12 M MACs (the issue's number), confirmed on the exported network by the hook counter."""
    model = build_model(default_arch("resnet56a", 10, net="dense"))
    ratios = layer_ratios(model, parse_ratio_list("[0,0.75,0.75,0.32,0]"))
    gates = decision(model, ratios)
    compact, payload = export_pruned(model, gates=gates)
    assert list(compact.arch["inner_widths"]) == [4] * 9 + [8] * 9 + [43] * 9
    assert payload["macs"] == 49_121_920 and f"{payload['macs'] / 1e6:.2f}" == "49.12"
    assert hook_macs(compact) == payload["macs"] and param_count(compact) == payload["params"]
    with pytest.raises(UsageError, match="entry 0 .* has no prunable layer"):
        layer_ratios(model, parse_ratio_list("[0.5,0.75,0.75,0.32,0]"))


# ------------------------------------------------------------------ where the gates sit


def gate_sides(name, layer):
    """(input gate, output gate) of a conv / Linear, from each network's description."""
    if name in BLOCKS:
        match = re.fullmatch(r"layer(\d)\.(\d+)\.conv(\d)", layer)
        if not match:
            assert layer in ("conv1", "linear")
            return None, None
        stage, block, conv = (int(g) for g in match.groups())
        gate = (stage - 1) * BLOCKS[name] + block
        return (None, gate) if conv == 1 else (gate, None)
    if name == "vgg16_apib":
        if layer == "classifier.0":
            return 12, None
        if layer == "classifier.2":
            return None, None
        i = int(re.fullmatch(r"features\.(\d+)\.conv", layer).group(1))
        return (i - 1 if i else None), i
    if layer in ("stem.conv", "linear"):
        return None, None
    block, part = re.fullmatch(r"inception_(\w\d)\.(\w+)\.conv", layer).groups()
    g = 3 * GOOGLENET_BLOCKS.index(block)
    return {"b1": (None, None), "b3_reduce": (None, g), "b3": (g, None), "b5_reduce": (None, g + 1),
            "b5_mid": (g + 1, g + 2), "b5": (g + 2, None), "pool_proj": (None, None)}[part]


@pytest.mark.parametrize("name", NETWORKS)
def test_records_describe_the_modules(name):
    model = tiny(name, net="hc")
    modules = dict(weight_modules(model))
    assert [w.name for w in model.weight_layers] == list(modules)
    out_hw = {}
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: out_hw.__setitem__(n, o[0, 0].numel()))
               for n, m in modules.items()]
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    for h in handles:
        h.remove()
    for w in model.weight_layers:
        m = modules[w.name]
        if isinstance(m, nn.Conv2d):
            assert (w.in_channels, w.out_channels, w.kernel, w.bias) == \
                (m.in_channels, m.out_channels, m.kernel_size[0], m.bias is not None)
            assert model.get_submodule(w.bn).num_features == m.out_channels
        else:
            assert (w.in_channels, w.out_channels, w.bn) == (m.in_features, m.out_features, None)
        assert w.out_hw == out_hw[w.name], w.name
        assert (w.in_gate, w.out_gate) == gate_sides(name, w.name), w.name
    # Closing a whole gated layer cuts VGG (a chain); a block's or a branch's inner layer may close.
    cut = model.disconnected_layers(torch.zeros(len(model.gated_layers), dtype=torch.long))
    assert cut == ([g.name for g in model.gated_layers] if name == "vgg16_apib" else [])


@pytest.mark.parametrize("name", NETWORKS)
def test_option_a_shortcut_and_heads(name):
    """What the authors' forward does at the places this project's networks never had: the option-A
    shortcut, APIB's pooled two-Linear head, the Inception concatenation."""
    model = tiny(name, net="dense").eval()
    x = torch.randn(2, 3, 32, 32)
    seen = {}
    if name in BLOCKS:
        block = model.layer2[0]
        block.bn2.register_forward_hook(lambda m, i, o: seen.__setitem__("residual", o))
        block.register_forward_hook(lambda m, i, o: seen.update(inp=i[0], out=o))
        with torch.no_grad():
            model(x)
        c_in, planes = seen["inp"].shape[1], seen["out"].shape[1]
        shortcut = torch.zeros_like(seen["out"])
        shortcut[:, (planes - c_in) // 2:(planes - c_in) // 2 + c_in] = seen["inp"][:, :, ::2, ::2]
        assert torch.allclose(seen["out"], torch.relu(seen["residual"] + shortcut))
    elif name == "vgg16_apib":
        model.features[12].register_forward_hook(lambda m, i, o: seen.__setitem__("maps", o))
        with torch.no_grad():
            out = model(x)
        assert seen["maps"].shape[2:] == (2, 2)
        fc1, fc2 = model.classifier[0], model.classifier[2]
        assert torch.allclose(out, fc2(torch.relu(fc1(seen["maps"].mean((2, 3))))), atol=1e-5)
    else:
        block = model.inception_a4
        block.register_forward_hook(lambda m, i, o: seen.update(inp=i[0], out=o))
        with torch.no_grad():
            model(x)
            parts = [block.b1(seen["inp"]), block.b3(block.b3_reduce(seen["inp"])),
                     block.b5(block.b5_mid(block.b5_reduce(seen["inp"]))),
                     block.pool_proj(F.max_pool2d(seen["inp"], 3, 1, 1))]
        assert seen["inp"].shape[2:] == (16, 16) and torch.equal(seen["out"], torch.cat(parts, 1))


@pytest.mark.parametrize("stride", [1, 2])
def test_max_pool_3x3_is_the_pool_bit_for_bit(stride):
    """GoogLeNet's 3x3 max-pools: without autograd (CPU, NCHW) two 1-D maxima over a -inf padded
    copy, otherwise ``F.max_pool2d`` itself; the same values, NaN and ties included."""
    from models.common import max_pool_3x3

    for shape in ((2, 3, 16, 16), (2, 3, 15, 17), (1, 2, 1, 1), (1, 1, 2, 3), (3, 4, 8, 8)):
        x = torch.relu(torch.randn(shape))  # ReLU's zeros: ties
        x.view(-1)[::7] = -torch.rand(x.view(-1)[::7].shape)
        if x.numel() > 20:
            x.view(-1)[5] = float("nan")
        expected = F.max_pool2d(x, 3, stride, 1)
        with torch.no_grad():
            got = max_pool_3x3(x, stride)
        assert got.shape == expected.shape and torch.equal(got.isnan(), expected.isnan())
        assert torch.equal(got.nan_to_num(), expected.nan_to_num())
        leaf = x.nan_to_num().requires_grad_()
        max_pool_3x3(leaf, stride).sum().backward()  # the pool's own backward: one maximum per window
        expected_grad, = torch.autograd.grad(F.max_pool2d(leaf, 3, stride, 1).sum(), leaf)
        assert torch.equal(leaf.grad, expected_grad)


@pytest.mark.parametrize("stride_block", [True, False])
def test_option_a_block_adds_its_shortcut_in_place_as_the_padded_sum(stride_block):
    """The option-A block adds its shortcut into a channel slice of BN's output, in place, with no
    zero-padded copy: the same output and gradients, bit for bit, as ``relu(bn2(...) + shortcut(x))``,
    gated in training and eval, and in the exported model."""
    from models.common import bn_gate_relu

    def composed(block, x, z):
        out = block.bn2(block.conv2(bn_gate_relu(block.bn1, block.conv1(x), z)))
        return torch.relu(out + block.shortcut(x))

    model = tiny("resnet20a", net="hc")
    block = model.layer2[0] if stride_block else model.layer2[1]
    assert (block.stride != 1 and any(block.pad)) == stride_block
    c_in = block.conv1.in_channels
    for train in (True, False):
        runs = []
        for fn in (lambda b, x, z: b(x, z), composed):
            torch.manual_seed(1)
            b = copy.deepcopy(block).train(train)
            x = torch.randn(3, c_in, 8, 8, requires_grad=True)
            z = torch.rand(3 if train else 1, block.conv1.out_channels, 1, 1, requires_grad=True)
            out = fn(b, x, z)
            out.backward(torch.randn_like(out))
            runs.append((out, x.grad, z.grad, [p.grad for p in b.parameters()], b.bn2.running_mean))
        (out, *grads), (expected, *expected_grads) = runs
        assert torch.equal(out, expected)
        for got, want in zip(grads[:2], expected_grads[:2]):
            assert torch.equal(got, want)
        assert all(torch.equal(g, w) for g, w in zip(grads[2], expected_grads[2]))
        assert torch.equal(grads[3], expected_grads[3])
    dense = tiny("resnet20a", net="dense").eval()
    block = dense.layer2[0] if stride_block else dense.layer2[1]
    x = torch.randn(3, c_in, 8, 8)
    with torch.no_grad():
        assert torch.equal(block(x, None), composed(block, x, None))


@pytest.mark.parametrize("name", NETWORKS)
def test_forward_backward_every_gate_kind(name):
    for net, back_dep in (("hc", False), ("dep", False), ("dep", True), ("dense", False)):
        model = tiny(name, net=net, back_dep=back_dep).train()
        x = torch.randn(2, 3, 32, 32)
        out = model(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        F.cross_entropy(out, torch.tensor([1, 7])).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        if net != "dense":
            assert sum(float(p.grad.abs().sum()) for p in model.gate_parameters()) > 0
            with torch.no_grad():
                assert not torch.equal(model(x), model(x))  # sampled gates
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(x), model(x))


# ------------------------------------------------------------------ export


def gate_state(model, random_logits, seed):
    """Logits with closed, open and fractional gates, layer 1 with one open channel and layer 2
    fully closed."""
    widths = model.gates.widths
    la = random_logits(widths, torch.Generator().manual_seed(seed), one_open_layer=1)
    start = sum(widths[:2])
    la[start:start + widths[2]] = -3.9
    return la


@pytest.mark.parametrize("name", NETWORKS)
def test_export_equals_gated_model_and_counts_its_cost(name, tmp_path, set_logits, random_logits):
    for seed, (net, back_dep) in enumerate((("hc", False), ("dep", True))):
        model = tiny(name, net=net, back_dep=back_dep)
        set_logits(model, gate_state(model, random_logits, seed))
        x = torch.randn(4, 3, 32, 32)
        model.train()
        with torch.no_grad():
            for _ in range(2):  # BN running statistics that are not the defaults
                model(1.5 * torch.randn_like(x) + 0.3)
        model.eval()
        kept = model.gates.kept()
        assert kept[1] == 1 and kept[2] == 0 and (kept < torch.tensor(model.gates.widths)).sum() >= 3
        compact, payload = save_pruned(model, tmp_path / "pruned.pt")
        loaded = load_pruned(tmp_path / "pruned.pt")
        assert type(loaded) is type(model) and loaded.arch["model"] == name == payload["arch"]["model"]
        assert list(loaded.gates.widths) == kept.clamp(min=1).tolist()
        with torch.no_grad():
            expected, got = model(x), loaded(x)
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
        # The independent counter on the exported network gives the payload's cost.
        assert hook_macs(loaded) == payload["macs"] == model.cost.pruned(kept)[0]
        assert param_count(loaded) == payload["params"]
        assert payload["macs"] < model.cost.dense()[0]
        # A compact network exports again unchanged.
        again, _ = export_pruned(loaded)
        assert again.arch == loaded.arch


# ------------------------------------------------------------------ every method on every network

RECIPE = dict(imagenet=False, lr=0.05, weight_decay=5e-4, milestones=(1,), lr_decay=0.1, gate_decay=None, epochs=1,
              fine_tune_epochs=1, batch_size=8, lamba=1e-3, workers=0)
FAST = ("--dummy", "-j", "0", "--limit-batches", "2", "-b", "8", "--seed", "0", "--width-mult", str(TINY))


def sparse_rule(name, layer):
    """DSR's rule written from its description: every conv and Linear but the stem conv, the 1x1
    projection shortcuts (none here) and the CIFAR classifier."""
    return layer not in {"resnet": ("conv1", "linear"), "vgg16_apib": ("features.0.conv", "classifier.2"),
                         "googlenet": ("stem.conv", "linear")}["resnet" if name in BLOCKS else name]


@pytest.mark.parametrize("name", NETWORKS)
def test_every_method_runs(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))

    # Dep-L0 under a MACs budget through the engine, exported: the run's pruned.pt is smaller, and the
    # hook counter agrees with what the run reports. (One depth of the option-A ResNets: the others are
    # the same class.)
    if name not in ("resnet32a", "resnet56a", "resnet110a"):
        with pytest.raises(SystemExit) as stop:
            cli.main(Recipe(model=name, **RECIPE), ["--net", "dep", "--target-macs", "0.5", *FAST,
                                                        "--out-dir", "dep"])
        assert stop.value.code == 0
        results = json.loads((tmp_path / "dep" / "results.json").read_text())
        assert results["model"] == name and results["method"] == "dep-l0"
        pruned = load_pruned(tmp_path / "dep" / "pruned.pt")
        assert hook_macs(pruned) == results["macs_pruned"] < results["macs_dense"]

    # L0-HC: two steps of cross-entropy plus the L0 penalty move the gate logits.
    model = tiny(name, net="hc")
    before = model.gates.log_alpha().detach().clone()
    penalty = L0Penalty(model, "macs")
    optimizer = torch.optim.Adam(model.gate_parameters(), lr=0.05)
    for _ in range(2):
        optimizer.zero_grad()
        (F.cross_entropy(model(x), y) + penalty(1e-7)).backward()
        optimizer.step()
    after = model.gates.log_alpha().detach()
    assert torch.isfinite(after).all() and (after < before).float().mean() > 0.5

    # L1 for a MACs target (uniform ratio on the declared stages), then export.
    dense = tiny(name, net="dense").eval()
    # No gated stem: every gated layer takes the ratio, but VGG's first conv (as our VGG16).
    assert uniform_layers(dense) == [i > 0 or name != "vgg16_apib" for i in range(len(dense.gated_layers))]
    ratio, ratios = ratios_for_macs(dense, 0.6)
    assert abs(macs_fraction(dense, ratios) - 0.6) <= 0.01
    compact, payload = export_pruned(dense, gates=decision(dense, ratios))
    assert hook_macs(compact) == payload["macs"] and abs(payload["macs"] / dense.cost.dense()[0] - 0.6) <= 0.01
    # GReg's stage list: one ratio per declared stage, the classifier's last; an entry without a gated
    # layer (the stem; APIB VGG16's hidden Linear) must be 0.
    stages, entries, _ = dense.stage_of_layers()
    stage_list = [0.5 if i in stages and i != 0 else 0.0 for i in range(entries)]
    assert layer_ratios(dense, stage_list) == [0.5 if s != 0 else 0.0 for s in stages]
    idle = [i for i in range(entries - 1) if i not in stages]
    assert idle
    with pytest.raises(UsageError, match=f"entry {idle[0]} .* has no prunable layer"):
        layer_ratios(dense, [0.5 if i == idle[0] else r for i, r in enumerate(stage_list)])
    # GReg-1 and GReg-2's regularisation: two steps grow the coefficients of the layers to prune.
    for variant in (1, 2):
        model = tiny(name, net="dense").train()
        greg = GReg(model, layer_ratios(model, stage_list), variant, update_interval=1, stabilize_interval=1)
        weights = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        for step in range(2):
            greg.before_step(step)
            weights.zero_grad()
            F.cross_entropy(model(x), y).backward()
            greg.after_backward()
            weights.step()
            greg.after_step(step)
        grown = [bool((reg > 0).any()) for reg in greg.reg]
        assert grown == [s != 0 for s in stages] and greg.updates == 2

    # HSIC-Lasso: the groups are the declared layers, each judged at its consumer; one alpha decides.
    groups = hsic.calibration_groups(copy.deepcopy(dense), x, log=lambda *a: None)
    assert [g.layer for g in groups] == list(range(len(dense.gated_layers)))
    assert [g.width for g in groups] == list(dense.gates.widths)
    assert all(g.design.shape[0] == 64 and g.target.shape == (64,) for g in groups)
    if name == "vgg16_apib":
        assert dense.gated_layers[-1].consumers == ("classifier.0",)
    search = hsic.HsicSearch(groups, dense.gates.widths, lambda c: dense.cost.pruned(torch.tensor(c))[0], omega=1)
    choice = search.decide(1e-4)
    compact, payload = export_pruned(dense, gates=search.gates(choice))
    assert payload["macs"] == choice.macs == hook_macs(compact)

    # Sparse training: the authors' rule picks the tensors; a static mask trains one step.
    layers = [w.name for w in sparse_layers(dense)]
    assert layers == [n for n, _ in weight_modules(dense) if sparse_rule(name, n)]
    dense.train()
    sparse = StaticSparse(dense, 0.2, seed=0)
    weights = torch.optim.SGD(dense.parameters(), lr=0.1)
    sparse.attach_optimizer(weights)
    F.cross_entropy(dense(x), y).backward()
    sparse.after_backward()
    weights.step()
    sparse.after_step(0)
    for layer, mask in zip(sparse.weights, sparse.masks):
        assert int(mask.sum()) == int(0.2 * mask.numel() + 0.1) and not layer[~mask].any()


def test_every_new_network_is_registered():
    for name in NETWORKS:
        assert name in models.NETWORKS
        assert build_model(default_arch(name, 100, TINY, net="dense")).arch["num_classes"] == 100
