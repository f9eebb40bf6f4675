"""Prune to a budget: ``--target-macs F`` / ``--target-params F`` (pruning/budget.py, engine/trainer.py).

* the annealed target (linear from 1.0 to F over the warm-up, then F; default
  warm-up a quarter of ``--epoch``);
* :class:`BudgetConstraint`: C is the exact expected cost as a fraction of
  dense, the term is ``lambda1 (C - t) + lambda2 (C - t)^2``, the multipliers
  ascend (Adam with ``maximize=True``, as the engine builds it) while the gates
  descend;
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
from pruning.budget import (TOLERANCE, BudgetConstraint, annealed_target, load_multiplier_state,
                              multiplier_optimizer)
from models import build_model, default_arch
from engine.cli import parse_args

BUDGET_KEYS = {"kind", "target", "achieved", "trained", "expected", "lambda1", "lambda2", "within_tolerance",
               "projection", "disconnected", "message"}
BUDGET_TAGS = {"budget/target", "budget/expected", "budget/deterministic", "budget/lambda1", "budget/lambda2"}


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
    assert args.lr_lagrangian == 0.003


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
    term, c = budget(0.0)
    assert c.item() == pytest.approx((cost / dense).item(), rel=1e-6)
    assert 0.0 < c.item() < 1.0
    # Fully open (expected widths = dense widths): exactly 1.
    assert budget.fraction(model.cost.dense_widths.float()).item() == pytest.approx(1.0, rel=1e-6)
    # The deterministic cost is that of the pruned network (test gates).
    macs, params = model.cost.pruned(model.gates.kept())
    assert budget.deterministic() == pytest.approx((macs if kind == "macs" else params) / dense, rel=1e-12)
    # Multipliers start at 0, so the term does too.
    assert budget.lambda1.item() == 0.0 and budget.lambda2.item() == 0.0 and term.item() == 0.0


@pytest.mark.parametrize("progress", [0.0, 0.7, 2.0, 5.0])
def test_term_is_lambda1_gap_plus_lambda2_gap_squared(progress):
    model = _model("hc")
    budget = BudgetConstraint(model, "macs", 0.4, warmup=2.0)
    with torch.no_grad():
        budget.lambda1.fill_(1.7)
        budget.lambda2.fill_(-0.3 if progress == 0.7 else 2.5)
    term, c = budget(progress)
    t = annealed_target(0.4, progress, 2.0)
    assert budget.target_at(progress) == pytest.approx(t)
    gap = c.item() - t
    channels = sum(model.gates.widths)  # the multipliers are prices per channel: the term is N times the gap's
    assert term.item() == pytest.approx(channels * (budget.lambda1.item() * gap + budget.lambda2.item() * gap ** 2),
                                        rel=1e-5)


def test_budget_rejects_bad_kind_and_target():
    model = _model("hc")
    for kind, target in (("flops", 0.5), ("macs", 0.0), ("macs", 1.5), ("params", -0.1)):
        with pytest.raises(ValueError):
            BudgetConstraint(model, kind, target, 1.0)
    BudgetConstraint(model, "params", 1.0, 1.0)  # 1.0 is allowed


@pytest.mark.parametrize("case", ["over", "under"])
def test_lagrangian_ascent_moves_the_multipliers(case):
    """Adam ascent with a constant gap: lambda1 moves by lr towards the sign of C - t at every
    step, whatever the size of the gap, and lambda2 rises by lr (its gradient (C - t)^2 > 0)."""
    model = _model("hc")
    n = sum(model.gates.widths)
    if case == "over":  # logits 3: nearly everything open, C ~ 0.99 > t = 0.5
        _set_hc_logits(model, torch.full((n,), 3.0))
        target = 0.5
    else:  # logits -1: C well below t = 0.9
        _set_hc_logits(model, torch.full((n,), -1.0))
        target = 0.9
    budget = BudgetConstraint(model, "macs", target, warmup=0.0)
    opt = multiplier_optimizer(budget, lr=0.5)
    for step in range(3):
        l1, l2 = budget.lambda1.item(), budget.lambda2.item()
        term, c = budget(10.0)
        gap = c.item() - target
        assert (gap > 0) == (case == "over")
        opt.zero_grad()
        term.backward()
        opt.step()
        assert budget.lambda1.item() == pytest.approx(l1 + math.copysign(0.5, gap), abs=1e-5)
        assert budget.lambda2.item() == pytest.approx(l2 + 0.5, abs=1e-5)


def test_lambda2_never_decreases_over_a_trajectory():
    model = _model("hc")
    budget = BudgetConstraint(model, "macs", 0.6, warmup=1.0)
    opt = multiplier_optimizer(budget, lr=1.0)
    previous = 0.0
    for k, logit in enumerate([3.0, 2.0, 0.0, -2.0, -4.0, 1.0, 4.0]):  # C sweeps above and below t
        _set_hc_logits(model, torch.full((sum(model.gates.widths),), logit))
        term, _ = budget(k / 3)
        opt.zero_grad()
        term.backward()
        opt.step()
        assert budget.lambda2.item() >= previous
        previous = budget.lambda2.item()


@pytest.mark.parametrize("net", ["hc", "dep"])
def test_lagrangian_step_changes_only_the_multipliers(net):
    """The multipliers are the only parameters of the constraint: the engine's
    multiplier optimiser (maximize=True) must not do gradient *ascent* on the
    gate parameters (they belong to the model and descend with their own optimiser)."""
    model = _model(net)
    budget = BudgetConstraint(model, "macs", 0.5, warmup=0.0)
    assert [name for name, _ in budget.named_parameters()] == ["lambda1", "lambda2"]
    assert set(budget.state_dict()) == {"lambda1", "lambda2"}
    with torch.no_grad():
        budget.lambda1.fill_(2.0)
        budget.lambda2.fill_(1.0)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = multiplier_optimizer(budget, lr=1.0)
    term, _ = budget(1.0)
    opt.zero_grad()
    term.backward()
    opt.step()
    moved = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    assert not moved, f"the Lagrangian optimiser changed model parameters: {moved}"


@pytest.mark.parametrize("kind", ["macs", "params"])
def test_gate_gradient_pushes_logits_down_when_over_budget(kind):
    """lambda1 > 0 and C > t: d term / d log_alpha > 0 for every channel (descent closes gates);
    lambda1 < 0 and C < t: < 0 (descent opens them)."""
    model = _model("hc")
    n = sum(model.gates.widths)
    for lam1, logit, target in ((3.0, 2.0, 0.5), (-3.0, -1.0, 0.95)):
        _set_hc_logits(model, torch.full((n,), logit) + torch.linspace(-0.5, 0.5, n))
        budget = BudgetConstraint(model, kind, target, warmup=0.0)
        with torch.no_grad():
            budget.lambda1.fill_(lam1)
        term, c = budget(0.0)
        assert (c.item() > target) == (lam1 > 0)
        model.zero_grad()
        term.backward()
        grad = model.gates.logits.log_alpha.grad
        assert grad is not None
        assert ((grad > 0) if lam1 > 0 else (grad < 0)).all(), grad
        # A plain descent step on the gates moves C towards the target.
        with torch.no_grad():
            model.gates.logits.log_alpha -= 10.0 * grad
        _, c_after = budget(0.0)
        assert (c_after.item() < c.item()) == (lam1 > 0)


def test_gate_gradient_dep_lowers_the_cost():
    """Dep-L0: the logits come from an MLP; a small descent step on it lowers C and the mean logit."""
    model = _model("dep")
    budget = BudgetConstraint(model, "macs", 0.2, warmup=0.0)
    with torch.no_grad():
        budget.lambda1.fill_(5.0)
    term, c = budget(0.0)
    assert c.item() > 0.2
    mean_logit = model.gates.log_alpha().mean().item()
    term.backward()
    params = model.gate_parameters()
    assert params and all(p.grad is not None for p in params)
    assert any(p.grad.abs().sum() > 0 for p in params)
    opt = torch.optim.SGD(params, lr=1e-2)
    opt.step()
    _, c_after = budget(0.0)
    assert c_after.item() < c.item()
    assert model.gates.log_alpha().mean().item() < mean_logit


def test_multiplier_state_of_an_sgd_checkpoint_is_not_loaded():
    """Checkpoints from before the Adam multipliers hold an SGD state (no betas): loading it
    into Adam would fail at the first step, so it is refused and Adam starts afresh."""
    model = _model("hc")
    budget = BudgetConstraint(model, "macs", 0.5, warmup=1.0)
    sgd = torch.optim.SGD(budget.parameters(), lr=0.01, maximize=True)
    adam = multiplier_optimizer(budget, 0.01)
    assert load_multiplier_state(adam, sgd.state_dict()) is False
    assert "betas" in adam.param_groups[0] and not adam.state
    term, _ = budget(0.0)
    term.backward()
    adam.step()  # still a working Adam
    saved = adam.state_dict()
    fresh = multiplier_optimizer(budget, 0.01)
    assert load_multiplier_state(fresh, saved) is True
    assert fresh.state_dict()["state"][0]["step"] == saved["state"][0]["step"]


def test_engine_wires_the_budget(tmp_path, monkeypatch):
    """The Trainer's Lagrangian optimiser is Adam ascending exactly the two multipliers, with --lr-lagrangian."""
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    args = parse_args(train_vgg.RECIPE, ["--dummy", "--net", "dep", "--width-mult", "0.0625", "--target-params", "0.6",
                                         "--lr-lagrangian", "0.7", "--epoch", "4", "-b", "4", "-j", "0", "--seed", "0",
                                         "--out-dir", str(tmp_path / "run")])
    trainer = engine.Trainer(args)
    try:
        budget, lagrangian = trainer.method.budget, trainer.method.lagrangian
        assert budget is not None and budget.kind == "params" and budget.target == 0.6 and budget.warmup == 1.0
        assert isinstance(lagrangian, torch.optim.Adam)
        (group,) = lagrangian.param_groups
        assert group["maximize"] is True and group["lr"] == 0.7 and group["weight_decay"] == 0
        ids = {id(p) for p in group["params"]}
        assert ids == {id(budget.lambda1), id(budget.lambda2)}, \
            f"the Lagrangian optimiser ascends {len(ids)} tensors, not just lambda1 and lambda2"
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
    assert trainer.method.budget is None and trainer.method.lagrangian is None
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
}
EXPECTED_WORDS = {"both": "not allowed with", "dense": "gates", "dense-params": "gates", "no-penalty-epochs": "--epoch",
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
    for key in ("achieved", "trained", "expected", "lambda1", "lambda2"):
        assert isinstance(block[key], float) and math.isfinite(block[key]), (key, block)
    assert 0.0 < block["achieved"] <= 1.0 and 0.0 < block["trained"] <= 1.0 and 0.0 < block["expected"] <= 1.0
    projection = block["projection"]
    if projection is None:
        assert block["trained"] == block["achieved"]
    else:
        assert set(projection) == {"closed", "reopened", "share"} and projection["closed"] + projection["reopened"] > 0
        total = sum(c["total"] for c in run.results["channels"])
        assert projection["share"] == (projection["closed"] + projection["reopened"]) / total
    assert block["lambda2"] >= 0.0
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
    lambda2 = [v for _, v in scalars["budget/lambda2"]]
    assert all(b >= a for a, b in zip(lambda2, lambda2[1:])), "lambda2 decreased"
    # The last logged values are the final ones in results.json.
    block = run.results["budget"]
    assert scalars["budget/lambda1"][-1][1] == pytest.approx(block["lambda1"], rel=1e-6, abs=1e-6)
    assert scalars["budget/lambda2"][-1][1] == pytest.approx(block["lambda2"], rel=1e-6, abs=1e-6)
    # The scalars follow training; a projection at its end shows in results.json only.
    assert scalars["budget/deterministic"][-1][1] == pytest.approx(block["trained"], rel=1e-6)
    # The progress lines' penalty column (train/l0_penalty) is the Lagrangian term.
    assert "train/l0_penalty" in run.scalars("train/")


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
    """Issue 4's acceptance run: a narrow ResNet56 on synthetic data, 320 steps, lands within 2%.

    The constraint itself must have converged: the expected cost, which the
    Lagrangian acts on, ends within the tolerance, and stays near the target
    over the last epochs (no wind-up oscillation). The deterministic cost may
    still differ (gates not polarised); the projection closes that gap."""
    run = budget_runs["lands"]
    assert run.proc.returncode == 0, run.diagnostics
    block = run.results["budget"]
    assert block["within_tolerance"] is True, block
    assert abs(block["achieved"] - 0.5) <= TOLERANCE, block
    assert abs(block["expected"] - 0.5) <= TOLERANCE, block
    expected = run.scalars()["budget/expected"]
    last_epochs = [v for step, v in expected if step > 7 * STEPS["lands"]]
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
    assert message.startswith(f"macs at {block['achieved']:.3f} of dense, target 0.300 (within 2%) after the budget "
                              f"projection closed {closed} channels ({share:.1%} of "), message
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
    # The multipliers stop with the penalty phase.
    scalars = run.scalars()
    assert max(step for step, _ in scalars["budget/target"]) == STEPS["annealing"]
    assert scalars["budget/lambda1"][-1][1] == pytest.approx(block["lambda1"], rel=1e-6, abs=1e-6)
    assert scalars["budget/lambda2"][-1][1] == pytest.approx(block["lambda2"], rel=1e-6, abs=1e-6)


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
