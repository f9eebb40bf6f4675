"""Running a table's runs: one after another (or N at once) here, or as submitit jobs.

The two that wait for their runs share one scheduler (:func:`schedule`),
which starts a run once the runs it needs have finished and never starts one
whose dependency failed:

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

Nothing here imports torch: a submitit job starts in a fraction of a second.
"""
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import submitit

from utils.errors import EXIT_PREEMPTED
from .tables import Run, finished, started

DONE, STOPPED, FAILED, BLOCKED = "done", "stopped", "failed", "blocked"
# How long a run may take to save after SIGTERM before the job goes anyway (SLURM kills
# 90 s after its signal: submitit's default signal_delay_s).
SAVE_GRACE_S = 60
POLL_S = 0.2


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
        try:
            lines = [line for line in (self.cwd / self.log).read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return "(no log)"
        return lines[-1].strip() if lines else "(empty log)"

    def outcome(self, status: int) -> str:
        if status == 0 and finished(self.cwd / self.run.run_dir):
            return DONE
        # Under torchrun the launcher's status is its own; rank 0 logs the saved stop.
        if status == EXIT_PREEMPTED or (status != 0 and "stopped by signal" in self.last_line()):
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


def schedule(tasks: list[Task], jobs: int, start, poll, stop, say) -> dict[str, str]:
    """Run ``tasks`` (dependencies first), at most ``jobs`` at a time; returns each key's outcome.

    ``start(task)`` returns a handle, ``poll(task, handle)`` its outcome or None while it runs,
    ``stop(handle)`` asks it to save and stop. Runs done before are not in ``tasks``."""
    pending, running, outcome = list(tasks), {}, {}

    def stop_all():
        for _, handle in running.values():
            stop(handle)

    with StopRequest(stop_all) as request:
        while pending or running:
            for key, (task, handle) in list(running.items()):
                result = poll(task, handle)
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
            if request.received is not None:
                pending.clear()
            for task in list(pending):
                if len(running) >= jobs:
                    break
                states = [outcome.get(key) for key in task.run.after]
                if any(state in (FAILED, BLOCKED, STOPPED) for state in states):
                    pending.remove(task)
                    outcome[task.key] = BLOCKED
                    bad = next(k for k, s in zip(task.run.after, states) if s in (FAILED, BLOCKED, STOPPED))
                    say(f"error: {task.key} not run: the run it needs, {bad}, {outcome[bad]}")
                elif all(state == DONE for state in states):
                    pending.remove(task)
                    missing = task.missing_inputs()
                    if missing:
                        outcome[task.key] = BLOCKED
                        say(f"error: {task.key} not run: {missing[0]} does not exist")
                        continue
                    say(f"start   {task.key}: log {task.log}")
                    running[task.key] = (task, start(task))
            time.sleep(POLL_S)
    return outcome


# ------------------------------------------------------------------------------- local


def run_local(tasks: list[Task], jobs: int, say) -> dict[str, str]:
    return schedule(tasks, jobs, start=lambda task: task.start(),
                    poll=lambda task, process: None if process.poll() is None else task.outcome(process.returncode),
                    stop=terminate, say=say)


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


def run_submitit_local(tasks: list[Task], jobs: int, folder: Path, timeout_min: int, say) -> dict[str, str]:
    """The submitit path with submitit's local executor: every run a local submitit job."""
    ex = executor("local", folder, max_timeouts=3)

    def start(task):
        ex.update_parameters(timeout_min=timeout_min, gpus_per_node=task.gpu_count,
                             tasks_per_node=1, name=task.key)
        return ex.submit(SubmititRun(task))

    def poll(task, job):
        if not job.done():
            return None
        return DONE if finished(task.cwd / task.run.run_dir) else FAILED

    return schedule(tasks, jobs, start, poll, stop=lambda job: job.cancel(check=False), say=say)


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
