"""reproduce.py's runner when a table is stopped and started again (reproduction/launch.py).

One module-scoped chain of real runs of the tiny table (its dense baseline
and the L1 peer that prunes it, one seed) drives reproduce.py in-process, as
a user would call it again and again:

1. SIGTERM to reproduce.py while the dense run starts (torch still importing,
   no signal handler of its own yet): the run dies of the forwarded SIGTERM
   and counts as stopped (exit 75), not failed;
2. the next call runs it again; SIGTERM reaches it right after its ``done:``
   line (the run is frozen there with SIGSTOP until the forwarded signal is
   pending): it counts as done, the peer was not started, exit 75;
3. the next call finds the dense run finished and must start the peer that
   needs it (it used to wait forever), with progress reports every second;
4. the same from a copy of that state with the submitit-local launcher (and
   SLURM's dry run puts the peer in the first job array).

A watchdog ends a call that starts nothing within a minute, so a hang fails
the test instead of the suite. The rest are quick in-process checks of the
scheduler's decisions.
"""
import contextlib
import io
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

import reproduce
from conftest import process_ids, script_env
from reproduction import launch
from reproduction.tables import finished, load_table, plan

ROWS = ["--only", "dense", "--only", "l1-macs", "--seeds", "1"]
STARTUP_S = 60   # a call that has not started the run it should within this long is hung
WAIT_S = 240     # the most any one step may wait for a run to reach a point


def _wait(condition, seconds=WAIT_S, step=0.005):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    return None


def _sigterm_pending(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True  # gone: nothing left to wait for
    masks = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask & (1 << (signal.SIGTERM - 1)) for mask in masks)


def _call(argv, action=None):
    """reproduce.main(argv) in this process, with ``action`` in a thread beside it; returns (status,
    stdout, what the action returned). SIGTERM meant for reproduce.py's handler is harmless outside it."""
    got, out = {}, io.StringIO()
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    thread = threading.Thread(target=lambda: got.setdefault("action", action()), daemon=True) if action else None
    try:
        if thread:
            thread.start()
        with contextlib.redirect_stdout(out):
            status = reproduce.main(argv)
        if thread:
            thread.join(WAIT_S)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return status, out.getvalue(), got.get("action")


def _stop_while_starting(run_dir: Path, log: Path):
    """SIGTERM to reproduce.py as soon as the run's process exists (it is still importing torch)."""
    pids = _wait(lambda: log.exists() and process_ids(f"--out-dir {run_dir}"))
    if pids:
        os.kill(os.getpid(), signal.SIGTERM)
    return pids


def _stop_right_after_done(run_dir: Path, log: Path):
    """Once the run has logged ``done:``: freeze it, SIGTERM reproduce.py, wait until the SIGTERM it
    forwards is pending in the run, and let the run go on to meet it."""
    pids = _wait(lambda: log.exists() and "done: " in log.read_text() and process_ids(f"--out-dir {run_dir}"),
                 step=0.002)
    if not pids:
        return None
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        pending = _wait(lambda: all(_sigterm_pending(pid) for pid in pids), seconds=30)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # a SIGTERM without handler ends it even frozen
                os.kill(pid, signal.SIGCONT)
    return pids if pending else None


def _watchdog(log: Path):
    """End the call (SIGTERM to reproduce.py) if the run's log has not appeared within STARTUP_S."""
    if _wait(log.exists, seconds=STARTUP_S, step=0.05):
        return "started"
    os.kill(os.getpid(), signal.SIGTERM)
    return "hung"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    runs = base / "runs"
    dense, peer = runs / "tiny/dense/seed0", runs / "tiny/l1-macs/seed0"
    dense_log, peer_log = runs / "tiny/logs/dense.seed0.log", runs / "tiny/logs/l1-macs.seed0.log"
    steps = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PYTHONPATH", raising=False)
        for key, value in script_env().items():
            mp.setenv(key, value)
        mp.chdir(base)
        argv = ["tiny", *ROWS, "--runs-dir", str(runs)]
        steps["startup"] = _call(argv + ["--progress", "0"], lambda: _stop_while_starting(dense, dense_log))
        after_startup = dict(saved=(dense / "last.pt").exists(), log=dense_log.read_text())
        steps["after_done"] = _call(argv + ["--progress", "0"], lambda: _stop_right_after_done(dense, dense_log))
        steps["slurm_dry_run"] = _call(argv + ["--dry-run", "--launcher", "slurm"])
        copy = base / "copy"
        shutil.copytree(runs, copy / "runs")
        steps["again_local"] = _call(argv + ["--progress", "1"], lambda: _watchdog(peer_log))
        mp.chdir(copy)
        steps["again_submitit"] = _call(["tiny", *ROWS, "--runs-dir", str(copy / "runs"), "--progress", "0",
                                         "--launcher", "submitit-local"],
                                        lambda: _watchdog(copy / "runs/tiny/logs/l1-macs.seed0.log"))
    return dict(base=base, dense=dense, peer=peer, dense_log=dense_log, steps=steps, after_startup=after_startup)


def test_sigterm_while_a_run_starts_stops_it_and_exits_75(chain):
    status, out, pids = chain["steps"]["startup"]
    assert pids, "the run's process never appeared"
    assert status == 75, out
    assert "stopped dense/seed0: saved" in out and "error" not in out, out
    assert "stopped: 1 run not started (l1-macs/seed0)" in out, out
    assert not chain["after_startup"]["saved"]  # it really was stopped while starting
    assert "[reproduce.py] dense/seed0 stopped after" in chain["after_startup"]["log"]


def test_sigterm_right_after_done_counts_the_run_as_done_and_exits_75(chain):
    status, out, pids = chain["steps"]["after_done"]
    assert pids, "the run was not caught between its done: line and its exit"
    assert status == 75, out
    assert "done    dense/seed0" in out and "error" not in out and "stopped dense" not in out, out
    assert "stopped: 1 run not started (l1-macs/seed0)" in out, out
    assert finished(chain["dense"])
    # The next call (below) starts from here: the interrupted start ran again without --resume
    # (nothing of it was saved), and this one finished.
    commands = [line for line in chain["dense_log"].read_text().splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 and not any("--resume" in c for c in commands), commands


@pytest.mark.parametrize("launcher", ["again_local", "again_submitit"])
def test_a_dependency_finished_in_an_earlier_call_starts_its_dependents(chain, launcher):
    status, out, watchdog = chain["steps"][launcher]
    assert watchdog == "started", f"reproduce.py never started l1-macs:\n{out}"
    assert status == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("skip    dense/seed0: finished ("), out
    assert "start   l1-macs/seed0: log" in out and "done    l1-macs/seed0" in out, out
    run = chain["peer"] if launcher == "again_local" else chain["base"] / "copy/runs/tiny/l1-macs/seed0"
    assert finished(run)


def test_slurm_submits_the_dependent_of_a_finished_run_without_waiting(chain):
    """SLURM's path: the peer goes in the first array, with no afterok on a job that will never run."""
    status, out, _ = chain["steps"]["slurm_dry_run"]
    assert status == 0, out
    skip, peer = out.splitlines()
    assert skip.startswith("skip    dense/seed0: finished") and peer.startswith("[slurm level 0] ")
    assert "prune.py" in peer and "l1-macs/seed0" in peer


def test_progress_reports_runs_done_elapsed_eta_and_each_running_runs_last_line(chain):
    status, out, _ = chain["steps"]["again_local"]
    assert status == 0, out
    head = re.compile(r"progress: 1/2 runs done, 1 running, 0 waiting; \d+:\d\d:\d\d elapsed, "
                      r"ETA ~\d+:\d\d:\d\d \(from the finished run's time\)$")
    lines = out.splitlines()
    reports = [i for i, line in enumerate(lines) if line.startswith("progress: ")]
    assert reports and all(head.match(lines[i]) for i in reports), out
    # Each report names the running run, how long it has run and the last line of its log.
    assert all(re.match(r"  l1-macs/seed0 \(\d+:\d\d:\d\d\): \S", lines[i + 1]) for i in reports), out
    assert any("prune.py" in lines[i + 1] or "Epoch" in lines[i + 1] or "run directory" in lines[i + 1]
               for i in reports), out
    assert "progress: " not in chain["steps"]["again_submitit"][1]  # --progress 0: none


# ------------------------------------------------------------------ the scheduler's decisions, in-process


def _tasks(tmp_path, rows=("dense", "l1-macs")):
    runs = plan(load_table("tiny"), Path("runs"), (0,), list(rows))
    return [launch.Task(run, tmp_path, Path(f"{run.row.name}.log")) for run in runs]


@pytest.mark.parametrize("status, stopping, expected", [
    (75, False, launch.STOPPED), (-signal.SIGTERM, False, launch.STOPPED), (128 + signal.SIGTERM, False, launch.STOPPED),
    (-signal.SIGINT, False, launch.STOPPED), (1, True, launch.STOPPED), (1, False, launch.FAILED),
    (-signal.SIGKILL, False, launch.FAILED), (0, False, launch.FAILED)])
def test_outcome_of_an_unfinished_run(tmp_path, status, stopping, expected):
    task = _tasks(tmp_path, ("dense",))[0]
    assert task.outcome(status, stopping) == expected


@pytest.mark.parametrize("status", [0, 1, 75, -signal.SIGTERM, 128 + signal.SIGTERM])
def test_a_run_with_complete_results_is_done_whatever_its_status(tmp_path, status):
    task = _tasks(tmp_path, ("dense",))[0]
    run_dir = tmp_path / task.run.run_dir
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text('{"epochs_done": 1, "epochs_total": 1}')
    (run_dir / "pruned.pt").write_bytes(b"")
    assert task.outcome(status) == launch.DONE


def test_schedule_counts_a_dependency_finished_before_as_finished(tmp_path):
    """The peer alone is a task; its dependency finished in an earlier call (given, or simply not a
    task): it starts at once instead of waiting forever."""
    peer = _tasks(tmp_path)[1]
    assert peer.run.after == ("dense/seed0",)
    (tmp_path / "runs/tiny/dense/seed0").mkdir(parents=True)
    (tmp_path / "runs/tiny/dense/seed0/best.pt").write_bytes(b"")  # the file the peer reads
    for done_before in ({"dense/seed0": 12.0}, None):
        started, lines = [], []
        outcome = launch.schedule([peer], 1, start=lambda task: started.append(task.key),
                                  poll=lambda task, handle, stopping: launch.DONE, stop=lambda handle: None,
                                  say=lines.append, done_before=done_before)
        assert started == ["l1-macs/seed0"] and outcome == {"l1-macs/seed0": launch.DONE}, lines


def test_a_stopped_dependency_leaves_its_dependent_stopped_not_blocked(tmp_path):
    dense, peer = _tasks(tmp_path)
    lines = []
    outcome = launch.schedule([dense, peer], 1, start=lambda task: None,
                              poll=lambda task, handle, stopping: launch.STOPPED, stop=lambda handle: None,
                              say=lines.append)
    assert outcome == {"dense/seed0": launch.STOPPED, "l1-macs/seed0": launch.STOPPED}
    assert not any(line.startswith("error") for line in lines), lines


def test_eta_from_finished_runs_times(tmp_path):
    dense, peer = _tasks(tmp_path)
    progress = launch.Progress([dense, peer], {"dsr/seed0": 100.0}, jobs=1, every=60, say=None)
    assert progress.eta([dense, peer], {}) == 200.0  # no run of these rows yet: the mean of any finished
    progress.times["dense/seed0"] = 40.0
    assert progress.estimate("dense/seed1") == 40.0 and progress.estimate("l1-macs/seed0") == 70.0
    progress.started["l1-macs/seed0"] = time.monotonic() - 30
    assert progress.eta([], {"l1-macs/seed0": (peer, None)}) == pytest.approx(40.0, abs=1)
    line = progress.lines([], {"l1-macs/seed0": (peer, None)}, {"dense/seed0": launch.DONE})[0]
    assert line.startswith("progress: 2/3 runs done, 1 running, 0 waiting; 0:00:00 elapsed, ETA ~0:00:40 "
                           "(from 2 finished runs' times)"), line
    assert launch.Progress([peer], {}, 1, 60, None).lines([peer], {}, {})[0].endswith("ETA once a run has finished")


def test_the_launcher_logs_how_long_each_start_took(tmp_path):
    log, run_dir = tmp_path / "x.log", tmp_path / "run"
    log.write_text("$ python a\n[reproduce.py] a/seed0 stopped after 12.5 s\n$ python a --resume auto\n"
                   "[reproduce.py] a/seed0 done after 30.0 s\n")
    assert launch.run_seconds(log, run_dir) == 42.5
    run_dir.mkdir()
    (run_dir / "results.json").write_text('{"wall_time_s": 7.25}')
    assert launch.run_seconds(tmp_path / "none.log", run_dir) == 7.25
    assert launch.run_seconds(tmp_path / "none.log", tmp_path / "nothing") is None
