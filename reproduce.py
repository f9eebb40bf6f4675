"""Reproduce a paper table with one command: every row and seed of ``experiments/<table>.toml``.

    python reproduce.py resnet56_cifar10_macs --dry-run          # the exact commands, nothing run
    python reproduce.py resnet56_cifar10_macs --jobs 2           # here, two runs at a time
    python reproduce.py resnet50_imagenet_macs --launcher slurm --partition gpu --gpus 8 --time 2880 \\
        --data-dir /path/to/imagenet
    python reproduce.py resnet56_cifar10_macs --report           # report.md / .csv / .png of what has finished

Runs what is missing, dependencies first (a peer after the dense baseline it
prunes), each in ``<runs>/<table>/<row>/seed<k>/``: a finished run is
skipped (and counts as finished for the runs that need it), a started one
continues with ``--resume auto``. Every row's flags are checked by its own
script's parser, and the data directory of rows that read real data, before
anything runs or is submitted. While runs go (local, submitit-local) a
progress report every ``--progress`` seconds: k/N runs done, the time so far,
an ETA, and each running run's last log line. Stopped (Ctrl-C, SIGTERM), it
lets its runs save and exits 75; the next invocation continues. The table
format, the launchers and the report: reproduction/tables.py,
reproduction/launch.py, reproduction/report.py, and docs/reproducing.md.
"""
import argparse
import contextlib
import io
import os
import shlex
import shutil
import sys
from pathlib import Path

from utils.cli import DefaultsFormatter, OneLineParser, nonneg_float, positive_int
from utils.errors import EXIT_PREEMPTED, EXIT_USAGE, UsageError, run_reporting_errors
from reproduction.launch import (BLOCKED, FAILED, STOPPED, Task, run_local, run_seconds, run_submitit_local,
                                 submit_slurm)
from reproduction.report import ReportJob, write_report
from reproduction.tables import REPO_ROOT, finished, load_table, plan

LAUNCHERS = ("local", "slurm", "submitit-local")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="reproduce.py", formatter_class=DefaultsFormatter,
                      description="Run a paper table's missing runs, dependencies first, and report it.")
    p.add_argument("table", metavar="TABLE", help="a table of experiments/ (its name) or a path to a .toml file")
    p.add_argument("--launcher", choices=LAUNCHERS, default="local",
                   help="local: subprocesses here; slurm: submitit job arrays; submitit-local: submitit's "
                        "local executor (the SLURM path without SLURM)")
    p.add_argument("--dry-run", action="store_true", help="print the exact commands (and submissions); run nothing")
    p.add_argument("--only", action="append", metavar="ROW", help="only this row (repeatable)")
    p.add_argument("--seeds", type=positive_int, metavar="N", help="seeds 0..N-1 (default: the table's seeds)")
    p.add_argument("--jobs", type=positive_int, metavar="N",
                   help="runs at a time (default: 1 here, every task of an array at once on SLURM)")
    p.add_argument("--report", action="store_true", help="only write the report of the finished runs")
    p.add_argument("--runs-dir", default="runs", metavar="DIR", help="where <table>/<row>/seed<k>/ are made")
    p.add_argument("--data-dir", metavar="DIR", help="passed to every run (ImageNet's folder; CIFAR: ./data)")
    p.add_argument("--gpus", type=positive_int, metavar="N",
                   help="GPUs per run, >1 under torchrun (default: the row's gpus, else 1)")
    p.add_argument("--progress", type=nonneg_float, default=60.0, metavar="SECONDS",
                   help="seconds between progress reports while runs go (k/N done, elapsed, ETA, each running "
                        "run's last log line); 0: none")
    g = p.add_argument_group("slurm")
    g.add_argument("--partition", help="SLURM partition (default: the cluster's)")
    g.add_argument("--time", type=positive_int, default=24 * 60, metavar="MINUTES",
                   help="time limit of a job; a run that reaches it is saved and requeued")
    g.add_argument("--cpus-per-gpu", type=positive_int, default=8, help="CPU cores per GPU of a job")
    g.add_argument("--max-timeouts", type=positive_int, default=10,
                   help="requeues after reaching the time limit before a job gives up (preemptions are not counted)")
    return p


def script_args_checker(script: str):
    """The script's own command-line check, without running it."""
    if script == "prune.py":
        import prune
        return prune.parse_args
    import importlib

    from engine.cli import parse_args
    recipe = importlib.import_module(script.removesuffix(".py")).RECIPE
    return lambda argv: parse_args(recipe, argv, prog=script)


def check_flags(table, runs, data_dir) -> None:
    """Every run's arguments through its script's parser: a rejected row is one line naming it."""
    checkers = {}
    for run in runs:
        check = checkers.setdefault(run.row.script, script_args_checker(run.row.script))
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
                check(run.argv(resume=False, data_dir=data_dir))
        except SystemExit:
            message = errors.getvalue().strip().splitlines()[-1:] or ["the script refused its arguments"]
            raise UsageError(f"{table.path.name} row {run.row.name!r}: {message[0]}") from None


def check_inputs(todo, table_dir: Path) -> None:
    """A run reads files of other runs; those this invocation does not make must exist now."""
    made = {run.run_dir for run in todo}
    for run in todo:
        for path in run.needs:
            if path.exists() or any(path.is_relative_to(d) for d in made):
                continue
            row = path.relative_to(table_dir).parts[0]
            raise UsageError(f"{run.key} needs {path}, which does not exist: run its row first (--only {row})")


def _flag_value(args, flags) -> str | None:
    for i, arg in enumerate(args):
        name, _, value = arg.partition("=")
        if name in flags:
            return value or (args[i + 1] if i + 1 < len(args) else "")
    return None


def needs_data_folder(table, row) -> bool:
    """The row reads a dataset that must already be on disk (ImageNet: train_resnet50.py, or a prune.py row
    with --dataset imagenet, e.g. torchvision's weights through --pretrained; or a --dataset folder tree),
    from reproduce.py's --data-dir: not with --dummy, nor with a --data-dir of its own; a row that prunes
    such a row's network (``{dense}``) reads the same data. CIFAR downloads itself."""
    if "--dummy" in row.args or _flag_value(row.args, ("--data-dir", "--data_dir")) is not None:
        return False
    if row.script == "train_resnet50.py" or _flag_value(row.args, ("--dataset",)) in ("folder", "imagenet"):
        return True
    return any(needs_data_folder(table, table.row(need)) for need in row.needs)


def check_data_dir(table, runs, data_dir) -> None:
    """A table that reads real data gets an existing --data-dir (ImageNet: a required one)."""
    real = list({run.row.name: run.row for run in runs if "--dummy" not in run.row.args}.values())
    if not real:
        return
    if data_dir is None:
        folder = next((row for row in real if needs_data_folder(table, row)), None)
        if folder is not None:
            raise UsageError(f"{table.name} row {folder.name!r} reads ImageNet (or an image folder): give its "
                             f"directory with --data-dir DIR (to try reproduce.py without data: python reproduce.py "
                             f"tiny, a table on synthetic data)")
        return
    if not Path(data_dir).is_dir():
        folder = next((row for row in real if needs_data_folder(table, row)), None)
        hint = ("the ImageNet folder, with train/ and val/" if folder is not None
                else "CIFAR: create the folder and the runs download CIFAR into it")
        raise UsageError(f"--data-dir {data_dir} is not a directory, and row {(folder or real[0]).name!r} of "
                         f"{table.name} reads real data from it ({hint})")


def levels_of(todo) -> dict[str, int]:
    level = {}
    for run in todo:  # dependencies first
        level[run.key] = 1 + max((level[k] for k in run.after if k in level), default=-1)
    return level


def log_of(runs_dir: Path, table, run) -> Path:
    return runs_dir / table.name / "logs" / f"{run.row.name}.seed{run.seed}.log"


def say(line: str) -> None:
    print(line, flush=True)  # a table's output is often a file (nohup, SLURM): every line as it happens


def reproduce(args) -> int:
    table = load_table(args.table)
    seeds = tuple(range(args.seeds)) if args.seeds else table.seeds
    runs_dir = Path(args.runs_dir)
    if args.report:
        for path in write_report(table, runs_dir, seeds):
            print(f"wrote {path}")
        return 0
    runs = plan(table, runs_dir, seeds, args.only)
    check_data_dir(table, runs, args.data_dir)
    check_flags(table, runs, args.data_dir)
    todo = [run for run in runs if not finished(run.run_dir)]
    check_inputs(todo, runs_dir / table.name)
    if args.launcher == "slurm" and not args.dry_run and shutil.which("sbatch") is None:
        raise UsageError("--launcher slurm needs SLURM's sbatch on PATH (try --launcher submitit-local here)")
    cwd = Path.cwd()
    tasks = [Task(run, cwd, log_of(runs_dir, table, run), args.data_dir, args.gpus) for run in todo]
    for run in runs:
        if run not in todo:
            print(f"skip    {run.key}: finished ({run.run_dir})")
    if args.dry_run:
        levels = levels_of(todo)
        for task in tasks:
            where = f"[slurm level {levels[task.key]}] " if args.launcher == "slurm" else ""
            print(f"{where}{shlex.join(task.command())}")
            if task.run.row.authors:
                print(f"    # authors: {task.run.row.authors}")
        return 0
    submitit_folder = runs_dir / table.name / "submitit"
    # Finished runs count as finished for the runs that need them; their wall times feed the ETA.
    done_before = {run.key: run_seconds(log_of(runs_dir, table, run), run.run_dir) for run in runs if run not in todo}
    if not tasks:
        print(f"nothing to run: every run of {table.name} has finished")
        outcome = {}
    elif args.launcher == "local":
        outcome = run_local(tasks, args.jobs or 1, say=say, done_before=done_before, progress_s=args.progress)
    else:
        # The jobs unpickle this project's classes wherever they start.
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        if args.launcher == "submitit-local":
            outcome = run_submitit_local(tasks, args.jobs or 1, submitit_folder, args.time, say=say,
                                         done_before=done_before, progress_s=args.progress)
        else:
            settings = dict(time=args.time, partition=args.partition, cpus_per_gpu=args.cpus_per_gpu,
                            jobs=args.jobs, max_timeouts=args.max_timeouts, name=table.name)
            report = ReportJob(str(table.path.resolve()), str(runs_dir.resolve()), seeds)
            submit_slurm(tasks, levels_of(todo), submitit_folder, settings, report, say=print)
            print(f"the last job writes the report; at any time: python reproduce.py {args.table} --report")
            return 0
    for path in write_report(table, runs_dir, seeds):
        print(f"wrote {path}")
    states = set(outcome.values())
    return (EXIT_PREEMPTED if STOPPED in states else EXIT_USAGE if BLOCKED in states
            else 1 if FAILED in states else 0)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_reporting_errors("reproduce.py", lambda: reproduce(args))


if __name__ == "__main__":
    sys.exit(main())
