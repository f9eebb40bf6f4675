"""Loading the authors' published CIFAR checkpoints (models/published.py, utils.checkpoint.load_foreign).

Each test writes a small checkpoint (tiny widths) in one code base's format, with its names, its
wrapping (``DataParallel``'s ``module.``, a pickled model, thop's buffers, an old-format file
without ``num_batches_tracked``) and random tensors, loads it into this project's network and
compares the outputs with the authors' architecture computed here, functionally, straight from
their tensor names: so every tensor must have landed in its place.
"""
import io
import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.published import checkpoint_state, import_state, load_published
from utils.checkpoint import ForeignObject, load_checkpoint, load_foreign
from utils.errors import UsageError

TINY = 0.125
RESNET_WIDTHS = (2, 4, 8)  # 16, 32, 64 at TINY
BLOCKS = {"resnet20a": 3, "resnet32a": 5, "resnet56a": 9, "resnet110a": 18}

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ random tensors under their names


class State(dict):
    def __init__(self, seed):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def randn(self, *shape, scale=1.0):
        return scale * torch.randn(*shape, generator=self.generator)

    def conv(self, key, c_in, c_out, k, bias=False):
        self[f"{key}.weight"] = self.randn(c_out, c_in, k, k, scale=(2.0 / (c_in * k * k)) ** 0.5)
        if bias:
            self[f"{key}.bias"] = self.randn(c_out, scale=0.1)

    def bn(self, key, c, tracked=True):
        self[f"{key}.weight"] = 1.0 + self.randn(c, scale=0.2)
        self[f"{key}.bias"] = self.randn(c, scale=0.2)
        self[f"{key}.running_mean"] = self.randn(c, scale=0.2)
        self[f"{key}.running_var"] = 0.5 + torch.rand(c, generator=self.generator)
        if tracked:
            self[f"{key}.num_batches_tracked"] = torch.tensor(100)

    def linear(self, key, c_in, c_out):
        self[f"{key}.weight"] = self.randn(c_out, c_in, scale=c_in ** -0.5)
        self[f"{key}.bias"] = self.randn(c_out, scale=0.1)


def bn(x, s, key):
    return F.batch_norm(x, s[f"{key}.running_mean"], s[f"{key}.running_var"], s[f"{key}.weight"], s[f"{key}.bias"],
                        False, 0.0, 1e-5)


def conv(x, s, key, stride=1, padding=None):
    w = s[f"{key}.weight"]
    return F.conv2d(x, w, s.get(f"{key}.bias"), stride, w.shape[-1] // 2 if padding is None else padding)


# ------------------------------------------------------------------ the authors' networks, functionally


def resnet_names(style):
    """(stem conv, stem BN, block conv k, block BN k) of akamaster / GReg (``aka``) or APIB (``apib``)."""
    if style == "aka":
        return "conv1", "bn1", lambda s, b, k: f"layer{s}.{b}.conv{k}", lambda s, b, k: f"layer{s}.{b}.bn{k}"
    return ("conv_bn.conv", "conv_bn.bn", lambda s, b, k: f"layer{s}.block_{b}.conv_bn{k}.conv",
            lambda s, b, k: f"layer{s}.block_{b}.conv_bn{k}.bn")


def resnet_state(style, n, classes=10, seed=0, tracked=True):
    s = State(seed)
    stem, stem_bn, conv_key, bn_key = resnet_names(style)
    s.conv(stem, 3, RESNET_WIDTHS[0], 3)
    s.bn(stem_bn, RESNET_WIDTHS[0], tracked)
    c_in = RESNET_WIDTHS[0]
    for stage, planes in enumerate(RESNET_WIDTHS, 1):
        for b in range(n):
            s.conv(conv_key(stage, b, 1), c_in, planes, 3)
            s.bn(bn_key(stage, b, 1), planes, tracked)
            s.conv(conv_key(stage, b, 2), planes, planes, 3)
            s.bn(bn_key(stage, b, 2), planes, tracked)
            c_in = planes
    s.linear("linear", c_in, classes)
    return s


def resnet_forward(s, x, style, n):
    """He et al.'s CIFAR ResNet, option A: the shortcut subsamples and pads planes // 4 zeros each side."""
    stem, stem_bn, conv_key, bn_key = resnet_names(style)
    x = torch.relu(bn(conv(x, s, stem), s, stem_bn))
    for stage, planes in enumerate(RESNET_WIDTHS, 1):
        for b in range(n):
            stride = 2 if stage > 1 and b == 0 else 1
            out = torch.relu(bn(conv(x, s, conv_key(stage, b, 1), stride), s, bn_key(stage, b, 1)))
            out = bn(conv(out, s, conv_key(stage, b, 2)), s, bn_key(stage, b, 2))
            if stride != 1:
                x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))
            x = torch.relu(out + x)
    return F.linear(F.avg_pool2d(x, x.shape[3]).flatten(1), s["linear.weight"], s["linear.bias"])


APIB_VGG_CFG = (8, 8, "M", 16, 16, "M", 32, 32, 32, "M", 64, 64, 64, "M", 64, 64, 64)


def vgg_state(seed=0):
    s, c_in, k = State(seed), 3, 0
    for v in APIB_VGG_CFG:
        if v != "M":
            k += 1
            s.conv(f"feature.conv_{k}", c_in, v, 3)
            s.bn(f"feature.bn_{k}", v)
            c_in = v
    s.linear("classifier.0", c_in, 64)
    s.linear("classifier.2", 64, 10)
    return s


def vgg_forward(s, x):
    k = 0
    for v in APIB_VGG_CFG:
        if v == "M":
            x = F.max_pool2d(x, 2, 2)
        else:
            k += 1
            x = torch.relu(bn(conv(x, s, f"feature.conv_{k}"), s, f"feature.bn_{k}"))
    x = F.avg_pool2d(x, 2).flatten(1)
    x = torch.relu(F.linear(x, s["classifier.0.weight"], s["classifier.0.bias"]))
    return F.linear(x, s["classifier.2.weight"], s["classifier.2.bias"])


# HRank's filters / mid_filters at TINY: n1x1, n3x3, n5x5, pool; n3x3red, n5x5red, n5x5red2
FILTERS = [(8, 16, 4, 4), (16, 24, 12, 8), (24, 26, 6, 8), (20, 28, 8, 8), (16, 32, 8, 8), (14, 36, 8, 8),
           (32, 40, 16, 16), (32, 40, 16, 16), (48, 48, 16, 16)]
MID = [(12, 2, 4), (16, 4, 12), (12, 2, 6), (14, 3, 8), (16, 3, 8), (18, 4, 8), (20, 4, 16), (20, 4, 16), (24, 6, 16)]
INCEPTIONS = ("a3", "b3", "a4", "b4", "c4", "d4", "e4", "a5", "b5")


def googlenet_state(seed=0):
    s = State(seed)
    s.conv("pre_layers.0", 3, 24, 3, bias=True)
    s.bn("pre_layers.1", 24)
    c_in = 24
    for name, (n1, n3, n5, pool), (r3, r5, m5) in zip(INCEPTIONS, FILTERS, MID):
        p = f"inception_{name}"
        for key, a, b, k in (("branch1x1.0", c_in, n1, 1), ("branch3x3.0", c_in, r3, 1), ("branch3x3.3", r3, n3, 3),
                             ("branch5x5.0", c_in, r5, 1), ("branch5x5.3", r5, m5, 3), ("branch5x5.6", m5, n5, 3),
                             ("branch_pool.1", c_in, pool, 1)):
            s.conv(f"{p}.{key}", a, b, k, bias=True)
            branch, index = key.split(".")
            s.bn(f"{p}.{branch}.{int(index) + 1}", b)
        c_in = n1 + n3 + n5 + pool
    s.linear("linear", c_in, 10)
    return s


def googlenet_forward(s, x):
    def unit(x, p, branch, index):
        return torch.relu(bn(conv(x, s, f"{p}.{branch}.{index}"), s, f"{p}.{branch}.{index + 1}"))

    x = torch.relu(bn(conv(x, s, "pre_layers.0"), s, "pre_layers.1"))
    for i, name in enumerate(INCEPTIONS):
        p = f"inception_{name}"
        x = torch.cat([unit(x, p, "branch1x1", 0),
                       unit(unit(x, p, "branch3x3", 0), p, "branch3x3", 3),
                       unit(unit(unit(x, p, "branch5x5", 0), p, "branch5x5", 3), p, "branch5x5", 6),
                       unit(F.max_pool2d(x, 3, 1, 1), p, "branch_pool", 1)], 1)
        if name in ("b3", "e4"):
            x = F.max_pool2d(x, 3, 2, 1)
    x = F.avg_pool2d(x, 8, 1).flatten(1)
    return F.linear(x, s["linear.weight"], s["linear.bias"])


# ------------------------------------------------------------------ the three formats


def with_prefix(state, prefix="module."):
    return {prefix + k: v for k, v in state.items()}


def akamaster_file(path, state):
    """pytorch_resnet_cifar10's pretrained files: an old-format torch file, DataParallel names."""
    torch.save({"state_dict": with_prefix(state), "best_prec1": 91.25}, path, _use_new_zipfile_serialization=False)


@pytest.fixture
def greg_file():
    """GReg's checkpoint: the DataParallel model pickled whole (its class from the authors' package,
    which is not importable here) next to its state dict, the optimizer's state and run metadata."""
    def write(path, state):
        package, module = types.ModuleType("model"), types.ModuleType("model.resnet_cifar10")
        ResNet = type("ResNet", (nn.Module,), {"__module__": "model.resnet_cifar10"})
        module.ResNet = ResNet
        sys.modules.update({"model": package, "model.resnet_cifar10": module})
        try:
            net = ResNet()
            net.conv1 = nn.Conv2d(3, 2, 3)
            wrapped = nn.DataParallel(net)
            optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.01, momentum=0.9)
            torch.save({"epoch": 120, "arch": "resnet56", "model": wrapped, "state_dict": with_prefix(state),
                        "acc1": 93.4, "acc5": 99.8, "optimizer": optimizer.state_dict(), "ExpID": "SERVER-123",
                        "prune_state": "finetune"}, path)
        finally:
            del sys.modules["model"], sys.modules["model.resnet_cifar10"]
    return write


def apib_file(path, state, thop=True):
    """HSIC-Lasso's train.py: {'state_dict', ...}; files profiled by thop carry its buffers."""
    state = dict(state)
    if thop:
        for key in [k for k in state if k.endswith(".weight")]:
            state[key[:-len("weight")] + "total_ops"] = torch.zeros(1, dtype=torch.float64)
            state[key[:-len("weight")] + "total_params"] = torch.zeros(1, dtype=torch.float64)
        state["total_ops"], state["total_params"] = torch.zeros(1), torch.zeros(1)
    torch.save({"state_dict": with_prefix(state), "best_prec1": 93.9, "epoch": 300}, path)


def assert_same_outputs(model, state, forward):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        expected, got = forward(state, x), model(x)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (got - expected).abs().max()


# ------------------------------------------------------------------ the tests


@pytest.mark.parametrize("name", ("resnet20a", "resnet56a"))
def test_akamaster_checkpoint(name, tmp_path):
    n = BLOCKS[name]
    state = resnet_state("aka", n, tracked=False)
    akamaster_file(tmp_path / "resnet.th", state)
    model = load_published(tmp_path / "resnet.th", name, width_mult=TINY)
    assert model.gates.net == "dense" and model.arch["num_classes"] == 10
    assert_same_outputs(model, state, lambda s, x: resnet_forward(s, x, "aka", n))


def test_greg_checkpoint_with_a_pickled_model(tmp_path, greg_file):
    state = resnet_state("aka", 3, seed=1)
    greg_file(tmp_path / "checkpoint_best.pth", state)
    with pytest.raises(UsageError, match="refusing to load .*Python objects"):
        load_checkpoint(tmp_path / "checkpoint_best.pth", expected_format="anything")
    raw = load_foreign(tmp_path / "checkpoint_best.pth")
    assert "model.resnet_cifar10" not in sys.modules  # nothing of the authors' package was imported
    assert isinstance(raw["model"], ForeignObject) and raw["model"].name.endswith("DataParallel")
    assert raw["acc1"] == 93.4 and raw["arch"] == "resnet56"
    # Starting a Dep-L0 run from it: the gates are the model's own, the weights the file's.
    model = load_published(tmp_path / "checkpoint_best.pth", "resnet20a", width_mult=TINY, net="dep")
    assert model.gates.net == "dep"
    assert torch.equal(model.layer3[2].conv2.weight, state["layer3.2.conv2.weight"])
    assert int(model.layer1[0].bn1.num_batches_tracked) == 100
    model.gates.freeze(torch.ones(sum(model.gates.widths)))
    assert_same_outputs(model, state, lambda s, x: resnet_forward(s, x, "aka", 3))


@pytest.mark.parametrize("name", ("resnet56a", "resnet110a"))
def test_apib_resnet_checkpoint(name, tmp_path):
    n = BLOCKS[name]
    state = resnet_state("apib", n, seed=2)
    apib_file(tmp_path / "resnet.pth.tar", state)
    model = load_published(tmp_path / "resnet.pth.tar", name, width_mult=TINY)
    assert_same_outputs(model, state, lambda s, x: resnet_forward(s, x, "apib", n))


def test_apib_vgg16_checkpoint(tmp_path):
    state = vgg_state(seed=3)
    apib_file(tmp_path / "vgg16.pth.tar", state)
    model = load_published(tmp_path / "vgg16.pth.tar", "vgg16_apib", width_mult=TINY)
    assert_same_outputs(model, state, vgg_forward)


def test_apib_googlenet_checkpoint(tmp_path):
    state = googlenet_state(seed=4)
    apib_file(tmp_path / "googlenet.pth.tar", state)
    model = load_published(tmp_path / "googlenet.pth.tar", "googlenet", width_mult=TINY)
    assert model.arch["stem"] == 24 and model.arch["blocks"][1] == (16, 16, 24, 4, 12, 12, 8)
    assert_same_outputs(model, state, googlenet_forward)


def test_a_bare_state_dict_and_every_key_mapped_once(tmp_path):
    state = googlenet_state(seed=6)
    torch.save(dict(state), tmp_path / "bare.pt")
    model = load_published(tmp_path / "bare.pt", "googlenet", width_mult=TINY)
    mapped = import_state(model, checkpoint_state(load_foreign(tmp_path / "bare.pt")))
    assert len(mapped) == len(state) and set(mapped) == set(model.state_dict())


def test_a_hundred_class_head_is_read_from_the_file(tmp_path):
    state = resnet_state("aka", 3, classes=100, seed=7)
    akamaster_file(tmp_path / "c100.th", state)
    model = load_published(tmp_path / "c100.th", "resnet20a", width_mult=TINY)
    assert model.arch["num_classes"] == 100
    assert_same_outputs(model, state, lambda s, x: resnet_forward(s, x, "aka", 3))
    with pytest.raises(UsageError, match="'linear.weight' is 100x8, resnet20a's is 10x8"):
        load_published(tmp_path / "c100.th", "resnet20a", num_classes=10, width_mult=TINY)


def one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_a_checkpoint_of_another_network_is_one_line(tmp_path, greg_file):
    akamaster_file(tmp_path / "r20.th", resnet_state("aka", 3))
    with pytest.raises(UsageError) as e:
        load_published(tmp_path / "r20.th", "resnet32a", width_mult=TINY)
    assert "r20.th is not a resnet32a checkpoint: it lacks 'layer1.3.conv1.weight'" in one_line(e)
    with pytest.raises(UsageError) as e:
        load_published(tmp_path / "r20.th", "resnet56", width_mult=TINY)  # option B: projection shortcuts
    assert "is not a resnet56 checkpoint" in one_line(e)
    apib_file(tmp_path / "googlenet.pth.tar", googlenet_state())
    with pytest.raises(UsageError) as e:
        load_published(tmp_path / "googlenet.pth.tar", "vgg16_apib", width_mult=TINY)
    assert "is not a vgg16_apib checkpoint: it has 'module.pre_layers.0.weight'" in one_line(e)
    # A pruned network (GReg's pruned checkpoints keep narrower convs) is another network too.
    state = resnet_state("aka", 3)
    state["layer2.1.conv1.weight"] = state["layer2.1.conv1.weight"][:2]
    greg_file(tmp_path / "pruned.pth", state)
    with pytest.raises(UsageError) as e:
        load_published(tmp_path / "pruned.pth", "resnet20a", width_mult=TINY)
    assert "'layer2.1.conv1.weight' is 2x4x3x3, resnet20a's is 4x4x3x3" in one_line(e)
    with pytest.raises(UsageError) as e:
        load_published(tmp_path / "r20.th", "resnet21", width_mult=TINY)
    assert "unknown network 'resnet21'" in one_line(e)


def test_files_that_are_not_checkpoints_are_one_line(tmp_path):
    torch.save({"epoch": 3, "acc1": 90.0}, tmp_path / "meta.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    buffer = io.BytesIO()
    torch.save({"state_dict": {}, "hook": Evil()}, buffer)
    (tmp_path / "evil.pt").write_bytes(buffer.getvalue())
    torch.save({"x": Evil()}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    for file, words in (("meta.pt", "holds no state dict"), ("junk.pt", "not a readable checkpoint"),
                        ("missing.pt", "does not exist"), ("old.pt", "refusing to load")):
        with pytest.raises(UsageError) as e:
            load_published(tmp_path / file, "resnet20a", width_mult=TINY)
        assert words in one_line(e), file
    # builtins.print is not in a module torch blocks: it is read as inert data and never called.
    raw = load_foreign(tmp_path / "evil.pt")
    assert isinstance(raw["hook"], ForeignObject) and raw["hook"].args == ("this must never run",)


def test_a_blocked_module_is_refused(tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"state_dict": {}, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UsageError) as e:
        load_foreign(tmp_path / "evil.pt")
    assert "refusing to load" in one_line(e)


def test_prune_py_starts_from_a_published_checkpoint(tmp_path, monkeypatch, capsys):
    """``prune.py CHECKPOINT --arch resnet20a`` prunes an akamaster file as it was published."""
    import prune
    monkeypatch.setattr(sys.modules[__name__], "RESNET_WIDTHS", (16, 32, 64))
    akamaster_file(tmp_path / "resnet20.th", resnet_state("aka", BLOCKS["resnet20a"], tracked=False))
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    argv = ["resnet20.th", "--arch", "resnet20a", "--method", "l1", "--target-macs", "0.6", "--dummy", "--epochs", "1",
            "--limit-batches", "1", "-b", "8", "-j", "0", "--seed", "0", "--out-dir", "l1"]
    assert prune.main(argv) == 0
    assert "l1 on published resnet20a checkpoint resnet20.th" in capsys.readouterr().out
    results = json.loads((tmp_path / "l1" / "results.json").read_text())
    assert results["model"] == "resnet20a" and abs(results["macs_pruned"] / results["macs_dense"] - 0.6) < 0.011
    # Without --arch the file is not this project's checkpoint: one line, no traceback.
    assert prune.main(argv[:1] + argv[3:-1] + ["l1b"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
