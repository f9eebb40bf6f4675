"""Prune to a budget: ``--target-macs F`` / ``--target-params F`` (pruning/budget.py, engine/trainer.py).

* the annealed target (linear from 1.0 to F over the warm-up, then F; default
  warm-up a quarter of ``--epoch``);
* :class:`BudgetConstraint`: C is the exact expected cost as a fraction of
  dense, K the kept network's; the push ratio lambda1 follows its damped,
  bounded equation on max(C, K) and the push moves the gates by lambda1
  learning rates; the collapse guard names a shrinking collapse;
* real runs of the scripts on tiny synthetic data: results.json's ``budget``
  block, the ``budget/*`` TensorBoard scalars, the end-of-penalty message, a
  run whose constraint converges and that lands within tolerance, a run
  projected onto the target because its warm-up outlasted it, and a target no
  network of the model can reach (the projection itself: test_projection.py);
* bad values are one-line errors with exit status 2.
"""
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import train_resnet50
import train_resnet56
import train_vgg
import engine.trainer as engine
from conftest import read_tb_events, run_script
from pruning.budget import (DAMPING_STEPS, MAX_PUSH, RATE_DECAY, TOLERANCE, TRAVEL, BudgetConstraint, annealed_target,
                            collapse_message, shrinking_collapse)
from models import build_model, default_arch
from engine.cli import parse_args

BUDGET_KEYS = {"kind", "target", "achieved", "trained", "expected", "lambda1", "within_tolerance", "projection",
               "disconnected", "collapse", "settled_by", "converged", "message"}
BUDGET_TAGS = {"budget/target", "budget/expected", "budget/deterministic", "budget/kept", "budget/lambda1"}


# ------------------------------------------------------------ annealed target


@pytest.mark.parametrize("final", [0.5, 0.3, 1.0])
def test_annealed_target_is_linear_then_flat(final):
    warmup = 4.0
    for progress in [0.0, 0.1, 0.5, 1.0, 2.0, 3.3, 3.999]:
        expected = 1.0 - (1.0 - final) * progress / warmup
        assert annealed_target(final, progress, warmup) == pytest.approx(expected, abs=1e-12)
    for progress in [4.0, 4.5, 10.0, 300.0]:
        assert annealed_target(final, progress, warmup) == pytest.approx(final, abs=1e-12)
    assert annealed_target(final, 0.0, warmup) == 1.0
    # Monotone non-increasing, every step (fractional epochs).
    values = [annealed_target(final, k / 7, warmup) for k in range(60)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("progress", [0.0, 0.25, 1.0, 50.0])
def test_annealed_target_without_warmup_is_final_at_once(progress):
    assert annealed_target(0.4, progress, 0.0) == 0.4


@pytest.mark.parametrize("recipe, epoch_flags, warmup", [
    (train_resnet56.RECIPE, [], 75.0),                      # 300 epochs
    (train_resnet56.RECIPE, ["--epoch", "8"], 2.0),
    (train_resnet56.RECIPE, ["--epochs", "10"], 2.5),
    (train_vgg.RECIPE, [], 75.0),
    (train_resnet50.RECIPE, ["--dummy"], 22.5),             # 90 epochs
    (train_resnet50.RECIPE, ["--dummy", "--epochs", "1"], 0.25),
])
def test_default_warmup_is_a_quarter_of_the_epochs(recipe, epoch_flags, warmup):
    args = parse_args(recipe, ["--target-macs", "0.5", *epoch_flags])
    assert args.target_warmup == pytest.approx(warmup)
    assert args.target_macs == 0.5 and args.target_params is None
    assert args.lr_lagrangian == 0.05


def test_explicit_warmup_is_kept():
    recipe = train_resnet56.RECIPE
    assert parse_args(recipe, ["--target-macs", "0.5", "--epoch", "8", "--target-warmup", "3"]).target_warmup == 3.0
    # 0 is a value (the target from the first step), not "use the default".
    assert parse_args(recipe, ["--target-params", "0.5", "--epoch", "8", "--target-warmup", "0"]).target_warmup == 0.0
    args = parse_args(recipe, ["--target-params", "0.25", "--lr-lagrangian", "2"])
    assert (args.target_params, args.target_macs, args.lr_lagrangian) == (0.25, None, 2.0)


# -------------------------------------------------------- BudgetConstraint unit


def _model(net="hc", model="resnet56", width=0.125, seed=0):
    torch.manual_seed(seed)
    return build_model(default_arch(model, 10, width, net=net))


def _set_hc_logits(model, values):
    with torch.no_grad():
        model.gates.logits.log_alpha.copy_(torch.as_tensor(values, dtype=torch.float32))


@pytest.mark.parametrize("kind", ["macs", "params"])
@pytest.mark.parametrize("net", ["hc", "dep"])
def test_fraction_is_the_exact_expected_cost_over_dense(kind, net):
    model = _model(net)
    if net == "hc":
        _set_hc_logits(model, torch.empty(sum(model.gates.widths)).uniform_(-4, 4))
    budget = BudgetConstraint(model, kind, 0.5, warmup=2.0)
    dense_macs, dense_params = model.cost.dense()
    dense = dense_macs if kind == "macs" else dense_params
    assert budget.dense == dense
    widths = model.gates.expected_open()
    cost = model.cost.macs(widths) if kind == "macs" else model.cost.params(widths)
    assert budget.lambda1.item() == 0.0  # the push starts at 0
    c, k = budget(0.0, model.gates.log_alpha())
    assert c.item() == pytest.approx((cost / dense).item(), rel=1e-6)
    assert 0.0 < c.item() < 1.0
    # Fully open (expected widths = dense widths): exactly 1.
    assert budget.fraction(model.cost.dense_widths.float()).item() == pytest.approx(1.0, rel=1e-6)
    # The deterministic cost is that of the pruned network (test gates); the kept cost the controller
    # sees is the same network's, never below the expected one.
    macs, params = model.cost.pruned(model.gates.kept())
    assert budget.deterministic() == pytest.approx((macs if kind == "macs" else params) / dense, rel=1e-12)
    kept = budget.kept_fraction(model.gates.log_alpha()).item()
    assert k.item() == pytest.approx(max(kept, c.item()), rel=1e-6)
    if net == "hc":  # uniform logits in (-4, 4): some layers closed or not, the prices as the export's
        widths = model.gates.kept().clamp(min=1).float()
        own = (model.cost.macs(widths) if kind == "macs" else model.cost.params(widths)) / dense
        assert kept == pytest.approx(own.item(), rel=1e-6)


def test_budget_rejects_bad_kind_and_target():
    model = _model("hc")
    for kind, target in (("flops", 0.5), ("macs", 0.0), ("macs", 1.5), ("params", -0.1)):
        with pytest.raises(ValueError):
            BudgetConstraint(model, kind, target, 1.0)
    BudgetConstraint(model, "params", 1.0, 1.0)  # 1.0 is allowed


def test_controller_follows_its_equation_step_by_step():
    """lambda1 <- clip(lambda1 + gain (g + H r), -MAX, MAX) with g = max(C, K) - t and r the smoothed
    per-step change of max(C, K): computed by hand over a trajectory of logits."""
    model = _model("hc")
    n = sum(model.gates.widths)
    budget = BudgetConstraint(model, "macs", 0.5, warmup=2.0, gain=0.01)
    lam, rate, last = 0.0, 0.0, None
    for step, logit in enumerate([3.0, 2.0, 1.0, -1.0, -3.0, -3.0, 0.5, 4.0]):
        _set_hc_logits(model, torch.full((n,), logit) + torch.linspace(-0.2, 0.2, n))
        progress = step / 4
        c, k = budget(progress, model.gates.log_alpha())
        value = k.item()
        rate = RATE_DECAY * rate + (1 - RATE_DECAY) * (0.0 if last is None else value - last)
        last = value
        lam = min(MAX_PUSH, max(-MAX_PUSH, lam + 0.01 * (value - annealed_target(0.5, progress, 2.0)
                                                          + DAMPING_STEPS * rate)))
        assert budget.lambda1.item() == pytest.approx(lam, abs=1e-6)
        assert budget.kept_rate.item() == pytest.approx(rate, abs=1e-6)


def test_kept_cost_sees_the_shrinking_band():
    """Every gate open at test time but scaled almost to zero (logits just above log(1/11)): the
    expected cost is far under the target, the kept cost is the dense network's. The old Lagrangian
    (on C alone) lowered its multiplier here and left the network shrunk; the controller keeps
    pressing, and the collapse guard names the state."""
    model = _model("hc")
    n = sum(model.gates.widths)
    _set_hc_logits(model, torch.full((n,), -2.2))
    budget = BudgetConstraint(model, "macs", 0.5, warmup=0.0)
    for _ in range(5):
        c, k = budget(1.0, model.gates.log_alpha())
    assert c.item() < 0.5 < 0.99 < k.item()
    assert budget.lambda1.item() > 0
    signs = shrinking_collapse(model.gates.test_gates(), top1=10.0, peak_top1=85.0, num_classes=10)
    assert signs["near_zero_share"] == 1.0 and signs["at_chance"]
    line = collapse_message(7, signs)
    assert "\n" not in line and "epoch 7" in line and "100% of the open channels" in line and "at chance" in line


def test_collapse_guard_stays_quiet_on_healthy_gates():
    model = _model("hc")
    assert shrinking_collapse(model.gates.test_gates(), top1=80.0, peak_top1=85.0, num_classes=10) is None
    # Top-1 at chance before the network ever learned (the first epochs) is no collapse either...
    assert shrinking_collapse(model.gates.test_gates(), top1=10.0, peak_top1=15.0, num_classes=10) is None
    # ...until the warm-up is over: a network at chance then is named, learned or not.
    signs = shrinking_collapse(model.gates.test_gates(), top1=10.0, peak_top1=15.0, num_classes=10, after_warmup=True)
    assert signs["at_chance"] and signs["near_zero_share"] == 0.0
    assert "top-1 is at chance (10.00%, chance 10.00%; best so far 15.00%)" in collapse_message(5, signs)


def _guarded(model, epochs=10, warmup=2.0):
    """The L0 method's collapse guard on ``model`` (no optimiser, no budget: only the guard's state)."""
    from argparse import Namespace
    from pruning.l0 import L0Method
    method = L0Method.__new__(L0Method)
    method.model, method.epochs, method.budget, method.name = model, epochs, None, "l0"
    method.args = Namespace(target_warmup=warmup, net="hc", back_dep=False, lamba=0.0, reg="l0")
    method.peak_top1, method.collapse = 0.0, None
    return method


def test_collapse_guard_names_a_recovery_and_a_fall_back():
    """A dip to chance after the warm-up is named; an epoch healthy again after it records the
    recovery (the result counts as the method's); falling back before the penalty phase ends
    takes the recovery away."""
    method = _guarded(_model("hc"))
    lines = {}
    for epoch, top1 in enumerate([30.0, 60.0, 80.0, 10.0, 75.0]):  # 1-based epoch 4 is at chance
        lines[epoch + 1] = method.epoch_message(epoch, {"top1": top1}) or ""
    assert lines[4].startswith("collapse guard, epoch 4: top-1 is at chance")
    assert lines[5].startswith("collapse guard, epoch 5: recovered from epoch 4's collapse (top-1 75.00%")
    assert method.collapse["epoch"] == 4 and method.collapse["recovered_epoch"] == 5
    assert method.epoch_message(5, {"top1": 82.0}) is None  # quiet once recovered
    results = {"top1": 9.0}
    assert "epoch 7: top-1 is at chance" in method.epoch_message(6, results)
    assert method.collapse["recovered_epoch"] is None and results["collapse"]["recovered_epoch"] is None


def test_a_recovered_dip_still_converges_a_lasting_collapse_does_not():
    from reproduction.report import reached_by
    model = _model("hc")
    budget = BudgetConstraint(model, "macs", 1.0, warmup=0.0)
    dip = dict(epoch=4, near_zero_share=0.0, top1=10.0, peak_top1=80.0, chance=10.0, at_chance=True)
    healthy = budget.report(True, 10, 0, dict(dip, recovered_epoch=5))
    assert healthy["converged"] and "fired in epoch 4 and the run recovered from epoch 5" in healthy["message"]
    lasting = budget.report(True, 10, 0, dict(dip, recovered_epoch=None))
    assert not lasting["converged"] and "so this result is not the method's" in lasting["message"]
    assert reached_by({"budget": healthy}) == "training (dip in epoch 4, recovered by 5)"
    assert reached_by({"budget": lasting}) == "collapse (epoch 4)"


def test_controller_is_damped_and_bounded():
    """A kept cost falling fast enough to meet the target within DAMPING_STEPS steps stops the
    push from growing although the gap is still positive; and the push never exceeds MAX_PUSH."""
    model = _model("hc")
    n = sum(model.gates.widths)
    budget = BudgetConstraint(model, "macs", 0.3, warmup=0.0, gain=1.0)
    for _ in range(10):  # a standing gap: the push climbs to its bound and stays there
        _set_hc_logits(model, torch.full((n,), 3.0))
        budget(1.0, model.gates.log_alpha())
    assert budget.lambda1.item() == MAX_PUSH
    peak = budget.lambda1.item()
    logits = torch.full((n,), 3.0) + torch.linspace(0, 0.001, n)
    for step in range(12):  # the channels now close one expensive slice per step: the cost falls fast
        logits[: (step + 1) * n // 40] = -5.0
        _set_hc_logits(model, logits)
        c, k = budget(1.0, model.gates.log_alpha())
        assert k.item() > 0.3  # still over the target...
    assert budget.lambda1.item() < peak  # ...but the push is easing off before it gets there


@pytest.mark.parametrize("net", ["hc", "dep"])
def test_keep_set_is_the_cheapest_prefix_within_the_target(net):
    """The channels the target keeps are the first k of the projection's order, k the largest whose
    network costs at most the (annealed) target; the next channel would exceed it."""
    model = _model(net)
    if net == "hc":
        _set_hc_logits(model, torch.empty(sum(model.gates.widths)).uniform_(-1, 4))
    budget = BudgetConstraint(model, "macs", 0.4, warmup=2.0)
    log_alpha = model.gates.log_alpha().detach()
    for progress, target in ((1.0, annealed_target(0.4, 1.0, 2.0)), (5.0, 0.4)):
        keep = budget.keep_set(log_alpha, progress)
        order, _, _, forced = budget.channel_order(log_alpha)
        k = int(keep.sum())
        assert keep[order[:k]].all() and not keep[order[k:]].any()
        fractions = budget._prefix_fractions(order)
        assert fractions[k].item() <= target + 1e-9 or k == forced
        assert k == len(order) or fractions[k + 1].item() > target


@pytest.mark.parametrize("net", ["hc", "dep"])
def test_push_closes_the_channels_the_target_does_not_keep(net):
    """lambda1 > 0 moves the gates outside the keep set towards closing (L0-HC: each such logit by
    lambda1 learning rates in rms, the kept ones not at all), and lowers the expected cost;
    lambda1 < 0 raises the kept ones (and, for L0-HC, the cost). Only gate parameters move."""
    model = _model(net)
    budget = BudgetConstraint(model, "macs", 0.3, warmup=0.0)
    groups = [dict(params=g["params"], lr=g["lr"]) for g in model.gates.param_groups(0.01, fan_in_scaled=True)]
    for lam in (1.0, -1.0):
        with torch.no_grad():
            budget.lambda1.fill_(lam)
        keep = budget.keep_set(model.gates.log_alpha().detach(), 10.0)
        before = model.gates.log_alpha().detach().clone()
        c_before = budget.fraction(model.gates.expected_open()).item()
        budget.push_(groups, model.gates.log_alpha, 10.0, 0.0)
        c_after = budget.fraction(model.gates.expected_open()).item()
        if lam > 0 or net == "hc":  # Dep-L0's shared generator may move other gates too when it raises some
            assert (c_after < c_before) == (lam > 0)
        if net == "hc":
            moved = model.gates.log_alpha().detach() - before
            pushed = ~keep if lam > 0 else keep
            assert (moved[~pushed] == 0).all()
            assert moved[pushed].pow(2).mean().sqrt().item() == pytest.approx(0.01, rel=1e-3)
            assert ((moved[pushed] < 0) if lam > 0 else (moved[pushed] > 0)).all()
    assert not any(p.grad is not None for p in model.weight_parameters())


def test_push_keeps_the_schedule_whatever_the_gate_lr():
    """With a gate lr too small to close a gate within the warm-up, the push moves at the schedule's
    pace instead: TRAVEL / warm-up per epoch at lambda1 = 1 (in rms: the push is normalised, whatever
    the size of the cost's gradient)."""
    model = _model("hc")
    budget = BudgetConstraint(model, "macs", 0.3, warmup=4.0)
    with torch.no_grad():
        budget.lambda1.fill_(1.0)
    groups = [dict(params=[model.gates.logits.log_alpha], lr=1e-6)]
    keep = budget.keep_set(model.gates.log_alpha().detach(), 10.0)
    start = model.gates.logits.log_alpha.detach().clone()
    budget.push_(groups, model.gates.log_alpha, 10.0, 0.25)
    moved = (model.gates.logits.log_alpha.detach() - start)[~keep]
    assert moved.pow(2).mean().sqrt().item() == pytest.approx(TRAVEL / 4.0 * 0.25, rel=1e-3)


def test_engine_wires_the_budget(tmp_path, monkeypatch):
    """The Trainer builds the controller with --lr-lagrangian as its gain; no optimiser for it, and
    the gate optimiser holds every gate parameter."""
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    args = parse_args(train_vgg.RECIPE, ["--dummy", "--net", "dep", "--width-mult", "0.0625", "--target-params", "0.6",
                                         "--lr-lagrangian", "0.7", "--epoch", "4", "-b", "4", "-j", "0", "--seed", "0",
                                         "--out-dir", str(tmp_path / "run")])
    trainer = engine.Trainer(args)
    try:
        budget = trainer.method.budget
        assert budget is not None and budget.kind == "params" and budget.target == 0.6 and budget.warmup == 1.0
        assert budget.gain == 0.7 and not list(budget.parameters())
        assert set(trainer.method.optimizers()) == {"gate"}
        gate_ids = {id(p) for p in trainer.model.gate_parameters()}
        assert gate_ids <= {id(p) for g in trainer.method.gates.param_groups for p in g["params"]}
    finally:
        trainer.log.close()


def test_no_target_no_budget(tmp_path, monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    args = parse_args(train_vgg.RECIPE, ["--dummy", "--width-mult", "0.0625", "--lr-lagrangian", "5",
                                         "--target-warmup", "1", "-b", "4", "-j", "0", "--seed", "0",
                                         "--out-dir", str(tmp_path / "run")])
    trainer = engine.Trainer(args)
    trainer.log.close()
    assert trainer.method.budget is None and set(trainer.method.optimizers()) == {"gate"}
    assert "budget" not in trainer.results(dict(top1=0.0, loss=1.0, top5=0.0))


# ------------------------------------------------------------- bad arguments


BAD = {
    "macs-zero": ["--target-macs", "0"],
    "macs-above-one": ["--target-macs", "1.5"],
    "macs-negative": ["--target-macs", "-0.1"],
    "macs-abc": ["--target-macs", "abc"],
    "macs-nan": ["--target-macs", "nan"],
    "params-zero": ["--target-params", "0"],
    "params-above-one": ["--target-params", "2"],
    "both": ["--target-macs", "0.5", "--target-params", "0.5"],
    "dense": ["--net", "dense", "--target-macs", "0.5"],
    "dense-params": ["--net", "dense", "--target-params", "0.5"],
    "warmup-negative": ["--target-macs", "0.5", "--target-warmup", "-1"],
    "lr-lagrangian-zero": ["--target-macs", "0.5", "--lr-lagrangian", "0"],
    "no-penalty-epochs": ["--target-macs", "0.5", "--epoch", "0", "--fine_tune_epoch", "2"],
    "dense-no-penalty-epochs": ["--net", "dense", "--target-macs", "0.5", "--epoch", "0", "--fine_tune_epoch", "2"],
}
EXPECTED_WORDS = {"both": "not allowed with", "dense": "gates", "dense-params": "gates", "no-penalty-epochs": "--epoch",
                  "dense-no-penalty-epochs": "needs gates: use --net hc or --net dep",
                  "warmup-negative": "target-warmup", "lr-lagrangian-zero": "lr-lagrangian"}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_budget_flags_are_one_line(case, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(train_resnet56.RECIPE, ["--dummy", *BAD[case]], prog="train_resnet56.py")
    assert exc.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("train_resnet56.py: error: "), lines
    flag = "--target-params" if case.startswith("params") else "--target-macs"
    assert (EXPECTED_WORDS.get(case) or flag) in lines[0], lines[0]
    assert not captured.out


@pytest.mark.parametrize("net", ["dense", "hc"])
def test_back_dep_needs_the_dependency_mlp(net, capsys):
    """The gate flags' checks are one, whatever --net (pruning.specs.check_gate_flags)."""
    with pytest.raises(SystemExit) as exc:
        parse_args(train_resnet56.RECIPE, ["--dummy", "--net", net, "--back_dep"], prog="train_resnet56.py")
    assert exc.value.code == 2
    assert capsys.readouterr().err == (f"train_resnet56.py: error: --back_dep applies to --net dep, not --net {net} "
                                       f"(see --help)\n")


SCRIPT_CASES = ["both", "dense", "macs-abc"]


@pytest.fixture(scope="module")
def script_errors(tmp_path_factory):
    """The real script on a few bad command lines, run concurrently (mostly interpreter start-up)."""
    base = tmp_path_factory.mktemp("budget_errors")

    def one(case):
        cwd = base / case
        cwd.mkdir()
        proc = run_script("train_resnet56.py", *BAD[case], "--dummy", "-j", "0", "--epoch", "1", "-b", "2",
                          "--limit-batches", "1", cwd=cwd, timeout=120)
        return case, (proc, cwd)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(one, SCRIPT_CASES))


@pytest.mark.parametrize("case", SCRIPT_CASES)
def test_bad_budget_flags_through_the_script(case, script_errors):
    proc, cwd = script_errors[case]
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_resnet56.py: error: "), proc.stderr
    assert not proc.stdout and not (cwd / "runs").exists()


# ---------------------------------------------------------------- real runs
#
# Tiny runs of the real scripts (subprocess, CPU, synthetic data), two at a time.

TINY = ("--dummy", "-j", "0", "--width-mult", "0.125", "--seed", "0")
BUDGET_RUNS = {
    # L0-HC on VGG16 towards 50% MACs, printing (and logging) every step.
    "hc-macs": ("train_vgg.py", ["--net", "hc", "--target-macs", "0.5", "--target-warmup", "2", "--epoch", "4",
                                 "--limit-batches", "5", "-b", "16", "--lr_gate", "0.5", "--lr-lagrangian", "1",
                                 "-p", "1"]),
    # Dep-L0 on ResNet56 with a parameter budget.
    "dep-params": ("train_resnet56.py", ["--net", "dep", "--target-params", "0.7", "--target-warmup", "1", "--epoch", "2",
                                         "--limit-batches", "4", "-b", "16", "--lr_gate", "0.03",
                                         "--lr-lagrangian", "5", "-p", "2"]),
    # Training cannot make it (one epoch while the target is annealed over two): projected, then fine-tuned.
    "annealing": ("train_resnet56.py", ["--net", "hc", "--target-macs", "0.3", "--target-warmup", "2", "--epoch", "1",
                                        "--fine_tune_epoch", "1", "--limit-batches", "3", "-b", "8", "-p", "1"]),
    # No network of this ResNet56 is that cheap: its shortcuts and classifier are not gated.
    "unreachable": ("train_resnet56.py", ["--net", "hc", "--target-macs", "0.05", "--target-warmup", "0.5",
                                          "--epoch", "1", "--limit-batches", "2", "-b", "8", "-p", "1"]),
    # Long enough (320 steps) for the constraint to converge on the target.
    "lands": ("train_resnet56.py", ["--net", "hc", "--target-macs", "0.5", "--target-warmup", "5", "--epoch", "10",
                                    "--limit-batches", "40", "-b", "16", "--lr_gate", "0.1", "--lr-lagrangian", "0.5",
                                    "-p", "4"]),
    # ResNet50, backward Dep-L0, a parameter budget: projected after one step, then fine-tuned and exported.
    "r50-back": ("train_resnet50.py", ["--net", "dep", "--back_dep", "--target-params", "0.75", "--target-warmup", "0.5",
                                       "--epochs", "1", "--fine_tune_epoch", "1", "--width-mult", "0.0625",
                                       "--limit-batches", "1", "-b", "4", "-p", "1"]),
    # No target at all.
    "plain": ("train_vgg.py", ["--net", "hc", "--epoch", "1", "--limit-batches", "2", "-b", "8", "-p", "1"]),
}
STEPS = {"hc-macs": 5, "dep-params": 4, "annealing": 3, "unreachable": 2, "lands": 32, "r50-back": 1, "plain": 2}
PROGRESS = re.compile(r"^Epoch \[(\d+)\]\[\s*(\d+)/(\d+)\]")


class BudgetRun:
    def __init__(self, name, proc, run_dir):
        self.name, self.proc, self.run_dir = name, proc, run_dir
        self.results = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").is_file() else {}

    @property
    def diagnostics(self):
        return (f"{self.name}: rc {self.proc.returncode}\n--- stdout ---\n{self.proc.stdout[-3000:]}\n"
                f"--- stderr ---\n{self.proc.stderr[-3000:]}")

    def scalars(self, prefix="budget/"):
        """{tag: [(step, value), ...]} of the run's TensorBoard scalars under ``prefix``."""
        out = {}
        for path in sorted(self.run_dir.glob("events.out.tfevents*")):
            for step, tag, kind, value in read_tb_events(path):
                if kind == "simple_value" and tag.startswith(prefix):
                    out.setdefault(tag, []).append((step, value))
        return out

    def arg(self, flag):
        argv = BUDGET_RUNS[self.name][1]
        if flag == "--epoch" and flag not in argv:
            flag = "--epochs"  # ResNet50's spelling
        return argv[argv.index(flag) + 1]


@pytest.fixture(scope="module")
def budget_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("budget")

    def one(name):
        script, argv = BUDGET_RUNS[name]
        cwd = base / name
        cwd.mkdir()
        proc = run_script(script, *TINY, *argv, "--out-dir", "run", cwd=cwd, timeout=600)
        return name, BudgetRun(name, proc, cwd / "run")

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, BUDGET_RUNS))


@pytest.mark.parametrize("name", list(BUDGET_RUNS))
def test_budget_run_finishes(name, budget_runs):
    run = budget_runs[name]
    assert run.proc.returncode == 0, run.diagnostics
    assert "Traceback" not in run.proc.stderr, run.diagnostics
    assert run.results, run.diagnostics


@pytest.mark.parametrize("name", ["hc-macs", "dep-params", "annealing", "unreachable", "lands", "r50-back"])
def test_results_json_has_the_budget_block(name, budget_runs):
    run = budget_runs[name]
    assert run.proc.returncode == 0, run.diagnostics
    block = run.results.get("budget")
    assert isinstance(block, dict), run.results.keys()
    assert set(block) == BUDGET_KEYS, set(block) ^ BUDGET_KEYS
    kind = "params" if "--target-params" in BUDGET_RUNS[name][1] else "macs"
    assert block["kind"] == kind
    assert block["target"] == float(run.arg(f"--target-{kind}"))
    for key in ("achieved", "trained", "expected", "lambda1"):
        assert isinstance(block[key], float) and math.isfinite(block[key]), (key, block)
    assert 0.0 < block["achieved"] <= 1.0 and 0.0 < block["trained"] <= 1.0 and 0.0 < block["expected"] <= 1.0
    projection = block["projection"]
    if projection is None:
        assert block["trained"] == block["achieved"]
    else:
        assert set(projection) == {"closed", "reopened", "share"} and projection["closed"] + projection["reopened"] > 0
        total = sum(c["total"] for c in run.results["channels"])
        assert projection["share"] == (projection["closed"] + projection["reopened"]) / total
    assert abs(block["lambda1"]) <= MAX_PUSH
    assert block["settled_by"] == ("missed" if not block["within_tolerance"] else
                                   "projection" if projection and projection["share"] > 0.05 else "training")
    collapse = block["collapse"]
    lasting = collapse is not None and collapse.get("recovered_epoch") is None
    assert block["converged"] is (block["settled_by"] == "training" and not lasting)
    assert block["collapse"] == run.results["collapse"]
    assert block["disconnected"] == run.results["disconnected"] == []
    assert block["within_tolerance"] is (abs(block["achieved"] - block["target"]) <= TOLERANCE)
    # achieved is the deterministic cost of the network in results.json.
    pruned = run.results[f"{kind}_pruned"] / run.results[f"{kind}_dense"]
    assert block["achieved"] == pytest.approx(pruned, rel=1e-9)
    assert isinstance(block["message"], str) and "\n" not in block["message"]


@pytest.mark.parametrize("name", ["hc-macs", "dep-params"])
def test_tensorboard_budget_scalars(name, budget_runs):
    run = budget_runs[name]
    assert run.proc.returncode == 0, run.diagnostics
    scalars = run.scalars()
    assert set(scalars) == BUDGET_TAGS, set(scalars)
    steps_per_epoch = STEPS[name]
    epochs = int(run.arg("--epoch"))
    freq = int(run.arg("-p"))
    logged = [s for s, _ in scalars["budget/target"]]
    expected_steps = [e * steps_per_epoch + k for e in range(epochs) for k in range(1, steps_per_epoch + 1)
                      if k % freq == 0 or k == steps_per_epoch]
    assert logged == expected_steps
    for tag in BUDGET_TAGS:
        assert [s for s, _ in scalars[tag]] == logged, tag
    # budget/target follows the annealed schedule at the fractional epoch of each step.
    final, warmup = run.results["budget"]["target"], float(run.arg("--target-warmup"))
    for step, value in scalars["budget/target"]:
        assert value == pytest.approx(annealed_target(final, step / steps_per_epoch, warmup), abs=1e-6), step
    assert scalars["budget/target"][-1][1] == pytest.approx(final, abs=1e-6)
    for tag in ("budget/expected", "budget/deterministic"):
        assert all(0.0 < v <= 1.0 for _, v in scalars[tag]), scalars[tag]
    assert all(abs(v) <= MAX_PUSH for _, v in scalars["budget/lambda1"])
    assert all(kept >= expected - 1e-6 for (_, kept), (_, expected) in zip(scalars["budget/kept"],
                                                                          scalars["budget/expected"]))
    # The last logged values are the final ones in results.json.
    block = run.results["budget"]
    assert scalars["budget/lambda1"][-1][1] == pytest.approx(block["lambda1"], rel=1e-6, abs=1e-6)
    # The scalars follow training; a projection at its end shows in results.json only.
    assert scalars["budget/deterministic"][-1][1] == pytest.approx(block["trained"], rel=1e-6)


def test_budget_prunes_towards_the_target(budget_runs):
    """The constraint does something: with the target below the dense cost, lambda1 rises
    while the cost is above the target and gates close (the deterministic cost falls below 1)."""
    run = budget_runs["hc-macs"]
    assert run.proc.returncode == 0, run.diagnostics
    scalars = run.scalars()
    target = dict(scalars["budget/target"])
    expected = dict(scalars["budget/expected"])
    lambda1 = [v for _, v in scalars["budget/lambda1"]]
    assert max(lambda1) > 0
    assert expected[max(expected)] < expected[min(expected)]
    assert run.results["budget"]["achieved"] < 1.0
    assert run.results["macs_pruned"] < run.results["macs_dense"]
    assert any(expected[s] > target[s] for s in target)


@pytest.mark.parametrize("name", ["hc-macs", "dep-params", "annealing", "unreachable", "lands", "r50-back"])
def test_console_reports_the_budget_once_at_the_end_of_the_penalty_phase(name, budget_runs):
    run = budget_runs[name]
    assert run.proc.returncode == 0, run.diagnostics
    lines = run.proc.stdout.splitlines()
    reports = [i for i, line in enumerate(lines) if line.startswith("budget: ")]
    assert len(reports) == 1, run.diagnostics
    assert lines[reports[0]] == "budget: " + run.results["budget"]["message"]
    # Right after the summary of the last penalty epoch.
    last_penalty_epoch = int(run.arg("--epoch"))
    assert lines[reports[0] - 1].startswith(f"Epoch {last_penalty_epoch}: top-1"), lines[reports[0] - 1]


def test_constraint_converges_and_lands(budget_runs):
    """A narrow ResNet56 on synthetic data, 320 steps, lands within 2% by training.

    The controller itself must have converged: the kept cost, which it acts on, ends within the
    tolerance and stays near the target over the last epochs (no wind-up oscillation), and the
    projection moved at most 5% of the channels: the network is training's (``converged``)."""
    run = budget_runs["lands"]
    assert run.proc.returncode == 0, run.diagnostics
    block = run.results["budget"]
    assert block["within_tolerance"] is True, block
    assert abs(block["achieved"] - 0.5) <= TOLERANCE, block
    assert block["settled_by"] == "training" and block["converged"] is True, block
    kept = run.scalars()["budget/kept"]
    last_epochs = [v for step, v in kept if step > 7 * STEPS["lands"]]
    assert last_epochs and all(abs(v - 0.5) <= 0.05 for v in last_epochs), last_epochs
    assert block["message"].startswith("macs at ") and "target 0.500 (within 2%)" in block["message"], block["message"]
    pruned = run.results["macs_pruned"] / run.results["macs_dense"]
    assert pruned == pytest.approx(block["achieved"], rel=1e-9)


def test_projection_when_training_cannot_make_it(budget_runs):
    """The warm-up outlasts the penalty phase: the gates are projected onto the target, the
    message says so and why, and the fine-tuning epoch trains the projected network."""
    run = budget_runs["annealing"]
    assert run.proc.returncode == 0, run.diagnostics
    block = run.results["budget"]
    assert block["within_tolerance"] is True and block["projection"] is not None, block
    closed = block["projection"]["closed"]
    assert closed > 0 and block["projection"]["reopened"] == 0, block
    assert block["trained"] > block["target"] + TOLERANCE
    assert block["target"] - TOLERANCE <= block["achieved"] <= block["target"] + TOLERANCE
    message = block["message"]
    share = closed / sum(c["total"] for c in run.results["channels"])
    assert (f"macs at {block['achieved']:.3f} of dense, target 0.300 (within 2%) after the budget "
            f"projection closed {closed} channels ({share:.1%} of ") in message, message
    assert f"): training ended at {block['trained']:.3f}" in message, message
    assert "still being annealed (--target-warmup 2 >= --epoch 1)" in message, message
    assert "--fine_tune_epoch" not in message  # one follows
    # The fine-tuning epoch ran with the projected gates, and the saved model is the projected network.
    assert run.results["epochs_done"] == 2
    last = torch.load(run.run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert last["gates_frozen"] is True
    frozen = last["model"]["gates.frozen_gates"]
    assert int((frozen > 0).sum()) == sum(c["kept"] for c in run.results["channels"])
    assert run.results["macs_pruned"] / run.results["macs_dense"] == pytest.approx(block["achieved"], rel=1e-9)
    # The controller stops with the penalty phase.
    scalars = run.scalars()
    assert max(step for step, _ in scalars["budget/target"]) == STEPS["annealing"]
    assert scalars["budget/lambda1"][-1][1] == pytest.approx(block["lambda1"], rel=1e-6, abs=1e-6)
    # The projection chose most of the network: the run says it is the projection's, not training's.
    assert block["settled_by"] == "projection" and block["converged"] is False
    assert message.startswith("not converged: the projection, not training, chose ")


def test_projected_resnet50_exports_at_the_budget(budget_runs):
    """ResNet50 with backward Dep-L0 and a parameter budget: the projected, fine-tuned network
    is what pruned.pt holds, at the cost results.json reports."""
    from models.export import build_pruned, read_pruned

    run = budget_runs["r50-back"]
    assert run.proc.returncode == 0, run.diagnostics
    block = run.results["budget"]
    assert block["projection"] is not None and block["within_tolerance"] is True, block
    assert block["achieved"] <= 0.75 + TOLERANCE and block["trained"] > 0.75 + TOLERANCE
    payload = read_pruned(run.run_dir / "pruned.pt")
    model = build_pruned(payload)
    assert payload["params"] == run.results["params_pruned"]
    assert payload["params"] / run.results["params_dense"] == pytest.approx(block["achieved"], rel=1e-9)
    assert sum(p.numel() for p in model.parameters()) == payload["params"]


def test_unreachable_target_says_by_how_much_and_why(budget_runs):
    run = budget_runs["unreachable"]
    assert run.proc.returncode == 0, run.diagnostics
    block = run.results["budget"]
    assert block["within_tolerance"] is False and block["projection"] is None
    message = block["message"]
    gap = block["achieved"] - block["target"]
    assert re.match(r"missed the macs target by [+-]\d\.\d{3} of dense", message), message
    assert f"by {gap:+.3f} of dense" in message, message
    assert f"achieved {block['achieved']:.3f}, target 0.050" in message, message
    cheapest = float(re.search(r"one channel per gated layer, costs (\d\.\d{3})$", message).group(1))
    assert cheapest > block["target"] + TOLERANCE
    assert block["achieved"] >= cheapest - 5e-4


def test_no_target_means_no_budget(budget_runs):
    run = budget_runs["plain"]
    assert run.proc.returncode == 0, run.diagnostics
    assert "budget" not in run.results
    assert not run.scalars(), "budget/* scalars without a target"
    assert "budget:" not in run.proc.stdout
    args = json.loads(next(line for line in run.proc.stdout.splitlines() if line.startswith("arguments: "))[11:])
    assert args["target_macs"] is None and args["target_params"] is None
    # The L0 penalty is in force instead (lambda > 0, a non-zero l0 column).
    assert run.results["lamba"] > 0
    penalties = [v for _, v in run.scalars("train/l0_penalty")["train/l0_penalty"]]
    assert len(penalties) == STEPS["plain"] and all(p > 0 for p in penalties), penalties


def test_lowered_epoch_on_resume_ends_the_penalty_phase_with_its_report(tmp_path):
    """Resuming a budget run's epoch-1 checkpoint with --epoch 1 ends its penalty phase at once:
    the gates freeze (projected onto the target) and the one-line budget report is printed."""
    common = (*TINY, "--net", "hc", "--target-macs", "0.4", "--target-warmup", "2", "--limit-batches", "2",
              "-b", "8", "-p", "1")
    first = run_script("train_resnet56.py", *common, "--epoch", "2", "--save_epoch", "1", "--out-dir", "a",
                       cwd=tmp_path, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = tmp_path / "a" / "epoch_1.pt"
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["gates_frozen"] is False
    second = run_script("train_resnet56.py", *common, "--epoch", "1", "--fine_tune_epoch", "1", "--resume",
                        str(checkpoint), "--out-dir", "b", cwd=tmp_path, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    reports = [line for line in second.stdout.splitlines() if line.startswith("budget: ")]
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert reports == [f"budget: {results['budget']['message']}"], second.stdout[-3000:]
    assert results["budget"]["within_tolerance"] is True and results["budget"]["projection"] is not None
    assert "Epoch [1][" not in second.stdout and "Epoch [2][" in second.stdout
