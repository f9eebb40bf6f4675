"""What a new user hits in the first hour (issue: the first hour and the thirty-hour table).

Each case failed before: a negative number in exponent form taken for a flag, a
run of zero epochs accepted, a library message cut mid-word, a second run of an
interrupted command starting a new folder without a word, evaluate.py and
prune.py reaching for real data for a run made on synthetic data, a progress
line with no run ETA or phase, a resumed run that does not say where from.
"""
import json
import os
import subprocess

import pytest
import torch

import evaluate
import prune
import train_resnet50
import train_vgg
from conftest import script_command, script_env
from engine import cli
from engine.cli import build_parser, parse_args
from models import build_model, default_arch
from pruning import specs
from pruning.greg import GReg
from utils import run
from utils.cli import usable_cpus
from utils.errors import brief
from utils.run import limit_threads, new_run_note, unfinished_run

TINY = ("--dummy", "--width-mult", "0.125", "-b", "8", "--limit-batches", "2", "-j", "0", "--seed", "0")


def one_line_error(capsys, action) -> str:
    with pytest.raises(SystemExit) as stop:
        action()
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_negative_number_in_exponent_form_is_a_value_with_a_clear_error(capsys):
    line = one_line_error(capsys, lambda: parse_args(train_vgg.RECIPE, ["--lamba", "-1e-6"], prog="train_vgg.py"))
    assert "--lamba: must be >= 0.0, got -1e-6" in line
    assert parse_args(train_vgg.RECIPE, ["--lamba", "1e-6"]).lamba == 1e-6


def test_zero_epochs_are_refused(capsys):
    line = one_line_error(capsys, lambda: parse_args(train_vgg.RECIPE, ["--epoch", "0", "--fine_tune_epoch", "0"]))
    assert "trains nothing" in line
    line = one_line_error(capsys, lambda: parse_args(train_vgg.RECIPE, ["--sparse", "static", "--density", "0.5",
                                                                         "--epoch", "0"]))
    assert "trains nothing" in line
    line = one_line_error(capsys, lambda: prune.parse_args(["best.pt", "--method", "l1", "--target-macs", "0.5",
                                                            "--epochs", "0"]))
    assert "--epochs 0 fine-tunes nothing" in line
    # --epoch 0 with fine-tuning epochs is a real run (the gates as initialised, then fine-tuning).
    assert parse_args(train_vgg.RECIPE, ["--epoch", "0", "--fine_tune_epoch", "2"]).epochs == 0


def test_a_quoted_message_is_cut_at_a_word():
    text = "PytorchStreamReader failed reading zip archive: failed finding central directory. " * 3
    cut = brief(text)
    assert len(cut) <= 124 and cut.endswith(" ...")
    assert cut[:-4] == text[:len(cut) - 4] and text[len(cut) - 4] == " "
    assert brief("short line\nsecond") == "short line"


def test_usable_cpus_are_the_affinity(monkeypatch):
    assert usable_cpus() == len(os.sched_getaffinity(0)) >= 1
    monkeypatch.delattr(os, "sched_getaffinity")  # not Linux: the machine's count
    assert usable_cpus() == (os.cpu_count() or 1)


@pytest.mark.parametrize("cpus", (1, 3, 64))
def test_workers_default_to_at_most_the_cpus_this_process_may_use(cpus, monkeypatch):
    """-j of every script (and HSIC-Lasso's --lasso-threads): the script's default, or the CPUs this
    process may use (its affinity) if fewer, which --help says."""
    for module in (cli, prune, evaluate, specs):
        monkeypatch.setattr(module, "usable_cpus", lambda: cpus)
    assert parse_args(train_vgg.RECIPE, []).workers == min(4, cpus)
    assert parse_args(train_resnet50.RECIPE, ["--dummy"]).workers == min(8, cpus)
    assert f"4, or the CPUs this process may use if fewer (here {min(4, cpus)})" in " ".join(
        build_parser(train_vgg.RECIPE).format_help().split())
    args = prune.parse_args(["b.pt", "--method", "hsic", "--target-macs", "0.5"])
    assert args.workers == min(4, cpus) and args.lasso_threads == min(8, cpus)
    evaluated = []
    monkeypatch.setattr(evaluate, "evaluate", evaluated.append)
    assert evaluate.main(["run/last.pt"]) == 0 and evaluated[0].workers == min(4, cpus)


def test_torch_threads_never_exceed_the_cpus_this_process_may_use(monkeypatch):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(run, "usable_cpus", lambda: 1)
        assert limit_threads() == 1 == torch.get_num_threads()
        monkeypatch.setattr(run, "usable_cpus", lambda: 64)
        assert limit_threads() == 1 == torch.get_num_threads()  # the default or a choice, never raised
    finally:
        torch.set_num_threads(threads)


def test_a_run_on_one_cpu_starts_no_more_loader_workers_than_it_may_use(tmp_path):
    """On a machine of several cores, a process bound to one (taskset, a cpuset) runs with the
    default -j: one loader worker, and no warning from PyTorch that there are too many."""
    argv = ["--dummy", "--width-mult", "0.125", "-b", "4", "--epoch", "1", "--limit-batches", "1", "--seed", "0",
            "--out-dir", "run"]
    proc = subprocess.run(script_command("train_vgg.py", *argv), cwd=tmp_path, env=script_env(), capture_output=True,
                          text=True, timeout=600, preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))
    assert proc.returncode == 0, proc.stderr
    assert '"workers": 1' in proc.stdout
    assert "worker" not in proc.stderr, proc.stderr


def test_an_unfinished_run_of_the_same_command_is_named(tmp_path):
    base = tmp_path / "runs" / "vgg16_cifar10_dep_lam1e-06"
    base.mkdir(parents=True)
    (base / "last.pt").write_bytes(b"x")
    (base / "results.json").write_text(json.dumps(dict(epochs_done=3, epochs_total=10)))
    finished = base.with_name(base.name + "-2")
    finished.mkdir()
    (finished / "last.pt").write_bytes(b"x")
    (finished / "results.json").write_text(json.dumps(dict(epochs_done=10, epochs_total=10)))
    assert unfinished_run(base) == base
    note = new_run_note(base, base.with_name(base.name + "-3"))
    assert f"--resume auto --out-dir {base}" in note and "-3" in note
    (base / "results.json").write_text(json.dumps(dict(epochs_done=10, epochs_total=10)))
    assert unfinished_run(base) is None and new_run_note(base, base) is None


def test_greg_says_how_many_updates_can_remain():
    model = build_model(default_arch("resnet56", 10, 0.125, net="dense"))
    greg = GReg(model, [0.0] + [0.5] * (len(model.gated_layers) - 1), 1, update_interval=10, stabilize_interval=100)
    assert greg.updates_bound() == 10_001  # 1e-4 per update up to 1: the docstring's 10,000 updates, and the stop
    message = greg.epoch_message(0, {})
    assert "at most 10001 more updates (100010 iterations) and 100 stabilising iterations left" in message


@pytest.fixture
def dummy_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    with pytest.raises(SystemExit) as stop:
        cli.main(train_vgg.RECIPE, ["--net", "hc", "--target-macs", "0.6", "--epoch", "1", "--fine_tune_epoch",
                                        "1", "-p", "1", *TINY, "--out-dir", "run"])
    assert stop.value.code == 0
    return tmp_path / "run", capsys.readouterr().out


def test_progress_lines_give_the_run_eta_and_the_phase(dummy_run):
    _, out = dummy_run
    progress = [line for line in out.splitlines() if line.startswith("Epoch [")]
    assert all("run ETA" in line for line in progress if "[1][1/" in line)
    assert any(line.startswith("Epoch [2][") and line.endswith("(fine-tune)") for line in progress)
    assert not any(line.startswith("Epoch [1][") and "fine-tune" in line for line in progress)
    assert any(line.startswith("Epoch 1: top-1") and line.endswith(" s") for line in out.splitlines())


def test_a_resumed_run_says_from_where(dummy_run, capsys):
    run, _ = dummy_run
    with pytest.raises(SystemExit) as stop:
        cli.main(train_vgg.RECIPE, ["--net", "hc", "--target-macs", "0.6", "--epoch", "1", "--fine_tune_epoch",
                                        "1", *TINY, "--out-dir", "run", "--resume", "auto"])
    assert stop.value.code == 0
    assert "resumed from run/last.pt: epoch 3, step 0" in capsys.readouterr().out


def test_a_synthetic_run_is_evaluated_and_pruned_on_synthetic_data(dummy_run, capsys):
    run, _ = dummy_run
    for path in (run / "best.pt", run / "pruned.pt"):
        assert evaluate.main([str(path), "--limit-batches", "1", "-j", "0", "-b", "8"]) == 0
        out = capsys.readouterr().out
        assert "trained on synthetic data (--dummy); evaluating on the same" in out and "on dummy cifar10 val" in out
