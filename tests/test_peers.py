"""The pruning-method interface and the first peers: L1, GReg-1, GReg-2 (pruning/, prune.py).

* A toy method plugs into the engine with no change to it: its hooks run in the
  documented order, its loss term, state, scalars, results and channel
  decision reach the checkpoint, results.json and pruned.pt.
* GReg's ratio syntax per model; L1 removes exactly the filters with the
  smallest mean |W|, min(ceil(rN), N-1) of them; a MACs target is met.
* GReg-1 and GReg-2 step by step against the spec's formulas on a tiny model
  (coefficients, the magnitude-ratio EMA, the stop rules, GReg-2's pick, the
  stabilisation), the float32 update counts of the authors' code, and the
  gradient term lambda * W.
* The cut equals masking the removed filters, and a FLOP counter on the saved
  network equals the reported MACs.
* prune.py end to end on --dummy and on a folder dataset, an exact resume after
  SIGTERM mid-phase, and one-line errors.
"""
import json
import math
import os
import re
import signal

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import prune
import train_resnet56
from conftest import assert_equal_states, read_tb_events, run_parallel, run_script
from models import build_model, default_arch, export_pruned, load_pruned
from pruning.greg import GReg
from pruning.method import PruningMethod
from pruning.selection import (decision, filter_scores, layer_ratios, macs_fraction, parse_ratio_list,
                               pruned_count, ratios_for_macs)
from engine import prune_job
from engine.cli import parse_args
from engine.trainer import Trainer
from utils.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")


def _dense(name="resnet56", width=0.25, seed=0):
    torch.manual_seed(seed)
    size = {"resnet50": dict(input_size=64)}.get(name, {})
    return build_model(default_arch(name, 10, width, net="dense", **size))


# ----------------------------------------------------------------------- the interface


class ToyMethod(PruningMethod):
    """Closes the first channel of every gated layer, adds a term, stops after 5 steps."""

    name = "toy"
    loss_name = "toy"

    def __init__(self, model):
        super().__init__(model)
        self.calls, self.steps = [], 0

    def start_epoch(self, epoch):
        self.calls.append(("start_epoch", epoch))

    def before_step(self, iteration):
        self.calls.append(("before_step", iteration))

    def loss(self, progress):
        self.calls.append(("loss", round(progress, 3)))
        return torch.tensor(0.25)

    def after_backward(self):
        self.calls.append(("after_backward",))

    def after_step(self, iteration):
        self.calls.append(("after_step", iteration))
        self.steps += 1

    def end_epoch(self, epoch):
        self.calls.append(("end_epoch", epoch))

    def finished(self):
        return self.steps >= 5

    def channel_gates(self):
        gates = torch.ones(sum(self.model.gates.widths))
        starts = torch.tensor([0, *self.model.gates.widths[:-1]]).cumsum(0)
        gates[starts] = 0.0
        return gates

    def state_dict(self):
        return dict(steps=self.steps)

    def progress_scalars(self, progress):
        return {"toy/steps": float(self.steps)}

    def results(self):
        return dict(toy_steps=self.steps)


def test_a_toy_method_needs_no_change_in_the_engine(tmp_path, monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    args = parse_args(train_resnet56.RECIPE, ["--dummy", "--net", "dense", "--width-mult", "0.125", "-b", "64",
                                              "-j", "0", "--seed", "0", "--epoch", "3", "-p", "1",
                                              "--out-dir", str(tmp_path / "run")])
    made = []
    trainer = Trainer(args, method=lambda model, a: made.append(ToyMethod(model)) or made[0])
    assert trainer.fit() == 0
    toy = made[0]
    # 512 dummy images at 64: 8 steps an epoch; the method stops the run after 5.
    assert toy.calls[0] == ("start_epoch", 0)
    step = ["before_step", "loss", "after_backward", "after_step"]
    assert [c[0] for c in toy.calls[1:1 + 4 * 5]] == step * 5
    assert toy.calls[-1] == ("end_epoch", 0)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["method"] == "toy" and results["toy_steps"] == 5 and results["epochs_done"] == 1
    widths = trainer.model.gates.widths
    assert [c["kept"] for c in results["channels"]] == [w - 1 for w in widths]
    macs, params = trainer.model.cost.pruned(torch.tensor([w - 1 for w in widths]))
    assert results["macs_pruned"] == macs and results["params_pruned"] == params
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert last["method"] == dict(steps=5)
    compact = load_pruned(tmp_path / "run" / "pruned.pt")
    assert compact.cost.dense() == (macs, params)
    assert math.isfinite(results["val_loss"])


# ------------------------------------------------------------------------- the ratios


def test_ratio_syntax_per_model():
    r56, r50, vgg = _dense("resnet56"), _dense("resnet50", 0.125), _dense("vgg16", 0.125)
    ratios = layer_ratios(r56, parse_ratio_list("[0,0.75,0.75,0.32,0]"))
    assert ratios == [0.0] + [0.75] * 18 + [0.32] * 9
    ratios = layer_ratios(r50, parse_ratio_list("0,0.6,0.6,0.6,0.21,0"))
    assert ratios == [0.0] + [0.6] * (2 * 13) + [0.21] * 6
    assert layer_ratios(vgg, parse_ratio_list("1-12:0.5")) == [0.0] + [0.5] * 12
    assert layer_ratios(vgg, parse_ratio_list("[0:0.1,3-4:0.2]")) == [0.1, 0, 0, 0.2, 0.2] + [0.0] * 8
    for model, text, needle in ((r56, "0,0.5,0.5,0", "takes 5 ratios"), (r56, "0,0.5,0.5,0.5,0.2", "classifier"),
                                (r56, "0,1.0,0.5,0.5,0", "[0, 1)"), (r56, "1-3:0.5", "VGG's form"),
                                (vgg, "14:0.5", "0-13"), (r50, "0,0.5,0.5,0.5,0", "takes 6")):
        with pytest.raises(UsageError, match=re.escape(needle)):
            layer_ratios(model, parse_ratio_list(text))


def test_greg_resnet56_keeps_4_8_43_filters_per_stage():
    """The spec's count: [0,.75,.75,.32,0] keeps 4 / 8 / 43 conv1 filters (full width)."""
    model = build_model(default_arch("resnet56", 10, net="dense"))
    ratios = layer_ratios(model, parse_ratio_list("[0,0.75,0.75,0.32,0]"))
    kept = [g.width - pruned_count(g.width, r) for g, r in zip(model.gated_layers, ratios)]
    assert kept == [16] + [4] * 9 + [8] * 9 + [43] * 9
    # Option-B shortcuts (this repository) add their 1x1 convs to both sides of the ratio.
    dense, _ = model.cost.dense()
    assert dense == 125_747_840 and round(macs_fraction(model, ratios) * dense) == 49_384_064


def test_l1_removes_exactly_the_smallest_mean_abs_filters():
    model = _dense("vgg16", 0.125)
    ratios = [0.3] * 13
    gates = decision(model, ratios)
    for layer, z, ratio in zip(model.gated_layers, gates.split(model.gates.widths), ratios):
        weight = model.get_submodule(layer.conv).weight.detach()
        score = [float(weight[f].abs().mean()) for f in range(layer.width)]
        n = min(math.ceil(ratio * layer.width), layer.width - 1)
        smallest = sorted(range(layer.width), key=lambda f: score[f])[:n]
        assert sorted((z == 0).nonzero().flatten().tolist()) == sorted(smallest), layer.name
    assert pruned_count(4, 0.99) == 3 and pruned_count(10, 0.31) == 4 and pruned_count(10, 0.0) == 0


def test_a_macs_target_is_met_by_one_global_ratio():
    model = _dense("resnet56", 0.5)
    for target in (0.4, 0.6, 0.8):
        r, ratios = ratios_for_macs(model, target)
        assert abs(macs_fraction(model, ratios) - target) <= 0.01
        assert ratios[0] == 0.0
        # Every pruned layer takes r's count or the next filter (where the step jumped the band).
        for g, ratio in zip(model.gated_layers[1:], ratios[1:]):
            assert pruned_count(g.width, ratio) - pruned_count(g.width, r) in (0, 1)
    with pytest.raises(UsageError, match="smallest network"):
        ratios_for_macs(model, 0.05)


@pytest.mark.parametrize("model_name", ["vgg16", "resnet56"])
def test_the_ratio_search_lands_on_the_budget_matrix_targets(model_name):
    """L1's and GReg's --target-macs on the budget matrix's networks (width 0.25) and targets: the
    search lands within its 1% and its budget block says so (bench/budget_matrix.py, issue 24)."""
    from pruning.selection import TARGET_TOLERANCE, search_budget
    model = _dense(model_name, 0.25)
    for target in (0.25, 0.35, 0.5):
        r, ratios = ratios_for_macs(model, target)
        block = search_budget(target, macs_fraction(model, ratios), r)
        assert abs(block["achieved"] - target) <= TARGET_TOLERANCE, (model_name, target, block)
        assert block["within_tolerance"] and block["settled_by"] == "search" and block["converged"]
        assert f"target {target:.3f} (within 1%)" in block["message"]


# ------------------------------------------------------------------------------- GReg


def _fake_step(model, method, iteration, lr=0.0):
    """One loop step without data: the hooks in the engine's order, zero loss gradients."""
    method.before_step(iteration)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    method.after_backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    method.after_step(iteration)


def test_greg1_schedule_gradient_term_and_stop_step_by_step():
    model = _dense("resnet56", 0.25)
    ratios = [0.0] + [0.5] * 27
    pretrained = filter_scores(model)
    method = GReg(model, ratios, 1, update_interval=3, stabilize_interval=4, upper_limit=0.001)
    # The pruned set is fixed from the pretrained weights: the smallest mean |W|.
    assert torch.equal(method.channel_gates(), decision(model, ratios, pretrained))
    want = torch.zeros((), dtype=torch.float32)
    updates = 0
    for iteration in range(40):
        if method.stopped_at is None and iteration % 3 == 0:
            want += torch.tensor(1e-4, dtype=torch.float32)  # float32, as the authors' code accumulates
            updates += 1
        before = [model.get_submodule(g.conv).weight.detach().clone() for g in model.gated_layers]
        _fake_step(model, method, iteration)
        for layer, (g, reg, pruned) in enumerate(zip(model.gated_layers, method.reg, method.pruned)):
            if ratios[layer] == 0:
                assert reg.abs().max() == 0
                continue
            assert torch.equal(reg[pruned], want.expand(int(pruned.sum()))) and reg[~pruned].abs().max() == 0
            # The gradient term: lambda_f * W_f on each filter, nothing else (zero loss gradient).
            grad = model.get_submodule(g.conv).weight.grad
            torch.testing.assert_close(grad, reg.view(-1, 1, 1, 1) * before[layer], rtol=0, atol=0)
        if method.done:
            break
    # Stop: the first update whose max lambda exceeds 1e-3 (11 additions of 1e-4 in float32), then K_s = 4.
    acc, expected_updates = torch.zeros((), dtype=torch.float32), 0
    while float(acc) <= 0.001:
        acc += torch.tensor(1e-4, dtype=torch.float32)
        expected_updates += 1
    assert method.updates == updates == expected_updates
    assert method.stopped_at == 3 * (expected_updates - 1)
    assert method.done and iteration == method.stopped_at + 4


def test_greg_magnitude_ratio_is_an_ema_of_kept_over_pruned():
    model = _dense("resnet56", 0.25)
    ratios = [0.0] + [0.5] * 27
    method = GReg(model, ratios, 1, update_interval=1, stabilize_interval=1, upper_limit=10.0)
    layer = 5
    conv = model.get_submodule(model.gated_layers[layer].conv)
    history = []
    for iteration in range(4):
        with torch.no_grad():  # change the kept/pruned ratio between updates
            conv.weight[~method.pruned[layer]] *= 1.0 + 0.3 * iteration
        score = conv.weight.detach().abs().flatten(1).mean(1)
        pruned = method.pruned[layer]
        ratio = float(score[~pruned].mean() / score[pruned].mean())
        history.append(ratio if not history else 0.9 * history[-1] + 0.1 * ratio)
        _fake_step(model, method, iteration)
        assert method.hist[layer] == pytest.approx(history[-1], rel=1e-6)


def test_greg1_stops_every_layer_when_all_magnitude_ratios_pass_the_limit():
    model = _dense("resnet56", 0.25)
    ratios = [0.0] + [0.5] * 27
    method = GReg(model, ratios, 1, update_interval=1, stabilize_interval=0, mag_ratio_limit=0.5)
    _fake_step(model, method, 0)  # every kept/pruned ratio is >= 1 > 0.5 from the start
    assert all(method.finished_layers) and method.stopped_at == 0 and method.done


def test_greg2_a_layer_already_apart_stops_at_its_pick():
    """As in the authors' code, the stop is checked in the same update as the pick."""
    model = _dense("resnet56", 0.25)
    method = GReg(model, [0.0] + [0.5] * 27, 2, update_interval=1, stabilize_interval=0, upper_limit_pick=1e-5,
                  mag_ratio_limit=0.5)
    _fake_step(model, method, 0)
    assert method.picked_at == 1 and all(method.finished_layers) and method.done


def test_greg2_phase_switch_pick_and_recover():
    model = _dense("resnet56", 0.25)
    ratios = [0.0] + [0.5] * 27
    step = torch.tensor(1e-5, dtype=torch.float32)
    pick_at = float(step + step + step + step)  # exactly the float32 coefficient after 4 updates: >=, not >
    method = GReg(model, ratios, 2, update_interval=1, stabilize_interval=2, upper_limit_pick=pick_at,
                  upper_limit=0.00025)
    layer, conv = 3, model.get_submodule(model.gated_layers[3].conv)
    assert torch.equal(method.channel_gates(), torch.ones(sum(model.gates.widths)))  # nothing decided yet
    for iteration in range(3):  # phase 1: +1e-5 on every filter; picks when max >= pick_at (update 4)
        _fake_step(model, method, iteration)
        assert torch.equal(method.reg[layer], torch.full_like(method.reg[layer], float(
            sum([torch.tensor(1e-5, dtype=torch.float32)] * (iteration + 1)))))
        assert not method.picked[layer]
    with torch.no_grad():  # the pick uses the scores of the moment, not the pretrained ones
        conv.weight[:2].mul_(100.0)
        conv.weight[-2:].mul_(0.01)
    _fake_step(model, method, 3)
    assert method.picked[layer] and method.picked_at == 4
    pruned = method.pruned[layer]
    assert not pruned[:2].any() and pruned[-2:].all()
    assert int(pruned.sum()) == pruned_count(len(pruned), 0.5)
    _fake_step(model, method, 4)  # phase 2: pruned += 1e-4, kept = -1e-4 (set)
    reg = method.reg[layer]
    assert torch.allclose(reg[~pruned], torch.full_like(reg[~pruned], -1e-4))
    assert torch.allclose(reg[pruned], torch.full_like(reg[pruned], 4e-5 + 1e-4))
    assert torch.equal(method.channel_gates().split(model.gates.widths)[layer], (~pruned).float())
    while not method.done:
        _fake_step(model, method, method.iteration)
    # max > 2.5e-4 after two more phase-2 updates (4e-5 + 3e-4), then two stabilising iterations.
    assert method.stopped_at == 6 and method.iteration == 9


def test_greg2_float32_counts_match_the_authors_code():
    """1000 additions of 1e-5 fall short of 0.01 in float32: the pick is at update 1,001, the end at
    update 10,901 (the magnitude-ratio stop disabled)."""
    model = _dense("resnet56", 0.125)
    ratios = [0.0] + [0.5] * 27
    method = GReg(model, ratios, 2, update_interval=1, stabilize_interval=0, mag_ratio_limit=float("inf"))
    while not method.done:
        method.before_step(method.iteration)
        method.after_step(method.iteration)
    assert method.picked_at == 1001 and method.updates == 10901


# -------------------------------------------------------------------- the cut


@pytest.mark.parametrize("name", ["resnet56", "vgg16", "resnet50"])
def test_the_cut_equals_masking_and_the_counter_equals_the_reported_macs(name):
    model = _dense(name, 0.25 if name != "resnet50" else 0.125).eval()
    with torch.no_grad():  # trained-looking BN statistics
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.bias.uniform_(-0.2, 0.2)
    gates = decision(model, [0.4] * len(model.gated_layers))
    compact, payload = export_pruned(model, gates=gates)
    size = 64 if name == "resnet50" else 32
    x = torch.randn(4, 3, size, size)
    masked = build_model(model.arch).eval()
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        for g, z in zip(masked.gated_layers, gates.split(masked.gates.widths)):
            bn = masked.get_submodule(g.bn)
            bn.weight.mul_(z)
            bn.bias.mul_(z)
        torch.testing.assert_close(compact(x), masked(x), rtol=1e-4, atol=1e-4)
    with FlopCounterMode(display=False) as counter:
        compact(x[:1])
    assert counter.get_total_flops() // 2 == payload["macs"]
    assert sum(p.numel() for p in compact.parameters()) == payload["params"]
    kept = model.gates.per_layer_sum((gates > 0).float()).long()
    assert (payload["macs"], payload["params"]) == model.cost.pruned(kept)


# --------------------------------------------------------------------- prune.py end to end

TINY = ("--dummy", "-j", "0", "--seed", "0")
GREG_FAST = ("--update_reg_interval", "1", "--stabilize_reg_interval", "3", "--reg_granularity_prune", "0.2",
             "--batch_size_prune", "32", "--epochs", "2", "-b", "64")


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("peers")
    proc = run_script("train_resnet56.py", "--net", "dense", "--width-mult", "0.25", "--epoch", "2", "-b", "64",
                      *TINY, "--out-dir", "dense", cwd=base)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return base


@pytest.fixture(scope="module")
def prune_runs(dense_run):
    base = dense_run

    def job(name, *argv):
        def run():
            proc = run_script("prune.py", "dense/best.pt", *argv, *TINY, "--out-dir", name, cwd=base)
            assert proc.returncode == 0, f"{name}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
            return proc, json.loads((base / name / "results.json").read_text())
        return run

    jobs = {
        "l1": job("l1", "--method", "L1", "--stage_pr", "[0,0.5,0.5,0.5,0]", "--epochs", "2", "-b", "64"),
        "greg1": job("greg1", "--method", "GReg-1", "--stage_pr", "0,0.5,0.5,0.5,0", *GREG_FAST),
        "greg2": job("greg2", "--method", "GReg-2", "--stage_pr", "0,0.5,0.5,0.5,0", "--reg_granularity_pick",
                     "0.004", *GREG_FAST),
        "l1-macs": job("l1-macs", "--method", "l1", "--target-macs", "0.6", "--epochs", "1", "-b", "64"),
    }
    return base, run_parallel(jobs, workers=2)


# A Dep-L0 run's keys, less the penalty's (lamba, reg: only runs with gates write them), plus the
# cost convention.
RUN_KEYS = {"model", "dataset", "net", "back_dep", "cost_convention", "seed", "epochs_done", "epochs_total", "top1",
               "best_top1", "val_loss", "macs_dense", "macs_pruned", "macs_reduction", "params_dense",
               "params_pruned", "params_reduction", "channels", "disconnected", "wall_time_s", "device",
               "world_size", "torch_version", "git_commit", "best_top1_epochs", "best_top1_over", "method"}


@pytest.mark.parametrize("name", ["l1", "greg1", "greg2", "l1-macs"])
def test_prune_runs_end_to_end(name, prune_runs):
    base, outcomes = prune_runs
    proc, results = outcomes[name].get()
    assert RUN_KEYS <= set(results), RUN_KEYS - set(results)
    assert not {"lamba", "reg"} & set(results), "a run without gates reports no penalty settings"
    assert results["method"] == {"l1-macs": "l1"}.get(name, name)
    assert results["layer_ratios"][0] == 0.0
    dense = json.loads((base / "dense" / "results.json").read_text())
    assert results["macs_dense"] == dense["macs_dense"] and results["macs_pruned"] < results["macs_dense"]
    # The saved network is the smaller one, and a counter on it gives the reported MACs.
    compact = load_pruned(base / name / "pruned.pt")
    with FlopCounterMode(display=False) as counter:
        compact(torch.randn(1, 3, 32, 32))
    assert counter.get_total_flops() // 2 == results["macs_pruned"]
    assert sum(p.numel() for p in compact.parameters()) == results["params_pruned"]
    if name.startswith("greg"):
        phase = results["pruning_phase"]
        assert phase["done"] and phase["stopped_at_iteration"] is not None and phase["iterations"] > 0
        assert (base / name / "regularize" / "pruned.pt").is_file()
        assert "greg: iteration" in proc.stdout
        tags = {tag for path in (base / name / "regularize").glob("events.out.tfevents*")
                for _, tag, _, _ in read_tb_events(path)}
        assert {"greg/reg_pruned", "greg/reg_kept", "greg/mag_ratio_min", "channels", "Test/Accuracy",
                "Train/loss"} <= tags, tags
    if name == "l1-macs":
        assert abs(results["macs_pruned"] / results["macs_dense"] - 0.6) <= 0.01
        # The ratio search says where it landed, in the keys a gated run's budget block has.
        block = results["budget"]
        assert block["target"] == 0.6 and block["within_tolerance"] is True and block["converged"] is True
        assert block["settled_by"] == "search" and block["tolerance"] == 0.01
        assert block["achieved"] == pytest.approx(results["macs_pruned"] / results["macs_dense"], abs=1e-9)
    else:
        assert "budget" not in results  # --stage_pr: no target to land on


def test_summarize_puts_every_method_in_one_table(prune_runs):
    import summarize
    base, outcomes = prune_runs
    for outcome in outcomes.values():
        outcome.get()
    table = summarize.summarize([str(base)])
    for method in ("dense", "L1", "GReg-1", "GReg-2"):
        assert f"| {method} |" in table, table


def _interrupt_at(monkeypatch, iteration):
    original = GReg.after_step

    def after_step(self, it):
        original(self, it)
        if self.iteration == iteration:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(GReg, "after_step", after_step)


def test_sigterm_mid_regularisation_resumes_exactly(dense_run, tmp_path, monkeypatch, capsys):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(dense_run)
    argv = ["dense/best.pt", "--method", "greg2", "--stage_pr", "0,0.5,0.5,0.5,0", "--reg_granularity_pick", "0.004",
            *GREG_FAST, *TINY]
    assert prune.main([*argv, "--out-dir", str(tmp_path / "ref")]) == 0
    _interrupt_at(monkeypatch, 6)  # mid-epoch of the regularisation phase, after the pick
    assert prune.main([*argv, "--out-dir", str(tmp_path / "cut")]) == 75
    monkeypatch.undo()
    monkeypatch.chdir(dense_run)
    stopped = torch.load(tmp_path / "cut" / "regularize" / "last.pt", weights_only=True)
    assert stopped["step"] > 0 and not stopped["method"]["done"]
    assert prune.main([*argv, "--out-dir", str(tmp_path / "cut"), "--resume", "auto"]) == 0
    for part in ("regularize/last.pt", "last.pt"):
        a = torch.load(tmp_path / "ref" / part, weights_only=True)
        b = torch.load(tmp_path / "cut" / part, weights_only=True)
        for key in ("model", "weight_optimizer", "method"):
            assert_equal_states(a[key], b[key], f"{part}:{key}")
    capsys.readouterr()


def test_folder_dataset_end_to_end(tmp_path):
    from PIL import Image
    root = tmp_path / "tree"
    for split, n in (("train", 12), ("val", 4)):
        for c in ("ant", "bee", "cat"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 36), ((i * 20) % 255, 100, {"ant": 0, "bee": 120, "cat": 240}[c])).save(
                    root / split / c / f"{i}.png")
    common = ("--dataset", "folder", "--data-dir", str(root), "-j", "0", "--seed", "0")
    proc = run_script("train_resnet56.py", "--net", "dense", "--width-mult", "0.125", "--epoch", "1", "-b", "12",
                      *common, "--out-dir", "dense", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fast = ("--update_reg_interval", "1", "--stabilize_reg_interval", "2", "--reg_granularity_prune", "0.3",
            "--reg_granularity_pick", "0.004", "--batch_size_prune", "12")
    ways = {"l1": ("--stage_pr", "0,0.5,0.5,0.5,0"), "greg1": ("--stage_pr", "0,0.5,0.5,0.5,0", *fast),
            "greg2": ("--stage_pr", "0,0.5,0.5,0.5,0", *fast),
            "hsic": ("--target-macs", "0.6", "--alpha", "1e-3", "--calib-batch-size", "12")}
    for method, how in ways.items():
        proc = run_script("prune.py", "dense/best.pt", "--method", method, *how, "--epochs", "1", "-b", "12", "-j",
                          "0", "--seed", "0", "--out-dir", method, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        results = json.loads((tmp_path / method / "results.json").read_text())
        assert results["dataset"] == "folder" and results["method"] == method
        assert results["macs_pruned"] < results["macs_dense"]
        if method.startswith("greg"):
            assert results["pruning_phase"]["done"]
        if method == "hsic":
            assert results["calib_batch_size"] == 12 and results["hsic"]["within_tolerance"]


ERRORS = {
    "gated checkpoint": (["--method", "l1", "--stage_pr", "0,0.5,0.5,0.5,0"], "gated", "gated"),
    "pruned.pt": (["--method", "l1", "--stage_pr", "0,0.5,0.5,0.5,0"], "pruned", "already pruned"),
    "ratio 1": (["--method", "l1", "--stage_pr", "0,1,0.5,0.5,0"], "dense", "[0, 1)"),
    "wrong length": (["--method", "greg1", "--stage_pr", "0,0.5,0.5,0"], "dense", "takes 5 ratios"),
    "unreachable": (["--method", "l1", "--target-macs", "0.02"], "dense", "smallest network"),
    "no ratios": (["--method", "l1"], "dense", "one of the arguments --stage_pr --target-macs --target --density is required"),
    "bad lr_ft": (["--method", "l1", "--stage_pr", "0,0.5,0.5,0.5,0", "--lr_ft", "60:0.1"], "dense", "epoch 0"),
}


@pytest.fixture(scope="module")
def error_inputs(dense_run):
    base = dense_run
    proc = run_script("train_resnet56.py", "--net", "hc", "--width-mult", "0.125", "--epoch", "1", "-b", "64",
                      "--limit-batches", "1", *TINY, "--out-dir", "gated", cwd=base)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dict(dense="dense/best.pt", gated="gated/last.pt", pruned="dense/pruned.pt"), base


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_is_one_line(case, error_inputs):
    paths, base = error_inputs
    argv, which, needle = ERRORS[case]
    proc = run_script("prune.py", paths[which], *argv, *TINY, "--out-dir", f"err-{case.replace(' ', '-')}", cwd=base)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("method", ["greg1", "l1"])
def test_prune_under_torchrun_with_two_processes(method, dense_run, tmp_path):
    """Both ranks use rank 0's seed and run directory, wait for rank 0's cut, and finish together."""
    from test_distributed import torchrun

    fast = GREG_FAST if method == "greg1" else ("--epochs", "1", "-b", "64")
    proc = torchrun(prune.__file__, str(dense_run / "dense" / "best.pt"), "--method", method, "--stage_pr",
                    "0,0.5,0.5,0.5,0", "--pick_pruned", "rand", *fast, "--dummy", "-j", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = list((tmp_path / "runs").iterdir())
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["method"] == method
    if method == "greg1":
        phase = torch.load(run_dir / "regularize" / "last.pt", weights_only=True)
        assert phase["args"]["seed"] == results["seed"]


def test_torchvision_resnet50_weights_are_a_dense_source(tmp_path):
    """torchvision's ResNet50 state dict (a local file) loads into this project's ResNet50 with
    the same eval-mode outputs: the input of prune.py for GReg's ImageNet rows."""
    import torchvision
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None).eval()
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    state = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "resnet50.pth")
    source = prune_job.load_source(str(tmp_path / "resnet50.pth"))
    assert source["dataset"] == "imagenet" and source["arch"]["net"] == "dense"
    model = prune_job.dense_model(source).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)
