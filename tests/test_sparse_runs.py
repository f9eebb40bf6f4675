"""Unstructured sparse training and IMP end to end: the training scripts' --sparse, prune.py --method imp,
the cost they report against a counter on the saved model, resume through a reallocation, TensorBoard,
summarize/evaluate, and one-line errors. The rules themselves: tests/test_sparse_rules.py."""
import json
import os
import signal

import pytest
import torch

import prune
import train_resnet56
from conftest import assert_equal_states, read_tb_events, run_parallel, run_script
from models import load_pruned
from models.export import read_pruned
from pruning import sparse
from pruning.sparse import DSR, SparseMethod, imp_fraction, sparse_layers
from engine.cli import parse_args
from engine.trainer import Trainer

TINY = ("--dummy", "-j", "0", "--seed", "0")
CIFAR = ("--width-mult", "0.25", "--epoch", "2", "--limit-batches", "4", "-b", "32")
# A Dep-L0 run's keys, less the penalty's (lamba, reg: only runs with gates write them), plus the
# cost convention.
RUN_KEYS = {"model", "dataset", "net", "back_dep", "cost_convention", "seed", "epochs_done", "epochs_total", "top1",
               "best_top1", "val_loss", "macs_dense", "macs_pruned", "macs_reduction", "params_dense",
               "params_pruned", "params_reduction", "channels", "disconnected", "wall_time_s", "device",
               "world_size", "torch_version", "git_commit", "best_top1_epochs", "best_top1_over", "method"}


def counted_cost(model, sparse_names, size):
    """An independent counter: forward hooks give each conv/linear's output positions; MACs = its
    non-zero weights (sparse layers) or all weights times those; params = non-zero sparse weights +
    every other parameter."""
    positions = {}
    hooks = [module.register_forward_hook(lambda m, i, o, name=name: positions.__setitem__(name, o[0, 0].numel()))
             for name, module in model.named_modules() if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    macs = params = 0
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            present = int((module.weight != 0).sum()) if name in sparse_names else module.weight.numel()
            macs += present * positions[name]
    for name, p in model.named_parameters():
        layer = name.rsplit(".", 1)[0]
        params += int((p != 0).sum()) if layer in sparse_names and name.endswith(".weight") else p.numel()
    return macs, params


@pytest.fixture(scope="module")
def sparse_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("sparse")

    def job(name, script, *argv):
        def run():
            proc = run_script(script, *argv, *TINY, "--out-dir", name, cwd=base)
            assert proc.returncode == 0, f"{name}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
            return proc, json.loads((base / name / "results.json").read_text())
        return run

    jobs = {
        "dsr": job("dsr", "train_resnet56.py", "--sparse", "dsr", "--density", "0.2", *CIFAR),
        "set": job("set", "train_resnet56.py", "--sparse", "set", "--density", "0.3", *CIFAR),
        "deepr": job("deepr", "train_resnet56.py", "--sparse", "deepr", "--density", "0.4", *CIFAR),
        "static": job("static", "train_vgg.py", "--sparse", "static", "--density", "0.1", "--width-mult", "0.125",
                      "--epoch", "1", "--limit-batches", "2", "-b", "16"),
        "resnet50": job("resnet50", "train_resnet50.py", "--sparse", "dsr", "--density", "0.2", "--width-mult",
                        "0.125", "--epochs", "1", "--limit-batches", "1", "-b", "2"),
        "dense": job("dense", "train_resnet56.py", "--net", "dense", "--width-mult", "0.25", "--epoch", "2",
                     "--limit-batches", "4", "-b", "32"),
    }
    return base, run_parallel(jobs, workers=2)


@pytest.mark.parametrize("name", ["dsr", "set", "deepr", "static", "resnet50"])
def test_sparse_runs_end_to_end(name, sparse_runs):
    base, outcomes = sparse_runs
    proc, results = outcomes[name].get()
    assert RUN_KEYS <= set(results), RUN_KEYS - set(results)
    assert not {"lamba", "reg"} & set(results), "a run without gates reports no penalty settings"
    method = {"resnet50": "dsr"}.get(name, name)
    assert results["method"] == method and results["net"] == "dense"
    density = {"dsr": 0.2, "set": 0.3, "deepr": 0.4, "static": 0.1, "resnet50": 0.2}[name]
    assert results["density"] == density
    checkpoint = torch.load(base / name / "last.pt", weights_only=True)
    assert checkpoint["args"]["nesterov"] is True  # the method's schedule: Nesterov SGD
    masks = checkpoint["method"]["masks"]
    layers = results["layer_densities"]
    assert len(masks) == len(layers)
    # Every sparse tensor starts at int(d n + 0.1) active; the reallocations keep the total.
    expected = sum(sparse.active_count(m.numel(), density) for m in masks)
    assert results["sparse_weights_active"] == sum(int(m.sum()) for m in masks) == expected
    for (layer, d), mask in zip(layers.items(), masks):
        assert d == pytest.approx(float(mask.float().mean()))
        weight = checkpoint["model"][f"{layer}.weight"]
        assert torch.all(weight[~mask] == 0), layer  # masked weights are exact zeros in the checkpoint
    # Which tensors are sparse: no stem, no shortcut; the classifier on ResNet50 only.
    assert not any(layer == "conv1" or "shortcut" in layer or "downsample" in layer for layer in layers)
    assert ("fc" in layers) == (name == "resnet50")
    assert "classifier" not in layers and "linear" not in layers
    # The saved model: exact zeros, weights_only, and a counter on it gives the reported cost.
    payload = read_pruned(base / name / "pruned.pt")
    compact = load_pruned(base / name / "pruned.pt")
    size = 224 if name == "resnet50" else 32
    counted = counted_cost(compact, set(layers), size)
    assert counted == (results["macs_pruned"], results["params_pruned"]) == (payload["macs"], payload["params"])
    assert results["params_pruned"] < results["params_dense"] and results["macs_pruned"] < results["macs_dense"]
    assert payload["arch"]["source"]["sparse_layers"] == list(layers)
    assert f"{method}: " in proc.stdout and "sparse weights active" in proc.stdout


def test_sparse_run_in_the_summary_and_evaluate(sparse_runs, capsys):
    import evaluate
    import summarize
    base, outcomes = sparse_runs
    for outcome in outcomes.values():
        outcome.get()
    table = summarize.summarize([str(base)])
    for method in ("DSR", "SET", "DeepR", "static sparse", "dense"):
        assert f"| {method} |" in table, table
    assert "density 0.2" in table
    _, results = outcomes["dsr"].get()
    for path in ("pruned.pt", "last.pt"):
        stats = evaluate.evaluate(evaluate_args(evaluate, base / "dsr" / path))
        assert (stats["macs"], stats["params"]) == (results["macs_pruned"], results["params_pruned"]), path
    capsys.readouterr()


def evaluate_args(evaluate, path):
    from argparse import Namespace
    return Namespace(path=str(path), dataset=None, data_dir=None, num_classes=None, dummy=True, batch_size=64,
                     workers=0, limit_batches=1, gpu=None)


# ----------------------------------------------------------------- in-process runs: reallocations


def _in_process(argv):
    return Trainer(parse_args(train_resnet56.RECIPE, argv)).fit()


@pytest.fixture
def fast_rewiring(monkeypatch):
    """Reallocate every 3 steps (the code's 100 needs more steps than a test should take)."""
    for kind in ("cifar", "imagenet"):
        monkeypatch.setitem(sparse.SCHEDULES[kind], "rewire_periods", {0: 3})
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("method", ["dsr", "set", "deepr"])
def test_resume_through_a_reallocation_equals_an_uninterrupted_run(method, fast_rewiring, tmp_path, monkeypatch):
    argv = ["--sparse", method, "--density", "0.3", "--width-mult", "0.125", "--epoch", "2", "--limit-batches", "5",
            "-b", "16", *TINY, "-p", "100"]
    assert _in_process([*argv, "--out-dir", str(tmp_path / "ref")]) == 0
    original = SparseMethod.after_step
    seen = []

    def after_step(self, iteration):
        original(self, iteration)
        seen.append(iteration)
        if iteration == 7:  # mid-epoch 2, after the reallocation at iteration 6
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(SparseMethod, "after_step", after_step)
    assert _in_process([*argv, "--out-dir", str(tmp_path / "cut")]) == 75
    monkeypatch.setattr(SparseMethod, "after_step", original)
    stopped = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert stopped["epoch"] == 1 and stopped["step"] == 3
    assert _in_process([*argv, "--out-dir", str(tmp_path / "cut"), "--resume", "auto"]) == 0
    a = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    for key in ("model", "weight_optimizer", "method"):
        assert_equal_states(a[key], b[key], key)
    first = torch.load(tmp_path / "ref" / "last.prev.pt", weights_only=True)["method"]["masks"]
    assert any(not torch.equal(x, y) for x, y in zip(first, a["method"]["masks"])) or method == "deepr"


def test_dsr_logs_density_reallocations_and_threshold(fast_rewiring, tmp_path):
    argv = ["--sparse", "dsr", "--density", "0.3", "--width-mult", "0.125", "--epoch", "2", "--limit-batches", "4",
            "-b", "16", *TINY, "--out-dir", str(tmp_path / "run")]
    assert _in_process(argv) == 0
    events = [e for path in (tmp_path / "run").glob("events.out.tfevents*") for e in read_tb_events(path)]
    tags = {tag for _, tag, _, _ in events}
    assert "sparse/reallocated" in tags and "sparse/H" in tags and "sparse/reallocated_per_epoch" in tags
    assert any(tag.startswith("sparse/density/layers.") for tag in tags)
    steps = sorted(step for step, tag, _, _ in events if tag == "sparse/reallocated")
    assert steps == [4, 7]  # after the steps of iterations 3 and 6 (t mod 3 = 0, t != 0), one event each
    thresholds = [value for step, tag, _, value in sorted(events) if tag == "sparse/H"]
    assert thresholds[0] == pytest.approx(sparse.THRESHOLD_START)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["n_prune_params"] == sparse.default_n_prune_params(
        "cifar", results["sparse_weights_total"]) and results["threshold"] > 0


# --------------------------------------------------------------------------- IMP through prune.py


@pytest.fixture(scope="module")
def dense_checkpoint(sparse_runs):
    base, outcomes = sparse_runs
    outcomes["dense"].get()
    return base


@pytest.mark.parametrize("cubic", [False, True])
def test_imp_prunes_on_its_schedule_to_the_density(cubic, dense_checkpoint):
    base = dense_checkpoint
    name = f"imp-{'cubic' if cubic else 'exp'}"
    # The cubic run stops right after its last prune (--epochs 5); the other runs the default 2(K-1)+10.
    argv = ["dense/best.pt", "--method", "imp", "--density", "0.25", "--prune-iterations", "3", "--limit-batches", "2",
            "-b", "32", *TINY, "--out-dir", name] + (["--cubic", "--epochs", "5"] if cubic else [])
    proc = run_script("prune.py", *argv, cwd=base)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((base / name / "results.json").read_text())
    assert results["method"] == "imp" and results["prunes_done"] == 3
    assert results["epochs_done"] == (5 if cubic else 2 * (3 - 1) + 10)  # prunes after epochs 0, 2, 4, then 10 epochs
    assert results["lr_ft"] == {"0": 0.0, "1": 0.02, "25": 0.004, "35": 0.0008}
    dense = torch.load(base / "dense" / "best.pt", weights_only=True)
    state = torch.load(base / name / "last.pt", weights_only=True)
    # The code's pruning job resumes the dense run's optimizer, and with it the dense run's weight decay.
    assert state["args"]["weight_decay"] == 5e-4
    for layer, density in results["layer_densities"].items():
        n = dense["model"][f"{layer}.weight"].numel()
        active = n
        for i in range(3):
            active -= int(imp_fraction(i, 3, 0.25, cubic) * active) + 1
        assert round(density * n) == active, layer
        assert int((state["model"][f"{layer}.weight"] != 0).sum()) == active
    compact = load_pruned(base / name / "pruned.pt")
    assert counted_cost(compact, set(results["layer_densities"]), 32) == (results["macs_pruned"],
                                                                         results["params_pruned"])
    # best_top1 ranges only over the epochs evaluated after the last prune (it ends epoch 5, before its
    # evaluation): the dense and partly pruned epochs do not count.
    last = results["epochs_done"]
    assert results["best_top1_epochs"] == [5, last]
    assert results["best_top1_over"].startswith(f"epochs 5-{last}: those whose active weights per sparse tensor")


# ------------------------------------------------------------------------------- one-line errors

ERRORS = {
    "density 0": (["--sparse", "dsr", "--density", "0"], "must be in (0, 1]"),
    "density above 1": (["--sparse", "set", "--density", "1.5"], "must be in (0, 1]"),
    "with gates": (["--sparse", "dsr", "--density", "0.2", "--net", "dep"], "does not combine with --net dep"),
    "no density": (["--sparse", "static"], "needs --density"),
    "density alone": (["--density", "0.2"], "add --sparse"),
    "empty layer": (["--sparse", "static", "--density", "1e-5"], "with no active weight"),
    "SET density unknown": (["--sparse", "set", "--density", "0.25"], "give --rewire-fraction"),
    "other method's flag": (["--sparse", "set", "--density", "0.2", "--n-prune-params", "5"], "dsr's setting"),
    "static stop": (["--sparse", "static", "--density", "0.2", "--stop-rewire-epoch", "3"], "never reallocates"),
    "gate flag": (["--sparse", "dsr", "--density", "0.2", "--lamba", "1e-6"], "--lamba belongs to the gates"),
    "budget": (["--sparse", "dsr", "--density", "0.2", "--target-params", "0.3"], "--target-params belongs to the gates"),
    "fine-tune": (["--sparse", "set", "--density", "0.2", "--fine_tune_epoch", "3"], "--fine_tune_epoch belongs"),
    "no momentum": (["--sparse", "static", "--density", "0.2", "--momentum", "0"], "Nesterov momentum needs"),
}


def _one_line_error(capsys, call):
    """``call`` ends with exit status 2 and one line on stderr, no traceback; returns that line."""
    with pytest.raises(SystemExit) as stop:
        status = call()
        raise SystemExit(status)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and "Traceback" not in err, (stop.value.code, err)
    return lines[0]


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_sparse_input_is_one_line(case, tmp_path, capsys, monkeypatch):
    from engine.cli import main
    monkeypatch.chdir(tmp_path)
    argv, needle = ERRORS[case]
    line = _one_line_error(capsys, lambda: main(train_resnet56.RECIPE, [
        *argv, "--width-mult", "0.125", "--epoch", "1", "--limit-batches", "1", *TINY, "--out-dir", "run"]))
    assert needle in line, line
    assert not (tmp_path / "run" / "last.pt").exists()


def test_the_refused_gate_flags_are_the_l0_specs():
    """--sparse refuses every flag the L0 spec adds (its declared ``flags``, which are what its
    add_arguments adds), and --fine_tune_epoch; and the spec's flags are the sparse spec's too."""
    import argparse

    from pruning import METHODS
    for name in ("l0", "dsr"):
        spec = METHODS.get(name)
        parser = argparse.ArgumentParser(add_help=False)
        spec.add_arguments(parser, recipe=train_resnet56.RECIPE)
        assert set(spec.flags) == set(parser._option_string_actions), name
    assert set(METHODS.get("dsr").gate_flags) == {*METHODS.get("l0").flags, "--fine_tune_epoch"}


@pytest.mark.parametrize("argv, needle", [
    (["--method", "l1", "--density", "0.5"], "--density is IMP's"),
    (["--method", "imp", "--density", "0.5", "--lr", "0.1"], "--lr is HSIC-Lasso's"),
    (["--method", "imp", "--density", "2"], "must be in (0, 1]"),
    (["--method", "imp", "--density", "0.5", "--prune-iterations", "5", "--epochs", "8"], "last prune comes at the end of epoch 9"),
    (["--method", "imp", "--density", "0.5", "--momentum", "0"], "--momentum must be above 0"),
])
def test_bad_imp_input_is_one_line(argv, needle, dense_checkpoint, capsys, monkeypatch):
    monkeypatch.chdir(dense_checkpoint)
    line = _one_line_error(capsys, lambda: prune.main(["dense/best.pt", *argv, *TINY, "--out-dir", "imp-error"]))
    assert needle in line, line


def test_sparse_recipes_are_the_codes():
    """--sparse selects the method's schedule: WRN-28-2's on CIFAR (200 epochs, batch 100, lr 0.1 x0.2 at
    60/120/160, wd 5e-4; DeepR without weight decay; static the 400-epoch one), ResNet50's on ImageNet."""
    import train_resnet50
    args = parse_args(train_resnet56.RECIPE, ["--sparse", "dsr", "--density", "0.1", "--dummy"])
    assert (args.epochs, args.batch_size, args.lr, args.milestones, args.lr_decay, args.weight_decay,
            args.nesterov, args.net, args.fine_tune_epoch) == (200, 100, 0.1, (60, 120, 160), 0.2, 5e-4, True,
                                                               "dense", 0)
    args = parse_args(train_resnet56.RECIPE, ["--sparse", "deepr", "--density", "0.1", "--dummy"])
    assert args.weight_decay == 0.0 and args.DeepR_eta == 0.01 and args.L1_loss_coeff == 1e-5
    args = parse_args(train_resnet56.RECIPE, ["--sparse", "static", "--density", "0.1", "--dummy", "--epoch", "7"])
    assert (args.epochs, args.milestones) == (7, (120, 220, 350))
    args = parse_args(train_resnet50.RECIPE, ["--sparse", "set", "--density", "0.2", "--dummy"])
    assert (args.epochs, args.batch_size, args.milestones, args.lr_decay, args.weight_decay) == (
        100, 256, (30, 60, 90), 0.1, 1e-4)
    args = parse_args(train_resnet56.RECIPE, ["--dummy"])
    assert args.net == "dep" and args.nesterov is False and args.sparse is None


def test_dsr_threshold_adapts_to_n_prune_params():
    from conftest import _build_tiny
    model, x = _build_tiny("resnet56", net="dense")
    method = DSR(model, 0.5, seed=0, periods={0: 1}, stop_epoch=10, n_prune_params=10 ** 9)
    method.rewire(1)
    assert method.threshold == 2 * sparse.THRESHOLD_START  # far fewer than 0.9 N_p reallocated
    method.n_prune_params = 1
    method.threshold = 10.0  # everything is below: far more than 1.1 N_p
    method.rewire(2)
    assert method.threshold == 5.0
    assert all(int(m.sum()) >= 1 for m in method.masks)  # the first active weight of each tensor stays
    assert len(sparse_layers(model)) == len(method.masks)


# ------------------------------------------------------------------------------------- torchrun

RANK_SCRIPT = """
import os, sys
import torch
sys.path.insert(0, {repo!r})
import train_resnet56
from pruning import sparse
from engine.cli import parse_args
from engine.trainer import Trainer
for kind in sparse.SCHEDULES:
    sparse.SCHEDULES[kind]["rewire_periods"] = {{0: 3}}
trainer = Trainer(parse_args(train_resnet56.RECIPE, sys.argv[1:]))
assert trainer.fit() == 0
torch.save(dict(masks=[m.cpu() for m in trainer.method.masks], weights=[w.detach().cpu() for w in trainer.method.weights]),
           f"rank{{os.environ['RANK']}}.pt")
"""


@pytest.mark.parametrize("method", ["dsr", "deepr"])
def test_masks_and_weights_agree_across_torchrun_ranks(method, tmp_path):
    """Reallocations draw from the method's own generator, seeded alike on every rank, and decide on
    weights DDP keeps equal: two processes end with the same masks and weights."""
    from conftest import REPO_ROOT
    from test_distributed import diagnostics, torchrun
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT.format(repo=str(REPO_ROOT)))
    proc = torchrun(script, "--sparse", method, "--density", "0.3", "--width-mult", "0.125", "--epoch", "1",
                    "--limit-batches", "7", "-b", "16", *TINY, "--out-dir", "run", cwd=tmp_path)
    assert proc.returncode == 0, diagnostics(proc)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert_equal_states(ranks[0], ranks[1], "rank 0 vs rank 1")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["world_size"] == 2 and results["sparse_weights_active"] == sum(int(m.sum()) for m in ranks[0]["masks"])
    if method == "dsr":
        assert results["threshold"] != sparse.THRESHOLD_START  # it reallocated (iterations 3 and 6)


def test_resume_with_other_method_settings_is_refused(tmp_path, capsys, monkeypatch):
    from engine.cli import main
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    argv = ["--sparse", "dsr", "--density", "0.3", "--width-mult", "0.125", "--epoch", "2", "--limit-batches", "2",
            "-b", "16", *TINY, "--out-dir", str(tmp_path / "run")]
    assert _in_process([*argv, "--epoch", "1", "--n-prune-params", "5"]) == 0
    capsys.readouterr()
    line = _one_line_error(capsys, lambda: main(train_resnet56.RECIPE, [*argv, "--n-prune-params", "7",
                                                                         "--resume", "auto"]))
    assert "used --n-prune-params 5, this command 7" in line, line
