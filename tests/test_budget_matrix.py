"""The budget matrix's smallest cell, end to end (bench/budget_matrix.py, issue 24).

Real images the project makes offline (scikit-learn's digits, upscaled, as a
``--dataset folder`` tree), VGG16 at 1/8 width, L0-HC at the default gate lr,
half of the dense MACs in 8 penalty epochs and 2 of fine-tuning: the run the
Lagrangian used to leave to the projection or to a collapse. The controller must
land on the target by training (projection at most 5% of the channels, within
the 2% tolerance), without the collapse guard firing, and the network must have
learned (top-1 far above chance). The whole matrix is a benchmark, not a test.
"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_smallest_cell_lands_by_training_without_collapse(tmp_path):
    out = tmp_path / "matrix"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "budget_matrix.py"), "--out", str(out),
                           "--models", "vgg16", "--methods", "hc", "--targets", "0.5", "--gate-lr-factors", "1",
                           "--width-mult", "0.125", "--epochs", "8", "--fine-tune", "2", "--no-dense",
                           "--threads", "1"], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "digits" / "train").iterdir()) == [str(d) for d in range(10)]
    run = out / "vgg16_hc_t0.5_lr0.001"
    results = json.loads((run / "results.json").read_text())
    block = results["budget"]
    assert block["within_tolerance"] and abs(block["achieved"] - 0.5) <= 0.02, block
    assert block["settled_by"] == "training" and block["converged"] is True, block
    assert block["collapse"] is None and results["collapse"] is None
    assert results["best_top1"] >= 60.0, results["best_top1"]  # ten classes: chance is 10%
    # The table's row says the same.
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| vgg16 | hc | 0.5 | 0.001 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5] in ("0%",) or float(cells[5].rstrip("%")) <= 5.0, row
    assert cells[6] == "training" and cells[9] == "no", row
    assert (out / "budget_matrix.md").read_text().count("| vgg16 | hc |") == 1
