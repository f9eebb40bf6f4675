"""Faults, done for real on the CPU: docs/faults.md.

Every fault is caused, not simulated, wherever that is possible: the training
script runs in a subprocess and gets a real signal (to its pid, and to its
process group as Ctrl-C and SLURM send it), a real ``kill -9``, a checkpoint
file really truncated or overwritten, a real full disk (a small tmpfs, where
this machine lets us mount one), an absurd learning rate, broken image files,
a file holding pickled code. Where a fault cannot be caused from outside
(a write failing at one chosen save, a NaN at one chosen step) the engine runs
in this process, ``engine.cli.main(RECIPE, argv)`` exactly as the script
calls it, with that one function patched.

After an interruption, ``--resume auto`` must end bit for bit where an
uninterrupted run with the same flags and seed ends: model, optimiser and
scheduler states in ``last.pt`` and every number of ``results.json``.

Runs are tiny (ResNet56 at width 1/8, 8 batches of 8 per epoch, 3 epochs) and
single-threaded (``OMP_NUM_THREADS=1``); most of their time is Python start-up
(about 4 s of CPU each). So that the file takes about a minute and a half, the
subprocess runs are *jobs* of a module-wide :class:`Campaign`: the selected
tests' jobs start together, three at a time, and each test waits only for the
jobs it checks. In-process tests run meanwhile.
"""
import errno
import importlib.util
import io
import json
import math
import os
import queue
import random
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_equal_states, REPO_ROOT, script_command, script_env

TRAIN = "train_resnet56.py"
STEPS = 8  # training batches per epoch (--limit-batches), also the validation batches
COMMON = ("-b", "8", "--width-mult", "0.125", "-p", "1")
DUMMY_BASE = ("--dummy", "-j", "0", *COMMON, "--limit-batches", str(STEPS), "--seed", "7")
DUMMY = (*DUMMY_BASE, "--epoch", "3")
TIMEOUT = 300  # seconds for any one run; a tiny run takes a few, more on a loaded machine
HANG = 20  # seconds a run on the full disk may take after its last save; it needs about 2
PARALLEL_JOBS = 3
VOLATILE_RESULTS = {"wall_time_s", "git_commit"}  # describe the process (and HEAD) that wrote the file
RUN_LOCAL_ARGS = {"resume", "out_dir", "workers"}
CHECKPOINT_FORMAT, PRUNED_FORMAT = "dep-l0-checkpoint/1", "dep-l0-pruned/1"


def _env():
    env = script_env()
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"
    return env


# ------------------------------------------------------------------ running the scripts


@dataclass
class Result:
    rc: int | str | None
    stdout: str
    stderr: str

    @property
    def diag(self) -> str:
        return f"rc {self.rc}\n--- stdout ---\n{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-5000:]}"

    def progress(self) -> list[str]:
        return [line for line in self.stdout.splitlines() if line.startswith("Epoch [")]


class Background:
    """A script running in its own process group; its stdout is read line by line as it comes."""

    live: set = set()  # every Background not yet reaped, for the campaign's teardown
    closed = False  # set by the campaign's teardown: no new runs
    _count = 0
    _lock = threading.Lock()

    def __init__(self, script, args, cwd):
        with Background._lock:
            if Background.closed:
                raise RuntimeError("the test module is being torn down")
            Background._count += 1
            n = Background._count
        self.stderr_path = Path(cwd) / f"{Path(script).stem}-{n}.stderr"
        self._stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(script_command(script, *map(str, args)), cwd=cwd, env=_env(),
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                     start_new_session=True)
        Background.live.add(self)
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def result(self) -> Result:
        return Result(self.proc.returncode, "".join(self.lines), self.stderr_path.read_text())

    def kill(self):
        """SIGKILL the whole process group (the script and its DataLoader workers) and reap it."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=60)
        Background.live.discard(self)

    def wait_for(self, prefix: str, timeout: float = TIMEOUT) -> str:
        """Block until a stdout line starts with ``prefix``; fail if the run ends or stalls first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                self.kill()
                raise AssertionError(f"no line starting {prefix!r} within {timeout} s\n{self.result().diag}") from None
            if line is None:
                self.proc.wait(timeout=60)
                raise AssertionError(f"the run ended before printing {prefix!r}\n{self.result().diag}")
            if line.startswith(prefix):
                return line

    def finish(self, timeout: float = TIMEOUT, what: str = "the run") -> Result:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self._reader.join(timeout=10)
            raise AssertionError(f"{what} did not end within {timeout} s (killed)\n{self.result().diag}") from None
        self._reader.join(timeout=60)
        self._stderr.close()
        Background.live.discard(self)
        return self.result()


def run(script, *args, cwd, timeout=TIMEOUT) -> Result:
    return Background(script, args, cwd).finish(timeout)


# ------------------------------------------------------------------ the jobs


def _write_image_tree(root: Path, classes=("ant", "bee", "cat", "dog"), train=16, val=3, seed=0) -> Path:
    """train/<class>/*.png and val/<class>/*.png: 40x40 RGB noise, so resize, crop and flip all matter."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def folder_args(tree, workers):
    # 64 training images: 8 batches of 8 per epoch, as the dummy runs.
    return ("--dataset", "folder", "--data-dir", str(tree), "-j", str(workers), *COMMON, "--epoch", "3",
            "--seed", "11")


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _temporary_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp" in p.name or p.name.startswith(".write-test"))


def job_run(cwd, campaign, args):
    out = cwd / "run"
    return dict(out=out, res=run(TRAIN, *args, "--out-dir", out, cwd=cwd))


def job_interrupt(cwd, campaign, args, how, group=False, resume=True):
    """Start a run, send it ``how`` on its first progress line of epoch 2, look at what it left,
    then (if it left a checkpoint) continue it with --resume auto."""
    out = cwd / "run"
    bg = Background(TRAIN, [*args, "--out-dir", out], cwd)
    bg.wait_for("Epoch [2][")
    (os.killpg if group else os.kill)(bg.proc.pid, getattr(signal, how))
    job = dict(out=out, stopped=bg.finish(), resumed=None, state=None, results=None)
    job["temporary"] = _temporary_files(out)
    if (out / "last.pt").exists():
        job["state"] = _load(out / "last.pt")
        job["results"] = json.loads((out / "results.json").read_text())
        if resume:
            job["resumed"] = run(TRAIN, *args, "--resume", "auto", "--out-dir", out, cwd=cwd)
    return job


def _damage(path: Path, how: str):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "corrupt-middle":  # 64 bytes flipped in the middle of the file: tensor data of the zip archive
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + data[middle + 64:])
    elif how == "random-bytes":
        path.write_bytes(random.Random(0).randbytes(len(data)))
    else:
        raise ValueError(how)


def job_fallback(cwd, campaign, how):
    """The finished reference run with a damaged last.pt, continued with --resume auto."""
    out = cwd / "run"
    shutil.copytree(campaign.reference("dummy/reference"), out)  # copies: best.pt is no longer a link to last.pt
    _damage(out / "last.pt", how)
    return dict(out=out, res=run(TRAIN, *DUMMY, "--resume", "auto", "--out-dir", out, cwd=cwd))


def _fill(disk: Path):
    with open(disk / "filler", "wb", buffering=0) as f:  # unbuffered: closing it has nothing left to write
        try:
            while True:
                f.write(b"\0" * (1 << 16))
        except OSError as e:
            assert e.errno == errno.ENOSPC, e


def job_full_disk(cwd, campaign):
    """A run on a 16 MiB tmpfs that is filled up while epoch 2 trains. Needs root and a kernel
    that allows the mount; returns ``skip`` otherwise."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or not shutil.which("mount"):
        return dict(skip="mounting a tmpfs needs root on Linux")
    disk = cwd / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode:
        return dict(skip=f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    bg = None
    try:
        out = disk / "run"
        bg = Background(TRAIN, [*DUMMY_BASE, "--epoch", "2", "--out-dir", out], cwd)
        bg.wait_for("Epoch [2][")
        job = dict(out=out, good=(out / "last.pt").read_bytes(), hung=None)
        _fill(disk)
        try:
            job["res"] = bg.finish(timeout=HANG, what="the run on the full disk")
        except AssertionError as e:
            job["hung"], job["res"] = str(e), bg.result()
        job["last"] = (out / "last.pt").read_bytes()  # the tmpfs goes away below
        job["temporary"] = _temporary_files(out)
        return job
    finally:
        if bg is not None:
            bg.kill()
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def job_undecodable_image(cwd, campaign, workers):
    root, bad = _tree_with_undecodable_image(cwd / "data")
    out = cwd / "run"
    bg = Background(TRAIN, ["--dataset", "folder", "--data-dir", root, "-j", workers, "-b", "8", "--width-mult",
                            "0.125", "--epoch", "1", "--out-dir", out], cwd)
    try:  # it stops within a few seconds; a process still there after 30 s is stuck on its workers
        res, hung = bg.finish(timeout=30, what="the run with an undecodable image"), None
    except AssertionError as e:
        res, hung = bg.result(), str(e)
    return dict(res=res, bad=bad, out=out, hung=hung)


class _RunsCode:
    """Unpickling this calls os.system(command)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _evil_file(path: Path, marker: Path, fmt: str) -> Path:
    torch.save({"format": fmt, "model": _RunsCode(f"touch {shlex.quote(str(marker))}")}, path)
    return path


def job_evil(cwd, campaign, script, *args):
    marker = cwd / "MARKER"
    evil = _evil_file(cwd / "best.pt", marker, CHECKPOINT_FORMAT)
    res = run(script, evil, *args, cwd=cwd)
    return dict(res=res, evil=evil, marker=marker)


class Campaign:
    """The subprocess runs of this module, started together (a few at a time) so they overlap.

    Jobs are listed in the order the tests read them; a test declares the ones it reads with
    :func:`uses_jobs`, and only the jobs of selected tests are started.
    """

    def __init__(self, root: Path):
        self.root = root
        tree = _write_image_tree(root / "images")
        self.specs = {
            "dummy/reference": (job_run, DUMMY),
            "dummy/SIGTERM": (job_interrupt, DUMMY, "SIGTERM"),
            "disk-full": (job_full_disk,),  # mostly waits: started early
            # Resuming is the same whichever signal stopped the run: checked once, after SIGTERM.
            "dummy/SIGUSR1": (job_interrupt, DUMMY, "SIGUSR1", False, False),
            "dummy/SIGINT": (job_interrupt, DUMMY, "SIGINT", False, False),
            "folder/reference": (job_run, folder_args(tree, 0)),
            "folder/j0": (job_interrupt, folder_args(tree, 0), "SIGTERM"),
            "folder/j2": (job_interrupt, folder_args(tree, 2), "SIGTERM"),
            "folder/group": (job_interrupt, folder_args(tree, 2), "SIGTERM", True, False),
            "dummy/SIGKILL": (job_interrupt, DUMMY, "SIGKILL", True),
            "fallback/truncated": (job_fallback, "truncated"),
            "fallback/corrupt-middle": (job_fallback, "corrupt-middle"),
            "diverge": (job_run, (*DUMMY_BASE, "--epoch", "2", "--lr", "1e30")),
            "bad-image/j2": (job_undecodable_image, 2),
            "evil/export": (job_evil, "export.py"),
            "evil/evaluate": (job_evil, "evaluate.py", "--dummy", "-j", "0"),
        }
        self.needs = {"fallback/truncated": ["dummy/reference"], "fallback/corrupt-middle": ["dummy/reference"]}
        self.futures = {}
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(PARALLEL_JOBS, thread_name_prefix="fault-job")

    def start(self, keys):
        wanted = set(keys)
        wanted |= {dep for key in keys for dep in self.needs.get(key, ())}
        with self.lock:
            for key, (fn, *args) in self.specs.items():  # dependencies come first in specs
                if key in wanted and key not in self.futures:
                    cwd = self.root / key.replace("/", "-")
                    cwd.mkdir()
                    self.futures[key] = self.pool.submit(fn, cwd, self, *args)

    def get(self, key) -> dict:
        self.start([key])
        return self.futures[key].result()

    def reference(self, key) -> Path:
        job = self.get(key)
        assert job["res"].rc == 0 and not job["res"].stderr.strip(), f"the reference run failed\n{job['res'].diag}"
        return job["out"]

    def close(self):
        Background.closed = True
        self.pool.shutdown(wait=False, cancel_futures=True)
        for bg in list(Background.live):
            bg.kill()
        self.pool.shutdown(wait=True)
        Background.closed = False


def uses_jobs(*keys):
    """The campaign jobs a test reads; ``{name}`` is filled in from the test's parameters."""
    def mark(fn):
        fn.campaign_jobs = keys
        return fn
    return mark


@pytest.fixture(scope="module")
def campaign(request, tmp_path_factory):
    c = Campaign(tmp_path_factory.mktemp("faults"))
    keys = []
    for item in request.session.items:
        if getattr(item, "module", None) is request.module and hasattr(item.function, "campaign_jobs"):
            params = item.callspec.params if hasattr(item, "callspec") else {}
            keys += [key.format(**params) for key in item.function.campaign_jobs]
    c.start(keys)
    yield c
    c.close()


# ------------------------------------------------------------------ running the engine in this process


def _load_script(name):
    spec = importlib.util.spec_from_file_location(f"_{Path(name).stem}_for_fault_tests", REPO_ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def train_here(capsys, monkeypatch, tmp_path):
    """``train(*argv)`` runs ``engine.cli.main(RECIPE, argv)`` here (cwd: tmp_path, one thread)
    and returns its exit status and output."""
    from engine import cli

    recipe = _load_script(TRAIN).RECIPE
    monkeypatch.setattr(sys, "argv", [TRAIN])
    monkeypatch.chdir(tmp_path)

    def train(*argv):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        capsys.readouterr()
        code = "returned without sys.exit"
        try:
            cli.main(recipe, [str(a) for a in argv])
        except SystemExit as e:
            code = e.code
        finally:
            torch.set_num_threads(threads)
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return train


# ------------------------------------------------------------------ checks


def _without(d, keys):
    return {k: v for k, v in d.items() if k not in keys}


def assert_same_run(reference: Path, run_dir: Path, epochs=3):
    """``run_dir`` ended exactly where the uninterrupted ``reference`` ended."""
    a, b = _load(reference / "last.pt"), _load(run_dir / "last.pt")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (epochs, 0)
    for key in ("model", "weight_optimizer", "weight_scheduler", "method"):
        assert_equal_states(a[key], b[key], key)
    assert a["method"]["gate_optimizer"] is not None
    for key in ("best_top1", "gates_frozen", "arch"):
        assert a[key] == b[key], key
    assert_equal_states(_without(a["args"], RUN_LOCAL_ARGS), _without(b["args"], RUN_LOCAL_ARGS), "args")
    ra = json.loads((reference / "results.json").read_text())
    rb = json.loads((run_dir / "results.json").read_text())
    assert ra["epochs_done"] == epochs
    assert _without(ra, VOLATILE_RESULTS) == _without(rb, VOLATILE_RESULTS)


def assert_one_line_error(res: Result, code: int, *needles) -> str:
    assert res.rc == code, res.diag
    assert "Traceback" not in res.stderr, res.diag
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.diag
    for needle in needles:
        assert str(needle) in lines[0], (needle, res.diag)
    return lines[0]


def assert_all_finite(state, where="checkpoint"):
    if isinstance(state, torch.Tensor):
        if state.is_floating_point():
            assert torch.isfinite(state).all(), f"{where} holds non-finite values"
    elif isinstance(state, dict):
        for k, v in state.items():
            assert_all_finite(v, f"{where}.{k}")
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            assert_all_finite(v, f"{where}[{i}]")
    elif isinstance(state, float):
        assert math.isfinite(state), where


def assert_stopped_mid_epoch_2(job: dict, how: str) -> dict:
    """Exit 75, one line saying where it saved, last.pt at epoch 1 (done) plus a few steps of epoch 2."""
    res, out = job["stopped"], job["out"]
    assert res.rc == 75, res.diag  # EXIT_PREEMPTED
    assert not res.stderr.strip(), res.diag
    said = [line for line in res.stdout.splitlines() if "saved" in line]
    assert len(said) == 1, res.diag
    assert str(out / "last.pt") in said[0] and "--resume auto" in said[0], said
    assert f"signal {int(getattr(signal, how))}" in said[0], said
    state = job["state"]
    assert state["epoch"] == 1 and 0 < state["step"] < STEPS, (state["epoch"], state["step"])
    assert f"at epoch 2 step {state['step']};" in said[0], said
    assert len(state["rank_states"]) == 1  # the RNG state inside the epoch
    assert not job["temporary"], job["temporary"]
    return state


def assert_resumed_exactly(job: dict, reference: Path, first_line: str):
    res, out = job["resumed"], job["out"]
    assert res.rc == 0 and not res.stderr.strip(), res.diag
    progress = res.progress()
    assert progress and progress[0].startswith(first_line), progress[:2]
    assert_same_run(reference, out)
    assert not _temporary_files(out)


# ================================================================== 1-3: preemption and kill -9


@uses_jobs("dummy/reference", "dummy/SIGTERM")
def test_sigterm_mid_epoch_saves_exits_75_and_resumes_exactly(campaign):
    job = campaign.get("dummy/SIGTERM")
    state = assert_stopped_mid_epoch_2(job, "SIGTERM")
    assert_resumed_exactly(job, campaign.reference("dummy/reference"), f"Epoch [2][{state['step'] + 1}/")


@uses_jobs("dummy/{how}")
@pytest.mark.parametrize("how", ["SIGUSR1", "SIGINT"])
def test_sigusr1_and_sigint_mid_epoch_save_and_exit_75(how, campaign):
    assert_stopped_mid_epoch_2(campaign.get(f"dummy/{how}"), how)


@uses_jobs("folder/reference", "folder/{workers}")
@pytest.mark.parametrize("workers", ["j0", "j2"])
def test_signal_on_augmented_folder_data_resumes_exactly(workers, campaign):
    """Random crops and flips of real (PIL) images: the resumed epoch draws exactly the
    uninterrupted run's augmentations, also with two loader workers (the reference has none)."""
    job = campaign.get(f"folder/{workers}")
    state = assert_stopped_mid_epoch_2(job, "SIGTERM")
    assert_resumed_exactly(job, campaign.reference("folder/reference"), f"Epoch [2][{state['step'] + 1}/")


@uses_jobs("folder/group")
def test_sigterm_to_process_group_with_loader_workers(campaign):
    """SLURM's preemption signals every process of the job, Ctrl-C the terminal's whole process
    group: the DataLoader workers get the signal too, and the run must still save and exit 75."""
    assert_stopped_mid_epoch_2(campaign.get("folder/group"), "SIGTERM")


@uses_jobs("dummy/reference", "dummy/SIGKILL")
def test_kill_9_resumes_from_last_completed_epoch(campaign):
    job = campaign.get("dummy/SIGKILL")
    assert job["stopped"].rc == -signal.SIGKILL, job["stopped"].diag
    assert (job["state"]["epoch"], job["state"]["step"]) == (1, 0), "kill -9 loses at most the epoch in progress"
    assert job["results"]["epochs_done"] == 1
    # Epoch 2 is trained again from its first batch.
    assert_resumed_exactly(job, campaign.reference("dummy/reference"), "Epoch [2][1/")


# ================================================================== 4: damaged checkpoints


@uses_jobs("dummy/reference")
@pytest.mark.parametrize("how", ["truncated", "corrupt-middle", "random-bytes"])
def test_damaged_checkpoint_given_to_resume_is_one_line(how, tmp_path, campaign, train_here):
    out = shutil.copytree(campaign.reference("dummy/reference"), tmp_path / "run")
    _damage(out / "last.pt", how)
    res = train_here(*DUMMY, "--resume", out / "last.pt", "--out-dir", out)
    assert res.rc != 0, f"the {how} last.pt was loaded as if it were intact\n{res.diag}"
    assert_one_line_error(res, 2, out / "last.pt")


@uses_jobs("fallback/{how}")
@pytest.mark.parametrize("how", ["truncated", "corrupt-middle"])
def test_resume_auto_falls_back_to_previous_checkpoint(how, campaign):
    """last.pt (epoch 3) damaged: --resume auto warns in one line, takes last.prev.pt (epoch 2),
    trains epoch 3 again and ends exactly where the reference ends."""
    job = campaign.get(f"fallback/{how}")
    res, out = job["res"], job["out"]
    assert res.rc == 0, res.diag
    warnings = [line for line in res.stderr.splitlines() if line.strip()]
    assert warnings, f"the {how} last.pt was loaded as if it were intact (no warning, no fallback)\n{res.diag}"
    assert len(warnings) == 1 and warnings[0].startswith("warning:") and str(out / "last.pt") in warnings[0], res.diag
    progress = res.progress()
    assert progress and progress[0].startswith("Epoch [3][1/"), res.diag
    assert_same_run(campaign.reference("dummy/reference"), out)
    assert not _temporary_files(out)


# ================================================================== 5: failed writes


def test_disk_full_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch, train_here):
    """The second checkpoint write runs out of space half-way (torch.save writes half, then ENOSPC)."""
    out = tmp_path / "run"
    real_save, calls, before = torch.save, [], {}

    def save(obj, f, *args, **kwargs):
        # Background jobs of this module save files too: only this run's writes count.
        if not str(getattr(f, "name", f)).startswith(str(out)):
            return real_save(obj, f, *args, **kwargs)
        calls.append(f)
        if len(calls) != 2:
            return real_save(obj, f, *args, **kwargs)
        before["last.pt"] = (out / "last.pt").read_bytes()
        before["results.json"] = (out / "results.json").read_bytes()
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save)
    res = train_here("--dummy", "-j", "0", *COMMON, "--limit-batches", "2", "--epoch", "3", "--seed", "1",
                     "--out-dir", out)
    assert len(calls) == 2, res.diag
    assert_one_line_error(res, 2, out / "last.pt", os.strerror(errno.ENOSPC))
    assert (out / "last.pt").read_bytes() == before["last.pt"], "the previous last.pt was changed"
    assert (out / "results.json").read_bytes() == before["results.json"]
    assert _load(out / "last.pt")["epoch"] == 1
    assert not _temporary_files(out)


@uses_jobs("disk-full")
def test_disk_fills_up_during_training(campaign):
    """A real full disk (tmpfs), filled while epoch 2 trains: the run must stop with one line and
    status 2, not hang, keep last.pt of epoch 1 and leave no temporary files."""
    job = campaign.get("disk-full")
    if "skip" in job:
        pytest.skip(job["skip"])
    assert job["hung"] is None, f"the run hung once the disk was full\n{job['hung']}"
    assert_one_line_error(job["res"], 2, os.strerror(errno.ENOSPC))
    assert job["last"] == job["good"], "last.pt of epoch 1 was changed"
    assert not job["temporary"], job["temporary"]


# ================================================================== 6: divergence


@uses_jobs("diverge")
def test_absurd_learning_rate_stops_with_status_3(campaign):
    job = campaign.get("diverge")
    line = assert_one_line_error(job["res"], 3, "non-finite", "at epoch 1 step ", "no checkpoint was saved yet")
    step = int(line.split("at epoch 1 step ")[1].split(";")[0])
    assert 1 <= step <= 3, line  # lr 1e30: the first update blows the weights up
    for path in job["out"].glob("*.pt"):
        assert_all_finite(_load(path), path.name)


def test_nan_loss_at_a_chosen_step_is_reported_there(tmp_path, monkeypatch, train_here):
    """The loss of epoch 2, step 3 is NaN, with progress (and the finiteness check) only every 4
    steps: the message still names step 3 and last.pt as the last good checkpoint, and last.pt
    (epoch 1) is not overwritten with the NaN weights."""
    import torch.nn.functional as F

    out, steps_per_epoch, bad = tmp_path / "run", 4, (2, 3)
    real_ce, train_calls = F.cross_entropy, []

    def cross_entropy(input, target, *args, **kwargs):
        loss = real_ce(input, target, *args, **kwargs)
        if "reduction" in kwargs:  # evaluation sums; training takes the mean
            return loss
        train_calls.append(1)
        if len(train_calls) == (bad[0] - 1) * steps_per_epoch + bad[1]:
            loss = loss * float("nan")
        return loss

    monkeypatch.setattr(F, "cross_entropy", cross_entropy)
    res = train_here("--dummy", "-j", "0", "-b", "8", "--width-mult", "0.125", "-p", "4", "--limit-batches",
                     steps_per_epoch, "--epoch", "3", "--seed", "1", "--out-dir", out)
    line = assert_one_line_error(res, 3, f"non-finite loss at epoch {bad[0]} step {bad[1]};",
                                 f"the last good checkpoint is {out / 'last.pt'}")
    assert "--max-grad-norm" in line
    state = _load(out / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 0)
    for path in out.glob("*.pt"):
        assert_all_finite(_load(path), path.name)


def test_max_grad_norm_clips_every_step(tmp_path, monkeypatch, train_here):
    real_clip, norms = torch.nn.utils.clip_grad_norm_, []

    def clip(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        total = real_clip(parameters, max_norm, *args, **kwargs)
        norms.append((max_norm, float(total)))
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))
        assert after <= max_norm * (1 + 1e-4)
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    out = tmp_path / "run"
    res = train_here("--dummy", "-j", "0", *COMMON, "--limit-batches", "3", "--epoch", "2", "--seed", "1",
                     "--max-grad-norm", "1.0", "--out-dir", out)
    assert res.rc == 0 and not res.stderr.strip(), res.diag
    assert len(norms) == 6 and all(m == 1.0 for m, _ in norms), norms
    assert any(total > 1.0 for _, total in norms), "clipping never did anything: the test tests nothing"
    assert_all_finite(_load(out / "last.pt"))


# ================================================================== 7: user mistakes


BAD_FLAGS = {
    "unknown-net": ["--net", "foo"],
    "negative-lambda": ["--lamba", "-1"],
    "text-lambda": ["--lamba", "abc"],
    "negative-lr": ["--lr", "-0.1"],
    "text-lr": ["--lr", "abc"],
    "nan-lr": ["--lr", "nan"],
    "negative-batch": ["-b", "-8"],
    "zero-batch": ["-b", "0"],
    "text-batch": ["-b", "eight"],
    "limit-batches-0": ["--limit-batches", "0"],
    "back-dep-without-dep": ["--net", "hc", "--back_dep"],
}


@pytest.mark.parametrize("flags", list(BAD_FLAGS.values()), ids=list(BAD_FLAGS))
def test_bad_flag_is_one_line(flags, tmp_path, train_here):
    res = train_here("--dummy", "-j", "0", "--epoch", "1", "--out-dir", tmp_path / "run", *flags)
    assert_one_line_error(res, 2, "error:", flags[0])
    assert not (tmp_path / "run").exists()


def _tree_without_images(root):
    for split in ("train", "val"):
        (root / split / "ant").mkdir(parents=True)
        (root / split / "ant" / "notes.txt").write_text("not an image\n")
    return root, root / "train"


def _tree_with_differing_classes(root):
    _write_image_tree(root / "a", ("ant", "bee"), train=1, val=1)
    _write_image_tree(root / "b", ("ant", "cat"), train=1, val=1)
    (root / "a" / "train").rename(root / "train")
    (root / "b" / "val").rename(root / "val")
    return root, "bee"


def _tree_with_undecodable_image(root):
    _write_image_tree(root, ("ant", "bee"), train=4, val=1)
    bad = root / "train" / "bee" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not image data" * 10)
    return root, bad


BAD_TREES = {  # each makes the tree and returns (root, what the error line must name)
    "no-images": _tree_without_images,
    "train-val-classes-differ": _tree_with_differing_classes,
    "undecodable-image": _tree_with_undecodable_image,
}


@pytest.mark.parametrize("case", list(BAD_TREES))
def test_bad_image_folder_is_one_line(case, tmp_path, train_here):
    root, named = BAD_TREES[case](tmp_path / "data")
    res = train_here("--dataset", "folder", "--data-dir", root, "-j", "0", "-b", "8", "--width-mult", "0.125",
                     "--epoch", "1", "--out-dir", tmp_path / "run")
    assert_one_line_error(res, 2, named)
    assert not (tmp_path / "run" / "last.pt").exists()


@uses_jobs("bad-image/j2")
def test_undecodable_image_in_a_loader_worker_is_one_line(campaign):
    """The decode error happens in a worker process and is re-raised with the worker's traceback
    in its text: the script still prints one line naming the file. (A subprocess: workers forked
    from this multi-threaded test process would not be a fair test.)"""
    job = campaign.get("bad-image/j2")
    assert job["hung"] is None, f"the run printed its error but did not exit\n{job['hung']}"
    assert_one_line_error(job["res"], 2, job["bad"])
    assert not (job["out"] / "last.pt").exists()


def test_out_dir_holding_another_run_is_refused(tmp_path, train_here):
    other = tmp_path / "other"
    other.mkdir()
    (other / "last.pt").write_bytes(b"someone else's run")
    res = train_here("--dummy", "-j", "0", "--epoch", "1", "--out-dir", other)
    assert_one_line_error(res, 2, other, "--resume")
    assert (other / "last.pt").read_bytes() == b"someone else's run"


@pytest.mark.parametrize("where", ["under-a-file", "is-a-file"])
def test_out_dir_that_cannot_be_a_directory(where, tmp_path, train_here):
    file = tmp_path / "file"
    file.write_text("x")
    out = file / "run" if where == "under-a-file" else file
    res = train_here("--dummy", "-j", "0", "--epoch", "1", "--out-dir", out)
    assert_one_line_error(res, 2, out)
    assert file.read_text() == "x"


# ================================================================== 8: files holding pickled code


def test_pickled_code_given_to_resume_is_refused(tmp_path, train_here):
    marker = tmp_path / "MARKER"
    evil = _evil_file(tmp_path / "last.pt", marker, CHECKPOINT_FORMAT)
    res = train_here("--dummy", "-j", "0", "--epoch", "1", "--resume", evil, "--out-dir", tmp_path / "run")
    assert not marker.exists(), "loading the checkpoint ran its code"
    assert_one_line_error(res, 2, evil, "refusing")


@uses_jobs("evil/{script}")
@pytest.mark.parametrize("script", ["export", "evaluate"])
def test_pickled_code_given_to_export_and_evaluate_is_refused(script, campaign):
    job = campaign.get(f"evil/{script}")
    assert not job["marker"].exists(), "loading the file ran its code"
    assert_one_line_error(job["res"], 2, job["evil"], "refusing")


def test_pickled_code_as_pruned_model_is_refused(tmp_path, capsys):
    """evaluate.py on a pruned.pt, and models.load_pruned, in this process."""
    from models import load_pruned
    from utils.errors import UsageError

    marker = tmp_path / "MARKER"
    evil = _evil_file(tmp_path / "pruned.pt", marker, PRUNED_FORMAT)
    assert _load_script("evaluate.py").main([str(evil), "--dummy", "-j", "0"]) == 2
    assert_one_line_error(Result(2, *capsys.readouterr()), 2, evil, "refusing")
    with pytest.raises(UsageError, match="refusing"):
        load_pruned(evil)
    assert not marker.exists(), "loading the file ran its code"


@pytest.mark.parametrize("where", ["local header", "central directory"])
def test_checkpoint_with_a_damaged_member_name_is_one_line(where, tmp_path):
    """A flipped byte in a member name of the zip (no longer UTF-8) is damage, not a traceback."""
    from utils.checkpoint import FORMAT, load_checkpoint
    from utils.errors import UsageError

    path = tmp_path / "last.pt"
    torch.save({"format": FORMAT, "weights": torch.zeros(4)}, path)
    data = bytearray(path.read_bytes())
    find = data.find if where == "local header" else data.rfind
    at = find(b"data.pkl")
    assert at > 0
    data[at] = 0x9E
    path.write_bytes(bytes(data))
    with pytest.raises(UsageError, match=r"last\.pt is (not a readable checkpoint|corrupt)") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)
