"""Unstructured GReg (GReg's ``--wg weight``, its Tab. 4) and GReg's ``--skip_layers``.

* On a layer of eight weights, by hand: which weights GReg-1 prunes (the smallest |w|,
  min(ceil(rN), N-1) of them; ``--pick_pruned max`` the largest), the coefficient after k updates
  (k float32 additions of 1e-4), the gradient term lambda * w weight by weight, the stop and the
  stabilising iterations; GReg-2's phase 1 on every weight, its pick by the weights of the moment,
  phase 2 (pruned += 1e-4, kept = -1e-4) and its stop; at the end the pruned weights are 0.
* GReg's layer rule under ``--wg weight``: every conv and linear layer takes its stage's ratio (the
  published ResNet50 command prunes the shortcuts and the classifier too); ``--skip_layers`` by the
  code's matching rule (a prefix of ``stage.block.conv`` on ResNets, an exact index on VGG).
* The state round trip continues exactly; prune.py end to end: the same-shape network with zeros,
  the structural cost unchanged in results.json with the sparsity beside it; one-line errors.
"""
import json

import numpy as np
import pytest
import torch

import prune
from conftest import run_script
from models import build_model, default_arch, load_pruned
from pruning.greg import GRegUnstructured
from pruning.selection import layer_ratios, parse_ratio_list, parse_skip_layers, skipped, weight_layer_ratios
from utils.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")

# fc1 of a LeNet-300-100 of widths (2, 2) on 2x2 one-channel images: 2 filters of 4 weights.
FC1 = [[0.5, -0.1, 0.3, -0.05],
       [0.2, -0.4, 0.01, 0.6]]
# |w| in the flat (logical) order: 0.5 0.1 0.3 0.05 0.2 0.4 0.01 0.6; ascending: 6 (0.01), 3 (0.05),
# 1 (0.1), 4 (0.2), 2 (0.3), 5 (0.4), 0 (0.5), 7 (0.6).


def _tiny():
    torch.manual_seed(0)
    model = build_model(dict(default_arch("lenet300_100", 10, 1.0, net="dense"), widths=(2, 2), input_size=2))
    with torch.no_grad():
        model.fc1.weight.copy_(torch.tensor(FC1))
    return model


def _float32_sum(step, k, start=0.0):
    """``start`` plus k additions of ``step``, each rounded to float32 (as the code's float32 tensor)."""
    value = np.float32(start)
    for _ in range(k):
        value = np.float32(value + np.float32(step))
    return float(value)


def _step(model, method, lr=0.0):
    """One loop step without data (zero loss gradient), in the engine's order."""
    method.before_step(method.iteration)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    method.after_backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    method.after_step(method.iteration)


def test_greg1_picks_the_smallest_weights_and_grows_their_coefficient_by_hand():
    model = _tiny()
    # fc1 at 0.5: ceil(0.5 * 8) = 4 weights, the four smallest |w|: positions 6, 3, 1, 4.
    method = GRegUnstructured(model, [0.5, 0.0, 0.0], 1, update_interval=2, stabilize_interval=3,
                              upper_limit=3.5e-4)
    assert method.pruned[0].nonzero().flatten().tolist() == [1, 3, 4, 6]
    assert method.pruned[1].numel() == 0 and method.pruned[2].numel() == 0  # ratio 0: nothing
    weight = torch.tensor(FC1)
    pruned = method.pruned[0].view(2, 4)
    for k in range(1, 5):  # iterations 0, 2, 4, 6 update; 1, 3, 5 do not
        for _ in range(2):
            _step(model, method)
            value = _float32_sum(1e-4, k)
            assert float(method.reg_pruned[0]) == value and float(method.reg_kept[0]) == 0.0
            # The gradient: lambda * w on the pruned weights, 0 on the kept ones (zero loss gradient).
            want = torch.where(pruned, torch.tensor(value, dtype=torch.float32) * weight, torch.zeros(()))
            assert torch.equal(model.fc1.weight.grad, want)
            if method.stopped_at is not None:
                break
    # 3e-4 is not above 3.5e-4, 4e-4 is: the 4th update (iteration 6) stops; 3 stabilising iterations.
    assert method.updates == 4 and method.stopped_at == 6 and method.finished_layers == [True] * 3
    while not method.done:
        _step(model, method)
    assert method.iteration == 10  # the step of iteration 6 + 3 ends the phase
    # At the end the pruned weights are 0 and the others untouched (lr 0 here).
    assert torch.equal(model.fc1.weight, torch.where(pruned, torch.zeros(()), weight))


@pytest.mark.parametrize("ratio, rule, want", [(0.3, "min", [1, 3, 6]), (0.5, "max", [0, 2, 5, 7]),
                                               (0.99, "min", [0, 1, 2, 3, 4, 5, 6])])
def test_how_many_and_which_weights(ratio, rule, want):
    """min(ceil(r N), N - 1): 0.3 of 8 is 3; 0.99 of 8 would be 8 but one weight stays."""
    method = GRegUnstructured(_tiny(), [ratio, 0.0, 0.0], 1, 1, 0, pick_rule=rule)
    assert method.pruned[0].nonzero().flatten().tolist() == want


def test_float32_counts_of_the_authors_code():
    """10,000 additions of 1e-4 exceed 1 in float32 (the code's float32 tensor): GReg-1 stops after
    10,000 updates. GReg-2: 1000 additions of 1e-5 fall short of 0.01, so it picks at update 1,001,
    and 9,900 additions of 1e-4 from there exceed 1: 10,901 updates."""
    method = GRegUnstructured(_tiny(), [0.5, 0.5, 0.5], 1, 1, 0)
    while not method.done:
        method.before_step(method.iteration)
        method.after_step(method.iteration)
    value = _float32_sum(1e-4, 10000)
    assert value > 1.0 and _float32_sum(1e-4, 9999) <= 1.0
    assert method.updates == 10000 and float(method.reg_pruned[0]) == value
    method = GRegUnstructured(_tiny(), [0.5, 0.5, 0.5], 2, 1, 0)
    while not method.done:
        method.before_step(method.iteration)
        method.after_step(method.iteration)
    assert _float32_sum(1e-5, 1000) < float(np.float32(0.01)) <= _float32_sum(1e-5, 1001)
    assert method.picked_at == 1001 and method.updates == 10901
    assert float(method.reg_pruned[0]) == _float32_sum(1e-4, 9900, _float32_sum(1e-5, 1001))


def test_greg2_phase_one_pick_by_the_weights_of_the_moment_then_phase_two_by_hand():
    model = _tiny()
    two = _float32_sum(1e-5, 2)
    method = GRegUnstructured(model, [0.5, 0.0, 0.0], 2, update_interval=1, stabilize_interval=1,
                              upper_limit_pick=two, upper_limit=2.5e-4)
    assert not method.picked[0] and not method.pruned[0].any()  # nothing decided yet
    _step(model, method)  # update 1: every weight's coefficient is 1e-5
    assert float(method.reg_pruned[0]) == float(method.reg_kept[0]) == _float32_sum(1e-5, 1)
    assert torch.equal(model.fc1.weight.grad, torch.tensor(_float32_sum(1e-5, 1)) * torch.tensor(FC1))
    with torch.no_grad():  # the pick sees these weights, not the pretrained ones
        model.fc1.weight.copy_(torch.tensor([[0.001, -0.1, 0.3, -0.05], [0.2, -0.4, 0.9, 0.6]]))
    _step(model, method)  # update 2: 2e-5 >= the pick limit (exactly): pick the 4 smallest |w| now
    # |w| now: 0.001 0.1 0.3 0.05 0.2 0.4 0.9 0.6 -> smallest four: 0, 3, 1, 4.
    assert method.picked[0] and method.picked_at == 2
    assert method.pruned[0].nonzero().flatten().tolist() == [0, 1, 3, 4]
    _step(model, method)  # update 3: pruned 2e-5 + 1e-4, kept set to -1e-4
    assert float(method.reg_pruned[0]) == _float32_sum(1e-4, 1, two)
    assert float(method.reg_kept[0]) == float(np.float32(-1e-4))
    weight = model.fc1.weight.detach()
    pruned = method.pruned[0].view(2, 4)
    want = torch.where(pruned, torch.tensor(float(method.reg_pruned[0])) * weight,
                       torch.tensor(float(method.reg_kept[0])) * weight)
    assert torch.equal(model.fc1.weight.grad, want)
    _step(model, method)  # update 4: 2.2e-4, not above 2.5e-4
    assert method.stopped_at is None
    _step(model, method)  # update 5: 3.2e-4 > 2.5e-4: stops at iteration 4, then 1 stabilising iteration
    assert method.stopped_at == 4
    _step(model, method)
    assert method.done and method.iteration == 6
    assert torch.equal(model.fc1.weight[pruned], torch.zeros(4))
    assert (model.fc1.weight[~pruned] != 0).all()


def test_the_state_round_trip_continues_exactly():
    def run(interrupt):
        model = _tiny()
        method = GRegUnstructured(model, [0.5, 0.5, 0.3], 2, 1, 2, upper_limit=5e-4, upper_limit_pick=3e-5)
        while not method.done:
            _step(model, method, lr=0.1)
            if method.iteration == interrupt:
                state = method.state_dict()
                method = GRegUnstructured(model, [0.5, 0.5, 0.3], 2, 1, 2, upper_limit=5e-4, upper_limit_pick=3e-5)
                method.load_state_dict(state)
        return model.state_dict(), method.state_dict()

    (weights, state), (weights_resumed, state_resumed) = run(-1), run(4)
    assert state["iteration"] == state_resumed["iteration"] and state["picked_at"] == state_resumed["picked_at"]
    for key in weights:
        assert torch.equal(weights[key], weights_resumed[key]), key


# ------------------------------------------------------------------------ which layers, which ratios


def test_the_published_resnet50_command_prunes_every_layer_but_the_stem():
    """GReg's README: --wg weight --stage_pr [0,0.827,0.827,0.827,0.827,0.827]: shortcuts and the
    classifier take their stage's 0.827 (meta_pruner.py:211-226), the stem stage 0's 0."""
    model = build_model(default_arch("resnet50", 10, 0.125, net="dense", input_size=64))
    ratios = weight_layer_ratios(model, parse_ratio_list("[0,0.827,0.827,0.827,0.827,0.827]"))
    by_name = dict(zip((w.name for w in model.weight_layers), ratios))
    assert by_name["conv1"] == 0.0
    assert by_name["fc"] == by_name["layers.0.downsample.0"] == by_name["layers.15.conv3"] == 0.827
    assert sum(r == 0.827 for r in ratios) == len(ratios) - 1
    with pytest.raises(UsageError, match="takes 6 ratios"):
        weight_layer_ratios(model, parse_ratio_list("[0,0.827,0.827,0.827,0.827]"))


def test_skip_layers_follow_the_codes_matching_rule():
    assert parse_skip_layers("[1.0,2.0,2.3,3.0,3.5]") == ["1.0", "2.0", "2.3", "3.0", "3.5"]
    # ResNet56 (ours): a prefix of 'stage.block.conv'; 1.0 is block 0 of stage 1.
    model = build_model(default_arch("resnet56", 10, 0.125, net="dense"))
    ratios = layer_ratios(model, parse_ratio_list("0,0.5,0.5,0.5,0"), parse_skip_layers("[1.0,2.3]"))
    skipped_names = [g.conv for g, r in zip(model.gated_layers, ratios) if r == 0]
    assert skipped_names == ["conv1", "layers.0.conv1", "layers.12.conv1"]  # stem (ratio 0), 1.0, 2.3 (9 + 3)
    # The prefix rule of the code: '1.1' is block 1 and blocks 10-17 of stage 1 on ResNet110 (18 per stage).
    model = build_model(default_arch("resnet110a", 10, 0.125, net="dense"))
    names = [g.conv for g in model.gated_layers]
    hits = [n for n, s in zip(names, skipped(model, ["1.1"], names)) if s]
    assert hits == ["layer1.1.conv1"] + [f"layer1.{j}.conv1" for j in range(10, 18)]
    # VGG: the layer index, exactly; also under --wg weight.
    model = build_model(default_arch("vgg16", 10, 0.125, net="dense"))
    ratios = layer_ratios(model, parse_ratio_list("[1-12:0.5]"), ["2", "12"])
    assert [i for i, r in enumerate(ratios) if r == 0] == [0, 2, 12]
    ratios = weight_layer_ratios(model, parse_ratio_list("[0-13:0.5]"), ["2", "13"])
    assert [i for i, r in enumerate(ratios) if r == 0] == [2, 13]


def test_skip_layers_on_a_resnet_under_wg_weight_change_nothing_as_in_the_code():
    model = build_model(default_arch("resnet56", 10, 0.125, net="dense"))
    stage_pr = parse_ratio_list("0,0.5,0.5,0.5,0.5")
    assert weight_layer_ratios(model, stage_pr, ["1.0"]) == weight_layer_ratios(model, stage_pr)


# ------------------------------------------------------------------------ prune.py end to end

TINY = ("--dummy", "-j", "0", "--seed", "0")
FAST = ("--update_reg_interval", "1", "--stabilize_reg_interval", "2", "--reg_granularity_prune", "0.25",
        "--reg_granularity_pick", "0.004", "--batch_size_prune", "32", "--epochs", "1", "-b", "64",
        "--limit-batches", "2")


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    base = tmp_path_factory.mktemp("greg_weight")
    proc = run_script("train_resnet56.py", "--net", "dense", "--width-mult", "0.125", "--epoch", "1", "-b", "64",
                      "--limit-batches", "2", *TINY, "--out-dir", "dense", cwd=base)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return base


def test_prune_py_wg_weight_end_to_end(dense):
    proc = run_script("prune.py", "dense/best.pt", "--method", "GReg-1", "--wg", "weight", "--stage_pr",
                      "[0,0.5,0.5,0.5,0.5]", *FAST, *TINY, "--out-dir", "w1", cwd=dense)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((dense / "w1" / "results.json").read_text())
    # The structure is unchanged and says so; the sparsity is beside it.
    assert results["macs_pruned"] == results["macs_dense"] and results["params_pruned"] == results["params_dense"]
    sparse = results["unstructured"]
    assert sparse["structure"].startswith("unchanged") and results["wg"] == "weight"
    assert sparse["zero_weights"] == sparse["pruned_weights"] > 0 and sparse["weight_sparsity"] > 0.49
    assert sparse["layer_sparsity"]["conv1"] == 0.0 and 0.5 <= sparse["layer_sparsity"]["linear"] < 0.6
    assert results["pruning_phase"]["done"] and results["pruning_phase"]["wg"] == "weight"
    # The export: the dense shape, with zeros exactly where the regularisation phase pruned.
    phase = torch.load(dense / "w1" / "regularize" / "last.pt", weights_only=True)["method"]
    model = load_pruned(dense / "w1" / "pruned.pt")
    reference = build_model(dict(model.arch, net="dense"))
    assert [tuple(p.shape) for p in model.parameters()] == [tuple(p.shape) for p in reference.parameters()]
    for name, pruned in zip(phase["layers"], phase["pruned"]):
        weight = model.get_submodule(name).weight.detach().flatten()
        if pruned.numel():
            assert torch.equal(weight[pruned], torch.zeros(int(pruned.sum())))
            assert (weight[~pruned] != 0).all()
    assert "weight sparsity" in proc.stdout and "keeps its shape" in proc.stdout


@pytest.mark.parametrize("argv, needle", [
    (["--method", "GReg-1", "--wg", "weight", "--target-macs", "0.5"], "a MACs target does not apply"),
    (["--method", "L1", "--wg", "weight", "--stage_pr", "0,0.5,0.5,0.5,0"], "implemented for GReg-1 and GReg-2"),
    (["--method", "GReg-2", "--wg", "weight", "--stage_pr", "0,0.5,0.5,0.5"], "takes 5 ratios"),
    (["--method", "hsic", "--target-macs", "0.5", "--skip_layers", "1.0"], "GReg's"),
    (["--method", "GReg-1", "--stage_pr", "0,0.5,0.5,0.5,0", "--skip_layers", "1.x"], "--skip_layers item"),
])
def test_bad_unstructured_input_is_one_line(argv, needle, dense):
    proc = run_script("prune.py", "dense/best.pt", *argv, *TINY, "--out-dir", "err", cwd=dense)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines


@pytest.mark.parametrize("stage_pr, needle", [("0,1,0.5,0.5,0", "[0, 1)"), ("0,-0.2,0.5,0.5,0", "[0, 1)"),
                                              ("0,nan,0,0,0", "[0, 1)"), ("[1-12:1.5]", "[0, 1)"),
                                              ("0,0.5,x,0,0", "not a number"), ("[]", "empty")])
def test_bad_ratios_are_refused_when_the_command_is_parsed(stage_pr, needle, capsys):
    """Before any checkpoint is read (reproduce.py checks its rows with this parser too)."""
    with pytest.raises(SystemExit) as stop:
        prune.parse_args(["best.pt", "--method", "greg1", "--stage_pr", stage_pr])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines
