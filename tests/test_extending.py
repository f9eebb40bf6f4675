"""Adding a method or a network is one module each, registered in one line.

The toy network below is a complete model module (a :class:`GatedNetwork` that
declares its layers, default arch, GReg stages and export rule) and the toy
method a complete prune.py method (its flag, defaults, run name and phases).
Registered here, they run through the unchanged training script engine,
export and prune.py end to end: gating, cost, export and selection all follow
from the declarations.
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prune
from engine import cli
from engine.cli import Recipe
from models import NETWORKS, Network, build_model, load_pruned, register_model
from models.common import GatedNetwork, LayerRecorder, bn_gate_relu
from pruning import METHODS, MethodSpec, register


# ------------------------------------------------------------------------- the toy network (one module)


class ToyNet(GatedNetwork):
    """conv 3x3 -> BN, gate, ReLU -> conv 3x3 / 2 -> BN, gate, ReLU -> global average -> Linear."""

    def __init__(self, widths=(8, 12), num_classes: int = 10, net: str = "hc", back_dep: bool = False,
                 temperature: float = 2.0 / 3.0, model: str = "toynet"):
        super().__init__()
        recorder = LayerRecorder(32)
        self.conv1, recorder.size = recorder.conv("conv1", 3, widths[0], 3, padding=1, out_gate=0, bn="bn1",
                                                  role="stem")
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.conv2, recorder.size = recorder.conv("conv2", widths[0], widths[1], 3, stride=2, padding=1, in_gate=0,
                                                  out_gate=1, bn="bn2")
        self.bn2 = nn.BatchNorm2d(widths[1])
        self.fc = recorder.linear("fc", widths[1], num_classes, in_gate=1)
        self._finish(dict(model=model, widths=tuple(widths), num_classes=num_classes, net=net, back_dep=back_dep,
                          temperature=temperature), recorder.records, list(widths), net, back_dep, temperature)

    def forward(self, x, log_alpha=None):
        z1, z2 = self.gates(x.shape[0], log_alpha)
        x = bn_gate_relu(self.bn1, self.conv1(x), z1)
        x = bn_gate_relu(self.bn2, self.conv2(x), z2)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    @classmethod
    def default_arch(cls, num_classes, scale):
        return dict(widths=scale((8, 12)))

    def compact_arch(self, keep):
        return dict(self.arch, net="dense", back_dep=False, widths=tuple(len(k) for k in keep))

    def stage_of_layers(self):
        return [0, 1], 3, "stem, conv2, fc"


# ------------------------------------------------------------------------- the toy method (one module)


class KeepFirst(MethodSpec):
    """Keeps the first (or last, ``--toy-order last``) ceil(F * width) channels of every gated layer
    but the stem, F = ``--target-macs``; then fine-tunes through the engine."""

    name = "keep-first"
    aliases = ("KeepFirst",)
    kind = "prune"
    targets = ("target_macs",)
    settings = ("toy_order",)
    summary = "a test's method: the first channels of each layer kept"

    def add_arguments(self, parser, **context):
        g = parser.add_argument_group("keep-first (a test's method)")
        g.add_argument("--toy-order", choices=("first", "last"), default="first", help="which channels stay")

    def defaults(self, kind):
        return dict(epochs=1, batch_size=8, weight_decay=0.0, lr=0.05)

    def run_label(self, args):
        return f"keep{args.target_macs:g}_{args.toy_order}"

    def run(self, job):
        args = job.args
        job.start(self.run_label(args), f"keep {args.target_macs:g} of each layer's channels ({args.toy_order})")
        model = job.dense_model()
        gates = []
        for i, layer in enumerate(model.gated_layers):
            n = layer.width if i == 0 else math.ceil(args.target_macs * layer.width)
            z = torch.zeros(layer.width)
            z[:n] = 1.0
            gates.append(z if args.toy_order == "first" else z.flip(0))
        cut = job.run_dir / "cut.pt"
        job.run_dir.mkdir(parents=True, exist_ok=True)
        job.save_cut(model, cut, torch.cat(gates))
        return job.fine_tune(cut, dict(lr=args.lr), self.settings, dict(method=self.name, toy_order=args.toy_order))


# ------------------------------------------------------------------------- the tests

RECIPE = Recipe(model="toynet", imagenet=False, lr=0.05, weight_decay=5e-4, milestones=(1,), lr_decay=0.1,
                gate_decay=None, epochs=1, fine_tune_epochs=1, batch_size=8, lamba=1e-3, workers=0)
FAST = ("--dummy", "-j", "0", "--limit-batches", "2", "-b", "8", "--seed", "0")


@pytest.fixture
def registered(monkeypatch, tmp_path):
    """The toy network and method registered for this test only (each one line), cwd tmp_path."""
    monkeypatch.setattr(METHODS, "_by_name", dict(METHODS._by_name))
    monkeypatch.setattr(METHODS, "_specs", list(METHODS._specs))
    monkeypatch.setitem(NETWORKS, "toynet", Network("toynet", ToyNet))  # register_model's entry, undone after
    register(KeepFirst())
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    return tmp_path


def train(*argv) -> int:
    with pytest.raises(SystemExit) as stop:
        cli.main(RECIPE, list(argv))
    return stop.value.code


def test_a_new_network_trains_gated_and_exports_smaller(registered):
    assert train("--net", "hc", "--target-macs", "0.5", *FAST, "--out-dir", "hc") == 0
    results = json.loads((registered / "hc" / "results.json").read_text())
    assert results["model"] == "toynet" and results["method"] == "l0-hc"
    assert [c["name"] for c in results["channels"]] == ["conv1", "conv2"]
    model = load_pruned(registered / "hc" / "pruned.pt")
    info = torch.load(registered / "hc" / "pruned.pt", weights_only=True)
    assert list(model.arch["widths"]) == [c["kept"] if c["kept"] else 1 for c in results["channels"]]
    assert sum(model.arch["widths"]) < 8 + 12
    # The compact network's own cost model agrees with what the run reported.
    assert model.cost.dense()[0] == info["macs"] == results["macs_pruned"]


def test_a_new_method_runs_through_prune_py_end_to_end(registered):
    assert train("--net", "dense", *FAST, "--out-dir", "dense") == 0
    argv = ["dense/best.pt", "--method", "KeepFirst", "--target-macs", "0.5", "--toy-order", "last", *FAST]
    assert prune.main([*argv, "--out-dir", "toy"]) == 0
    results = json.loads((registered / "toy" / "results.json").read_text())
    assert results["method"] == "keep-first" and results["toy_order"] == "last"
    assert [c["kept"] for c in results["channels"]] == [8, 6]
    cut = load_pruned(registered / "toy" / "cut.pt")
    dense = build_model(torch.load(registered / "dense" / "best.pt", weights_only=False)["arch"])
    dense.load_state_dict(torch.load(registered / "dense" / "best.pt", weights_only=False)["model"])
    # The last six of conv2's filters are the ones kept.
    assert torch.equal(cut.conv2.weight, dense.conv2.weight[6:])
    # Its flag is its own: a run continues only with the same setting.
    status = prune.main([*argv[:-len(FAST)], "--toy-order", "first", *FAST, "--out-dir", "toy", "--resume", "toy"])
    assert status == 2


def test_the_registries_refuse_a_second_meaning_of_a_name():
    with pytest.raises(ValueError, match="two methods are called 'l1'"):
        METHODS.register(KeepFirst(), names=("l1",))
    with pytest.raises(ValueError, match="two models are called 'vgg16'"):
        register_model("vgg16", ToyNet)
