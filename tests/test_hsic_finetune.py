"""HSIC-Lasso's ``train.py --ckpt_path``: fine-tuning an already pruned network on its own
(``prune.py --ckpt_path PRUNED``, pruning/hsic.py ``fine_tune_only``, models/published.py
``load_published_pruned``).

* The authors' pruned checkpoints (their prune.py's ``{'state_dict', 'pruning_info'}``: the kept
  channels sliced out under the original module names) of ResNet56, VGG16 and GoogLeNet, written here
  at tiny widths with random tensors and sliced as their ``pruning_policy.py`` slices them, load into
  this project's compact networks: the outputs equal the authors' architecture computed functionally
  from their tensor names; ResNet50's (its ResNet_ImageNet names) tensor for tensor.
* Their README's train.py command, verbatim (its placeholders replaced, shortened by appended flags),
  fine-tunes such a file end to end on --dummy: the cut.pt it starts from holds the file's weights,
  the recipe is theirs (cosine from --lr, wd 2e-4), the reductions are against the uncut network.
* A pruned.pt of this project fine-tunes the same way, its baseline the network it was cut from; a
  SIGTERM mid-epoch and ``--resume auto`` continue it exactly.
* The ImageNet batch: its code's 64 by default, its README's 128 with ``--batch-from readme``; an
  explicit -b wins, with a note.
* Mistakes are one line (exit 2).
"""
import json
import os
import shlex
import signal

import pytest
import torch

import prune
from conftest import assert_equal_states, run_script
from engine.trainer import Trainer
from models import build_model, default_arch, save_pruned
from models.export import export_pruned, read_pruned
from models.published import load_published_pruned
from pruning import hsic
from pruning.specs import FINE_TUNE_BATCH
from test_peer_readme_commands import APIB_TRAIN, _apib_name
from test_published import (TINY, apib_file, assert_same_outputs, googlenet_forward, googlenet_state, resnet_forward,
                            resnet_state, vgg_forward, vgg_state, with_prefix)

pytestmark = pytest.mark.usefixtures("one_thread")

BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def slice_channels(state, conv, bn, consumers, keep):
    """What APIB's pruning_policy.py does to one group: the producer conv's filters (and bias), its BN's
    entries, and each consumer's input channels (a Linear's columns) keep only ``keep``."""
    state[f"{conv}.weight"] = state[f"{conv}.weight"][keep]
    if f"{conv}.bias" in state:
        state[f"{conv}.bias"] = state[f"{conv}.bias"][keep]
    for key in BN_KEYS:
        state[f"{bn}.{key}"] = state[f"{bn}.{key}"][keep]
    for consumer in consumers:
        state[f"{consumer}.weight"] = state[f"{consumer}.weight"][:, keep]


def pruned_file(path, state):
    """APIB's prune.py save_pruned_model: {'state_dict', 'pruning_info'} of the pruned model."""
    torch.save({"state_dict": dict(state), "pruning_info": [{"layer": 1, "orig": 4, "remain": 2}]}, path)


def keep_of(width, seed):
    generator = torch.Generator().manual_seed(seed)
    count = 1 + int(torch.randint(0, width, (1,), generator=generator))
    return torch.randperm(width, generator=generator)[:count].sort().values


def pruned_resnet56():
    state = resnet_state("apib", 9, seed=11)
    kept = []
    for stage in (1, 2, 3):
        for b in range(9):
            key = f"layer{stage}.block_{b}"
            keep = keep_of(state[f"{key}.conv_bn1.conv.weight"].shape[0], 100 * stage + b)
            slice_channels(state, f"{key}.conv_bn1.conv", f"{key}.conv_bn1.bn", [f"{key}.conv_bn2.conv"], keep)
            kept.append(len(keep))
    return state, kept, lambda s, x: resnet_forward(s, x, "apib", 9)


def pruned_vgg16():
    state = vgg_state(seed=12)
    kept = []
    for k in range(1, 14):
        keep = keep_of(state[f"feature.conv_{k}.weight"].shape[0], k)
        consumer = f"feature.conv_{k + 1}" if k < 13 else "classifier.0"
        slice_channels(state, f"feature.conv_{k}", f"feature.bn_{k}", [consumer], keep)
        kept.append(len(keep))
    return state, kept, vgg_forward


def pruned_googlenet():
    state = googlenet_state(seed=13)
    kept = []
    for i, name in enumerate(("a3", "b3", "a4", "b4", "c4", "d4", "e4", "a5", "b5")):
        p = f"inception_{name}"
        for j, (conv, bn, consumer) in enumerate((("branch3x3.0", "branch3x3.1", "branch3x3.3"),
                                                  ("branch5x5.0", "branch5x5.1", "branch5x5.3"),
                                                  ("branch5x5.3", "branch5x5.4", "branch5x5.6"))):
            keep = keep_of(state[f"{p}.{conv}.weight"].shape[0], 10 * i + j)
            slice_channels(state, f"{p}.{conv}", f"{p}.{bn}", [f"{p}.{consumer}"], keep)
            kept.append(len(keep))
    return state, kept, googlenet_forward


PRUNED = {"resnet56a": pruned_resnet56, "vgg16_apib": pruned_vgg16, "googlenet": pruned_googlenet}


@pytest.mark.parametrize("name", sorted(PRUNED))
def test_an_authors_pruned_checkpoint_loads_into_the_compact_network(name, tmp_path):
    state, kept, forward = PRUNED[name]()
    pruned_file(tmp_path / "pruned.pth.tar", with_prefix(state))
    model, uncut = load_published_pruned(tmp_path / "pruned.pth.tar", name)
    assert list(model.gates.widths) == kept and model.gates.net == "dense"
    assert uncut == build_model(default_arch(name, 10, TINY, net="dense")).arch  # width read off an ungated layer
    assert_same_outputs(model, state, forward)
    # Their train.py's checkpoint of the fine-tuned network ({'epoch', 'model', 'state_dict', 'acc', ...},
    # thop's buffers where it was profiled) is read the same way.
    apib_file(tmp_path / "ckpt.best.pth.tar", state)
    again, _ = load_published_pruned(tmp_path / "ckpt.best.pth.tar", name)
    assert list(again.gates.widths) == kept


def test_an_authors_pruned_resnet50_loads_tensor_for_tensor(tmp_path):
    torch.manual_seed(0)
    dense = build_model(default_arch("resnet50", 10, 0.0625, net="dense", input_size=64))
    gates = torch.cat([torch.ones(w) if i == 0 else (torch.arange(w) % 3 != 1).float()
                       for i, w in enumerate(dense.gates.widths)])  # HSIC-Lasso keeps the stem whole
    compact, _ = export_pruned(dense, gates=gates)
    torch.save({"state_dict": {_apib_name(k): v for k, v in compact.state_dict().items()}},
               tmp_path / "resnet50pruned.pth.tar")
    model, uncut = load_published_pruned(tmp_path / "resnet50pruned.pth.tar", "resnet50")
    assert uncut["widths"] == dense.arch["widths"] and uncut["num_classes"] == 10
    assert model.gates.widths == compact.gates.widths
    got = model.state_dict()
    for key, value in compact.state_dict().items():
        assert torch.equal(got[key], value), key


def train_words(command: str, **placeholders) -> list[str]:
    """The words after ``python train.py`` of an APIB README command (read as test_peer_readme_commands)."""
    text = command.replace("\\\n", " ")
    for placeholder, value in placeholders.items():
        text = text.replace(placeholder, value)
    argv = shlex.split(text)
    assert argv[:2] == ["python", "train.py"], argv
    return argv[2:]


FAST = ["--dummy", "--epochs", "2", "--limit-batches", "2", "-b", "16", "-j", "0", "--seed", "0"]


def test_the_readme_train_command_fine_tunes_a_pruned_vgg16(tmp_path):
    """APIB README's VGG16 ``train.py`` command, as written, on its pruned checkpoint."""
    state, kept, _ = pruned_vgg16()
    pruned_file(tmp_path / "vgg16pruned.pth.tar", with_prefix(state))
    argv = train_words(APIB_TRAIN[0], **{"[pruned model dir]": "vgg16pruned.pth.tar", "[dataset path]": "./data"})
    args = prune.parse_args(argv)
    assert (args.method, args.source_kind, args.arch, args.lr, args.batch_size) == ("hsic", "pruned", "vgg16_apib",
                                                                                   0.1, 256)
    proc = run_script("prune.py", *argv, *FAST, "--out-dir", "ft", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "fine-tuning the pruned network in vgg16pruned.pth.tar" in proc.stdout
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert results["method"] == "hsic" and results["hsic_finetune"]["widths"] == kept
    assert [c["kept"] for c in results["channels"]] == kept
    uncut = build_model(default_arch("vgg16_apib", 10, TINY, net="dense"))
    assert [c["total"] for c in results["channels"]] == list(uncut.gates.widths)
    assert results["cost_convention"] == "thop" and results["macs_dense"] == uncut.cost.dense("thop")[0]
    assert results["lr"] == 0.1 and results["lr_schedule"] == "cosine"
    last = torch.load(tmp_path / "ft" / "last.pt", weights_only=True)
    assert last["args"]["weight_decay"] == 2e-4 and last["args"]["lr_cosine"] and last["args"]["epochs"] == 2
    # The run starts from the file's weights: cut.pt holds them under this project's names.
    cut = read_pruned(tmp_path / "ft" / "cut.pt")
    assert torch.equal(cut["state_dict"]["features.12.conv.weight"], state["feature.conv_13.weight"])
    assert torch.equal(cut["state_dict"]["classifier.0.weight"], state["classifier.0.weight"])
    assert cut["arch"]["source"]["arch"]["cfg"] == uncut.arch["cfg"]  # it records the uncut network
    # Continued with another file: one line.
    (tmp_path / "other.pth").write_bytes((tmp_path / "vgg16pruned.pth.tar").read_bytes())
    assert prune.main(["--ckpt_path", str(tmp_path / "other.pth"), "--model", "vgg16", *FAST,
                       "--out-dir", str(tmp_path / "ft"), "--resume", "auto"]) == 2

def test_a_pruned_pt_of_this_project_fine_tunes_against_its_uncut_network(tmp_path, monkeypatch):
    torch.manual_seed(0)
    gated = build_model(default_arch("resnet56", 10, 0.25, net="hc"))
    gates = torch.cat([(torch.arange(w) % 2 == 0).float() for w in gated.gates.widths])
    save_pruned(gated, tmp_path / "pruned.pt", dict(dataset="cifar10", dummy=True), gates=gates)
    monkeypatch.chdir(tmp_path)
    assert prune.main(["--ckpt_path", "pruned.pt", *FAST, "--epochs", "1", "--out-dir", "ft"]) == 0
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    dense = build_model(default_arch("resnet56", 10, 0.25, net="dense"))
    assert results["macs_dense"] == dense.cost.dense("thop")[0] and results["model"] == "resnet56"
    assert [c["kept"] for c in results["channels"]] == [(w + 1) // 2 for w in gated.gates.widths]
    # Its own pruned.pt, and the cut.pt, fine-tune again against the same uncut network.
    for start in ("ft/cut.pt", "ft/pruned.pt"):
        out = f"again-{start.split('/')[1]}"
        assert prune.main(["--ckpt_path", start, *FAST, "--epochs", "1", "--out-dir", out]) == 0
        again = json.loads((tmp_path / out / "results.json").read_text())
        assert again["macs_dense"] == results["macs_dense"] and again["macs_pruned"] == results["macs_pruned"]


def test_sigterm_mid_fine_tune_resumes_exactly(tmp_path, monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    torch.manual_seed(0)
    gated = build_model(default_arch("resnet56", 10, 0.25, net="hc"))
    gates = torch.cat([(torch.arange(w) % 3 != 0).float() for w in gated.gates.widths])
    save_pruned(gated, tmp_path / "pruned.pt", dict(dataset="cifar10", dummy=True), gates=gates)
    monkeypatch.chdir(tmp_path)
    argv = ["--ckpt_path", "pruned.pt", *FAST]
    assert prune.main([*argv, "--out-dir", "ref"]) == 0
    original, sent = Trainer.train_epoch, []

    def train_epoch(self, stop, vote):
        if self.epoch == 1 and not sent:  # the second epoch: SIGTERM after its first step
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, stop, vote)

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    assert prune.main([*argv, "--out-dir", "cut"]) == 75
    monkeypatch.setattr(Trainer, "train_epoch", original)
    stopped = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert stopped["epoch"] == 1 and stopped["step"] > 0
    assert prune.main([*argv, "--out-dir", "cut", "--resume", "auto"]) == 0
    a = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    for key in ("model", "weight_optimizer"):
        assert_equal_states(a[key], b[key], key)


@pytest.mark.parametrize("batch_from,flags,want,note", [
    ("code", [], 64, False), ("readme", [], 128, False), ("code", ["-b", "128"], 128, True),
    ("readme", ["-b", "32"], 32, False)])
def test_the_imagenet_fine_tune_batch(batch_from, flags, want, note, tmp_path, monkeypatch, capsys):
    """Its train.py hard-codes 64 on ImageNet (train.py:303), its README says 128: --batch-from picks the
    default, -b still wins (against the code's 64, with a note)."""
    torch.manual_seed(0)
    dense = build_model(default_arch("resnet50", 1000, 0.0625, net="dense"))
    compact, _ = export_pruned(dense)
    torch.save({"state_dict": {_apib_name(k): v for k, v in compact.state_dict().items()}}, tmp_path / "r50.pth")
    seen = {}
    monkeypatch.setattr(hsic, "fine_tune_only", lambda job: seen.update(vars(job.args)) or 0)
    argv = ["--model", "resnet50", "--dataset", "imagenet", "--ckpt_path", str(tmp_path / "r50.pth"), "--dummy",
            "--batch-from", batch_from, *flags]
    assert prune.main(argv) == 0
    assert seen["batch_size"] == want and seen["lr"] == 0.01 and seen["epochs"] == 350
    assert ("train.py:303" in capsys.readouterr().out) == note
    assert FINE_TUNE_BATCH["code"]["cifar"] == FINE_TUNE_BATCH["readme"]["cifar"] == 256


ERRORS = {
    "a target": (["--ckpt_path", "x.pth", "--model", "vgg16", "--target", "1000"], "has nothing to prune"),
    "another method": (["--ckpt_path", "x.pth", "--model", "vgg16", "--method", "GReg-1"], "HSIC-Lasso's fine-tuning"),
    "two files": (["--ckpt_path", "x.pth", "--ckpt", "y.pth", "--model", "vgg16"], "both name the checkpoint"),
    "no target": (["best.pt", "--method", "l1"], "one of the arguments --stage_pr"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_what_does_not_combine_is_one_line(case, capsys):
    argv, needle = ERRORS[case]
    with pytest.raises(SystemExit) as stop:
        prune.parse_args(argv)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines


def test_files_that_do_not_fit_are_one_line(tmp_path, monkeypatch, capsys):
    state, _, _ = pruned_resnet56()
    pruned_file(tmp_path / "r56.pth", with_prefix(state))
    wide = resnet_state("apib", 9, seed=3)
    wide["layer1.block_0.conv_bn1.conv.weight"] = torch.cat([wide["layer1.block_0.conv_bn1.conv.weight"]] * 2)
    pruned_file(tmp_path / "wide.pth", wide)
    torch.manual_seed(0)
    model = build_model(default_arch("resnet56", 10, 0.25, net="dense"))
    torch.save(dict(format="dep-l0-checkpoint/1", arch=model.arch, model=model.state_dict()), tmp_path / "best.pt")
    monkeypatch.chdir(tmp_path)
    cases = {
        ("--ckpt_path", "r56.pth"): "name its network with --model",
        ("--ckpt_path", "r56.pth", "--model", "vgg16"): "is not a vgg16_apib checkpoint",
        ("--ckpt_path", "r56.pth", "--model", "resnet110"): "it lacks 'layer1.9.conv1.weight'",
        ("--ckpt_path", "wide.pth", "--model", "resnet56"): "'layer1.0.conv1' has 4 filters, resnet56a's at most 2",
        ("--ckpt_path", "best.pt"): "is a training checkpoint, not a pruned network",
    }
    for argv, needle in cases.items():
        assert prune.main([*argv, *FAST, "--out-dir", "err"]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err and "Traceback" not in err, (argv, err)
        assert not (tmp_path / "err" / "cut.pt").exists()
