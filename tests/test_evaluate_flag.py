"""``-e/--evaluate`` on the training scripts (pytorch/examples' "evaluate model on validation set"):
the network the run would build, with the weights of ``--resume`` or else of ``--init-weights`` /
``--pretrained``, evaluated once by the engine's own validation, and a finished run's results.json
(``evaluated_only``, no epoch, no checkpoint) that reproduce.py counts as done; engine/trainer.py
``Trainer.evaluate_only``. Its numbers are evaluate.py's on the same weights. Without weights to
evaluate it is one line and exit status 2.
"""
import argparse
import json

import pytest

import evaluate
import train_resnet50
import train_resnet56
import train_vgg
from engine.cli import main as train_main
from engine.cli import parse_args
from engine.trainer import Trainer
from reproduction.tables import finished
from test_published import TINY, apib_file, resnet_state

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = ["--dummy", "-b", "32", "--limit-batches", "4", "-j", "0"]


def run(recipe, argv):
    with pytest.raises(SystemExit) as stop:
        train_main(recipe, argv)
    assert stop.value.code in (0, None), argv


def evaluate_py(path) -> dict:
    """evaluate.py's numbers for a checkpoint, on the same synthetic images and batches."""
    args = argparse.Namespace(path=str(path), dataset=None, data_dir=None, num_classes=None, dummy=True,
                              batch_size=32, workers=0, limit_batches=4, gpu=None)
    return evaluate.evaluate(args)


def test_e_evaluates_a_published_checkpoint_as_evaluate_py_does(tmp_path, capsys):
    """An HSIC-Lasso-format ResNet56 (option A) file: -e builds the dense network, loads the file and
    writes results.json; evaluate.py on a checkpoint holding the same weights gives the same top-1."""
    path = tmp_path / "resnet56_cifar10.pth"
    apib_file(path, resnet_state("apib", 9, seed=4))
    net = ["--arch", "resnet56a", "--width-mult", str(TINY), "--num_classes", "10"]
    run(train_resnet56.RECIPE, ["-e", "--init-weights", str(path), *net, *DATA, "--out-dir", str(tmp_path / "ev")])
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results["evaluated_only"] is True and results["epochs_done"] == results["epochs_total"] == 0
    assert results["method"] == "dense" and results["evaluated_weights"] == str(path)
    assert results["best_top1"] == results["top1"] and results["val_examples"] == 128
    assert results["macs"] == results["macs_dense"] and results["params"] == results["params_dense"]
    assert results["cost_convention"] == "conv" and results["init_weights"] == str(path)
    assert finished(tmp_path / "ev") and sorted(p.name for p in (tmp_path / "ev").iterdir() if p.suffix == ".pt") == []
    assert "evaluated " in capsys.readouterr().out

    # The same weights in a checkpoint of this project (the run built, not trained), for evaluate.py.
    trainer = Trainer(parse_args(train_resnet56.RECIPE, ["--net", "dense", "--init-weights", str(path), *net,
                                                         *DATA, "--seed", "0", "--out-dir", str(tmp_path / "same")]))
    trainer.save(results=None)
    trainer.log.close()
    reference = evaluate_py(tmp_path / "same" / "last.pt")
    assert results["top1"] == pytest.approx(reference["top1"]) and results["top5"] == pytest.approx(reference["top5"])
    assert results["macs"] == reference["macs"] and results["params"] == reference["params"]

    # thop's count on request; again with --resume auto (as reproduce.py reruns a started row): re-evaluated.
    run(train_resnet56.RECIPE, ["-e", "--init-weights", str(path), *net, *DATA, "--cost-convention", "thop",
                                "--resume", "auto", "--out-dir", str(tmp_path / "ev")])
    again = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert again["cost_convention"] == "thop" and again["macs"] > results["macs"]
    assert again["top1"] == results["top1"] and finished(tmp_path / "ev")


def test_e_with_resume_evaluates_the_checkpoint_and_leaves_the_run_as_it_was(tmp_path):
    """-e --resume of a training run: its checkpoint with its test gates, evaluate.py's numbers; in the
    run's own directory they go to evaluation.json (its results.json stays the training's)."""
    train = ["--net", "dep", "--width-mult", str(TINY), *DATA]
    run(train_vgg.RECIPE, [*train, "--epoch", "1", "--fine_tune_epoch", "0", "--seed", "0",
                           "--out-dir", str(tmp_path / "run")])
    trained = (tmp_path / "run" / "results.json").read_text()
    run(train_vgg.RECIPE, ["-e", *train, "--resume", str(tmp_path / "run")])
    assert (tmp_path / "run" / "results.json").read_text() == trained
    own = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    run(train_vgg.RECIPE, ["-e", *train, "--resume", str(tmp_path / "run" / "last.pt"),
                           "--out-dir", str(tmp_path / "ev")])
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results["evaluated_only"] and results["evaluated_kind"] == "checkpoint" and results["evaluated_epoch"] == 1
    assert finished(tmp_path / "ev") and results["top1"] == own["top1"]
    reference = evaluate_py(tmp_path / "run" / "last.pt")
    assert results["top1"] == pytest.approx(reference["top1"])
    assert results["macs"] == reference["macs"] and results["params"] == reference["params"]


@pytest.mark.parametrize("recipe, argv, needle", [
    (train_vgg.RECIPE, ["-e"], "-e/--evaluate: nothing to evaluate: give --init-weights FILE or --resume CHECKPOINT"),
    (train_resnet56.RECIPE, ["--evaluate"], "python evaluate.py CHECKPOINT"),
    (train_resnet50.RECIPE, ["-e"], "give --pretrained (torchvision's weights), --init-weights FILE or --resume"),
    (train_resnet50.RECIPE, ["-e", "--pretrained", "--net", "dep"], "--net dep would add its untrained gates"),
    (train_vgg.RECIPE, ["-e", "--init-weights", "x.pth", "--sparse", "dsr", "--density", "0.2"],
     "--sparse dsr would add"),
])
def test_e_without_weights_to_evaluate_is_one_line(recipe, argv, needle, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args(recipe, ["--dummy", *argv], prog="train.py")
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines


def test_e_on_a_published_network_is_dense_and_needs_no_epochs():
    config = parse_args(train_resnet50.RECIPE, ["--dummy", "-e", "--pretrained", "--epoch", "0"])
    assert config.evaluate and config.net == "dense" and config.method == "dense" and config.init_pretrained
    config = parse_args(train_resnet56.RECIPE, ["--dummy", "-e", "--resume", "auto"])
    assert config.net == "dep"  # a run's checkpoint: the command's method, as for any --resume


def test_e_resume_auto_without_a_checkpoint_or_weights_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train_main(train_resnet56.RECIPE, ["-e", "--resume", "auto", "--width-mult", str(TINY), *DATA,
                                           "--out-dir", str(tmp_path / "none")])
    assert stop.value.code == 2
    assert "holds no checkpoint to evaluate" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
