"""The command-line tools around a finished run: export.py, evaluate.py,
summarize.py, and what training itself leaves behind (pruned.pt, the
TensorBoard ``channels`` image).

One real training run (a subprocess, ``--dummy`` data, one batch) makes the
checkpoint the tools work on. export.py also runs as a subprocess; the other
tools are called through their ``main(argv)`` in-process, which is the same
code path minus a second interpreter start-up.
"""
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import importlib.util

import pytest
import torch

from models import load_pruned
from models.export import FORMAT

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def load_script(relative: str, name: str):
    """Import a top-level script by its path (names like ``evaluate`` are also PyPI packages)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export_tool = load_script("export.py", "dep_l0_export_script")
evaluate_tool = load_script("evaluate.py", "dep_l0_evaluate_script")
summarize_tool = load_script("summarize.py", "dep_l0_summarize_script")


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "resnet56_dep"
    proc = run(ROOT / "train_resnet56.py", "--dummy", "--epoch", "1", "--limit-batches", "1", "-b", "2", "-j", "0",
               "--seed", "0", "--out-dir", out)
    assert proc.returncode == 0, proc.stderr
    return out


pytestmark = pytest.mark.usefixtures("one_thread")


def one_line_error(capsys, code, prog):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return err[0]


# ------------------------------------------------------------------ training leaves

def test_training_writes_pruned_model_with_the_reported_cost(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    payload = torch.load(run_dir / "pruned.pt", weights_only=True)
    assert payload["format"] == FORMAT
    assert (payload["macs"], payload["params"]) == (results["macs_pruned"], results["params_pruned"])
    assert payload["arch"]["source"]["dataset"] == "cifar10"
    model = load_pruned(run_dir / "pruned.pt")
    assert sum(p.numel() for p in model.parameters()) == results["params_pruned"]


def read_events(path):
    """(tag, kind) of every summary value in a TensorBoard event file (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    data, i, found = path.read_bytes(), 0, []
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        event = event_pb2.Event()
        event.ParseFromString(data[i + 12:i + 12 + n])
        i += 12 + n + 4
        found += [(v.tag, v.WhichOneof("value"), v) for v in event.summary.value]
    return found


def test_tensorboard_has_the_channels_image(run_dir):
    (events,) = run_dir.glob("events.out.tfevents.*")
    images = [v for tag, kind, v in read_events(events) if tag == "channels" and kind == "image"]
    assert len(images) == 1
    assert images[0].image.encoded_image_string.startswith(b"\x89PNG") and images[0].image.width > 300


# ------------------------------------------------------------------ export.py

def test_export_cli_writes_next_to_the_checkpoint(run_dir, tmp_path):
    checkpoint = tmp_path / "best.pt"
    shutil.copy(run_dir / "best.pt", checkpoint)
    proc = run(ROOT / "export.py", checkpoint)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and (tmp_path / "pruned.pt").is_file()
    expected = torch.load(run_dir / "pruned.pt", weights_only=True)
    got = torch.load(tmp_path / "pruned.pt", weights_only=True)
    assert (got["macs"], got["params"]) == (expected["macs"], expected["params"])
    assert got["arch"]["source"]["checkpoint"] == str(checkpoint)


def test_export_cli_out_option(run_dir, tmp_path, capsys):
    assert export_tool.main([str(run_dir), "-o", str(tmp_path / "small.pt")]) == 0  # a run dir means last.pt
    assert load_pruned(tmp_path / "small.pt").arch["net"] == "dense"
    assert export_tool.main([str(run_dir / "last.pt"), "-o", str(tmp_path)]) == 0  # a directory: OUT/pruned.pt
    assert (tmp_path / "pruned.pt").is_file()


def test_export_cli_mistakes_are_one_line(run_dir, tmp_path, capsys):
    capsys.readouterr()
    one_line_error(capsys, export_tool.main([str(tmp_path / "missing.pt")]), "export.py")
    line = one_line_error(capsys, export_tool.main([str(run_dir / "pruned.pt")]), "export.py")
    assert "dep-l0-checkpoint" in line
    for junk in ("junk", ""):
        (tmp_path / "junk.pt").write_text(junk)
        one_line_error(capsys, export_tool.main([str(tmp_path / "junk.pt")]), "export.py")
    one_line_error(capsys, export_tool.main([str(run_dir / "last.pt"), "-o", str(tmp_path / "no" / "such" / "x.pt")]),
                   "export.py")
    with pytest.raises(SystemExit) as e:
        export_tool.main([])
    one_line_error(capsys, e.value.code, "export.py")


# ------------------------------------------------------------------ evaluate.py

def evaluation(capsys, path, *flags):
    capsys.readouterr()
    assert evaluate_tool.main([str(path), "--dummy", "-b", "32", "-j", "0", "--limit-batches", "2", *flags]) == 0
    out = capsys.readouterr().out
    top1 = float(out.split("top-1 ")[1].split("%")[0])
    assert "64 images" in out and "MACs" in out and "params" in out
    return top1, out


def test_evaluate_checkpoint_and_pruned_model_agree(run_dir, capsys):
    results = json.loads((run_dir / "results.json").read_text())
    top1_ckpt, out_ckpt = evaluation(capsys, run_dir / "last.pt")
    top1_pruned, out_pruned = evaluation(capsys, run_dir / "pruned.pt")
    assert top1_ckpt == top1_pruned
    for out in (out_ckpt, out_pruned):
        assert f"-{results['macs_reduction']:.1f}%" in out and f"-{results['params_reduction']:.1f}%" in out
        assert "cifar10" in out  # inferred from the run
    assert "top-5" not in out_ckpt


def test_evaluate_imagenet_pruned_model_prints_top5(tmp_path, capsys):
    from models import ImageNetResNet, save_pruned

    model = ImageNetResNet(blocks=(1, 1, 1, 1), widths=(4, 4, 8, 8), num_classes=1000, input_size=224).eval()
    with torch.no_grad():
        model.gates.logits.log_alpha[::3] = -4.0
    save_pruned(model, tmp_path / "pruned.pt")  # no dataset recorded: inferred from the model
    capsys.readouterr()
    assert evaluate_tool.main([str(tmp_path / "pruned.pt"), "--dummy", "-b", "8", "-j", "0", "--limit-batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "dummy imagenet val, 8 images" in out and "top-5 " in out


def test_checkpoint_whose_weights_do_not_fit_its_arch_is_one_line(run_dir, tmp_path, capsys):
    """A checkpoint edited so that a tensor no longer fits its own arch: export.py and
    evaluate.py both refuse it in one line (evaluate.py used to print a traceback)."""
    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    state["model"]["linear.weight"] = torch.zeros(3, 3)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    capsys.readouterr()
    for main, prog in ((export_tool.main, "export.py"), (evaluate_tool.main, "evaluate.py")):
        line = one_line_error(capsys, main([str(bad)]), prog)
        assert "bad.pt: its weights do not fit its own arch" in line, line


def test_evaluate_mistakes_are_one_line(run_dir, tmp_path, capsys):
    capsys.readouterr()
    for argv in ([str(tmp_path / "missing.pt")],
                 [str(run_dir / "results.json")],
                 [str(run_dir / "pruned.pt"), "--dummy", "--num_classes", "100"],
                 [str(run_dir / "pruned.pt"), "--dummy", "--dataset", "imagenet"],
                 [str(run_dir / "last.pt"), "--dataset", "folder", "--data-dir", str(tmp_path / "nothing")]):
        one_line_error(capsys, evaluate_tool.main(argv), "evaluate.py")
    torch.save({"format": "something/else"}, tmp_path / "other.pt")
    line = one_line_error(capsys, evaluate_tool.main([str(tmp_path / "other.pt")]), "evaluate.py")
    assert "neither" in line


# ------------------------------------------------------------------ summarize.py

def fake_run(parent: Path, source: Path, name: str, **changes) -> Path:
    run_path = parent / name
    run_path.mkdir()
    results = json.loads((source / "results.json").read_text())
    results.update(changes)
    (run_path / "results.json").write_text(json.dumps(results))
    return run_path


def test_summarize_table_and_plots(run_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    fake_run(runs, run_dir, "b_vgg", model="vgg16", net="hc", method="l0-hc", back_dep=False)
    fake_run(runs, run_dir, "c_back", net="dep", back_dep=True)
    fake_run(runs, run_dir, "a_fwd")
    fake_run(runs, run_dir, "d_budget", budget=dict(kind="macs", target=0.35), lamba=1e-6)
    (runs / "empty").mkdir()
    (runs / "broken").mkdir()
    (runs / "broken" / "results.json").write_text("{not json")
    capsys.readouterr()
    assert summarize_tool.main([str(runs)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0].startswith("| model | dataset | method | direction | lambda / setting |") and "MACs ↓" in lines[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [r[-1] for r in rows] == ["a_fwd", "d_budget", "c_back", "b_vgg"]  # model, dataset, method, direction
    assert rows[0][:5] == ["resnet56", "CIFAR-10", "Dep-L0", "forward", "5e-07"]
    assert rows[1][4] == "macs≤0.35"  # a budget run: the target, not the unused lambda
    assert rows[2][3] == "backward" and rows[3][2:4] == ["L0-HC", "–"]
    warnings = captured.err.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("warning: skipping") for w in warnings)
    assert "empty: no results.json" in warnings[0] and "broken: unreadable results.json" in warnings[1]
    for name in ("a_fwd", "b_vgg", "c_back", "d_budget"):
        assert (runs / name / "channels.png").read_bytes().startswith(b"\x89PNG")


def test_summarize_accepts_run_directories_directly(run_dir, capsys):
    capsys.readouterr()
    assert summarize_tool.main([str(run_dir)]) == 0
    assert run_dir.name in capsys.readouterr().out and (run_dir / "channels.png").is_file()


def test_summarize_without_runs_is_one_line(tmp_path, capsys):
    capsys.readouterr()
    (tmp_path / "nothing").mkdir()
    one_line_error(capsys, summarize_tool.main([str(tmp_path / "nothing")]), "summarize.py")
    one_line_error(capsys, summarize_tool.main([str(tmp_path / "missing")]), "summarize.py")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.json").write_text("{not json")
    one_line_error(capsys, summarize_tool.main([str(broken)]), "summarize.py")


# ------------------------------------------------------------------ bench/inference.py

def test_bench_prints_speed_and_macs_ratio(run_dir, capsys):
    bench = load_script("bench/inference.py", "dep_l0_bench_inference")
    quick = ["--batches", "1,2", "--reps", "1", "--warmup", "0", "--min-time", "0", "--device", "cpu", "--threads", "1"]
    capsys.readouterr()
    assert bench.main(["--model", "resnet56", "--keep", "0.5", *quick]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| fp32 |")]
    assert len(rows) == 2 and all(row.endswith("| 2.01x |") for row in rows)  # 125.75 M / 62.42 M
    assert bench.main(["--checkpoint", str(run_dir / "pruned.pt"), *quick]) == 0
    out = capsys.readouterr().out
    payload = torch.load(run_dir / "pruned.pt", weights_only=True)
    ratio = payload["arch"]["source"]["macs_dense"] / payload["macs"]
    assert f"| {ratio:.2f}x |" in out and str(run_dir / "pruned.pt") in out


def test_bench_cpu_channels_last_mode(capsys):
    bench = load_script("bench/inference.py", "dep_l0_bench_inference")
    quick = ["--batches", "2", "--reps", "1", "--warmup", "0", "--min-time", "0", "--device", "cpu", "--threads", "1"]
    capsys.readouterr()
    assert bench.main(["--model", "lenet300_100", "--keep", "0.5", "--cpu-modes", "fp32,channels_last", *quick]) == 0
    out = capsys.readouterr().out
    assert [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| fp32 |")
            or line.startswith("| channels_last |")] == ["fp32", "channels_last"]
    with pytest.raises(SystemExit):
        bench.main(["--model", "lenet300_100", "--cpu-modes", "amp", *quick])

# ------------------------------------------------------------------ bench/mode_step.py

def test_mode_bench_times_each_mode_against_its_own_reference(capsys):
    """Unstructured GReg against filter GReg, tied against untied static: each pair's reference reads 1.000
    and the mode its measured ratio; a coefficient update falls inside the timed GReg steps."""
    bench = load_script("bench/mode_step.py", "dep_l0_bench_mode_step")
    bench.main(["--width-mult", "0.125", "-b", "4", "--steps", "2", "--reps", "2", "--warmup", "1",
                "--update-interval", "2", "--device", "cpu", "--threads", "1"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| greg |")
            or line.startswith("| tied |")]
    assert [(r[0].strip(), r[1].strip(), r[2].strip()) for r in rows] == [
        ("greg", "resnet56a", "greg-filter"), ("greg", "resnet56a", "greg-weight"),
        ("tied", "wrn", "untied"), ("tied", "wrn", "tied")]
    assert rows[0][4].strip() == rows[2][4].strip() == "1.000"
    assert all(float(r[4]) > 0 and float(r[3]) > 0 for r in rows) and "-" in rows[1][5] and "-" in rows[3][5]
