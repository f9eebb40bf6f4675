"""DSR's networks (IntelAI/dynamic-reparameterization ``model.py``): WRN-d-k (``cifar10_WideResNet``,
models/wrn.py) and LeNet-300-100 (``mnist_mlp``, models/lenet.py).

- their dense cost and DSR's sparse weights at full size (1,451,520 for WRN-28-2: the number
  pruning/sparse.py scales N_p by), against an independent hook counter;
- their forward against a plain re-statement of the authors' forward (same weights, same output);
- the init, the network options (``default_arch(..., options)``, their declarations' ``add_arguments``/``options_from``);
- gating and export: ``pruned.pt`` smaller, ``load_pruned`` rebuilds it, its eval output equals the
  gated model's, its MACs confirmed by the hook counter (tiny widths);
- the sparse rule (which layers are sparse, their init, IMP's LeNet exception), and an end-to-end
  gated run of WRN through the training engine.
"""
import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import NETWORKS, LeNet300100, WideResNet, build_model, default_arch, load_pruned, save_pruned
from pruning.sparse import IMP, SCHEDULES, StaticSparse, active_count, sparse_layers

torch.set_num_threads(1)


def hook_macs(model: nn.Module, x: torch.Tensor, nonzero: bool = False) -> int:
    """Conv and linear MACs of one forward of ``x`` (batch 1), counted by forward hooks on the modules
    themselves: conv out-positions x out-channels x in-channels/groups x k_h x k_w; linear in x out.
    ``nonzero``: each layer's non-zero weights x its output positions (unstructured sparsity)."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        positions = output[0].numel() // module.weight.shape[0]
        if nonzero:
            total += int(torch.count_nonzero(module.weight)) * positions
        elif isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output[0].numel() * (module.in_channels // module.groups) * kh * kw
        else:
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(x[:1])
    finally:
        for h in handles:
            h.remove()
    return total


def n_params(model: nn.Module) -> int:
    gate_ids = {id(p) for p in model.gates.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in gate_ids)


def sparse_weights(model) -> int:
    return sum(model.get_submodule(w.name).weight.numel() for w in sparse_layers(model))


def wrn(width=1.0, layers=28, widen_factor=2, **kwargs):
    return build_model(default_arch("wrn", 10, width, options=dict(layers=layers, widen_factor=widen_factor),
                                    **kwargs))


def lenet(batch_norm=True, width=1.0, **kwargs):
    return build_model(default_arch("lenet300_100", 10, width, options=dict(batch_norm=batch_norm), **kwargs))


# ----------------------------------------------------------------------------- full-size numbers


def test_wrn_28_2_numbers():
    model = wrn(net="dense")
    assert model.arch["widths"] == (16, 32, 64, 128)
    # DSR's sparse tensors (every block's conv1 and conv2): exactly the code's WRN-28-2 count.
    assert sparse_weights(model) == SCHEDULES["cifar"]["reference_sparse_weights"] == 1_451_520
    macs, params = model.cost.dense()
    assert params == n_params(model) == 1_467_610  # ~1.47 M: convs + fc + every BN's affine
    assert macs == hook_macs(model, torch.randn(1, 3, 32, 32)) == 214_353_152
    # The stem and the inner channels of the 12 blocks are gated.
    assert len(model.gated_layers) == 13 and sum(g.width for g in model.gated_layers) == 16 + 4 * (32 + 64 + 128)


@pytest.mark.parametrize("widen_factor, gated, channels, macs, params, sparse", [
    (1, 12, 448, 54_968_960, 369_498, 364_032),
    (10, 13, 4_496, 5_243_328_768, 36_479_194, 36_195_840),  # the published WRN-28-10 has 36.5 M
])
def test_wrn_28_k_table(widen_factor, gated, channels, macs, params, sparse):
    """The other rows of docs/networks-dsr.md's table."""
    model = wrn(widen_factor=widen_factor, net="dense")
    assert (len(model.gated_layers), sum(model.gates.widths)) == (gated, channels)
    assert model.cost.dense() == (macs, params) and n_params(model) == params and sparse_weights(model) == sparse


@pytest.mark.parametrize("batch_norm, params", [(False, 266_610), (True, 267_020)])
def test_lenet_300_100_numbers(batch_norm, params):
    model = lenet(batch_norm, net="dense")
    assert params == n_params(model) and model.cost.dense() == (266_200, params)
    assert 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10 == 266_610
    assert hook_macs(model, torch.randn(1, 1, 28, 28)) == 266_200
    # All three layers are DSR's DynamicLinear: the output layer too.
    assert [w.name for w in sparse_layers(model)] == ["fc1", "fc_int", "fc2"]
    assert sparse_weights(model) == 266_200
    assert [g.width for g in model.gated_layers] == [300, 100]
    assert (model.bn1 is None) == (not batch_norm) and (model.fc1.bias is None) == batch_norm


def test_wrn_sparse_rule_names():
    model = wrn(0.25, layers=10, net="dense")
    names = [w.name for w in sparse_layers(model)]
    assert names == [f"block{g}.layer.0.conv{c}" for g in (1, 2, 3) for c in (1, 2)]
    roles = {w.name: w.role for w in model.weight_layers}
    assert roles["conv1"] == "stem" and roles["fc"] == "classifier" and not model.sparse_classifier
    assert [n for n, r in roles.items() if r == "shortcut"] == [f"block{g}.layer.0.convShortcut" for g in (1, 2, 3)]


# ----------------------------------------------------------------------------- the authors' forward


class AuthorsWRN(nn.Module):
    """DSR's cifar10_WideResNet forward, re-stated with plain layers under the same module names."""

    def __init__(self, widths, n, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        c_in = widths[0]
        for g, planes in enumerate(widths[1:]):
            group = nn.Module()
            blocks = []
            for b in range(n):
                block = nn.Module()
                block.bn1, block.bn2 = nn.BatchNorm2d(c_in), nn.BatchNorm2d(planes)
                stride = 2 if g > 0 and b == 0 else 1
                block.conv1 = nn.Conv2d(c_in, planes, 3, stride, 1, bias=False)
                block.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
                block.convShortcut = nn.Conv2d(c_in, planes, 1, stride, bias=False) if c_in != planes else None
                blocks.append(block)
                c_in = planes
            group.layer = nn.ModuleList(blocks)
            setattr(self, f"block{g + 1}", group)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        x = self.conv1(x)
        for g in (self.block1, self.block2, self.block3):
            for b in g.layer:
                if b.convShortcut is None:      # equal widths: the raw input is the residual
                    out = F.relu(b.bn1(x))
                    out = b.conv2(F.relu(b.bn2(b.conv1(out))))
                    x = x + out
                else:                           # the activated input feeds conv1 and the shortcut
                    x = F.relu(b.bn1(x))
                    out = b.conv2(F.relu(b.bn2(b.conv1(x))))
                    x = b.convShortcut(x) + out
        x = F.relu(self.bn1(x))
        return self.fc(F.avg_pool2d(x, 8).flatten(1))


class AuthorsMLP(nn.Module):
    """DSR's mnist_mlp forward, re-stated with plain layers under the same module names."""

    def __init__(self, widths, batch_norm):
        super().__init__()
        self.fc1 = nn.Linear(784, widths[0], bias=not batch_norm)
        self.fc_int = nn.Linear(widths[0], widths[1], bias=not batch_norm)
        self.fc2 = nn.Linear(widths[1], 10, bias=not batch_norm)
        norm = nn.BatchNorm1d if batch_norm else (lambda n: nn.Identity())
        self.bn1, self.bn2, self.bn3 = norm(widths[0]), norm(widths[1]), norm(10)

    def forward(self, x):
        x = F.relu(self.bn1(self.fc1(x.view(-1, 784))))
        x = F.relu(self.bn2(self.fc_int(x)))
        return self.bn3(self.fc2(x))


def randomise_bn(model, generator):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.uniform_(-0.3, 0.3, generator=generator)
                m.running_mean.uniform_(-0.2, 0.2, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)


def own_state(model):
    return {k: v for k, v in model.state_dict().items() if not k.startswith("gates.")}


@pytest.mark.parametrize("widen_factor", [1, 2])
def test_wrn_forward_is_the_authors(widen_factor):
    torch.manual_seed(0)
    ours = wrn(0.25, layers=10, widen_factor=widen_factor, net="dense")
    randomise_bn(ours, torch.Generator().manual_seed(1))
    theirs = AuthorsWRN(ours.arch["widths"], 1)
    theirs.load_state_dict(own_state(ours), strict=True)  # same module names, same shapes
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.train()(x), theirs.train()(x), rtol=1e-4, atol=1e-4)
    # k = 1: the stem feeds an identity shortcut and is not gated; k = 2 gates it.
    assert (ours.gated_layers[0].name == "conv1") == (widen_factor == 2)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_lenet_forward_is_the_authors(batch_norm):
    torch.manual_seed(0)
    ours = lenet(batch_norm, 0.1, net="dense")
    randomise_bn(ours, torch.Generator().manual_seed(1))
    theirs = AuthorsMLP(ours.arch["widths"], batch_norm)
    theirs.load_state_dict(own_state(ours), strict=True)
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))
    torch.testing.assert_close(ours.train()(x), theirs.train()(x))


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = build_model(dict(default_arch("wrn", 10, 0.25, options=dict(layers=10), net="dense"), drop_rate=0.5))
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


# ----------------------------------------------------------------------------- init


def test_init_is_the_authors():
    torch.manual_seed(0)
    model = wrn(net="dense")
    w = model.block3.layer[3].conv2.weight
    assert abs(w.std().item() / (2.0 / (9 * 128)) ** 0.5 - 1) < 0.02  # He-normal, fan-out
    w = model.block1.layer[0].convShortcut.weight
    assert abs(w.std().item() / (2.0 / 32) ** 0.5 - 1) < 0.1
    assert model.fc.bias.abs().max() == 0 and model.fc.weight.abs().max() <= 1 / 128 ** 0.5
    assert all(m.weight.eq(1).all() and m.bias.eq(0).all() for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    for batch_norm in (False, True):
        mlp = lenet(batch_norm, net="dense")
        for layer, fan_in in ((mlp.fc1, 784), (mlp.fc_int, 300), (mlp.fc2, 100)):
            bound = fan_in ** -0.5
            assert layer.weight.abs().max() <= bound and abs(layer.weight.std().item() / (bound / 3 ** 0.5) - 1) < 0.1
            assert layer.bias is None if batch_norm else layer.bias.abs().max() == 0


# ----------------------------------------------------------------------------- options


def test_network_options():
    arch = default_arch("wrn", 10, options=dict(layers=16, widen_factor=4), net="dense")
    assert (arch["layers"], arch["widen_factor"], arch["widths"]) == (16, 4, (16, 64, 128, 256))
    model = build_model(arch)
    assert len(model.blocks()) == 6 and all(model.arch[k] == v for k, v in arch.items())
    assert default_arch("wrn", 10) == dict(default_arch("wrn", 10, options=dict(layers=28, widen_factor=2)))
    assert default_arch("lenet300_100", 10)["batch_norm"] is True
    assert default_arch("lenet300_100", 10, 0.5, options=dict(batch_norm=False))["widths"] == (150, 50)
    # Families without options keep their call, and refuse an option.
    assert NETWORKS["vgg16"].option_names() == () and default_arch("vgg16", 10, options={}) == default_arch("vgg16", 10)
    with pytest.raises(ValueError, match="vgg16 has no option 'layers'"):
        default_arch("vgg16", 10, options=dict(layers=28))
    with pytest.raises(ValueError, match="6n \\+ 4"):
        default_arch("wrn", 10, options=dict(layers=27))


def test_network_flags():
    parser = argparse.ArgumentParser()
    wrn, lenet = NETWORKS["wrn"], NETWORKS["lenet300_100"]
    assert wrn.model_class() is WideResNet and lenet.model_class() is LeNet300100
    for network in (wrn, lenet):
        network.add_arguments(parser.add_argument_group(network.name))
    assert wrn.option_names() == ("layers", "widen_factor") and lenet.option_names() == ("batch_norm",)
    args = parser.parse_args([])
    assert wrn.options_from(args) == dict(layers=28, widen_factor=2)
    assert lenet.options_from(args) == dict(batch_norm=True)
    args = parser.parse_args(["--layers", "16", "--widen-factor", "1", "--no-batch-norm"])
    assert wrn.options_from(args) == dict(layers=16, widen_factor=1)
    assert lenet.options_from(args) == dict(batch_norm=False)
    for bad in (["--layers", "27"], ["--layers", "4"], ["--widen-factor", "0"], ["--widen-factor", "1.5"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


@pytest.mark.parametrize("argv,message", [
    (["--layers", "16"], "--layers is --arch wrn's option, not --arch resnet56's"),
    (["--arch", "wrn", "--no-batch-norm"], "--no-batch-norm is --arch lenet300_100's option, not --arch wrn's"),
    (["--arch", "lenet300_100", "--dataset", "mnist", "--widen-factor", "2"],
     "--widen-factor is --arch wrn's option, not --arch lenet300_100's"),
])
def test_another_networks_flag_is_one_line(argv, message, capsys):
    import train_resnet56
    from engine.cli import parse_args
    with pytest.raises(SystemExit) as stop:
        parse_args(train_resnet56.RECIPE, argv, prog="train_resnet56.py")
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert parse_args(train_resnet56.RECIPE, ["--arch", "wrn", "--layers", "16"]).network_options == dict(
        layers=16, widen_factor=2)


# ----------------------------------------------------------------------------- gating and export


CASES = {
    "wrn-10-2": lambda net: wrn(0.25, layers=10, net=net),          # gated stem (projection shortcut)
    "wrn-10-1": lambda net: wrn(0.25, layers=10, widen_factor=1, net=net),  # identity: stem ungated
    "lenet-bn": lambda net: lenet(True, 0.1, net=net),
    "lenet": lambda net: lenet(False, 0.1, net=net),
}


def image(name, n=3):
    return torch.randn(n, 1, 28, 28) if name.startswith("lenet") else torch.randn(n, 3, 32, 32)


@pytest.mark.parametrize("net", ["hc", "dep"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_gated_training_step(name, net):
    torch.manual_seed(0)
    model = CASES[name](net).train()
    loss = F.cross_entropy(model(image(name, 4)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.gate_parameters())
    assert model.fc2.weight.grad is not None if name.startswith("lenet") else model.fc.weight.grad is not None


@pytest.mark.parametrize("net", ["hc", "dep"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_export_is_smaller_equal_and_counted(name, net, tmp_path, set_logits, random_logits):
    torch.manual_seed(0)
    model = CASES[name](net)
    randomise_bn(model, torch.Generator().manual_seed(2))
    with torch.no_grad():  # non-zero biases, so that the no-BN fold of a gate into a bias is tested
        for record in model.weight_layers:
            bias = model.get_submodule(record.name).bias
            if bias is not None:
                bias.uniform_(-0.2, 0.2)
    widths = model.gates.widths
    set_logits(model, random_logits(widths, torch.Generator().manual_seed(3), one_open_layer=len(widths) - 1))
    z = model.gates.test_gates()
    assert ((z > 0) & (z < 1)).any() and (z == 0).any()  # fractional and closed gates both present
    compact, payload = save_pruned(model, tmp_path / "pruned.pt")
    loaded = load_pruned(tmp_path / "pruned.pt")
    x = image(name)
    with torch.no_grad():
        expected = model.eval()(x)
        torch.testing.assert_close(loaded(x), expected, rtol=1e-4, atol=1e-5)
    kept = model.gates.kept()
    assert payload["params"] == n_params(loaded) < model.cost.dense()[1]
    assert payload["macs"] == hook_macs(loaded, x) == model.cost.pruned(kept)[0] < model.cost.dense()[0]
    assert loaded.gates.net == "dense" and list(loaded.gates.widths) == kept.clamp(min=1).tolist()
    assert loaded.arch["model"] == model.arch["model"] and loaded.arch.get("batch_norm") == model.arch.get("batch_norm")


@pytest.mark.parametrize("name", ["wrn-10-2", "lenet"])
def test_export_with_a_closed_layer(name, tmp_path):
    """A closable WRN inner layer, or a LeNet layer (kept as one zero unit), fully closed."""
    torch.manual_seed(0)
    model = CASES[name]("hc")
    randomise_bn(model, torch.Generator().manual_seed(2))
    closed = 1 if name.startswith("wrn") else 0
    z = torch.ones(sum(model.gates.widths))
    start = sum(model.gates.widths[:closed])
    z[start:start + model.gates.widths[closed]] = 0
    with torch.no_grad():
        model.gates.logits.log_alpha.copy_(torch.where(z > 0, 10.0, -10.0))
    assert torch.equal(model.gates.test_gates(), z)
    _, payload = save_pruned(model, tmp_path / "pruned.pt")
    loaded = load_pruned(tmp_path / "pruned.pt")
    x = image(name)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=1e-4, atol=1e-5)
    assert payload["macs"] == hook_macs(loaded, x)
    assert model.disconnected_layers() == ([] if name.startswith("wrn") else ["fc1"])


def test_declared_stages_and_hsic_groups():
    model = wrn(0.25, layers=16, net="hc")
    stages, entries, _ = model.stage_of_layers()
    assert stages == [0, 1, 1, 2, 2, 3, 3] and entries == 5 and model.hsic_layers() == list(range(1, 7))
    flat = wrn(0.25, layers=16, widen_factor=1, net="hc")
    assert flat.stage_of_layers()[0] == [1, 1, 2, 2, 3, 3] and flat.hsic_layers() == list(range(6))
    mlp = lenet(True, 0.1, net="hc")
    assert mlp.stage_of_layers()[:2] == ([0, 1], 3) and mlp.stages_are_layers and mlp.hsic_layers() == [0, 1]


@pytest.mark.parametrize("name", ["wrn-10-2", "lenet-bn"])
def test_hsic_groups_build(name):
    from pruning import hsic

    model = CASES[name]("dense")
    groups = hsic.calibration_groups(model, image(name, 6), log=lambda *_: None)
    assert [g.layer for g in groups] == model.hsic_layers()
    assert [g.width for g in groups] == [model.gated_layers[i].width for i in model.hsic_layers()]


# ----------------------------------------------------------------------------- sparse training


def test_sparse_training_init_and_masks_on_lenet():
    torch.manual_seed(0)
    model = lenet(False, net="dense")
    method = StaticSparse(model, 0.1, seed=0)
    assert [r.name for r in method.layers] == ["fc1", "fc_int", "fc2"]
    for record, mask in zip(method.layers, method.masks):
        layer = model.get_submodule(record.name)
        assert int(mask.sum()) == active_count(layer.weight.numel(), 0.1)
        # The code's DynamicLinear init, U(±1/sqrt(fan_in)), not the convs' He-normal.
        assert layer.weight.abs().max() <= record.in_channels ** -0.5 and layer.bias.abs().max() == 0
        assert torch.count_nonzero(layer.weight) == int(mask.sum())


@pytest.mark.parametrize("density", [0.02, 0.2])
def test_imp_keeps_lenets_output_layer_at_a_tenth(density):
    """DSR's main.py: pruning mnist_mlp above 90% sparsity keeps the 10x100 output layer at 10% and
    gives the hidden layers (1 - s)(784*300 + 300*100 + 100*10) - 100 weights."""
    model = lenet(True, net="dense")
    method = IMP(model, density, seed=0, iterations=1)
    expected = [density] * 3
    if density < 0.1:
        hidden = (density * 266_200 - 100) / (784 * 300 + 300 * 100)
        expected = [hidden, hidden, 0.1]
    assert method.targets == pytest.approx(expected)
    method.prune()
    left = [int(m.sum()) for m in method.masks]
    sizes = [235_200, 30_000, 1_000]
    assert left == [n - (int((1 - d) * n) + 1) for n, d in zip(sizes, method.targets)]
    # Other networks: one density everywhere (unchanged).
    other = wrn(0.25, layers=10, net="dense")
    assert IMP(other, 0.02, seed=0).targets == [0.02] * len(sparse_layers(other))


# ----------------------------------------------------------------------------- through the engine


def test_wrn_gated_run_through_the_engine(monkeypatch, tmp_path):
    from engine import cli
    from engine.cli import Recipe

    monkeypatch.chdir(tmp_path)
    recipe = Recipe(model="wrn", imagenet=False, lr=0.05, weight_decay=5e-4, milestones=(1,), lr_decay=0.1,
                    gate_decay=None, epochs=1, fine_tune_epochs=1, batch_size=8, lamba=1e-3, workers=0)
    argv = ["--net", "hc", "--target-macs", "0.5", "--dummy", "-j", "0", "--limit-batches", "2", "-b", "8",
            "--seed", "0", "--width-mult", "0.125", "--out-dir", "wrn"]
    with pytest.raises(SystemExit) as stop:
        cli.main(recipe, argv)
    assert stop.value.code == 0
    results = json.loads((tmp_path / "wrn" / "results.json").read_text())
    assert results["model"] == "wrn" and len(results["channels"]) == 13
    model = load_pruned(tmp_path / "wrn" / "pruned.pt")
    info = torch.load(tmp_path / "wrn" / "pruned.pt", weights_only=True)
    assert model.arch["layers"] == 28 and model.cost.dense()[0] == info["macs"] == results["macs_pruned"]
    assert info["macs"] == hook_macs(model, torch.randn(1, 3, 32, 32))


def test_wrn_sparse_run_through_the_engine(monkeypatch, tmp_path):
    """DSR on WRN: only the block convs are masked; pruned.pt's MACs are its non-zero weights' (hooks)."""
    from engine import cli
    from engine.cli import Recipe

    monkeypatch.chdir(tmp_path)
    recipe = Recipe(model="wrn", imagenet=False, lr=0.05, weight_decay=5e-4, milestones=(1,), lr_decay=0.1,
                    gate_decay=None, epochs=1, fine_tune_epochs=0, batch_size=8, lamba=1e-3, workers=0)
    argv = ["--sparse", "dsr", "--density", "0.2", "--dummy", "-j", "0", "--limit-batches", "2", "-b", "8",
            "--seed", "0", "--width-mult", "0.125", "--epochs", "1", "--out-dir", "dsr"]
    with pytest.raises(SystemExit) as stop:
        cli.main(recipe, argv)
    assert stop.value.code == 0
    model = load_pruned(tmp_path / "dsr" / "pruned.pt")
    info = torch.load(tmp_path / "dsr" / "pruned.pt", weights_only=True)
    sparse = set(info["arch"]["source"]["sparse_layers"])
    assert sparse == {w.name for w in sparse_layers(model)}
    for record in model.weight_layers:
        weight = model.get_submodule(record.name).weight
        density = torch.count_nonzero(weight).item() / weight.numel()
        assert density == pytest.approx(0.2, abs=0.02) if record.name in sparse else density == 1.0
    assert info["macs"] == hook_macs(model, torch.randn(1, 3, 32, 32), nonzero=True) < model.cost.dense()[0]
