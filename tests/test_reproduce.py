"""reproduce.py: a paper table in one command (experiments/*.toml, reproduction/tables.py, launch.py, report.py).

One module-scoped run of the tiny table (one seed, two runs at a time) serves
the tests of dependency order, skipping and the report; a one-row table of
many one-batch epochs is interrupted twice: killed (SIGKILL) under the local
launcher, and stopped with SIGTERM (the run saves and exits 75) under
submitit's local executor, where the job must requeue itself and finish the
run with --resume auto. Errors and dry runs are checked in-process.
"""
import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import cloudpickle
import pytest
import submitit

import reproduce
from reproduction import launch
from conftest import REPO_ROOT, process_ids, script_command, script_env
from reproduction.report import collect, figure, write_report
from reproduction.tables import TABLES_DIR, load_table, plan

TINY_ROWS = ("dense", "dep-fwd", "hc-macs", "dsr", "l1-macs")
# Many short epochs, so that a test can interrupt the run between two of them.
LONG_TABLE = """title = "long"
seeds = [0]
[[row]]
name = "dense"
method = "dense"
script = "train_vgg.py"
args = ["--net", "dense", "--dummy", "--width-mult", "0.125", "--epoch", "12", "-b", "16", "--limit-batches", "1",
        "-j", "0"]
"""
TIMEOUT = 300


def _reproduce(*args, cwd):
    return subprocess.run(script_command("reproduce.py", *args), cwd=cwd, env=script_env(), capture_output=True,
                          text=True, timeout=TIMEOUT)


def _diag(proc) -> str:
    return f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"


def _snapshot(root: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def scripts_env(monkeypatch):
    """In-process reproduce.py starts its runs in this process's environment: that of conftest's
    script runs (one thread, no CUDA, no downloads); PYTHONPATH, which the submitit launcher sets,
    is restored afterwards."""
    monkeypatch.delenv("PYTHONPATH", raising=False)
    for key, value in script_env().items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("reproduce")
    proc = _reproduce("tiny", "--seeds", "1", "--jobs", "2", cwd=base)
    return base, proc


def test_tiny_table_runs_every_row_dependencies_first(tiny):
    base, proc = tiny
    assert proc.returncode == 0, _diag(proc)
    lines = proc.stdout.splitlines()
    for row in TINY_ROWS:
        results = json.loads((base / "runs/tiny" / row / "seed0/results.json").read_text())
        assert results["epochs_done"] == results["epochs_total"] and results["seed"] == 0
        assert (base / "runs/tiny" / row / "seed0/pruned.pt").is_file()
    # The peer starts only once the dense baseline it prunes has finished, and prunes exactly it.
    assert lines.index("done    dense/seed0") < next(i for i, l in enumerate(lines) if l.startswith("start   l1-macs"))
    l1 = json.loads((base / "runs/tiny/l1-macs/seed0/results.json").read_text())
    assert Path(l1["source"]) == Path("runs/tiny/dense/seed0/best.pt")
    assert not (base / "runs/tiny/dense/seed1").exists()  # --seeds 1
    assert "Traceback" not in proc.stderr, proc.stderr


def test_report_of_the_tiny_table(tiny):
    base, proc = tiny
    assert proc.returncode == 0, _diag(proc)
    with open(base / "runs/tiny/report.csv") as f:
        rows = {r["row"]: r for r in csv.DictReader(f)}
    assert list(rows) == list(TINY_ROWS)
    for name, row in rows.items():
        results = json.loads((base / "runs/tiny" / name / "seed0/results.json").read_text())
        assert float(row["top1_mean"]) == results["best_top1"]
        assert float(row["macs_mean"]) == results["macs_pruned"]
        assert float(row["params_reduction_mean"]) == pytest.approx(results["params_reduction"])
        assert row["seeds_done"] == "1" and row["top1_std"] == ""  # one seed: no spread
        assert row["published_top1"] == "" and row["top1_minus_published"] == ""  # nothing published
    assert abs(float(rows["l1-macs"]["macs_reduction_mean"]) - 50) <= 1  # --target-macs 0.5
    md = (base / "runs/tiny/report.md").read_text()
    assert "| l1-macs | L1 | vgg16 | synthetic (CIFAR-10 shape) | 1/1 |" in md, md
    assert "**Synthetic data** (`--dummy`) in every row" in md
    assert rows["l1-macs"]["dataset"] == "cifar10" and rows["l1-macs"]["synthetic"] == "True"
    assert (base / "runs/tiny/report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_finished_rows_are_skipped(tiny, monkeypatch, capsys):
    base, proc = tiny
    assert proc.returncode == 0, _diag(proc)
    runs = base / "runs/tiny"
    before = {k: v for k, v in _snapshot(runs).items() if "/report." not in k}
    monkeypatch.chdir(base)
    assert reproduce.main(["tiny", "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert all(f"skip    {row}/seed0: finished" in out for row in TINY_ROWS), out
    assert "start" not in out
    assert {k: v for k, v in _snapshot(runs).items() if "/report." not in k} == before  # no run touched
    # The dry run of a second seed: the finished runs skipped, the missing ones' exact commands.
    assert reproduce.main(["tiny", "--dry-run", "--seeds", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    done = len(TINY_ROWS)
    assert out[:done] == [f"skip    {row}/seed0: finished (runs/tiny/{row}/seed0)" for row in TINY_ROWS]
    wanted = [run.command(resume=False) for run in plan(load_table("tiny"), Path("runs"), (0, 1)) if run.seed == 1]
    assert out[done:] == [" ".join(command) for command in wanted]
    assert out[-1].endswith("prune.py runs/tiny/dense/seed1/best.pt --method l1 --target-macs 0.5 --epochs 1 -b 16 "
                            "--limit-batches 2 --dummy -j 0 --seed 1 --out-dir runs/tiny/l1-macs/seed1")
    assert not (runs / "dense/seed1").exists()


def test_dry_run_writes_nothing_and_every_shipped_table_passes_its_scripts_parsers(tmp_path_factory, monkeypatch,
                                                                                    capsys):
    tmp_path, data = tmp_path_factory.mktemp("dry"), tmp_path_factory.mktemp("data")
    monkeypatch.chdir(tmp_path)
    for path in sorted(TABLES_DIR.glob("*.toml")):
        assert reproduce.main([path.stem, "--dry-run", "--data-dir", str(data)]) == 0, capsys.readouterr().err
        lines = capsys.readouterr().out.splitlines()
        out = [line for line in lines if not line.startswith("    # authors: ")]
        table = load_table(path.stem)
        assert len(out) == len(table.rows) * len(table.seeds)
        assert len(lines) - len(out) == sum(row.authors is not None for row in table.rows) * len(table.seeds)
        assert all(f"--out-dir runs/{path.stem}/" in line and "--resume" not in line for line in out)
        assert all(f"--data-dir {data}" in line for line in out)
        assert "Time on one GPU" in path.read_text()
    assert reproduce.main(["tiny", "--dry-run", "--launcher", "slurm"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split("]")[0] + "]" for line in out] == ["[slurm level 0]"] * 8 + ["[slurm level 1]"] * 2
    assert reproduce.main(["tiny", "--dry-run", "--only", "dense", "--gpus", "2"]) == 0
    assert all(" -m torch.distributed.run --standalone --nproc_per_node=2 " in line
               for line in capsys.readouterr().out.splitlines())
    assert list(tmp_path.iterdir()) == []


def test_dry_run_prints_the_authors_command_under_its_row(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    authors = "python main.py --method GReg-1 --stage_pr [0,0.75,0.75,0.32,0]"
    table = _table(tmp_path, HEAD + _row("a", TINY_VGG) + f'authors = "{authors}"\n' + _row("b", TINY_VGG))
    assert reproduce.main([table, "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == f"    # authors: {authors}" and "--out-dir runs/t/a/" in out[0]
    assert len(out) == 3 and "--out-dir runs/t/b/" in out[2]


def test_a_seed_offset_changes_the_runs_seed_not_its_folder_or_its_dependencies(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    text = (HEAD.replace("[0]", "[0, 1]") + _row("a", TINY_VGG)
            + _row("b", ["{a}/best.pt", "--method", "l1", "--stage_pr", "[0:0.5]"], "prune.py") + "seed_offset = 1000\n")
    assert reproduce.main([_table(tmp_path, text), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    b = [line for line in out if "/t/b/" in line]
    assert [(" --seed 1000 " in b[0]), (" --seed 1001 " in b[1])] == [True, True]
    assert "runs/t/a/seed0/best.pt" in b[0] and "--out-dir runs/t/b/seed0" in b[0]
    assert all(" --seed 0 " in line or " --seed 1 " in line for line in out if "--out-dir runs/t/a/" in line)


def _published_numbers(text: str) -> set[str]:
    return set(re.findall(r"\d+\.\d+", text))


@pytest.mark.skipif(not (REPO_ROOT.parent / "shared/spec/peer-methods.md").is_file(), reason="no specs here")
def test_published_numbers_come_from_the_spec():
    spec = _published_numbers((REPO_ROOT.parent / "shared/spec/peer-methods.md").read_text())
    for path in TABLES_DIR.glob("*.toml"):
        for row in load_table(path.stem).rows:
            for key in ("top1", "base"):
                if row.published and key in row.published:
                    value = row.published[key]  # as the spec writes it: 73.3 or 93.36
                    assert any(float(number) == value for number in spec), (path.name, row.name, key, value)


def _table(tmp_path: Path, text: str, name="t.toml") -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def _row(name, args, script="train_vgg.py"):
    return f'[[row]]\nname = "{name}"\nmethod = "{name}"\nscript = "{script}"\nargs = {json.dumps(args)}\n'


TINY_VGG = ["--net", "dense", "--dummy", "--width-mult", "0.125", "--epoch", "1", "-b", "16", "--limit-batches", "1",
            "-j", "0"]
HEAD = 'title = "t"\nseeds = [0]\n'
ERRORS = {
    "unknown table": (None, ["no_such_table"], "unknown table 'no_such_table'"),
    "unknown row": (None, ["tiny", "--only", "nope"], "unknown row 'nope'"),
    "unknown flag": (HEAD + _row("a", TINY_VGG + ["--bogus", "1"]), [],
                     "row 'a': train_vgg.py: error: unrecognized arguments: --bogus 1"),
    "bad value": (HEAD + _row("a", ["--net", "foo"]), [], "row 'a': train_vgg.py: error: argument --net"),
    "prune flag": (HEAD + _row("a", TINY_VGG) + _row("b", ["{a}/best.pt", "--method", "l1", "--target-macs", "1.5"],
                                                    "prune.py"), [], "row 'b': prune.py: error: --target-macs 1.5"),
    "run flag": (HEAD + _row("a", TINY_VGG + ["--out-dir", "x"]), [],
                 "row 'a': sets --out-dir, which reproduce.py sets"),
    "unknown placeholder": (HEAD + _row("a", ["{dense}/best.pt"], "prune.py"), [],
                            "refers to {dense}, which is no row"),
    "cycle": (HEAD + _row("a", ["{b}/best.pt"], "prune.py") + _row("b", ["{a}/best.pt"], "prune.py"), [],
              "cycle: a -> b -> a"),
    "unknown key": (HEAD + _row("a", TINY_VGG) + "gpu = 2\n", [], "row 'a': unknown key 'gpu'"),
    "seed_offset negative": (HEAD + _row("a", TINY_VGG) + "seed_offset = -1\n", [],
                             "row 'a': seed_offset must be a non-negative integer, got -1"),
    "authors not a string": (HEAD + _row("a", TINY_VGG) + "authors = 3\n", [],
                             "row 'a': authors must be the authors' command line as a string, got 3"),
    "published top5 not positive": (HEAD + _row("a", TINY_VGG) + 'published = { top1 = 90.0, top5 = -1, source = "x" }\n',
                                    [], "row 'a': published top5 must be a positive number, got -1"),
    "dependency not run": (None, ["tiny", "--only", "l1-macs"],
                           "l1-macs/seed0 needs runs/tiny/dense/seed0/best.pt, which does not exist: "
                           "run its row first (--only dense)"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, tmp_path, monkeypatch, capsys):
    text, argv, message = ERRORS[case]
    table = _table(tmp_path, text) if text else argv.pop(0)
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.iterdir())
    assert reproduce.main([table, *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert sorted(tmp_path.iterdir()) == before


def test_a_failed_dependency_stops_its_dependents(tmp_path, monkeypatch, scripts_env, capsys):
    broken = ["--net", "dense", "--dataset", "folder", "--data-dir", "no-such-folder", "--epoch", "1", "-j", "0"]
    table = _table(tmp_path, HEAD + _row("dense", broken)
                   + _row("l1", ["{dense}/best.pt", "--method", "l1", "--target-macs", "0.5"], "prune.py"))
    monkeypatch.chdir(tmp_path)
    assert reproduce.main([table, "--runs-dir", "out"]) == 2
    out = capsys.readouterr().out
    assert re.search(r"error: dense/seed0 failed: .*no-such-folder", out), out
    assert "error: l1/seed0 not run: the run it needs, dense/seed0, failed" in out
    assert not (tmp_path / "out/t/l1").exists()
    assert "| l1 | l1 |  |  | 0/1 |" in (tmp_path / "out/t/report.md").read_text()


def test_report_mean_std_and_published_difference(tmp_path):
    table = load_table(_table(tmp_path, HEAD.replace("[0]", "[0, 1]") + _row("a", TINY_VGG)
                              + 'published = { top1 = 90.5, base = 93.0, speedup = 2.0, source = "paper" }\n'
                              + _row("b", TINY_VGG)))
    for seed, top1 in ((0, 90.0), (1, 92.0)):
        run = tmp_path / "runs/t/a" / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "pruned.pt").write_bytes(b"")
        (run / "results.json").write_text(json.dumps(dict(
            model="vgg16", dataset="cifar10", epochs_done=3, epochs_total=3, best_top1=top1, top1=top1 - 1,
            macs_pruned=100 + seed, macs_reduction=50.0 + seed, params_pruned=10, params_reduction=40.0)))
    unfinished = tmp_path / "runs/t/b/seed0"
    unfinished.mkdir(parents=True)
    (unfinished / "results.json").write_text(json.dumps(dict(epochs_done=1, epochs_total=3, best_top1=1.0)))
    write_report(table, tmp_path / "runs", (0, 1))
    with open(tmp_path / "runs/t/report.csv") as f:
        a, b = csv.DictReader(f)
    assert float(a["top1_mean"]) == 91.0 and float(a["top1_std"]) == pytest.approx(2 ** 0.5)
    assert float(a["top1_minus_published"]) == pytest.approx(0.5) and float(a["published_macs_kept"]) == 0.5
    assert float(a["macs_reduction_mean"]) == 50.5 and a["seeds_done"] == "2"
    assert b["seeds_done"] == "0" and b["top1_mean"] == ""  # an unfinished run is not averaged
    # The plot: ours filled, the published point hollow, at the published MACs.
    lines = figure(table, collect(table, tmp_path / "runs", (0, 1))).axes[0].get_lines()
    hollow = [line for line in lines if line.get_markerfacecolor() == "none"]
    assert len(hollow) == 1 and list(hollow[0].get_xydata()[0]) == [50.0, 90.5]
    assert any(list(line.get_xydata()[0]) == [49.5, 91.0] for line in lines if line not in hollow)
    md = (tmp_path / "runs/t/report.md").read_text()
    assert "| 91.00 ± 1.41 |" in md and "| 90.50 (93.00) | 50.0% MACs (2.00x) | +0.50 | paper |" in md, md


def test_report_says_who_reached_the_budget(tmp_path):
    """The "reached by" column: training, the projection (with its share) when it moved more than 5% of
    the channels, the collapse guard's epoch, a peer's search; per seed, each distinct answer once."""
    table = load_table(_table(tmp_path, HEAD.replace("[0]", "[0, 1]") + _row("a", TINY_VGG) + _row("b", TINY_VGG)
                              + _row("c", TINY_VGG)))
    budgets = {
        "a": [dict(settled_by="training", within_tolerance=True, projection=None, collapse=None),
              dict(settled_by="projection", within_tolerance=True, projection=dict(closed=20, reopened=0, share=0.2),
                   collapse=None)],
        "b": [dict(settled_by="training", within_tolerance=True, projection=None, collapse=dict(epoch=7))] * 2,
        "c": [dict(kind="macs", target=0.5, achieved=0.5, settled_by="search", within_tolerance=True)] * 2,
    }
    for name, blocks in budgets.items():
        for seed, block in enumerate(blocks):
            run = tmp_path / "runs/t" / name / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "pruned.pt").write_bytes(b"")
            (run / "results.json").write_text(json.dumps(dict(
                model="vgg16", dataset="cifar10", epochs_done=3, epochs_total=3, best_top1=50.0, top1=50.0,
                macs_pruned=100, macs_reduction=50.0, params_pruned=10, params_reduction=40.0, budget=block)))
    write_report(table, tmp_path / "runs", (0, 1))
    with open(tmp_path / "runs/t/report.csv") as f:
        reached = {row["row"]: row["reached_by"] for row in csv.DictReader(f)}
    assert reached == {"a": "training; projection (20% of channels)", "b": "collapse (epoch 7)", "c": "search"}
    md = (tmp_path / "runs/t/report.md").read_text()
    assert "| reached by |" in md and "| training; projection (20% of channels) |" in md, md


def test_a_table_on_real_data_needs_an_existing_data_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    missing = str(tmp_path / "nonexistent")
    assert reproduce.main(["resnet50_imagenet", "--dry-run", "--data-dir", missing]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"reproduce.py: error: --data-dir {missing} is not a directory, and row 'dense' of resnet50_imagenet reads "
        f"real data from it (the ImageNet folder, with train/ and val/)"]
    # Without --data-dir: advice that reproduce.py can follow (it has no --dummy).
    for argv in (["resnet50_imagenet"], ["resnet50_imagenet_macs", "--only", "l1"]):
        assert reproduce.main([*argv, "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "--data-dir DIR" in err and "python reproduce.py tiny" in err, err
        assert "--dummy" not in err
    assert "row 'l1' reads ImageNet" in err  # a peer reads the data of the baseline it prunes
    # CIFAR downloads into an existing folder; synthetic rows read none.
    assert reproduce.main(["resnet56_cifar10", "--dry-run", "--data-dir", missing]) == 2
    assert "CIFAR: create the folder" in capsys.readouterr().err
    assert reproduce.main(["resnet56_cifar10", "--dry-run"]) == 0
    assert reproduce.main(["tiny", "--dry-run", "--data-dir", missing]) == 0
    assert list(tmp_path.iterdir()) == []


RESULTS = dict(model="vgg16", dataset="cifar10", method="dense", net="dense", epochs_done=1, epochs_total=1,
               top1=10.0, best_top1=10.0, macs_dense=100, macs_pruned=100, macs_reduction=0.0, params_dense=10,
               params_pruned=10, params_reduction=0.0, channels=[dict(name="conv1", kept=4, total=8)])


def test_summarize_finds_reproduce_runs_and_labels_synthetic_data(tmp_path, monkeypatch, capsys):
    import torch

    import summarize

    def run(path, checkpoint_args=None, **changes):
        path.mkdir(parents=True)
        (path / "results.json").write_text(json.dumps({**RESULTS, **changes}))
        (path / "pruned.pt").write_bytes(b"")
        if checkpoint_args is not None:
            torch.save(dict(args=checkpoint_args), path / "last.pt")

    runs = tmp_path / "runs"
    run(runs / "tiny/dense/seed0", dict(dummy=True))   # reproduce.py's: its checkpoint's arguments say so
    (runs / "tiny/logs").mkdir()
    (runs / "tiny/logs/dense.seed0.log").write_text("$ python train_vgg.py --dummy\n")
    run(runs / "vgg16_dummy-cifar10_dense")            # the scripts' own run name says so
    run(runs / "vgg16_cifar10_dense", dict(dummy=False))
    run(runs / "flagged", dummy=True)                  # results.json's own key
    titles = {}
    save = summarize.save_channels_png
    monkeypatch.setattr(summarize, "save_channels_png",
                        lambda channels, path, title: titles.setdefault(path.parent, title) and save(channels, path, title))
    capsys.readouterr()
    assert summarize.main([str(runs)]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # no "skipping runs/tiny: no results.json"
    rows = {cells[-1]: cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                           for line in out.strip().splitlines()[2:])}
    assert set(rows) == {"tiny/dense/seed0", "vgg16_dummy-cifar10_dense", "vgg16_cifar10_dense", "flagged"}
    for name in ("tiny/dense/seed0", "vgg16_dummy-cifar10_dense", "flagged"):
        assert rows[name][1] == "synthetic (CIFAR-10 shape)", rows[name]
        assert "synthetic (CIFAR-10 shape)" in titles[runs / name]
    assert rows["vgg16_cifar10_dense"][1] == "CIFAR-10"
    assert "synthetic" not in titles[runs / "vgg16_cifar10_dense"] and "CIFAR-10" in titles[runs / "vgg16_cifar10_dense"]
    assert (runs / "tiny/dense/seed0/channels.png").read_bytes()[:4] == b"\x89PNG"


def test_report_labels_synthetic_rows(tmp_path):
    real = ["--net", "dense", "--epoch", "1"]
    table = load_table(_table(tmp_path, HEAD + _row("real", real) + _row("fake", TINY_VGG)
                              + _row("peer", ["{fake}/best.pt", "--method", "l1", "--target-macs", "0.5"], "prune.py")))
    for row in ("real", "fake", "peer"):
        run = tmp_path / "runs/t" / row / "seed0"
        run.mkdir(parents=True)
        (run / "pruned.pt").write_bytes(b"")
        (run / "results.json").write_text(json.dumps(RESULTS))
    write_report(table, tmp_path / "runs", (0,))
    md = (tmp_path / "runs/t/report.md").read_text()
    assert "| real | real | vgg16 | CIFAR-10 | 1/1 |" in md, md
    assert "| fake | fake | vgg16 | synthetic (CIFAR-10 shape) | 1/1 |" in md
    assert "| peer | peer | vgg16 | synthetic (CIFAR-10 shape) | 1/1 |" in md  # it prunes a synthetic row
    assert "**Synthetic data** (`--dummy`) in rows fake, peer:" in md
    with open(tmp_path / "runs/t/report.csv") as f:
        assert [r["synthetic"] for r in csv.DictReader(f)] == ["False", "True", "True"]
    title = figure(table, collect(table, tmp_path / "runs", (0,))).axes[0].get_title()
    assert title == "t\n(synthetic data: not a result)"


def _interrupt_long_run(base: Path, launcher: str, signum: int, capsys):
    """Run the long table in-process; once its first checkpoint and its results.json exist (written
    one after the other at an epoch's end), send ``signum`` to the training process (from a
    thread: the launcher's signal handlers need the main thread)."""
    table = _table(base, LONG_TABLE, "long.toml")
    run_dir = base / "runs/long/dense/seed0"
    sent = []

    def interrupt():
        deadline = time.time() + 120
        while not ((run_dir / "last.pt").exists() and (run_dir / "results.json").exists()) and time.time() < deadline:
            time.sleep(0.05)
        for pid in process_ids(f"--out-dir {run_dir}"):
            os.kill(pid, signum)
            sent.append(pid)

    thread = threading.Thread(target=interrupt)
    thread.start()
    try:
        rc = reproduce.main([table, "--launcher", launcher, "--runs-dir", str(base / "runs")])
    finally:
        thread.join()
    assert sent, "the training process was not found"
    return rc, capsys.readouterr().out, run_dir


def _commands(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("$ ")]


def test_a_killed_row_continues_with_resume_auto(tmp_path, scripts_env, capsys):
    rc, out, run_dir = _interrupt_long_run(tmp_path, "local", signal.SIGKILL, capsys)
    assert rc == 1 and "error: dense/seed0 failed" in out, out
    done_before = json.loads((run_dir / "results.json").read_text())["epochs_done"]
    assert 1 <= done_before < 12
    assert reproduce.main([str(tmp_path / "long.toml"), "--runs-dir", str(tmp_path / "runs")]) == 0, capsys.readouterr()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs_done"] == 12
    first, second = _commands(tmp_path / "runs/long/logs/dense.seed0.log")
    assert second == first + " --resume auto"


def test_submitit_requeues_a_run_stopped_with_exit_75_and_resumes_it(tmp_path, scripts_env, capsys):
    rc, out, run_dir = _interrupt_long_run(tmp_path, "submitit-local", signal.SIGTERM, capsys)
    assert rc == 0 and "done    dense/seed0" in out, out
    assert json.loads((run_dir / "results.json").read_text())["epochs_done"] == 12
    log = (tmp_path / "runs/long/logs/dense.seed0.log").read_text()
    assert "stopped by signal" in log  # the run saved and exited 75 ...
    first, second = _commands(tmp_path / "runs/long/logs/dense.seed0.log")
    assert second == first + " --resume auto"  # ... and the requeued job continued it
    resumed = log.split(second, 1)[1]
    assert not re.search(r"^Epoch \[1\]", resumed, re.M)
    job_logs = "".join(p.read_text() for p in (tmp_path / "runs/long/submitit").glob("*_log.out"))
    assert "Requeued job" in job_logs, job_logs


class _FakeSlurm:
    """What submit_slurm asks of submitit's executor, recorded; job ids as SLURM gives them."""

    def __init__(self):
        self.arrays, self.parameters, self.next_id, self.in_batch = [], {}, 100, None

    def update_parameters(self, **kwargs):
        self.parameters.update(kwargs)

    @contextlib.contextmanager
    def batch(self):
        self.in_batch = []
        yield
        self.arrays.append((dict(self.parameters), self.in_batch))
        for i, job in enumerate(self.in_batch):
            job.job_id = f"{self.next_id}_{i}"
        self.next_id, self.in_batch = self.next_id + 1, None

    def submit(self, function):
        job = types.SimpleNamespace(job_id=None, function=function)
        if self.in_batch is None:
            job.job_id = str(self.next_id)
            self.arrays.append((dict(self.parameters), [job]))
        else:
            self.in_batch.append(job)
        return job


def test_slurm_submits_one_array_per_level_each_after_the_previous(tmp_path, monkeypatch):
    fake = _FakeSlurm()
    monkeypatch.setattr(launch, "executor", lambda cluster, folder, max_timeouts: fake)
    runs = plan(load_table("tiny"), Path("runs"), (0, 1))
    tasks = [launch.Task(run, tmp_path, Path("log"), gpus=None) for run in runs]
    settings = dict(time=600, partition="gpu", cpus_per_gpu=8, jobs=None, max_timeouts=10, name="tiny")
    ids = launch.submit_slurm(tasks, reproduce.levels_of(runs), tmp_path, settings, "report", say=lambda _: None)
    (first, dense_etc), (second, peers), (last, report) = fake.arrays
    assert [j.function.task.key for j in dense_etc] == [r.key for r in runs if r.row.name != "l1-macs"]
    assert [j.function.task.key for j in peers] == ["l1-macs/seed0", "l1-macs/seed1"]
    assert first["slurm_dependency"] is None and second["slurm_dependency"] == "afterok:100"
    assert (first["gpus_per_node"], first["cpus_per_task"], first["timeout_min"]) == (1, 8, 600)
    assert first["slurm_partition"] == "gpu"
    assert first["slurm_array_parallelism"] == 8
    assert last["slurm_dependency"] == "afterany:100:101" and last["gpus_per_node"] == 0
    assert report[0].function == "report"
    assert ids == ["100", "101", "102"]
    # A job travels pickled; a requeued one never carries the process of the run it stopped.
    job = cloudpickle.loads(cloudpickle.dumps(peers[0].function))
    assert job.task == peers[0].function.task and job.process is None


def test_submitits_signal_makes_the_run_save_before_the_job_requeues(tmp_path):
    """checkpoint() (called by submitit's handler of its USR2) passes SIGTERM to the run, waits for
    it to exit (the scripts save, then exit 75) and resubmits the same job."""
    run = plan(load_table("tiny"), Path("runs"), (0,))[0]
    job = launch.SubmititRun(launch.Task(run, tmp_path, Path("log")))
    job.process = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time\n"
                               "signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))\n"
                               "print('ready', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert job.process.stdout.readline() == "ready\n"
    delayed = job.checkpoint()
    assert job.process.returncode == 75
    assert isinstance(delayed, submitit.helpers.DelayedSubmission) and delayed.function is job


def test_a_stopped_launcher_lets_its_runs_save_and_exits_75(tmp_path):
    """SIGTERM (or Ctrl-C) to reproduce.py: the running run gets SIGTERM, saves and exits 75,
    nothing new starts, and reproduce.py exits 75 (the next invocation continues the run)."""
    table = _table(tmp_path, LONG_TABLE, "long.toml")
    proc = subprocess.Popen(script_command("reproduce.py", table), cwd=tmp_path, env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "runs/long/dense/seed0"
    deadline = time.time() + 120
    while not (run_dir / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 75, out + err
    assert "stopped dense/seed0: saved" in out
    assert "stopped by signal" in (tmp_path / "runs/long/logs/dense.seed0.log").read_text()
    assert json.loads((run_dir / "results.json").read_text())["epochs_done"] < 12
