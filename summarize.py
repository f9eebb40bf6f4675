"""Collect finished runs into a paper-style table and channel plots.

    python summarize.py runs/                       # every run directory under runs/
    python summarize.py runs/vgg16_* runs/resnet56_cifar10_dep_lam5e-07

Each argument is a run directory (it holds ``results.json``) or a folder with
run directories anywhere below it (reproduce.py's ``runs/<table>/<row>/seed<k>/``
too). Prints one Markdown table (model, dataset, method, direction, lambda or
budget target, top-1, MACs and reduction, params and reduction; top-5 too when an
ImageNet run is present) sorted by model, dataset and method, and writes
``<run>/channels.png``: kept vs original channels per gated layer
(utils/plots.py, the same figure TensorBoard shows each epoch). A run on
synthetic data (``--dummy``) says so in its dataset cell and its figure's
title: ``synthetic (CIFAR-10 shape)``. Folders directly in an argument with
no run anywhere below them are skipped with a warning.
"""
import json
import re
import sys
from pathlib import Path

from utils.cli import OneLineParser, human
from utils.errors import UsageError, run_reporting_errors
from utils.plots import METHOD_NAMES, dataset_label, run_title, save_channels_png, synthetic_run

METHOD = {"hc": "L0-HC", "dep": "Dep-L0", "dense": "dense"}


def method_cell(r: dict) -> str:
    if "method" in r:
        return METHOD_NAMES.get(r["method"], r["method"])
    return METHOD.get(r.get("net", "?"), r.get("net", "?"))


def run_label(run: Path) -> str:
    """The run column: the directory's name, or ``<table>/<row>/seed<k>`` for a run of reproduce.py."""
    return "/".join(run.parts[-3:]) if re.fullmatch(r"seed\d+", run.name) else run.name


def runs_below(folder: Path) -> list[Path]:
    """The run directories (those holding results.json) in ``folder`` and below it, in path order; a
    run directory's own subfolders are not searched."""
    runs = []
    for child in sorted(p for p in folder.iterdir() if p.is_dir()):
        if (child / "results.json").is_file():
            runs.append(child)
        else:
            runs += runs_below(child)
    return runs


def find_runs(paths) -> tuple[list[Path], list[str]]:
    """Run directories among ``paths`` and their subdirectories, and warnings about the rest."""
    runs, warnings = [], []
    for path in map(Path, paths):
        if not path.exists():
            raise UsageError(f"{path} does not exist")
        if (path / "results.json").is_file():
            runs.append(path)
        elif path.is_dir():
            children = sorted(p for p in path.iterdir() if p.is_dir())
            for child in children:
                found = [child] if (child / "results.json").is_file() else runs_below(child)
                if not found:
                    warnings.append(f"skipping {child}: no results.json")
                runs += found
            if not children:
                warnings.append(f"skipping {path}: no results.json and no run directories in it")
        else:
            warnings.append(f"skipping {path}: not a run directory")
    return list(dict.fromkeys(runs)), warnings


def read_results(run: Path, warnings: list) -> dict | None:
    """The run's results.json, with ``dummy`` (synthetic data) filled in where it lacks one."""
    try:
        results = json.loads((run / "results.json").read_text())
        results["macs_pruned"], results["params_pruned"], results["channels"]  # noqa: B018  (required keys)
        results["dummy"] = synthetic_run(run, results)
        return results
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.append(f"skipping {run}: unreadable results.json ({str(e)[:100]})")
        return None


def penalty_cell(r: dict) -> str:
    """What set the pruning level: lambda, the budget (``macs<=0.5``) that replaced it, or a peer's
    ratios (``--stage_pr``) or MACs target (``macs≈0.5``)."""
    if r.get("density") is not None:
        return f"density {r['density']:g}"  # unstructured sparse training or IMP: compare the params column
    if r.get("stage_pr"):
        return f"pr {r['stage_pr']}"
    if r.get("target_macs") and r.get("method") not in ("l0-hc", "dep-l0"):
        return f"macs≈{r['target_macs']:g}"
    if r.get("net") == "dense":
        return "–"
    if r.get("budget"):
        return f"{r['budget']['kind']}≤{r['budget']['target']:g}"
    return f"{r['lamba']:g}" if "lamba" in r else "–"


def table(rows) -> str:
    top5 = any("top5" in r for _, r in rows)  # every run writes it (older CIFAR runs did not)
    head = ["model", "dataset", "method", "direction", "lambda / setting", "epochs", "top-1 (%)"]
    head += ["top-5 (%)"] if top5 else []
    head += ["MACs", "MACs ↓", "params", "params ↓", "run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for run, r in rows:
        net = r.get("net", "?")
        cells = [r.get("model", "?"), dataset_label(r), method_cell(r),
                 ("backward" if r.get("back_dep") else "forward") if net == "dep" else "–",
                 penalty_cell(r),
                 f"{r.get('epochs_done', '?')}/{r.get('epochs_total', '?')}", f"{r.get('top1', float('nan')):.2f}"]
        cells += [f"{r['top5']:.2f}" if "top5" in r else "–"] if top5 else []
        cells += [human(r["macs_pruned"]), f"{r.get('macs_reduction', 0.0):.1f}%",
                  human(r["params_pruned"]), f"{r.get('params_reduction', 0.0):.1f}%", run_label(run)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(paths) -> str:
    runs, warnings = find_runs(paths)
    rows = [(run, r) for run in runs if (r := read_results(run, warnings)) is not None]
    if not rows:
        raise UsageError(f"no run with a readable results.json in {' '.join(map(str, paths))}")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    rows.sort(key=lambda x: (x[1].get("model", ""), x[1].get("dataset", ""), method_cell(x[1]),
                             bool(x[1].get("back_dep")), x[1].get("lamba") or 0.0, str(x[0])))
    for run, r in rows:
        try:
            save_channels_png(r["channels"], run / "channels.png", run_title(r))
        except OSError as e:
            print(f"warning: could not write {run / 'channels.png'} ({e.strerror or e})", file=sys.stderr)
    return table(rows)


def main(argv=None) -> int:
    p = OneLineParser(prog="summarize.py", description="Markdown results table and channel plots of finished runs.")
    p.add_argument("runs", nargs="+", metavar="RUNS_DIR", help="run directories, or folders of run directories")
    args = p.parse_args(argv)
    return run_reporting_errors(p.prog, lambda: print(summarize(args.runs)))


if __name__ == "__main__":
    sys.exit(main())
