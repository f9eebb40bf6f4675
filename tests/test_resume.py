"""End-to-end tests of checkpoints and resuming, on the CPU, through the real scripts.

A run resumed from a checkpoint must end bit for bit where the uninterrupted
run ends: same weights, optimiser and scheduler states, same results. Each
variant trains a reference run A (3 tiny epochs of 2 batches of 4, keeping epoch_1.pt), then

* C: A's epoch_1.pt copied into a fresh directory as last.pt and resumed;
* B (ResNet56 and VGG16): the same command started from scratch and killed
  with SIGKILL during epoch 2 (on its first progress line of epoch 2, so its
  last.pt is the one of epoch 1), then resumed with --resume B/last.pt;
* D (ResNet56): stopped with SIGTERM during epoch 2 (the engine saves the
  position inside the epoch and exits with 75), then resumed with
  --resume auto --out-dir D.

Every run uses one intra-op thread (conftest.script_env), so the bit-exact
comparison does not depend on how many threads the machine's load leaves.
All runs start from one module fixture, two at a time.

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
from pathlib import Path

import pytest
import torch

from conftest import assert_equal_states, run_parallel, run_script, script_command, script_env

FLAGS = ("--dummy", "--seed", "3", "-b", "4", "--limit-batches", "2", "--epoch", "3", "-j", "0", "-p", "1")
VARIANTS = {
    "resnet56-dep": ("train_resnet56.py", ()),
    "vgg16-dep": ("train_vgg.py", ()),
    "resnet56-dep-back": ("train_resnet56.py", ("--net", "dep", "--back_dep")),
    "resnet56-hc": ("train_resnet56.py", ("--net", "hc")),
    # One penalty epoch ending in a budget projection, then two fine-tuning epochs on the
    # projected gates: epoch_1.pt holds them frozen, and resuming from it must keep them.
    "resnet56-budget": ("train_resnet56.py", ("--net", "hc", "--target-macs", "0.4", "--target-warmup", "1",
                                              "--epoch", "1", "--fine_tune_epoch", "2")),
    # The peers' networks (--arch) resume as exactly as the paper's.
    "resnet20a-dep": ("train_resnet56.py", ("--arch", "resnet20a", "--width-mult", "0.5")),
    "wrn-hc": ("train_resnet56.py", ("--arch", "wrn", "--layers", "10", "--widen-factor", "1", "--net", "hc")),
    "lenet-dep-back": ("train_vgg.py", ("--arch", "lenet300_100", "--net", "dep", "--back_dep")),
}
KILLED_VARIANTS = ("resnet56-dep", "vgg16-dep")
CHECKPOINT_KEYS = {"model", "weight_optimizer", "weight_scheduler", "method", "epoch", "best_top1", "args", "arch"}
# Arguments that legitimately differ between the runs compared here.
RUN_LOCAL_ARGS = {"resume", "out_dir", "save_epoch"}


def _diagnostics(proc):
    return f"rc {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-5000:]}"


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _without(d, keys):
    return {k: v for k, v in d.items() if k not in keys}


def assert_same_final_state(dir_a: Path, dir_b: Path):
    a, b = _load(dir_a / "last.pt"), _load(dir_b / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    for key in ("model", "weight_optimizer", "weight_scheduler", "method"):
        assert_equal_states(a[key], b[key], key)
    for key in ("best_top1", "gates_frozen", "arch"):
        assert a[key] == b[key], key
    assert_equal_states(_without(a["args"], RUN_LOCAL_ARGS), _without(b["args"], RUN_LOCAL_ARGS), "args")
    ra = json.loads((dir_a / "results.json").read_text())
    rb = json.loads((dir_b / "results.json").read_text())
    assert ra["epochs_done"] == rb["epochs_done"] == 3
    # wall_time_s and git_commit describe the process that wrote the file, not the training state.
    volatile = {"wall_time_s", "git_commit"}
    assert _without(ra, volatile) == _without(rb, volatile)
    assert _without(a["results"], volatile) == _without(ra, volatile)


def _reference_run(base, name):
    """Run A: three uninterrupted epochs, keeping epoch_1.pt."""
    script, extra = VARIANTS[name]
    cwd = base / name
    cwd.mkdir()
    proc = run_script(script, *FLAGS, *extra, "--save_epoch", "1", "--out-dir", "A", cwd=cwd)
    return dict(name=name, script=script, extra=extra, cwd=cwd, dir=cwd / "A", proc=proc)


def _assert_completed(proc):
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, _diagnostics(proc)


def _resume_from_copy(ref):
    """C: A's epoch_1.pt copied into a fresh directory as last.pt, then resumed."""
    _assert_completed(ref["proc"])
    cwd, c = ref["cwd"], ref["cwd"] / "C"
    c.mkdir()
    shutil.copyfile(ref["dir"] / "epoch_1.pt", c / "last.pt")
    copied_epoch = _load(c / "last.pt")["epoch"]
    proc = run_script(ref["script"], *FLAGS, *ref["extra"], "--out-dir", "C", "--resume", c / "last.pt", cwd=cwd)
    return dict(copied_epoch=copied_epoch, proc=proc, dir=c)


def _stream_until(script, args, cwd, signum, prefix="Epoch [2]["):
    """Start a run; send ``signum`` on its first stdout line starting with ``prefix``.
    Returns (signalled, returncode, stdout+stderr)."""
    proc = subprocess.Popen(script_command(script, *args), cwd=cwd, env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, signalled = [], False
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(prefix) and not signalled:
                os.kill(proc.pid, signum)
                signalled = True
                if signum == signal.SIGKILL:
                    break
    finally:
        if not signalled and proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        rc = proc.wait(timeout=300)
    return signalled, rc, "".join(lines)


def _kill_and_resume(ref):
    """B: the same command from scratch, SIGKILLed on its first progress line of epoch 2
    (epoch 1 is saved by then, epoch 2 is not), then resumed with --resume B/last.pt."""
    _assert_completed(ref["proc"])
    args = (*FLAGS, *ref["extra"], "--out-dir", "B")
    b = ref["cwd"] / "B"
    killed, rc, out = _stream_until(ref["script"], args, ref["cwd"], signal.SIGKILL)
    state = dict(killed=killed, rc=rc, out=out, dir=b)
    if not killed:
        return state
    state["saved_epoch"] = _load(b / "last.pt")["epoch"]
    state["results_epochs"] = json.loads((b / "results.json").read_text())["epochs_done"]
    state["proc"] = run_script(ref["script"], *args, "--resume", b / "last.pt", cwd=ref["cwd"])
    return state


def _term_and_resume(ref):
    """D: SIGTERM (a scheduler's preemption) during epoch 2, then --resume auto --out-dir D."""
    _assert_completed(ref["proc"])
    args = (*FLAGS, *ref["extra"], "--out-dir", "D")
    d = ref["cwd"] / "D"
    signalled, rc, out = _stream_until(ref["script"], args, ref["cwd"], signal.SIGTERM)
    state = dict(signalled=signalled, rc=rc, out=out, dir=d)
    if rc != 75:
        return state
    stopped = _load(d / "last.pt")
    state["position"] = (stopped["epoch"], stopped["step"])
    state["proc"] = run_script(ref["script"], *args, "--resume", "auto", cwd=ref["cwd"])
    return state


class _RunsCode:
    """Unpickling this calls os.system(command)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _evil_checkpoint(base, writer):
    """A checkpoint that would create MARKER if unpickled, given to --resume."""
    cwd = base / f"evil-{writer}"
    cwd.mkdir()
    marker, evil = cwd / "MARKER", cwd / "evil.pt"
    payload = {"format": "dep-l0-checkpoint/1", "model": _RunsCode(f"touch {marker}")}
    if writer == "torch.save":
        torch.save(payload, evil)
    else:
        with open(evil, "wb") as f:
            pickle.dump(payload, f)
    proc = run_script("train_resnet56.py", "--resume", evil, "--dummy", "-j", "0", "--epoch", "1", "-b", "2",
                      "--limit-batches", "1", cwd=cwd)
    return dict(proc=proc, marker=marker)


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory):
    """Every run of this file, two at a time: the A runs first, then everything that needs them."""
    base = tmp_path_factory.mktemp("resume")
    refs = run_parallel({name: (lambda name=name: _reference_run(base, name)) for name in VARIANTS})
    jobs = {}
    for name in KILLED_VARIANTS:
        jobs[f"B/{name}"] = lambda name=name: _kill_and_resume(refs[name].get())
    jobs["D/resnet56-dep"] = lambda: _term_and_resume(refs["resnet56-dep"].get())
    for name in VARIANTS:
        jobs[f"C/{name}"] = lambda name=name: _resume_from_copy(refs[name].get())
    for writer in ("torch.save", "pickle"):
        jobs[f"evil/{writer}"] = lambda writer=writer: _evil_checkpoint(base, writer)
    later = run_parallel(jobs)
    yield {**{f"A/{name}": outcome for name, outcome in refs.items()}, **later}
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=list(VARIANTS))
def reference(request, resume_runs):
    ref = resume_runs[f"A/{request.param}"].get()
    _assert_completed(ref["proc"])
    return ref


def test_resume_from_epoch_1_checkpoint_is_exact(reference, resume_runs):
    c = resume_runs[f"C/{reference['name']}"].get()
    assert c["copied_epoch"] == 1
    _assert_completed(c["proc"])
    # Only epochs 2 and 3 were trained.
    out = c["proc"].stdout
    assert "Epoch [1][" not in out and "Epoch [2][" in out and "Epoch [3][" in out
    assert_same_final_state(reference["dir"], c["dir"])


@pytest.mark.parametrize("reference", ["resnet56-budget"], indirect=True)
def test_projected_gates_survive_resume(reference, resume_runs):
    """The budget variant really was projected at the end of epoch 1, and the run resumed from
    that checkpoint fine-tuned the same projected gates (the final states are compared above)."""
    epoch_1 = _load(reference["dir"] / "epoch_1.pt")
    assert epoch_1["gates_frozen"] is True
    assert epoch_1["results"]["budget"]["projection"] is not None, epoch_1["results"]["budget"]
    c = resume_runs["C/resnet56-budget"].get()
    _assert_completed(c["proc"])
    assert torch.equal(_load(c["dir"] / "last.pt")["model"]["gates.frozen_gates"], epoch_1["model"]["gates.frozen_gates"])


@pytest.mark.parametrize("reference", KILLED_VARIANTS, indirect=True)
def test_resume_after_sigkill_is_exact(reference, resume_runs):
    b = resume_runs[f"B/{reference['name']}"].get()
    assert b["killed"], f"the run never reached epoch 2 (rc {b['rc']})\n{b['out'][-4000:]}"
    assert b["rc"] == -signal.SIGKILL
    assert b["saved_epoch"] == 1, "the kill landed after epoch 2 was saved"
    assert b["results_epochs"] == 1
    _assert_completed(b["proc"])
    assert_same_final_state(reference["dir"], b["dir"])


@pytest.mark.parametrize("reference", ["resnet56-dep"], indirect=True)
def test_resume_after_sigterm_is_exact(reference, resume_runs):
    """SIGTERM during epoch 2: the run saves and exits with 75 (the engine's
    EXIT_PREEMPTED), and ``--resume auto`` ends exactly where A ends."""
    d = resume_runs["D/resnet56-dep"].get()
    assert d["signalled"] and d["rc"] == 75, f"rc {d['rc']}\n{d['out'][-4000:]}"
    assert "Traceback" not in d["out"]
    # Stopped inside epoch 2 (after its first step) or, if the signal came late, at its end.
    assert d["position"] in {(1, 1), (2, 0)}, d["position"]
    _assert_completed(d["proc"])
    assert_same_final_state(reference["dir"], d["dir"])


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
    extra = list(reference["extra"])
    assert last["arch"]["net"] == (extra[extra.index("--net") + 1] if "--net" in extra else "dep")
    assert all(isinstance(v, torch.Tensor) for v in last["model"].values())
    assert isinstance(last["weight_optimizer"], dict) and isinstance(last["method"]["gate_optimizer"], dict)


# ---------------------------------------------------------------- code on load


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_checkpoint_that_runs_code_is_refused(writer, resume_runs):
    evil = resume_runs[f"evil/{writer}"].get()
    proc = evil["proc"]
    assert not evil["marker"].exists(), "loading the checkpoint ran its code"
    assert proc.returncode == 2, _diagnostics(proc)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_resnet56.py: error: "), _diagnostics(proc)
    assert "evil.pt" in lines[0]
