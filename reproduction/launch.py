"""Running a table's runs: one after another (or N at once) here, or as submitit jobs.

The two that wait for their runs share one scheduler (:func:`schedule`),
which starts a run once the runs it needs have finished (in this invocation or
an earlier one), never starts one whose dependency failed, and reports at a
steady interval how far the table has got (:class:`Progress`):

* ``local``: each run is a subprocess of reproduce.py.
* ``submitit-local``: each run is a submitit job of submitit's local executor
  (real subprocesses through exactly the code a SLURM job runs), so the SLURM
  path is tested without SLURM.
* ``slurm``: :func:`submit_slurm` submits one job array per dependency level
  (per GPU count), each level ``afterok`` on the one before, and a last job
  that writes the report; reproduce.py returns at once.

A submitit job is a :class:`SubmititRun`. The training scripts save and exit
with status 75 when a signal stops them (SLURM's preemption, a scheduler's
SIGTERM); the job then requeues itself through submitit's own preemption path,
and the requeued job continues the run with ``--resume auto``. When submitit's
signal (USR2, before the time limit or on preemption) reaches the job first,
:meth:`SubmititRun.checkpoint` passes SIGTERM on to the run, waits for it to
save, and requeues the same way.

A run is *done* when its results are complete (:func:`tables.finished`),
whatever its exit status (a signal may reach it after its last line); it is
*stopped*, not failed, when it exits 75 or is ended by a stop signal (SIGTERM,
SIGINT, SIGUSR1: one that arrives before the run installed its handlers, while
it imports torch, ends it with -15 or 143), or exits otherwise once the
launcher itself asked it to stop. A stopped run continues with ``--resume
auto`` at the next invocation.

Nothing here imports torch: a submitit job starts in a fraction of a second.
"""
import os
import re
import shlex
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import submitit

from utils.errors import EXIT_PREEMPTED
from .tables import Run, finished, read_results, started

DONE, STOPPED, FAILED, BLOCKED = "done", "stopped", "failed", "blocked"
# How long a run may take to save after SIGTERM before the job goes anyway (SLURM kills
# 90 s after its signal: submitit's default signal_delay_s).
SAVE_GRACE_S = 60
POLL_S = 0.2
# The signals the training scripts take as "save and stop" (utils/run.py's StopSignals): a run they
# end before its handlers are installed (or after they are removed) was stopped, not broken.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))
# How much of a run's log is read for its last line (logs of long runs grow to megabytes).
TAIL_BYTES = 16384
LINE_CHARS = 200


ENDED = "[reproduce.py]"


def run_seconds(log: Path, run_dir: Path) -> float | None:
    """How long a finished run took: the sum of its starts' times that the launcher logged (start-up
    included), else its results.json's ``wall_time_s`` (training only); None if neither is known."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        text = ""
    times = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(ENDED)} \S+ \w+ after ([0-9.]+) s$", text, re.M)]
    if times:
        return sum(times)
    wall = (read_results(run_dir) or {}).get("wall_time_s")
    return float(wall) if isinstance(wall, (int, float)) and wall > 0 else None


def ended_by_stop_signal(status: int | None) -> bool:
    """Exit status of a process a stop signal ended: -N from Popen, 128+N from a shell or launcher."""
    return status is not None and any(status in (-s, 128 + s) for s in STOP_SIGNALS)


@dataclass(frozen=True)
class Task:
    """A run as a launcher executes it; paths are relative to ``cwd``."""

    run: Run
    cwd: Path
    log: Path
    data_dir: str | None = None
    gpus: int | None = None   # reproduce.py --gpus; None: the row's

    @property
    def key(self) -> str:
        return self.run.key

    @property
    def gpu_count(self) -> int:
        return self.gpus or self.run.row.gpus

    def command(self) -> list[str]:
        """The command to run now: with ``--resume auto`` if the run has started before."""
        return self.run.command(started(self.cwd / self.run.run_dir), self.data_dir, self.gpus)

    def missing_inputs(self) -> list[Path]:
        return [path for path in self.run.needs if not (self.cwd / path).exists()]

    def start(self):
        command = self.command()
        log = self.cwd / self.log
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as out:
            out.write(f"$ {shlex.join(command)}\n")
            out.flush()
            # Its own session: a signal meant for the launcher reaches the run only as the
            # launcher's SIGTERM, after which it saves and exits 75.
            return subprocess.Popen(command, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)

    def last_line(self) -> str:
        """The run's last non-empty line in the log (progress bars' carriage returns split lines
        too); the launcher's own notes of how a start ended are not the run's."""
        try:
            with open(self.cwd / self.log, "rb") as f:
                f.seek(max(f.seek(0, os.SEEK_END) - TAIL_BYTES, 0))
                tail = f.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        lines = [line for line in tail.splitlines() if line.strip() and not line.startswith(ENDED)]
        return lines[-1].strip() if lines else "(empty log)"

    def note_end(self, outcome: str, seconds: float) -> None:
        """Append how the run ended and how long this start of it took to its log (read back by
        :func:`run_seconds` for later ETAs)."""
        try:
            with open(self.cwd / self.log, "a") as out:
                out.write(f"{ENDED} {self.key} {outcome} after {seconds:.1f} s\n")
        except OSError:
            pass

    def outcome(self, status: int, stopping: bool = False) -> str:
        """DONE, STOPPED or FAILED for a run that exited with ``status``; ``stopping``: the launcher
        had asked it to stop (forwarded SIGTERM)."""
        if finished(self.cwd / self.run.run_dir):
            return DONE  # complete results: a signal after its last line does not undo them
        if status == 0:
            return FAILED  # exited without finishing
        # Under torchrun the launcher's status is its own; rank 0 logs the saved stop.
        if (status == EXIT_PREEMPTED or ended_by_stop_signal(status) or stopping
                or "stopped by signal" in self.last_line()):
            return STOPPED
        return FAILED


def terminate(process) -> None:
    """SIGTERM to the run's whole process group (torchrun and its ranks)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


class StopRequest:
    """SIGINT/SIGTERM to the launcher: start nothing new and tell the running runs to save."""

    def __init__(self, on_stop):
        self.received, self.on_stop, self.previous = None, on_stop, {}

    def _handle(self, signum, frame):
        self.received = signum
        self.on_stop()

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def clock(seconds: float) -> str:
    return str(timedelta(seconds=round(max(seconds, 0.0))))


def row_of(key: str) -> str:
    return key.rsplit("/seed", 1)[0]


class Progress:
    """Where a table is: k/N runs done, the time since this invocation began, an ETA from the
    finished runs' wall times (those of the same row, else of any row), and each running run's
    last log line; :meth:`report` says it every ``every`` seconds (0: never)."""

    def __init__(self, tasks: list[Task], done_before: dict[str, float | None], jobs: int, every: float, say):
        self.total, self.jobs, self.every, self.say = len(tasks) + len(done_before), jobs, every, say
        self.done_before = len(done_before)
        self.times = {key: float(t) for key, t in done_before.items() if isinstance(t, (int, float)) and t > 0}
        self.began = time.monotonic()
        self.next = self.began + every
        self.started: dict[str, float] = {}

    def start(self, key: str) -> None:
        self.started[key] = time.monotonic()

    def ended(self, task: Task, outcome: str) -> None:
        """Log how long the run took; a finished one's time (all its starts) feeds the ETA."""
        task.note_end(outcome, time.monotonic() - self.started[task.key])
        seconds = run_seconds(task.cwd / task.log, task.cwd / task.run.run_dir)
        if outcome == DONE and seconds:
            self.times[task.key] = seconds

    def estimate(self, key: str) -> float | None:
        same = [t for k, t in self.times.items() if row_of(k) == row_of(key)]
        pool = same or list(self.times.values())
        return statistics.fmean(pool) if pool else None

    def eta(self, pending: list[Task], running: dict) -> float | None:
        now = time.monotonic()
        work = 0.0
        for key in [t.key for t in pending] + list(running):
            estimate = self.estimate(key)
            if estimate is None:
                return None
            work += max(estimate - (now - self.started[key]), 0.0) if key in running else estimate
        return work / max(min(self.jobs, len(pending) + len(running)), 1)

    def lines(self, pending: list[Task], running: dict, outcome: dict) -> list[str]:
        done = self.done_before + sum(state == DONE for state in outcome.values())
        eta = self.eta(pending, running)
        n = len(self.times)
        basis = "the finished run's time" if n == 1 else f"{n} finished runs' times"
        when = f"ETA ~{clock(eta)} (from {basis})" if eta is not None else "ETA once a run has finished"
        counts = {state: sum(s == state for s in outcome.values()) for state in (FAILED, STOPPED, BLOCKED)}
        others = [f"{count} {state}" for state, count in counts.items() if count]
        head = (f"progress: {done}/{self.total} runs done, {len(running)} running, {len(pending)} waiting"
                + "".join(f", {o}" for o in others) + f"; {clock(time.monotonic() - self.began)} elapsed, {when}")
        now = time.monotonic()
        return [head] + [f"  {key} ({clock(now - self.started[key])}): {task.last_line()[:LINE_CHARS]}"
                         for key, (task, _) in running.items()]

    def report(self, pending: list[Task], running: dict, outcome: dict) -> None:
        if self.every <= 0 or time.monotonic() < self.next or not (pending or running):
            return
        self.next = time.monotonic() + self.every
        for line in self.lines(pending, running, outcome):
            self.say(line)


def schedule(tasks: list[Task], jobs: int, start, poll, stop, say, done_before: dict[str, float | None] | None = None,
             progress_s: float = 0) -> dict[str, str]:
    """Run ``tasks`` (dependencies first), at most ``jobs`` at a time; returns each task's outcome.

    ``start(task)`` returns a handle, ``poll(task, handle, stopping)`` its outcome or None while it
    runs, ``stop(handle)`` asks it to save and stop. Runs finished before are not in ``tasks``:
    ``done_before`` holds their keys (with their wall times in seconds, for the ETA, or None); a
    dependency that is no task counts as finished too. Every ``progress_s`` seconds (0: never) a
    progress report (:class:`Progress`). A stop (SIGINT/SIGTERM to this process) stops the running
    runs and starts nothing more: those left are STOPPED."""
    done_before = dict(done_before or {})
    keys = {task.key for task in tasks}
    for task in tasks:  # a dependency that is not to run here finished in an earlier invocation
        for key in task.run.after:
            if key not in keys:
                done_before.setdefault(key, None)
    pending, running, outcome = list(tasks), {}, {}
    progress = Progress(tasks, done_before, jobs, progress_s, say)

    def state_of(key):
        return DONE if key in done_before else outcome.get(key)

    def stop_all():
        for _, handle in running.values():
            stop(handle)

    with StopRequest(stop_all) as request:
        while pending or running:
            stopping = request.received is not None
            for key, (task, handle) in list(running.items()):
                result = poll(task, handle, stopping)
                if result is None:
                    continue
                del running[key]
                outcome[key] = result
                if result == DONE:
                    say(f"done    {key}")
                elif result == STOPPED:
                    say(f"stopped {key}: saved; run reproduce.py again to continue it (--resume auto)")
                else:
                    say(f"error: {key} failed: {task.last_line()} (log {task.log})")
                progress.ended(task, result)
            if request.received is not None and pending:
                for task in pending:
                    outcome[task.key] = STOPPED
                say(f"stopped: {len(pending)} run{'s' if len(pending) > 1 else ''} not started "
                    f"({', '.join(t.key for t in pending)}); run reproduce.py again to run "
                    f"{'them' if len(pending) > 1 else 'it'}")
                pending.clear()
            for task in list(pending):
                if len(running) >= jobs:
                    break
                states = [state_of(key) for key in task.run.after]
                bad = next((k for k, s in zip(task.run.after, states) if s in (FAILED, BLOCKED, STOPPED)), None)
                if bad is not None:
                    pending.remove(task)
                    if outcome[bad] == STOPPED:
                        outcome[task.key] = STOPPED
                        say(f"stopped {task.key}: not started, the run it needs, {bad}, was stopped; "
                            f"run reproduce.py again to continue")
                    else:
                        outcome[task.key] = BLOCKED
                        say(f"error: {task.key} not run: the run it needs, {bad}, {outcome[bad]}")
                elif all(state == DONE for state in states):
                    pending.remove(task)
                    missing = task.missing_inputs()
                    if missing:
                        outcome[task.key] = BLOCKED
                        say(f"error: {task.key} not run: {missing[0]} does not exist")
                        continue
                    say(f"start   {task.key}: log {task.log}")
                    progress.start(task.key)
                    running[task.key] = (task, start(task))
            progress.report(pending, running, outcome)
            time.sleep(POLL_S)
    return outcome


# ------------------------------------------------------------------------------- local


def run_local(tasks: list[Task], jobs: int, say, done_before=None, progress_s: float = 0) -> dict[str, str]:
    return schedule(tasks, jobs, start=lambda task: task.start(),
                    poll=lambda task, process, stopping: (None if process.poll() is None
                                                          else task.outcome(process.returncode, stopping)),
                    stop=terminate, say=say, done_before=done_before, progress_s=progress_s)


# ------------------------------------------------------------------------------- submitit

class SubmititRun(submitit.helpers.Checkpointable):
    """One run as a submitit job: it runs the task's command and requeues itself after a saved stop."""

    def __init__(self, task: Task):
        self.task = task
        self.process = None

    def __getstate__(self):  # a requeued job is pickled: the running process stays behind
        return {"task": self.task}

    def __setstate__(self, state):
        self.task, self.process = state["task"], None

    def __call__(self) -> str:
        missing = self.task.missing_inputs()
        if missing:
            raise RuntimeError(f"{self.task.key} not run: {missing[0]} does not exist")
        self.process = self.task.start()
        try:
            status = self._wait(None)
        finally:
            if self.process.poll() is None:  # the job itself is being ended: let the run save
                terminate(self.process)
                self._wait(SAVE_GRACE_S)
            self.process = None
        result = self.task.outcome(status)
        if result == STOPPED:
            # Requeue exactly as on preemption: submitit's handler of its own signal calls
            # checkpoint() (the run has already saved) and requeues the job.
            signal.raise_signal(getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}"))
            raise RuntimeError(f"{self.task.key} stopped after saving, but the job was not requeued")
        if result == FAILED:
            raise RuntimeError(f"{self.task.key} failed (exit {status}): {self.task.last_line()}")
        return self.task.key

    def _wait(self, seconds: float | None) -> int | None:
        """The run's exit status, polled (a blocking wait would hold the lock the signal handler's
        poll needs), or None if it still runs after ``seconds``."""
        deadline = None if seconds is None else time.time() + seconds
        while self.process.poll() is None and (deadline is None or time.time() < deadline):
            time.sleep(POLL_S)
        return self.process.returncode

    def checkpoint(self, *args, **kwargs):
        if self.process is not None and self.process.poll() is None:
            terminate(self.process)
            self._wait(SAVE_GRACE_S)
        return super().checkpoint(*args, **kwargs)


def executor(cluster: str, folder: Path, max_timeouts: int):
    return submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=max_timeouts)


def run_submitit_local(tasks: list[Task], jobs: int, folder: Path, timeout_min: int, say, done_before=None,
                       progress_s: float = 0) -> dict[str, str]:
    """The submitit path with submitit's local executor: every run a local submitit job."""
    ex = executor("local", folder, max_timeouts=3)

    def start(task):
        ex.update_parameters(timeout_min=timeout_min, gpus_per_node=task.gpu_count,
                             tasks_per_node=1, name=task.key)
        return ex.submit(SubmititRun(task))

    def poll(task, job, stopping):
        if not job.done():
            return None
        # A job cancelled by this launcher's stop ended its run with SIGTERM (the run saved).
        return DONE if finished(task.cwd / task.run.run_dir) else STOPPED if stopping else FAILED

    return schedule(tasks, jobs, start, poll, stop=lambda job: job.cancel(check=False), say=say,
                    done_before=done_before, progress_s=progress_s)


def submit_slurm(tasks: list[Task], levels: dict[str, int], folder: Path, settings: dict, report, say) -> list[str]:
    """One job array per dependency level and GPU count, each afterok on the previous level's arrays,
    then the report job (afterany on all). Returns the job ids."""
    ex = executor("slurm", folder, max_timeouts=settings["max_timeouts"])
    previous, all_ids = [], []
    for level in sorted(set(levels.values())):
        this_level = []
        for gpus in sorted({t.gpu_count for t in tasks if levels[t.key] == level}):
            group = [t for t in tasks if levels[t.key] == level and t.gpu_count == gpus]
            ex.update_parameters(timeout_min=settings["time"], gpus_per_node=gpus, tasks_per_node=1, nodes=1,
                                 cpus_per_task=settings["cpus_per_gpu"] * gpus, name=f"{settings['name']}-l{level}",
                                 slurm_partition=settings["partition"],
                                 slurm_array_parallelism=settings["jobs"] or len(group),
                                 slurm_dependency=f"afterok:{':'.join(previous)}" if previous else None)
            with ex.batch():
                jobs = [ex.submit(SubmititRun(task)) for task in group]
            array = jobs[0].job_id.split("_")[0]
            this_level.append(array)
            say(f"submitted {array} (level {level}, {gpus} GPU{'s' if gpus > 1 else ''}): "
                + ", ".join(f"{job.job_id} {task.key}" for job, task in zip(jobs, group)))
        previous = this_level
        all_ids += this_level
    ex.update_parameters(timeout_min=10, gpus_per_node=0, cpus_per_task=1, name=f"{settings['name']}-report",
                         slurm_partition=settings["partition"], slurm_dependency=f"afterany:{':'.join(all_ids)}")
    job = ex.submit(report)
    say(f"submitted {job.job_id}: the report, once every run has ended")
    return all_ids + [job.job_id]
