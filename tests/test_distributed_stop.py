"""All ranks of a torchrun job agree on stopping.

A preemption signal that reaches only one of two processes must stop both
after the same step: rank 0 saves last.pt mid-epoch (with every rank's RNG
state) and both exit; resuming with torchrun continues exactly, so the
final weights equal those of an uninterrupted two-process run.
"""
import json
import subprocess
import sys
import time

import torch

from conftest import REPO_ROOT, script_env

FLAGS = ["--dummy", "--width-mult", "0.125", "-b", "8", "--limit-batches", "30", "--epoch", "2", "-j", "0",
         "--seed", "4", "-p", "1"]


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(REPO_ROOT / "train_resnet56.py"), *map(str, args)]


def workers_of(launcher: int, run) -> list[int]:
    """Process ids of the training workers of ``run`` (every process naming it, but the launcher)."""
    out = subprocess.run(["pgrep", "-f", f"train_resnet56.py .*--out-dir {run}"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split() if int(p) != launcher]


def test_a_signal_to_one_rank_stops_all_and_resumes_exactly(tmp_path):
    env = script_env()
    env["OMP_NUM_THREADS"] = "1"
    reference = subprocess.run(torchrun(*FLAGS, "--out-dir", tmp_path / "A"), cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]

    run = tmp_path / "B"
    proc = subprocess.Popen(torchrun(*FLAGS, "--out-dir", run), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Epoch [1][ 3/"):
            break
    workers = workers_of(proc.pid, run)
    assert len(workers) == 2, "".join(lines)
    # One worker only: the two ranks are at different points of the step when it arrives.
    subprocess.run(["kill", "-USR1", str(max(workers))], check=True)
    rest, _ = proc.communicate(timeout=120)
    output = "".join(lines) + rest
    assert "stopped by signal" in output, output[-3000:]
    deadline = time.time() + 10
    while any(w for w in workers if subprocess.run(["kill", "-0", str(w)], capture_output=True).returncode == 0):
        assert time.time() < deadline, "a rank kept running after the other stopped"
        time.sleep(0.2)
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["epoch"] == 0 and 3 <= state["step"] < 30, (state["epoch"], state["step"])
    assert len(state["rank_states"]) == 2

    resumed = subprocess.run(torchrun(*FLAGS, "--out-dir", run, "--resume", "auto"), cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    a = torch.load(tmp_path / "A" / "last.pt", weights_only=True)["model"]
    b = torch.load(run / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (tmp_path / "A", run))
    for key in ("top1", "macs_pruned", "params_pruned", "channels", "val_loss"):
        assert ra[key] == rb[key], key
