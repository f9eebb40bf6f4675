"""Run plumbing shared by every entry point: devices, threads, run directories, resume files, signals,
loaders.

Everything here is about *running* a training, not about what it trains:
which device a process uses and how many CPU threads, where a run writes and whether it may, which
checkpoint a resumed run continues from, how SIGTERM/SIGINT/SIGUSR1 become a
clean stop after the current step, and the DataLoader settings that keep a
GPU fed. ``engine/trainer.py`` is the loop that uses them.
"""
import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from . import distributed
from .checkpoint import load_checkpoint, previous_of
from .cli import usable_cpus
from .errors import UsageError


def select_device(gpu: int | None, ctx: distributed.Context) -> torch.device:
    if not torch.cuda.is_available():
        if gpu is not None:
            print(f"warning: --gpu {gpu} given but CUDA is not available; running on the CPU", file=sys.stderr)
        return torch.device("cpu")
    if ctx.distributed:
        return torch.device("cuda", ctx.local_rank)  # torchrun decides the device of each rank
    if gpu is None:
        return torch.device("cuda")
    if gpu >= torch.cuda.device_count():
        raise UsageError(f"--gpu {gpu}: only {torch.cuda.device_count()} CUDA device(s) present")
    torch.cuda.set_device(gpu)
    return torch.device("cuda", gpu)


def limit_threads() -> int:
    """Torch's intra-op threads: its default (or what OMP_NUM_THREADS or an earlier
    ``torch.set_num_threads`` chose), but never more than the CPUs this process may use: threads
    beyond them, on a machine whose cpuset is smaller than its cores, only wait for one another.
    Returns the count."""
    threads = min(torch.get_num_threads(), usable_cpus())
    if threads < torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads


def fresh_out_dir(base: Path) -> Path:
    path, n = base, 1
    while path.exists():  # never write into another run's directory
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def unfinished_run(base: Path) -> Path | None:
    """The newest of ``base``, ``base-2``, ... that holds a run stopped before its end (a checkpoint,
    and no results.json whose ``epochs_done`` reached ``epochs_total``), or None."""
    found, path, n = None, base, 1
    while path.exists():
        started = (path / "last.pt").exists() or (path / "regularize" / "last.pt").exists()
        try:
            results = json.loads((path / "results.json").read_text())
            done = results["epochs_done"] >= results["epochs_total"]
        except (OSError, ValueError, KeyError, TypeError):
            done = False
        if started and not done:
            found = path
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return found


def new_run_note(base: Path, chosen: Path) -> str | None:
    """A line for starting ``chosen`` afresh while an earlier run of the same command is unfinished."""
    stopped = unfinished_run(base)
    if stopped is None:
        return None
    return (f"note: {stopped} holds an unfinished run of this command; starting afresh in {chosen}. To continue "
            f"that one instead, add --resume auto --out-dir {stopped}")


def check_out_dir(path: Path, resuming: bool) -> Path:
    """Refuse a run directory that cannot be used, before anything is created."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out-dir {path} exists and is not a directory")
    if not resuming and (path / "last.pt").exists():
        raise UsageError(f"{path} already holds a run; continue it with --resume {path} or choose another --out-dir")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        raise UsageError(f"cannot create the run directory {path}: {ancestor} is not a writable directory")
    return path


def create_out_dir(path: Path) -> None:
    """Create the run directory and prove it writable (called once the data has loaded,
    so a refused start leaves no empty directory behind)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to the run directory {path} ({e.strerror or e})") from e


def find_resumable(directory: Path, set_aside: bool = True) -> dict | None:
    """The newest readable checkpoint of a run directory (last.pt, else last.prev.pt).

    With ``set_aside`` (rank 0 only, so ranks do not race) a damaged file is
    renamed, so the next save does not rotate it over the good one."""
    for path in (directory / "last.pt", previous_of(directory / "last.pt")):
        if path.exists():
            try:
                state = load_checkpoint(path)
                state["path"] = str(path)
                return state
            except UsageError as e:
                if not set_aside:
                    continue
                damaged = path.with_name(f"{path.stem}.damaged{path.suffix}")
                os.replace(path, damaged)
                print(f"warning: {e}; moved it to {damaged.name} and trying an older checkpoint", file=sys.stderr)
    return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers ignore SIGTERM/SIGINT/SIGUSR1: a scheduler signals the whole
    process group, and the main process must finish its step and save while
    the workers it needs are still alive (see :func:`kill_loader_workers`)."""
    for s in StopSignals.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def kill_loader_workers() -> None:
    """At exit, end loader workers with SIGKILL: multiprocessing's own exit
    handler would send them SIGTERM, which they ignore, and wait forever.
    SIGCHLD goes back to its default first, so PyTorch's handler does not
    report the killed workers as a failure."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        child.kill()


def loader_options(workers: int, device: torch.device) -> dict:
    """DataLoader settings that keep GPUs fed: worker processes that live across
    epochs, 4 batches prefetched per worker, pinned memory for non-blocking
    copies; the loader's own generator leaves the global RNG (gate noise) alone."""
    return dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                prefetch_factor=4 if workers > 0 else None, generator=torch.Generator(),
                worker_init_fn=ignore_stop_signals if workers > 0 else None)


class StopSignals:
    """SIGTERM, SIGINT and SIGUSR1 (SLURM's preemption signals) ask the loop to stop
    after the current step; a second SIGINT interrupts at once."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))

    def __init__(self):
        self.received = None
        self.previous = {}

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self):
        for s in self.SIGNALS:
            self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
