"""bench/gpu_check.py, the one command a lent GPU runs, proved on the CPU.

* Its plan covers what the GPU must measure (the CUDA tests; the training step of VGG16, ResNet56
  and ResNet50 with every gate type in fp32 and bf16 + channels-last; the projected 300-epoch run;
  GReg-1, HSIC-Lasso and DeepR through prune.py and the engine; inference of an exported model;
  two processes only with two GPUs), every script and test file it names exists, and the dry run
  runs the same scripts as the real run.
* The wheels it installs on a bare machine are carried in bench/wheels (pure Python, small) and the
  install command is pip's offline one.
* ``--dry-run`` end to end (a fake device: CUDA hidden, tiny sizes): the wheels install offline and
  import from their folder, each step prints one status line, the output folder holds its three
  files and nothing else, a failing step, a step cut at its limit and a step whose prerequisite
  did not run make the exit status 1, a skipped step does not, and the figures reach results.md
  with the device, the versions and the command beside them.
"""
import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _names(steps):
    return [s.name for s in steps]


def test_the_plan_covers_the_gpu_checks(gpu_check, tmp_path):
    real = gpu_check.plan("PY", tmp_path, dry=False, gpus=1)
    names = _names(real)
    for model in ("vgg16", "resnet56", "resnet50"):
        for precision in ("fp32", "bf16"):
            assert f"train_step_{model}_{precision}" in names
    for name in ("env", "cuda_tests", "epoch_vgg16", "dense_checkpoint", "prune_greg1", "prune_hsic", "sparse_deepr",
                 "inference_greg1", "inference_vgg16", "ddp_2_processes", "sparse_step_resnet50", "input_pipeline"):
        assert name in names, name
    assert names.index("cuda_tests") < names.index("train_step_resnet56_bf16") < names.index("epoch_vgg16")
    steps = {s.name: s for s in real}
    for s in real:
        if s.command[2] in ("bench/train_step.py", "bench/sparse_step.py", "bench/inference.py"):
            assert s.command[s.command.index("--device") + 1] == "cuda", s.name
        for word in s.command:
            if word.endswith(".py") and not word.startswith(str(tmp_path)):
                assert (REPO / word).is_file(), word
        assert 0 < s.limit <= 150
    bf16 = steps["train_step_resnet50_bf16"].command
    assert "--amp" in bf16 and "--channels-last" in bf16
    assert "--amp" not in steps["train_step_resnet50_fp32"].command
    assert steps["epoch_vgg16"].command[steps["epoch_vgg16"].command.index("--epochs") + 1] == "3"
    assert "--checkpoint" in steps["inference_greg1"].command and steps["inference_greg1"].needs == ("prune_greg1",)
    assert "1,64,256" in steps["inference_vgg16"].command
    assert steps["ddp_2_processes"].skip and not _by_name(gpu_check.plan("PY", tmp_path, False, 2))[
        "ddp_2_processes"].skip
    # The dry run runs the same scripts, in the same order.
    dry = gpu_check.plan("PY", tmp_path, dry=True, gpus=1)
    assert names == _names(dry)
    for a, b in zip(real, dry):
        assert a.command[:3] == b.command[:3], a.name
    # The CUDA test subset: the files exist and hold CUDA variants.
    tests = [w for w in steps["cuda_tests"].command if w.startswith("tests/")]
    assert "tests/test_host_syncs.py" in tests and "tests/test_device_paths.py" in tests
    assert all((REPO / t).is_file() for t in tests)


def _by_name(steps):
    return {s.name: s for s in steps}


def test_the_wheels_are_carried_and_installed_offline(gpu_check, tmp_path):
    wheels = sorted((REPO / "bench" / "wheels").glob("*.whl"))
    names = {w.name.split("-")[0].lower() for w in wheels}
    assert {"tensorboardx", "protobuf"} <= names
    assert all(w.name.endswith("-py3-none-any.whl") for w in wheels)  # pure Python: any machine
    assert sum(w.stat().st_size for w in wheels) < 1_000_000
    for wheel in wheels:
        assert zipfile.ZipFile(wheel).testzip() is None
    command = gpu_check.install_command("PY", tmp_path / "site", ["tensorboardX"])
    assert command[:4] == ["PY", "-m", "pip", "install"]
    assert "--no-index" in command and command[command.index("--find-links") + 1] == "bench/wheels"
    assert command[command.index("--target") + 1] == str(tmp_path / "site") and command[-1] == "tensorboardX"
    assert "--no-deps" in command


def test_dry_run_plumbing(tmp_path):
    out = tmp_path / "out"
    only = "wheels,env,train_step_resnet56_fp32,inference_greg1,ddp_2_processes,injected_failure,injected_timeout"
    started = time.time()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--only", only,
                           "--inject-failure"], cwd=tmp_path, capture_output=True, text=True, timeout=200,
                          env=dict(os.environ, OUT=str(tmp_path / "not-this")))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.time() - started < 120
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "results.json", "results.md"]
    assert not (tmp_path / "not-this").exists()  # --out wins over $OUT
    results = json.loads((out / "results.json").read_text())
    status = {s["name"]: s["status"] for s in results["steps"]}
    assert status == {"wheels": "ok", "env": "ok", "train_step_resnet56_fp32": "ok", "inference_greg1": "NOT RUN",
                      "ddp_2_processes": "SKIP", "injected_failure": "FAIL", "injected_timeout": "TIMEOUT"}, status
    assert results["ok"] is False and results["dry_run"] is True
    assert results["env"]["gpus"] == 0 and results["env"]["torch"]
    # One status line per step on stdout, in order.
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert [line.split("]")[1].split()[0] for line in lines] == list(status), lines
    steps = {s["name"]: s for s in results["steps"]}
    assert "tensorboardX" in steps["wheels"]["message"] and "protobuf" in steps["wheels"]["message"]
    assert "--no-index --find-links bench/wheels" in steps["wheels"]["command"]
    assert steps["injected_failure"]["message"].startswith("exit 3")
    assert steps["inference_greg1"]["message"] == "needs prune_greg1"
    # Everything in one log, as it came.
    log = (out / "log.txt").read_text()
    for text in ("a step that fails on purpose", "sleeping", "variant", "GPU_CHECK_ENV", "=== [   SKIP]"):
        assert text in log, text
    # results.md: the figures with the device, the versions and the command beside them.
    md = (out / "results.md").read_text()
    assert "Device: CPU (dry run: no GPU); torch " in md
    assert "## Training step: gate overhead (bench/train_step.py)" in md
    assert "    python bench/train_step.py --model resnet56 --device cpu" in md
    assert "train_step_resnet56_fp32: ok in" in md and "dense " in md and "time ratio" in md
    assert "| injected_timeout | TIMEOUT" in md


def test_exit_status_zero_when_every_step_passes(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path), "--only",
                           "env,ddp_2_processes"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "[     ok] env" in proc.stdout and "[   SKIP] ddp_2_processes" in proc.stdout
    assert json.loads((tmp_path / "results.json").read_text())["ok"] is True
