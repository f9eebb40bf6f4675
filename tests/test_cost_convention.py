"""``--cost-convention thop``: the cost model against the thop package itself, on every network.

thop (pinned in requirements.txt: its counting rules changed between releases,
e.g. BatchNorm's ops) counts what its module hooks see: conv and linear
multiply-accumulates, 4 ops per element of an affine BatchNorm, the pooling
modules. ``CostModel.thop_macs`` must give exactly its number, dense and with
channels removed, for every registered network; ``conv`` stays the default.
"""
import pytest
import torch
import thop

from models import NETWORKS, build_model, default_arch
from models.export import export_pruned

SIZES = {"imagenet": (3, 224), "cifar": (3, 32), "mnist": (1, 28)}


def thop_count(model) -> int:
    channels, size = SIZES[NETWORKS[model.arch['model']].data_kind]
    model.eval()
    ops, _ = thop.profile(model, (torch.randn(1, channels, size, size),), verbose=False)
    for module in model.modules():  # thop leaves its counters behind
        for name in ("total_ops", "total_params"):
            if name in module._buffers:
                del module._buffers[name]
    return int(ops)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_thop_convention_is_thops_count_dense_and_pruned(name):
    torch.manual_seed(0)
    classes = 1000 if NETWORKS[name].data_kind == "imagenet" else 10
    model = build_model(default_arch(name, classes, 0.25, net="hc"))
    dense = build_model(default_arch(name, classes, 0.25, net="dense"))
    assert dense.cost.dense("thop")[0] == thop_count(dense)
    assert dense.cost.dense()[0] == dense.cost.dense("conv")[0] < dense.cost.dense("thop")[0]
    # Close about a third of every gated layer's channels (never all of one).
    gates = torch.cat([(torch.rand(w) > 0.35).float() for w in model.gates.widths])
    for i, chunk in enumerate(gates.split(model.gates.widths)):
        chunk[0] = 1.0
    compact, payload = export_pruned(model, gates=gates)
    kept = model.gates.per_layer_sum((gates > 0).float()).long()
    assert payload["macs_thop"] == model.cost.pruned(kept, "thop")[0] == thop_count(compact)
    assert payload["macs"] == model.cost.pruned(kept, "conv")[0]


def test_the_convention_is_chosen_and_reported():
    model = build_model(default_arch("vgg16", 10, 0.25, net="dense"))
    conv = model.cost.dense()
    model.cost.convention = "thop"
    assert model.cost.dense() == model.cost.dense("thop") != conv
    with pytest.raises(ValueError, match="unknown cost convention"):
        model.cost.dense("flops")
