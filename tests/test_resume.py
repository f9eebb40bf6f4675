"""End-to-end tests of checkpoints and resuming, on the CPU, through the real scripts.

A run resumed from a checkpoint must end bit for bit where the uninterrupted
run ends: same weights, optimiser and scheduler states, same results. Each
variant trains a reference run A (3 tiny epochs of 2 batches of 4, keeping epoch_1.pt), then

* C: A's epoch_1.pt copied into a fresh directory as last.pt and resumed;
* B (ResNet56 and VGG16): the same command started from scratch and killed
  with SIGKILL during epoch 2 (on its first progress line of epoch 2, so its
  last.pt is the one of epoch 1), then resumed with --resume B/last.pt.

It also checks what is in a checkpoint (tensors and plain values only, all
loadable with ``weights_only=True``), that a checkpoint which would run code
when unpickled is refused with one line, and that no temporary files are left.
"""
import json
import os
import pickle
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import run_script, script_command, script_env

FLAGS = ("--dummy", "--seed", "3", "-b", "4", "--limit-batches", "2", "--epoch", "3", "-j", "0", "-p", "1")
VARIANTS = {
    "resnet56-dep": ("train_resnet56.py", ()),
    "vgg16-dep": ("train_vgg.py", ()),
    "resnet56-dep-back": ("train_resnet56.py", ("--net", "dep", "--back_dep")),
    "resnet56-hc": ("train_resnet56.py", ("--net", "hc")),
}
KILLED_VARIANTS = ("resnet56-dep", "vgg16-dep")
CHECKPOINT_KEYS = {"model", "weight_optimizer", "gate_optimizer", "weight_scheduler", "gate_scheduler", "epoch",
                   "best_top1", "args", "arch"}
# Arguments that legitimately differ between the runs compared here.
RUN_LOCAL_ARGS = {"resume", "out_dir", "save_epoch"}


def _diagnostics(proc):
    return f"rc {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-5000:]}"


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_equal_states(a, b, where=""):
    """Recursively equal: tensors with torch.equal (same dtype and shape), the rest with ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs (max abs diff {(a.double() - b.double()).abs().max().item()})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b) if isinstance(b, dict) else b)
        for k in a:
            _assert_equal_states(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_states(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _without(d, keys):
    return {k: v for k, v in d.items() if k not in keys}


def assert_same_final_state(dir_a: Path, dir_b: Path):
    a, b = _load(dir_a / "last.pt"), _load(dir_b / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    for key in ("model", "weight_optimizer", "gate_optimizer", "weight_scheduler", "gate_scheduler"):
        _assert_equal_states(a[key], b[key], key)
    for key in ("best_top1", "gates_frozen", "arch"):
        assert a[key] == b[key], key
    _assert_equal_states(_without(a["args"], RUN_LOCAL_ARGS), _without(b["args"], RUN_LOCAL_ARGS), "args")
    ra = json.loads((dir_a / "results.json").read_text())
    rb = json.loads((dir_b / "results.json").read_text())
    assert ra["epochs_done"] == rb["epochs_done"] == 3
    assert _without(ra, {"wall_time_s"}) == _without(rb, {"wall_time_s"})
    assert _without(a["results"], {"wall_time_s"}) == _without(ra, {"wall_time_s"})


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def reference(request, tmp_path_factory):
    """Run A: three uninterrupted epochs, keeping epoch_1.pt."""
    name = request.param
    script, extra = VARIANTS[name]
    cwd = tmp_path_factory.mktemp(f"resume-{name}")
    proc = run_script(script, *extra, *FLAGS, "--save_epoch", "1", "--out-dir", "A", cwd=cwd)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, _diagnostics(proc)
    yield dict(name=name, script=script, extra=extra, cwd=cwd, dir=cwd / "A", proc=proc)
    shutil.rmtree(cwd, ignore_errors=True)


def test_resume_from_epoch_1_checkpoint_is_exact(reference):
    cwd, script, extra = reference["cwd"], reference["script"], reference["extra"]
    c = cwd / "C"
    c.mkdir()
    shutil.copyfile(reference["dir"] / "epoch_1.pt", c / "last.pt")
    assert _load(c / "last.pt")["epoch"] == 1
    proc = run_script(script, *extra, *FLAGS, "--out-dir", "C", "--resume", c / "last.pt", cwd=cwd)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, _diagnostics(proc)
    # Only epochs 2 and 3 were trained.
    assert "Epoch [1][" not in proc.stdout and "Epoch [2][" in proc.stdout and "Epoch [3][" in proc.stdout
    assert_same_final_state(reference["dir"], c)


def _start_and_kill_in_epoch_2(script, args, cwd):
    """Start a run and SIGKILL it on its first progress line of epoch 2 (epoch 1 is saved by then)."""
    stderr_path = cwd / "B.stderr"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(script_command(script, *args), cwd=cwd, env=script_env(), stdout=subprocess.PIPE,
                                stderr=stderr, text=True)
        lines, killed = [], False
        try:
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("Epoch [2]["):
                    os.kill(proc.pid, signal.SIGKILL)
                    killed = True
                    break
        finally:
            if not killed and proc.poll() is None:
                proc.kill()
            proc.stdout.close()
            proc.wait(timeout=60)
    return killed, proc.returncode, "".join(lines), stderr_path.read_text()


@pytest.mark.parametrize("reference", KILLED_VARIANTS, indirect=True)
def test_resume_after_sigkill_is_exact(reference):
    cwd, script, extra = reference["cwd"], reference["script"], reference["extra"]
    args = (*extra, *FLAGS, "--out-dir", "B")
    killed, rc, out, err = _start_and_kill_in_epoch_2(script, args, cwd)
    assert killed, f"the run never reached epoch 2 (rc {rc})\n{out[-3000:]}\n{err[-3000:]}"
    assert rc == -signal.SIGKILL
    b = cwd / "B"
    interrupted = _load(b / "last.pt")
    assert interrupted["epoch"] == 1, "the kill landed after epoch 2 was saved; the run is too fast to interrupt"
    assert json.loads((b / "results.json").read_text())["epochs_done"] == 1

    proc = run_script(script, *args, "--resume", b / "last.pt", cwd=cwd)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, _diagnostics(proc)
    assert_same_final_state(reference["dir"], b)


@pytest.mark.parametrize("reference", ["resnet56-dep"], indirect=True)
def test_resume_after_sigterm_is_exact(reference):
    """SIGTERM (a scheduler's preemption) during epoch 2: the run saves and exits with 75
    (the engine's EXIT_PREEMPTED), and ``--resume auto`` ends exactly where A ends."""
    cwd, script, extra = reference["cwd"], reference["script"], reference["extra"]
    args = (*extra, *FLAGS, "--out-dir", "D")
    proc = subprocess.Popen(script_command(script, *args), cwd=cwd, env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, signalled = [], False
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Epoch [2][") and not signalled:
            os.kill(proc.pid, signal.SIGTERM)
            signalled = True
    proc.stdout.close()
    rc = proc.wait(timeout=300)
    out = "".join(lines)
    assert signalled and rc == 75, f"rc {rc}\n{out[-4000:]}"
    assert "Traceback" not in out
    stopped = _load(cwd / "D" / "last.pt")
    # Stopped inside epoch 2 (after its first step) or, if the signal came late, at its end.
    assert (stopped["epoch"], stopped["step"]) in {(1, 1), (2, 0)}, (stopped["epoch"], stopped["step"])

    proc = run_script(script, *args, "--resume", "auto", cwd=cwd)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, _diagnostics(proc)
    assert_same_final_state(reference["dir"], cwd / "D")


def test_no_temporary_files_left(reference):
    names = sorted(p.name for p in reference["dir"].iterdir())
    assert not [n for n in names if n.startswith(".")], names
    assert {"last.pt", "best.pt", "results.json", "epoch_1.pt", "epoch_2.pt", "epoch_3.pt"} <= set(names), names


def _assert_plain(value, where):
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str), where
            _assert_plain(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _assert_plain(v, f"{where}[{i}]")
    else:
        assert value is None or type(value) in (str, int, float, bool), f"{where}: {type(value)}"


def test_checkpoint_is_plain_and_loads_with_weights_only(reference):
    for name in ("last.pt", "best.pt", "epoch_1.pt"):
        state = _load(reference["dir"] / name)  # raises if anything but tensors and plain values is inside
        assert CHECKPOINT_KEYS <= set(state), CHECKPOINT_KEYS - set(state)
    last = _load(reference["dir"] / "last.pt")
    assert last["epoch"] == 3
    assert type(last["args"]) is dict and type(last["arch"]) is dict
    _assert_plain(last["args"], "args")
    _assert_plain(last["arch"], "arch")
    assert last["args"]["seed"] == 3
    assert last["arch"]["net"] == (reference["extra"][1] if reference["extra"] else "dep")
    assert all(isinstance(v, torch.Tensor) for v in last["model"].values())
    assert isinstance(last["weight_optimizer"], dict) and isinstance(last["gate_optimizer"], dict)


# ---------------------------------------------------------------- code on load


class _RunsCode:
    """Unpickling this calls os.system(command)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_checkpoint_that_runs_code_is_refused(writer, tmp_path):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pt"
    payload = {"format": "dep-l0-checkpoint/1", "model": _RunsCode(f"touch {marker}")}
    if writer == "torch.save":
        torch.save(payload, evil)
    else:
        with open(evil, "wb") as f:
            pickle.dump(payload, f)
    proc = run_script("train_resnet56.py", "--resume", evil, "--dummy", "-j", "0", "--epoch", "1", "-b", "2",
                      "--limit-batches", "1", cwd=tmp_path)
    time.sleep(0.1)
    assert not marker.exists(), "loading the checkpoint ran its code"
    assert proc.returncode == 2, _diagnostics(proc)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_resnet56.py: error: "), _diagnostics(proc)
    assert "evil.pt" in lines[0]
