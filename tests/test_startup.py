"""What a command line imports: every script answers ``--help`` and a mistaken command without torch.

Torch and torchvision take seconds to import; a script's help, and the one line that refuses a
mistaken flag (exit status 2), need neither (docs/architecture.md, "What a command line imports").
Each case runs the script in a fresh interpreter, as ``python SCRIPT ARGS`` would, and reports
the heavy modules it imported by the time it exited.
"""
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, script_env

SCRIPTS = ("train_vgg.py", "train_resnet56.py", "train_resnet50.py", "prune.py", "evaluate.py", "export.py",
           "reproduce.py", "summarize.py")
HEAVY = ("torch", "torchvision", "numpy", "matplotlib", "tensorboardX", "sklearn")
# A mistaken command per script, refused by its own checks (not only by argparse), and the refusal.
MISTAKES = {
    "train_vgg.py": (["--sparse", "dsr", "--density", "0.1", "--lamba", "1e-6"], "--lamba belongs to the gates"),
    "train_resnet56.py": (["--layers", "16"], "--layers is --arch wrn's option"),
    "train_resnet50.py": (["--dummy", "--evaluate"], "-e/--evaluate: nothing to evaluate"),
    "prune.py": (["best.pt", "--method", "l1", "--target-macs", "1.5"], "--target-macs 1.5: must be below 1"),
    "evaluate.py": (["best.pt", "-b", "0"], "must be > 0"),
    "export.py": ([], "the following arguments are required: CHECKPOINT"),
    "reproduce.py": (["table", "--seeds", "x"], "expected a int"),
    "summarize.py": ([], "the following arguments are required: RUNS_DIR"),
}
# Runs the script as __main__ and names, on the last line of stderr, the heavy modules it imported.
PROBE = f"""
import runpy, sys
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, {str(REPO_ROOT)!r})
try:
    runpy.run_path(script, run_name="__main__")
finally:
    print("imported:", ",".join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)
"""


def run(script: str, *argv: str, cwd) -> tuple[int, str, str, str]:
    """``(exit status, stdout, stderr without the probe's line, heavy modules imported)``."""
    proc = subprocess.run([sys.executable, "-c", PROBE, str(REPO_ROOT / script), *argv], cwd=cwd, env=script_env(),
                          capture_output=True, text=True, timeout=120)
    *err, probe = proc.stderr.rstrip("\n").split("\n")
    assert probe.startswith("imported:"), proc.stderr
    return proc.returncode, proc.stdout, "\n".join(err), probe.removeprefix("imported:").strip()


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_imports_no_torch(script, tmp_path):
    status, out, err, heavy = run(script, "--help", cwd=tmp_path)
    assert status == 0 and out.startswith("usage:") and not err
    assert heavy == "", f"{script} --help imported {heavy}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_mistaken_command_is_one_line_without_torch(script, tmp_path):
    argv, message = MISTAKES[script]
    status, out, err, heavy = run(script, *argv, cwd=tmp_path)
    assert status == 2 and not out
    assert len(err.splitlines()) == 1 and err.startswith(f"{script}: error: ") and message in err, err
    assert heavy == "", f"{script} {' '.join(argv)} imported {heavy}"


def test_the_probe_sees_torch(tmp_path):
    """The check itself: a script that gets as far as training imports torch, and the probe says so."""
    status, _, err, heavy = run("export.py", str(tmp_path / "missing.pt"), cwd=tmp_path)
    assert status == 2 and "missing.pt" in err and "torch" in heavy.split(",")
