"""The reference ResNet50 script's pytorch/examples flags: honoured where they agree with how this
engine runs (``--pretrained``: torchvision's weights, tests/test_init_weights.py; ``-e/--evaluate``:
the validation set once, tests/test_evaluate_flag.py), else one line saying what does their job here
(torchrun). ``-e`` was refused with a pointer to evaluate.py until it evaluated --pretrained,
--init-weights and --resume itself; without any of them it still is one line naming them and
evaluate.py."""
import pytest

import train_resnet50
import train_vgg
from engine.cli import parse_args

BASE = ["--dummy"]


def one_line(capsys, argv, recipe=train_resnet50.RECIPE) -> str:
    with pytest.raises(SystemExit) as stop:
        parse_args(recipe, [*BASE, *argv], prog="train_resnet50.py")
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_single_process_flags_are_accepted_as_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = parse_args(train_resnet50.RECIPE, [*BASE, "-a", "resnet50", "--world-size", "1", "--rank", "0",
                                                "--dist-url", "tcp://127.0.0.1:23456", "--dist-backend", "gloo",
                                                "--start-epoch", "0"])
    assert config.model == "resnet50" and config.world_size == 1 and config.dist_backend == "gloo"


def test_under_torchrun_the_reference_distributed_flags_agree(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    config = parse_args(train_resnet50.RECIPE, [*BASE, "--multiprocessing-distributed", "--world-size", "4",
                                                "--rank", "0", "--dist-backend", "nccl"])
    assert config.multiprocessing_distributed


@pytest.mark.parametrize("argv, needle", [
    (["-e"], "-e/--evaluate: nothing to evaluate: give --pretrained (torchvision's weights), --init-weights FILE"),
    (["--evaluate"], "python evaluate.py CHECKPOINT"),
    (["--pretrained", "--init-weights", "x.pth"], "both name the starting weights"),
    (["--start-epoch", "5"], "--start-epoch 5 without --resume"),
    (["--multiprocessing-distributed"], "torchrun --nproc_per_node=GPUS train_resnet50.py"),
    (["--world-size", "8"], "--world-size 8: this run has 1 process(es)"),
    (["--rank", "2"], "--rank 2: this run has 1 process(es)"),
])
def test_what_this_engine_does_otherwise_is_one_line(argv, needle, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert needle in one_line(capsys, argv)


def test_pretrained_starts_from_torchvisions_weights():
    config = parse_args(train_resnet50.RECIPE, [*BASE, "--pretrained", "--net", "dep"])
    assert config.init_pretrained and config.init_weights is None
    assert not parse_args(train_resnet50.RECIPE, BASE).init_pretrained


def test_start_epoch_with_resume_is_the_references_no_op(tmp_path):
    config = parse_args(train_resnet50.RECIPE, [*BASE, "--start-epoch", "7", "--resume", "auto"])
    assert config.start_epoch == 7 and config.resume == "auto"


def test_evaluate_is_honoured(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = parse_args(train_resnet50.RECIPE, [*BASE, "-e", "--pretrained"])
    assert config.evaluate and config.init_pretrained and config.net == "dense"


def test_the_cifar_scripts_do_not_take_them(capsys):
    """The CIFAR scripts take -e (every training script evaluates), not the ImageNet script's others."""
    with pytest.raises(SystemExit):
        parse_args(train_vgg.RECIPE, ["--pretrained"], prog="train_vgg.py")
    assert "unrecognized arguments: --pretrained" in capsys.readouterr().err
