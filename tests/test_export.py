"""Export of the compact model (models/export.py): equivalence, cost, file format.

Numerical checks use the tiny models of conftest.py with gate states that hold
every case at once: channels closed, open and strictly between 0 and 1, a
layer with one open channel, a fully closed layer (kept as one exactly-zero
channel), and a partly or fully closed stem (ResNet56: the scatter shortcut).
BatchNorm running statistics are made non-trivial by train-mode forwards
before the comparison. Cost checks count with ``torch.utils.flop_counter``
(FLOPs / 2) and by summing parameter sizes, independently of CostModel.
"""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models import VGG, CifarResNet, ImageNetResNet, build_model, export_pruned, load_pruned, save_pruned
from models.export import FORMAT, read_pruned
from utils.errors import UsageError

FAMILIES = ("vgg", "resnet56", "resnet50")
NETS = (("hc", False), ("dep", False), ("dep", True))
CLOSED_LAYER = {"vgg": 2, "resnet56": 2, "resnet50": 3}  # fully closed in every scenario


pytestmark = pytest.mark.usefixtures("one_thread")


def gate_state(widths, scenario, closed_layer, random_logits, seed=0):
    """Logits for all gates; every value within the dep range (|a| < log 100)."""
    la = random_logits(widths, torch.Generator().manual_seed(seed), one_open_layer=1)
    offsets = [0]
    for w in widths:
        offsets.append(offsets[-1] + w)
    a, b = offsets[closed_layer], offsets[closed_layer + 1]
    la[a:b] = -3.9
    if scenario == "stem_closed":
        la[:widths[0]] = -3.9
    else:  # stem partly closed, one channel strictly between 0 and 1
        la[1], la[2] = -3.9, 0.0
    return la


def prepared(tiny, set_logits, random_logits, family, net, back_dep, scenario):
    model, x = tiny(family, net=net, back_dep=back_dep)
    set_logits(model, gate_state(model.gates.widths, scenario, CLOSED_LAYER[family], random_logits))
    model.train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial BN running statistics
            model(1.5 * torch.randn_like(x) + 0.3)
    return model.eval(), x


def flop_macs(model, x) -> int:
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("scenario", ("mixed", "stem_closed"))
@pytest.mark.parametrize("net,back_dep", NETS, ids=("hc", "dep", "dep-back"))
@pytest.mark.parametrize("family", FAMILIES)
def test_compact_model_equals_gated_model(family, net, back_dep, scenario, tiny, set_logits, random_logits):
    model, x = prepared(tiny, set_logits, random_logits, family, net, back_dep, scenario)
    z = model.gates.test_gates()
    assert ((z > 0) & (z < 1)).any() and (z == 0).any() and (z == 1).any()
    kept = model.gates.kept()
    assert kept[1] == 1 and kept[CLOSED_LAYER[family]] == 0

    compact, payload = export_pruned(model)
    with torch.no_grad():
        expected, got = model(x), compact(x)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()

    # Same class, no gates, the kept widths (a closed layer keeps one channel).
    assert type(compact) is type(model) and not compact.training
    assert compact.gates.logits is None and not any("gates" in k for k in compact.state_dict())
    assert list(compact.gates.widths) == kept.clamp(min=1).tolist()
    # Cost: an independent FLOP count and parameter sum equal the reported pruned cost.
    macs, params = model.cost.pruned(kept)
    assert (payload["macs"], payload["params"]) == (macs, params)
    assert flop_macs(compact, x[:1]) == macs
    assert param_count(compact) == params


@pytest.mark.parametrize("family", FAMILIES)
def test_fully_closed_layer_keeps_one_zero_channel(family, tiny, set_logits, random_logits):
    model, x = prepared(tiny, set_logits, random_logits, family, "hc", False, "mixed")
    compact, _ = export_pruned(model)
    layer = compact.gated_layers[CLOSED_LAYER[family]]
    assert layer.width == 1
    seen = []
    compact.get_submodule(layer.bn).register_forward_hook(lambda m, i, out: seen.append(out))
    with torch.no_grad():
        compact(x)
    assert seen and torch.equal(seen[0], torch.zeros_like(seen[0]))


def test_resnet56_stem_scatters_into_the_full_width_stream(tiny, set_logits, random_logits):
    model, x = prepared(tiny, set_logits, random_logits, "resnet56", "dep", False, "mixed")
    kept = (model.gates.test_gates()[:4] > 0).nonzero().flatten().tolist()
    assert 1 not in kept and 0 < len(kept) < 4
    compact, payload = export_pruned(model)
    assert compact.conv1.out_channels == len(kept) and compact.bn1.num_features == len(kept)
    first = compact.layers[0]
    assert first.conv1.in_channels == len(kept)
    assert first.conv2.out_channels == 4 and first.shortcut is None  # the stream keeps its width
    assert first.in_index.tolist() == kept == list(payload["arch"]["stem_index"])
    # Exporting the compact model again maps the kept positions through the scatter.
    again, _ = export_pruned(compact)
    assert again.arch == compact.arch
    with torch.no_grad():
        assert torch.allclose(again(x), compact(x), atol=1e-6)


def test_resnet50_stem_loses_inputs_of_conv1_and_projection(tiny, set_logits, random_logits):
    model, _ = prepared(tiny, set_logits, random_logits, "resnet50", "hc", False, "mixed")
    k = int(model.gates.kept()[0])
    compact, _ = export_pruned(model)
    first = compact.layers[0]
    assert compact.conv1.out_channels == k
    assert first.conv1.in_channels == k and first.downsample[0].in_channels == k


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_model_exports_unchanged(family, tiny):
    model, x = tiny(family, net="dense")
    model.eval()
    compact, payload = export_pruned(model)
    assert compact.gates.widths == model.gates.widths
    assert (payload["macs"], payload["params"]) == model.cost.dense()
    with torch.no_grad():
        assert torch.allclose(compact(x), model(x), atol=1e-6)


def test_pruned_file_loads_with_weights_only(tmp_path, tiny, set_logits, random_logits):
    model, x = prepared(tiny, set_logits, random_logits, "resnet56", "dep", True, "mixed")
    path = tmp_path / "pruned.pt"
    compact, _ = save_pruned(model, path, dict(dataset="cifar10", epoch=7))
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and set(raw) == {"format", "arch", "state_dict", "macs", "params", "macs_thop"}
    arch = raw["arch"]
    assert arch["model"] == "resnet56" and arch["num_classes"] == 10 and arch["net"] == "dense"
    assert list(arch["inner_widths"]) == model.gates.kept()[1:].clamp(min=1).tolist()
    source = arch["source"]
    assert (source["net"], source["back_dep"], source["dataset"], source["epoch"]) == ("dep", True, "cifar10", 7)
    assert source["arch"] == model.arch
    loaded = load_pruned(path)
    assert not loaded.training
    assert load_pruned(tmp_path).arch == loaded.arch  # a directory means its pruned.pt
    with torch.no_grad():
        assert torch.equal(loaded(x), compact(x))
        assert (loaded(x) - model(x)).abs().max() <= 1e-4 * model(x).abs().max()
    # The architecture description alone rebuilds the model.
    rebuilt = build_model({k: v for k, v in arch.items() if k != "source"})
    rebuilt.load_state_dict(raw["state_dict"])


def test_load_pruned_rejects_other_files(tmp_path):
    other = tmp_path / "last.pt"
    torch.save({"format": "dep-l0-checkpoint/1", "model": {}}, other)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip file at all")
    for path, words in ((other, FORMAT), (junk, "junk.pt"), (tmp_path / "missing.pt", "does not exist")):
        with pytest.raises(UsageError) as e:
            load_pruned(path)
        assert words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UsageError):
        read_pruned(tmp_path)  # a directory without pruned.pt


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_export_works_on_the_compact_model(family, tiny, set_logits, random_logits):
    model, x = prepared(tiny, set_logits, random_logits, family, "hc", False, "mixed")
    compact, _ = export_pruned(model)
    program = torch.export.export(compact, (x,))
    with torch.no_grad():
        assert torch.allclose(program.module()(x), compact(x), atol=1e-5)


# ------------------------------------------------------------ full-size models

def full_size(name):
    if name == "vgg16":
        return VGG(net="hc"), 32
    if name == "resnet56":
        return CifarResNet(net="hc"), 32
    return ImageNetResNet(net="hc"), 224


@pytest.mark.parametrize("name", ("vgg16", "resnet56", "resnet50"))
def test_full_size_cost_matches_flop_counter(name, set_logits):
    """Real architectures, random gates with a closed and a one-channel layer;
    counted on the meta device (shapes only, no arithmetic)."""
    model, size = full_size(name)
    widths = model.gates.widths
    g = torch.Generator().manual_seed(1)
    la = torch.where(torch.rand(sum(widths), generator=g) < 0.6, 3.0, -4.0).double()
    offsets = torch.tensor([0, *widths]).cumsum(0).tolist()
    la[offsets[0]:offsets[1]] = -4.0
    la[offsets[0] + 3] = 3.0            # stem: one channel
    la[offsets[2]:offsets[3]] = -4.0    # a fully closed layer
    set_logits(model, la)
    kept = model.gates.kept()
    compact, payload = export_pruned(model)
    macs, params = model.cost.pruned(kept)
    assert (payload["macs"], payload["params"]) == (macs, params) and macs < model.cost.dense()[0]
    assert param_count(compact) == params
    assert flop_macs(compact.to("meta"), torch.empty(1, 3, size, size, device="meta")) == macs
