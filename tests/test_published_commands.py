"""The 15 published Dep-L0 commands, exactly as README.md shows them, end to end.

The authors' README (github.com/leo-yangli/dep-l0) publishes 15 runs: Dep-L0
forward, Dep-L0 backward and L0-HC on VGG16 and ResNet56 for CIFAR-10 and
CIFAR-100, and on ResNet50 for ImageNet. README.md must show exactly these,
flag for flag (``--gpu [ID]`` written as ``--gpu 0``), in the first ```bash
block of its section "The published commands".

Each command is then run as README.md writes it, in this process
(``engine.cli.main(recipe, argv)``, as the script's ``__main__`` does), with
flags appended that make it short: synthetic data, one penalty epoch and one
fine-tune epoch of one batch, one thread, the CPU. A run must exit 0 and write
``results.json`` (describing the command's network, 2 of 2 epochs done) and a
``pruned.pt`` that loads safely and carries the reported cost.

tests/test_scripts.py runs nine of these commands again in subprocesses and
checks what a user sees there (stderr, TensorBoard); this file covers all 15 as
the README prints them.
"""
import importlib.util
import json
import re
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
README = ROOT / "README.md"
SECTION = "## The published commands"

# The authors' README, its 15 lines with `--gpu [ID]` / `--gpu_id [ID]` as device 0, `[imagenet_dir]`
# as /path/to/imagenet, single spaces, and the space its VGG16 / CIFAR-100 backward line lacks
# ("--lamba 1e-6--gpu [ID]").
PUBLISHED = [
    "python train_vgg.py --net dep --num_classes 10 --lamba 1e-6 --gpu 0",
    "python train_vgg.py --net dep --back_dep --num_classes 10 --lamba 1e-6 --gpu 0",
    "python train_vgg.py --net hc --num_classes 10 --lamba 5e-7 --gpu 0",
    "python train_vgg.py --net dep --num_classes 100 --lamba 1e-6 --gpu 0",
    "python train_vgg.py --net dep --back_dep --num_classes 100 --lamba 1e-6 --gpu 0",
    "python train_vgg.py --net hc --num_classes 100 --lamba 5e-7 --gpu 0",
    "python train_resnet56.py --net dep --num_classes 10 --lamba 5e-7 --gpu 0",
    "python train_resnet56.py --net dep --back_dep --num_classes 10 --lamba 1e-6 --gpu 0",
    "python train_resnet56.py --net hc --num_classes 10 --lamba 5e-7 --gpu 0",
    "python train_resnet56.py --net dep --num_classes 100 --lamba 5e-7 --gpu 0",
    "python train_resnet56.py --net dep --back_dep --num_classes 100 --lamba 1e-6 --gpu 0",
    "python train_resnet56.py --net hc --num_classes 100 --lamba 5e-7 --gpu 0",
    "python train_resnet50.py /path/to/imagenet --net dep --lamba 5e-9 --gpu_id 0",
    "python train_resnet50.py /path/to/imagenet --net dep --back_dep --lamba 5e-9 --gpu_id 0",
    "python train_resnet50.py /path/to/imagenet --net hc --lamba 5e-9 --gpu_id 0",
]
# Appended to every command: seconds instead of days. ResNet50 keeps its 224x224 input, so its
# batch is 2.
SHORT = ["--dummy", "--epoch", "1", "--fine_tune_epoch", "1", "--limit-batches", "1", "-j", "0", "--seed", "0"]
BATCH = {"train_resnet50.py": "2"}
MODEL = {"train_vgg.py": "vgg16", "train_resnet56.py": "resnet56", "train_resnet50.py": "resnet50"}


def readme_commands() -> list[str]:
    """The ``python ...`` lines of the first ```bash block of README's published-commands section."""
    text = README.read_text()
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    block = re.search(r"^```bash\n(.*?)^```", section, re.S | re.M)
    assert block, f"no ```bash block in README.md's {SECTION!r}"
    return [line.strip() for line in block.group(1).splitlines() if line.strip().startswith("python ")]


COMMANDS = readme_commands()


def command_id(command: str) -> str:
    words = shlex.split(command)
    script, flags = words[1], words[2:]
    name = MODEL.get(script, script)
    if "--num_classes" in flags:
        name += "-c" + flags[flags.index("--num_classes") + 1]
    net = flags[flags.index("--net") + 1] if "--net" in flags else "?"
    return f"{name}-{net}" + ("-back" if "--back_dep" in flags else "")


def test_readme_shows_the_15_published_commands():
    normalised = [" ".join(shlex.split(c)) for c in COMMANDS]
    assert normalised == PUBLISHED


def _load_script(script: str):
    spec = importlib.util.spec_from_file_location(f"_published_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run_here(monkeypatch, capsys):
    """``run(script, argv) -> (exit status, stdout, stderr)``: the script's ``main`` here, CPU only,
    one thread, in a scratch directory."""
    from engine import cli

    scratch = Path(tempfile.mkdtemp(prefix="published-"))
    monkeypatch.chdir(scratch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    torch.set_num_threads(1)

    def run(script, argv):
        from engine.cli import Recipe
        module = _load_script(script)
        recipe = next(v for v in vars(module).values() if isinstance(v, Recipe))
        monkeypatch.setattr(sys, "argv", [script])
        capsys.readouterr()
        code = "returned without sys.exit"
        try:
            cli.main(recipe, argv)
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    run.scratch = scratch
    yield run
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)
    shutil.rmtree(scratch, ignore_errors=True)  # ResNet50 checkpoints are 240 MB each


@pytest.mark.parametrize("command", COMMANDS, ids=[command_id(c) for c in COMMANDS])
def test_published_command_runs(command, run_here):
    words = shlex.split(command)
    assert words[0] == "python"
    script, flags = words[1], words[2:]
    out_dir = run_here.scratch / "run"
    argv = flags + SHORT + ["-b", BATCH.get(script, "4"), "--out-dir", str(out_dir)]
    code, out, err = run_here(script, argv)
    assert code == 0, f"{command}\nexit {code}\n--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-3000:]}"

    results = json.loads((out_dir / "results.json").read_text())
    assert results["model"] == MODEL[script]
    assert results["net"] == flags[flags.index("--net") + 1]
    assert results["back_dep"] is ("--back_dep" in flags)
    assert results["lamba"] == pytest.approx(float(flags[flags.index("--lamba") + 1]))
    assert results["method"] == {"dep": "dep-l0", "hc": "l0-hc"}[results["net"]]
    if "--num_classes" in flags:
        assert results["dataset"] == "cifar" + flags[flags.index("--num_classes") + 1]
    else:
        assert results["dataset"] == "imagenet"
    assert results["epochs_done"] == results["epochs_total"] == 2
    assert results["device"] == "cpu"

    pruned = torch.load(out_dir / "pruned.pt", map_location="cpu", weights_only=True, mmap=True)
    assert pruned["format"] == "dep-l0-pruned/1"
    assert (pruned["macs"], pruned["params"]) == (results["macs_pruned"], results["params_pruned"])
