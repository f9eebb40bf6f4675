"""Multi-process training with torchrun (gloo, CPU): ``torchrun --standalone --nproc_per_node=2 script.py ...``.

Each of the three scripts runs as two processes on tiny synthetic data and must
end with status 0, one set of outputs (one run directory with one
results.json, one event file, last.pt, pruned.pt: rank 0 writes, rank 1 only
computes), and progress printed once per step. That the two ranks end with
identical parameters and buffers is checked with a small helper written to
tmp_path: it builds ``engine.trainer.Trainer`` under torchrun, runs ``fit()`` and
saves each rank's ``model.state_dict()`` to ``rank_<r>.pt``. The ``-b`` flag is
the global batch, so ``-b 3`` over two processes is refused with one line.

torchrun is started as ``sys.executable -m torch.distributed.run`` with
OMP_NUM_THREADS=1, no CUDA and no PYTHONPATH (see conftest.script_env).
"""
import json
import math
import re
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import REPO_ROOT, script_env

TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
CIFAR_TINY = ("--dummy", "-j", "0", "--width-mult", "0.125", "-b", "8", "--epoch", "1", "--fine_tune_epoch", "1",
              "--limit-batches", "2", "-p", "1", "--seed", "0")
R50_TINY = ("--dummy", "-j", "0", "--width-mult", "0.0625", "-b", "4", "--limit-batches", "1", "--epochs", "1",
            "--fine_tune_epoch", "1", "-p", "1", "--seed", "0")
SCRIPTS = {
    "train_vgg.py": ("--net", "dep", *CIFAR_TINY),
    "train_resnet56.py": ("--net", "hc", *CIFAR_TINY),
    "train_resnet50.py": ("--net", "dep", *R50_TINY),
}
STEPS = {"train_vgg.py": 2, "train_resnet56.py": 2, "train_resnet50.py": 1}  # per epoch, after --limit-batches
PROGRESS = re.compile(r"^Epoch \[(\d+)\]\[\s*(\d+)/(\d+)\]\s+loss\s+(\S+)")


def torchrun_env():
    env = script_env()
    env["OMP_NUM_THREADS"] = "1"
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def torchrun(*args, cwd, timeout=300):
    return subprocess.run([*TORCHRUN, *map(str, args)], cwd=cwd, env=torchrun_env(), capture_output=True, text=True,
                          timeout=timeout)


def diagnostics(proc):
    return f"rc {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------- the three scripts
#
# All torchrun jobs of this file (the three scripts, the rank-state helper and the
# indivisible batch) start together, two at a time, in one module-scoped fixture:
# each is mostly interpreter and process-group start-up.


HELPER_ARGS = ("--net", "dep", "--target-macs", "0.8", "--target-warmup", "0.5", "--lr-lagrangian", "1", *CIFAR_TINY)
BAD_BATCH_ARGS = ("--dummy", "-j", "0", "--width-mult", "0.125", "-b", "3", "--epoch", "1", "--limit-batches", "1")


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    helper = base / "save_ranks.py"
    helper.write_text(HELPER.format(repo=str(REPO_ROOT)))
    (base / "ranks").mkdir()
    (base / "ranks" / "out").mkdir()
    todo = {script: (base / script.removesuffix(".py"), (REPO_ROOT / script, *SCRIPTS[script])) for script in SCRIPTS}
    # Dep-L0 gates (one MLP shared by all layers), a budget (its controller outside DDP),
    # then a fine-tuning epoch with the gates frozen (DDP re-wrapped).
    todo["ranks"] = (base / "ranks", (helper, "train_resnet56", base / "ranks" / "out", *HELPER_ARGS,
                                      "--out-dir", base / "ranks" / "run"))
    todo["bad-batch"] = (base / "bad-batch", (REPO_ROOT / "train_resnet56.py", *BAD_BATCH_ARGS))

    def one(name):
        cwd, args = todo[name]
        cwd.mkdir(exist_ok=True)
        # No --out-dir for the scripts: both ranks must agree on the fresh default directory (rank 0's choice).
        return name, (cwd, torchrun(*args, cwd=cwd))

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, todo))


@pytest.fixture(params=list(SCRIPTS), ids=[s.removesuffix(".py") for s in SCRIPTS])
def ddp_run(request, jobs):
    cwd, proc = jobs[request.param]
    return request.param, cwd, proc


def _run_dir(cwd):
    dirs = sorted((cwd / "runs").iterdir()) if (cwd / "runs").is_dir() else []
    return dirs


def test_two_processes_finish(ddp_run):
    script, cwd, proc = ddp_run
    assert proc.returncode == 0, diagnostics(proc)
    assert "Traceback" not in proc.stderr, diagnostics(proc)
    assert "device: cpu x 2 processes" in proc.stdout, diagnostics(proc)


def test_one_set_of_outputs(ddp_run):
    script, cwd, proc = ddp_run
    assert proc.returncode == 0, diagnostics(proc)
    # Everything the run wrote is in one run directory.
    assert sorted(p.name for p in cwd.iterdir()) == ["runs"], sorted(cwd.iterdir())
    dirs = _run_dir(cwd)
    assert len(dirs) == 1, f"the ranks wrote {len(dirs)} run directories: {dirs}"
    run_dir = dirs[0]
    names = sorted(p.name for p in run_dir.iterdir())
    events = [n for n in names if n.startswith("events.out.tfevents")]
    assert len(events) == 1, names
    for name in ("last.pt", "pruned.pt", "results.json", "best.pt"):
        assert names.count(name) == 1, names
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(".")], names
    assert set(names) <= {*events, "last.pt", "last.prev.pt", "best.pt", "pruned.pt", "results.json"}, names
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["device"] == "cpu"
    assert results["epochs_done"] == results["epochs_total"] == 2
    assert math.isfinite(results["top1"]) and math.isfinite(results["val_loss"])
    assert proc.stdout.count("run directory:") == 1 and f"run directory: runs/{run_dir.name}" in proc.stdout
    state = load(run_dir / "last.pt")
    assert state["epoch"] == 2 and state["step"] == 0 and state["gates_frozen"]


def test_progress_once_per_step(ddp_run):
    script, cwd, proc = ddp_run
    assert proc.returncode == 0, diagnostics(proc)
    lines = [m for m in map(PROGRESS.match, proc.stdout.splitlines()) if m]
    steps = STEPS[script]
    seen = [(int(m[1]), int(m[2]), int(m[3])) for m in lines]
    assert seen == [(e, s, steps) for e in (1, 2) for s in range(1, steps + 1)], "\n".join(m[0] for m in lines)
    # The epoch summary and the closing lines also come from rank 0 only.
    assert len(re.findall(r"^Epoch \d+: top-1", proc.stdout, re.M)) == 2, proc.stdout
    assert proc.stdout.count("pruned model:") == 1 and proc.stdout.count("done:") == 1, proc.stdout
    assert proc.stdout.count("arguments: ") == 1


# ------------------------------------- identical parameters on both ranks (helper)


HELPER = textwrap.dedent("""
    # Runs one training under torchrun through engine.trainer.Trainer, then saves
    # this rank's parameters and buffers (and the budget controller's state) to OUT/rank_<r>.pt.
    import importlib, os, sys
    sys.path.insert(0, {repo!r})
    import torch
    from engine.cli import parse_args
    from engine.trainer import Trainer

    module, out, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    recipe = importlib.import_module(module).RECIPE
    trainer = Trainer(parse_args(recipe, argv))
    initial = {{k: v.detach().clone() for k, v in trainer.model.state_dict().items()}}
    code = trainer.fit()
    rank = int(os.environ["RANK"])
    extra = {{}}
    budget = getattr(trainer.method, "budget", None)
    if budget is not None:
        extra = dict(budget={{k: v.detach().clone() for k, v in budget.state_dict().items()}})
    torch.save(dict(code=code, rank=rank, world_size=trainer.ctx.world_size, batch_size=trainer.batch_size,
                    model=trainer.model.state_dict(), initial=initial, **extra),
               os.path.join(out, f"rank_{{rank}}.pt"))
""")


@pytest.fixture(scope="module")
def rank_states(jobs):
    cwd, proc = jobs["ranks"]
    assert proc.returncode == 0, diagnostics(proc)
    return [load(cwd / "out" / f"rank_{r}.pt") for r in (0, 1)], cwd / "run"


def test_ranks_end_with_identical_parameters_and_buffers(rank_states):
    (r0, r1), run_dir = rank_states
    assert (r0["rank"], r1["rank"]) == (0, 1) and r0["world_size"] == r1["world_size"] == 2
    assert r0["code"] == r1["code"] == 0
    assert r0["model"].keys() == r1["model"].keys()
    different = [k for k in r0["model"] if not torch.equal(r0["model"][k], r1["model"][k])]
    assert not different, f"the ranks disagree on {different}"
    assert r0["budget"].keys() == r1["budget"].keys() and "lambda1" in r0["budget"]
    assert all(torch.equal(r0["budget"][k], r1["budget"][k]) for k in r0["budget"]), (r0["budget"], r1["budget"])
    # They trained (the comparison is not of two untouched initialisations) ...
    trained = [k for k in r0["initial"] if r0["model"][k].is_floating_point()
               and not torch.equal(r0["model"][k], r0["initial"][k])]
    assert any(k.startswith("gates.") for k in trained), trained
    assert sum(".weight" in k for k in trained) >= 10, trained
    assert r0["budget"]["lambda1"].item() != 0.0
    # ... from the same initialisation, and rank 0's state is what last.pt holds.
    assert all(torch.equal(r0["initial"][k], r1["initial"][k]) for k in r0["initial"])
    saved = load(run_dir / "last.pt")["model"]
    assert saved.keys() == r0["model"].keys()
    assert all(torch.equal(saved[k], r0["model"][k]) for k in saved)


def test_batch_size_is_global(rank_states):
    (r0, r1), _ = rank_states
    assert r0["batch_size"] == r1["batch_size"] == 4  # -b 8 over 2 processes


def test_indivisible_global_batch_is_one_line(jobs):
    tmp_path, proc = jobs["bad-batch"]
    assert proc.returncode != 0, diagnostics(proc)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("train_resnet56.py")]
    assert ours, diagnostics(proc)
    # torchrun adds its own report of the failed child; the script's part is one line, no traceback.
    assert all(line == ours[0] for line in ours), diagnostics(proc)
    assert ours[0].startswith("train_resnet56.py: error: "), diagnostics(proc)
    assert "-b 3" in ours[0] and "2 processes" in ours[0], diagnostics(proc)
    assert "exitcode  : 2" in proc.stderr, diagnostics(proc)
    script_traces = [block for block in proc.stderr.split("Traceback")[1:] if "engine/trainer.py" in block
                     or "train_resnet56.py\", line" in block]
    assert not script_traces, diagnostics(proc)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))
