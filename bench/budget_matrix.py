"""Does a budget run choose channels, land on its target by training, and never collapse?

    python bench/budget_matrix.py                                   # the whole matrix (hours on a CPU)
    python bench/budget_matrix.py --models vgg16 --targets 0.35     # one slice
    python bench/budget_matrix.py --jobs 2 --threads 1              # two runs at a time, one thread each

Runs the real training scripts on a small real image set the project makes
offline: scikit-learn's handwritten digits (1,797 8x8 images of 10 classes),
upscaled to 32x32 RGB and written once as a ``--dataset folder`` tree
(1,437 training / 360 validation images). Over {VGG16, ResNet56} at
``--width-mult`` (default 0.25) x {L0-HC, Dep-L0 forward, Dep-L0 backward} x
``--target-macs`` {0.25, 0.35, 0.5} (or ``--kind params``: ``--target-params``) x ``--lr_gate`` {the recipe's default,
10 times it}, plus a dense baseline per network on the same schedule, and
prints one table: the pruned MACs over the target, the share of channels the
projection moved and who settled the network (``training`` or the
``projection``), best and final top-1 against the dense baseline, and the
epochs after the target warm-up whose validation top-1 fell to chance (and
whether the collapse guard fired). Every run is a subprocess writing into
``--out``; a finished run is not run again, an interrupted one resumes
(``--resume auto``), so the matrix can be stopped and continued. The table
also goes to ``OUT/budget_matrix.md``. A benchmark, not a test.
"""
import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"vgg16": "train_vgg.py", "resnet56": "train_resnet56.py"}
METHODS = {"hc": ["--net", "hc"], "dep": ["--net", "dep"], "dep-back": ["--net", "dep", "--back_dep"]}
DEFAULT_GATE_LR = 1e-3  # engine.cli.Recipe.gate_lr, the default of every training script
EPOCH_LINE = re.compile(r"^Epoch (\d+): top-1 ([0-9.]+)%")
CHANCE = 10.0  # ten classes


def write_digits(root: Path) -> Path:
    """The digits as ``root/train/<class>/*.png`` and ``root/val/<class>/*.png`` (once)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    if (root / "val").is_dir():
        return root
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.images))
    tmp = root.with_name(root.name + ".partial")
    for i, j in enumerate(order):
        split = "val" if i < 360 else "train"
        pixels = (digits.images[j] / 16.0 * 255).astype(np.uint8)
        folder = tmp / split / str(digits.target[j])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).resize((32, 32), Image.BILINEAR).convert("RGB").save(folder / f"{j}.png")
    tmp.rename(root)  # a tree is complete or absent
    return root


def cells(args) -> list[dict]:
    """The dense baselines, then one target at a time over every network, method and gate lr (the
    first target given first), so that a matrix cut short has whole slices."""
    out = [] if args.no_dense else [dict(model=model, method="dense", target=None, gate_lr=None)
                                     for model in args.models]
    for target in args.targets:
        for model in args.models:
            for method in args.methods:
                for factor in args.gate_lr_factors:
                    out.append(dict(model=model, method=method, target=target, gate_lr=DEFAULT_GATE_LR * factor))
    return out


def cell_dir(out: Path, cell: dict, kind: str) -> Path:
    if cell["method"] == "dense":
        return out / f"{cell['model']}_dense"
    label = "t" if kind == "macs" else "p"  # a MACs target and a parameter target never share a folder
    return out / f"{cell['model']}_{cell['method']}_{label}{cell['target']:g}_lr{cell['gate_lr']:g}"


def command(args, data: Path, cell: dict, where: Path) -> list[str]:
    cmd = [sys.executable, str(ROOT / SCRIPTS[cell["model"]]), "--dataset", "folder", "--data-dir", str(data),
           "--width-mult", str(args.width_mult), "--seed", "0", "-b", str(args.batch_size), "-j", "0",
           "--out-dir", str(where)]
    if cell["method"] == "dense":
        # The same number of epochs and schedule as the pruned runs, penalty and fine-tuning together.
        total = args.epochs + args.fine_tune
        return cmd + ["--net", "dense", "--epoch", str(total), "--lr", str(args.lr),
                      "--milestones", f"{total * 5 // 8},{total * 7 // 8}"]
    return cmd + [*METHODS[cell["method"]], f"--target-{args.kind}", str(cell["target"]), "--lr_gate", str(cell["gate_lr"]),
                  "--epoch", str(args.epochs), "--fine_tune_epoch", str(args.fine_tune), "--lr", str(args.lr),
                  "--milestones", f"{args.epochs * 5 // 8},{args.epochs}"]


def log_of(where: Path) -> Path:
    return where.parent / (where.name + ".log")  # not with_suffix: the names hold dots (t0.35_lr0.001)


def finished(where: Path) -> dict | None:
    try:
        results = json.loads((where / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return results if results.get("epochs_done") == results.get("epochs_total") else None


def run(args, data: Path, cell: dict) -> dict:
    where = cell_dir(args.out, cell, args.kind)
    if finished(where) is None and not args.table_only:
        cmd = command(args, data, cell, where) + (["--resume", "auto"] if (where / "last.pt").exists() else [])
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        with open(log_of(where), "a") as log:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, check=False)
    results = finished(where)
    epochs = {}
    if log_of(where).exists():
        for line in log_of(where).read_text().splitlines():
            if (m := EPOCH_LINE.match(line)):
                epochs[int(m.group(1))] = float(m.group(2))
    if not args.table_only:
        print(f"done: {where.name}" if results else f"FAILED: {where.name} (see {log_of(where)})", flush=True)
    return dict(cell, results=results, epochs=epochs)


def row(entry: dict, dense: dict, args) -> str:
    r = entry["results"]
    name = f"{entry['model']} | {entry['method']} | {entry['target']:g} | {entry['gate_lr']:g}"
    if r is None:
        return f"| {name} | not run | | | | | |"
    budget = r.get("budget") or {}
    cost = r[f"{args.kind}_pruned"] / r[f"{args.kind}_dense"]
    projection = budget.get("projection")
    moved = f"{projection['share']:.1%}" if projection else "0%"
    warmup = args.epochs / 4
    fell = [e for e, top1 in sorted(entry["epochs"].items()) if e > warmup and top1 <= 1.5 * CHANCE]
    chance = (f"epochs {fell[0]}-{fell[-1]} ({len(fell)})" if fell else "no")
    collapse = budget.get("collapse")
    if collapse:
        chance += f"; guard: epoch {collapse['epoch']}"
        if collapse.get("recovered_epoch") is not None:
            chance += f", recovered by {collapse['recovered_epoch']}"
    base = dense.get(entry["model"])
    versus = f" ({r['best_top1'] - base:+.1f})" if base is not None else ""
    return (f"| {name} | {cost / entry['target']:.3f} | {moved} | {budget.get('settled_by', '?')} | "
            f"{r['best_top1']:.1f}{versus} | {r['top1']:.1f} | {chance} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/budget_matrix"), help="where runs and the table go")
    p.add_argument("--models", type=lambda s: s.split(","), default=["vgg16", "resnet56"])
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    p.add_argument("--targets", type=lambda s: [float(x) for x in s.split(",")], default=[0.35, 0.25, 0.5])
    p.add_argument("--gate-lr-factors", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 10.0],
                   help="--lr_gate as multiples of the default 1e-3")
    p.add_argument("--kind", choices=("macs", "params"), default="macs",
                   help="--target-macs or --target-params (the audit of the parameter budget)")
    p.add_argument("--width-mult", type=float, default=0.25)
    p.add_argument("--epochs", type=int, default=16, help="penalty epochs (--epoch)")
    p.add_argument("--fine-tune", type=int, default=4, help="--fine_tune_epoch")
    p.add_argument("--lr", type=float, default=0.05, help="the weights' lr")
    p.add_argument("-b", "--batch-size", type=int, default=64)
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--no-dense", action="store_true", help="no dense baselines (their column stays empty)")
    p.add_argument("--table-only", action="store_true",
                   help="run nothing: the table of the runs finished so far (the others read 'not run')")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1)), help="torch threads per run")
    args = p.parse_args(argv)
    if not set(args.models) <= set(SCRIPTS) or not set(args.methods) <= set(METHODS):
        p.error(f"--models from {sorted(SCRIPTS)}, --methods from {sorted(METHODS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    data = write_digits(args.out / "digits")
    todo = cells(args)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        entries = list(pool.map(lambda cell: run(args, data, cell), todo))
    dense = {e["model"]: e["results"]["best_top1"] for e in entries if e["method"] == "dense" and e["results"]}
    lines = [f"Digits 32x32 (1,437 train / 360 val), width {args.width_mult:g}, {args.epochs} penalty + "
             f"{args.fine_tune} fine-tune epochs, batch {args.batch_size}; dense best top-1: "
             + ", ".join(f"{m} {v:.1f}" for m, v in dense.items()), "",
             f"| model | method | target | lr_gate | {'MACs' if args.kind == 'macs' else 'params'} / target | projected | settled by | best top-1 (vs dense) "
             "| final top-1 | at chance after warm-up |", "|---|---|---|---|---|---|---|---|---|---|"]
    order = {(m, x): i for i, (m, x) in enumerate((m, x) for m in args.models for x in args.methods)}
    pruned = sorted((e for e in entries if e["method"] != "dense"),
                    key=lambda e: (order[e["model"], e["method"]], e["target"], e["gate_lr"]))
    lines += [row(e, dense, args) for e in pruned]
    text = "\n".join(lines) + "\n"
    (args.out / "budget_matrix.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
