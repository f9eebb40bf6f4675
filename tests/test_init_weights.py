"""The training scripts start from a published checkpoint's weights: ``--init-weights PATH`` on
train_vgg.py, train_resnet56.py and train_resnet50.py, and train_resnet50.py's ``--pretrained``
(torchvision's ResNet50 file from torch.hub's cache); engine/trainer.py, models/published.py
``load_weights``.

Each test writes a small checkpoint (tiny widths, random tensors) in one code base's format (akamaster's
old-format file, GReg's with a pickled model, HSIC-Lasso's with thop's buffers, torchvision's bare state
dict, a training checkpoint of this project) and builds the run (engine.cli.parse_args + Trainer, no
training step): every weight, bias and BN tensor is the file's under this project's names, and the gates
are the run's own initialisation, exactly those of the same run started without the file. One run goes end
to end through the script. A file that does not fit (another width, network or head) is one line and exit
status 2, before the run directory is made; nothing is downloaded (torch.hub's cache is a temporary folder
and its download is replaced by one that fails).
"""
import json
import re

import pytest
import torch

import train_resnet50
import train_resnet56
import train_vgg
from conftest import run_script
from engine.cli import parse_args
from engine.trainer import Trainer
from models import build_model, default_arch
from models.published import TORCHVISION_RESNET50, translate
from test_published import (TINY, akamaster_file, apib_file, googlenet_state, greg_file, resnet_state,  # noqa: F401
                            vgg_state)

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--dummy", "--epoch", "1", "--limit-batches", "1", "-b", "8", "-j", "0", "--seed", "0"]


def build_run(recipe, argv, out):
    return Trainer(parse_args(recipe, [*argv, *FAST, "--out-dir", str(out)]))


def assert_started_from(trainer, state, model_name):
    """Every tensor of ``state`` (the authors' names) is the run's model's, mapped; the gates are the run's own."""
    mapped = translate(type(trainer.model), state)
    own = trainer.model.state_dict()
    assert mapped and all(torch.equal(own[k], v.to(own[k].dtype)) for k, v in mapped.items())
    assert trainer.model.arch["model"] == model_name


def gates_of(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items() if k.startswith("gates.")}


@pytest.mark.parametrize("fmt", ["akamaster", "greg", "apib"])
def test_a_dep_l0_run_starts_from_a_published_resnet56(fmt, tmp_path, greg_file):  # noqa: F811
    style = "apib" if fmt == "apib" else "aka"
    state = resnet_state(style, 9, seed=1, tracked=fmt != "akamaster")
    path = tmp_path / f"{fmt}.pth"
    {"akamaster": akamaster_file, "greg": greg_file, "apib": apib_file}[fmt](path, state)
    argv = ["--arch", "resnet56a", "--width-mult", str(TINY), "--net", "dep"]
    trainer = build_run(train_resnet56.RECIPE, [*argv, "--init-weights", str(path)], tmp_path / "run")
    assert_started_from(trainer, state, "resnet56a")
    assert trainer.init_weights[0] == str(path)
    scratch = build_run(train_resnet56.RECIPE, argv, tmp_path / "scratch")
    assert gates_of(trainer) and all(torch.equal(v, gates_of(scratch)[k]) for k, v in gates_of(trainer).items())
    assert not torch.equal(trainer.model.conv1.weight, scratch.model.conv1.weight)


@pytest.mark.parametrize("name,state_of", [("vgg16_apib", vgg_state), ("googlenet", googlenet_state)])
def test_vgg_script_starts_from_hsic_lassos_networks(name, state_of, tmp_path):
    state = state_of(seed=2)
    apib_file(tmp_path / "base.pth.tar", state)
    trainer = build_run(train_vgg.RECIPE, ["--arch", name, "--width-mult", str(TINY), "--net", "hc",
                                           "--init-weights", str(tmp_path / "base.pth.tar")], tmp_path / "run")
    assert_started_from(trainer, state, name)


def torchvision_names(state: dict) -> dict:
    """This project's ResNet50 tensor names as torchvision's (layers.k -> layer{s}.{j})."""
    firsts = ((4, 13), (3, 7), (2, 3), (1, 0))

    def name(key):
        match = re.match(r"layers\.(\d+)\.(.*)", key)
        if match is None:
            return key
        k = int(match.group(1))
        stage, first = next((s, f) for s, f in firsts if k >= f)
        return f"layer{stage}.{k - first}.{match.group(2)}"

    return {name(k): v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def tiny_torchvision_file(path):
    torch.manual_seed(3)
    dense = build_model(default_arch("resnet50", 1000, 0.0625, net="dense"))
    state = torchvision_names(dense.state_dict())
    torch.save(state, path)  # torchvision's files are bare state dicts
    return state


def test_resnet50_starts_from_torchvisions_file_and_pretrained_reads_the_hub_cache(tmp_path, monkeypatch):
    state = tiny_torchvision_file(tmp_path / "resnet50-0676ba61.pth")
    argv = ["--width-mult", "0.0625", "--net", "dep"]
    trainer = build_run(train_resnet50.RECIPE, [*argv, "--init-weights", str(tmp_path / "resnet50-0676ba61.pth")],
                        tmp_path / "file")
    assert_started_from(trainer, state, "resnet50")
    # --pretrained: the same file where torch.hub keeps it (pretrained=True), never downloaded here.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    from utils.errors import UsageError
    with pytest.raises(UsageError, match="could not be downloaded .*network is unreachable.*give the file with "
                                         "--init-weights"):
        build_run(train_resnet50.RECIPE, [*argv, "--pretrained"], tmp_path / "absent")
    assert not (tmp_path / "absent").exists()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)
    (tmp_path / "resnet50-0676ba61.pth").rename(tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth")
    trainer = build_run(train_resnet50.RECIPE, [*argv, "--pretrained"], tmp_path / "hub-run")
    assert_started_from(trainer, state, "resnet50")
    assert trainer.results(dict(top1=0.0, top5=0.0, loss=0.0))["init_weights"] == TORCHVISION_RESNET50


def test_a_training_checkpoint_of_this_project_starts_a_gated_run(tmp_path):
    """A dense baseline's checkpoint (its ``model``) starts a Dep-L0 run of the same network."""
    dense = build_run(train_resnet56.RECIPE, ["--width-mult", "0.25", "--net", "dense"], tmp_path / "dense")
    dense.save(results=None)
    trainer = build_run(train_resnet56.RECIPE, ["--width-mult", "0.25", "--net", "dep",
                                                "--init-weights", str(tmp_path / "dense" / "last.pt")], tmp_path / "dep")
    assert_started_from(trainer, dense.model.state_dict(), "resnet56")


def test_the_script_end_to_end_and_files_that_do_not_fit(tmp_path):
    akamaster_file(tmp_path / "resnet56.th", resnet_state("aka", 9, tracked=False))
    argv = ["--arch", "resnet56a", "--width-mult", str(TINY), "--net", "dep", "--init-weights", "resnet56.th", *FAST]
    proc = run_script("train_resnet56.py", *argv, "--out-dir", "ok", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "weights from resnet56.th (a published checkpoint)" in proc.stdout
    assert json.loads((tmp_path / "ok" / "results.json").read_text())["init_weights"] == "resnet56.th"
    cases = {
        ("--arch", "resnet56a", "--width-mult", "0.25"): "is not a resnet56a checkpoint of these widths",
        ("--arch", "resnet110a", "--width-mult", str(TINY)): "is not a resnet110a checkpoint: it lacks",
        ("--arch", "resnet56a", "--width-mult", str(TINY), "--num_classes", "100"): "'linear.weight' is 10x8",
        ("--width-mult", str(TINY)): "is not a resnet56 checkpoint",  # option B: projection shortcuts
    }
    for flags, needle in cases.items():
        proc = run_script("train_resnet56.py", *flags, "--net", "dep", "--init-weights", "resnet56.th", *FAST,
                          "--out-dir", "bad", cwd=tmp_path)
        assert proc.returncode == 2, (flags, proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, (flags, lines)
        assert not (tmp_path / "bad").exists()


def test_pretrained_and_init_weights_do_not_combine(capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args(train_resnet50.RECIPE, ["--dummy", "--pretrained", "--init-weights", "x.pth"])
    assert stop.value.code == 2 and "give one" in capsys.readouterr().err
