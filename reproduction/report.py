"""A table's report: Markdown, CSV and a top-1 vs MACs (or parameters) plot of its finished runs.

For each row: mean +- standard deviation over the finished seeds of top-1
(the row's ``top1`` key of results.json, ``best_top1`` by default) and top-5
(the same epoch's: ``best_top5`` or ``top5``) where measured, MACs and
parameters with their reductions from dense, the MACs' counting convention
(results.json's ``cost_convention``) and the run's setting (GReg's and L1's
stage ratios, a sparse run's sparsity, a budget's target), next to the
published numbers and the difference (ours - published). Written into ``<runs>/<table>/`` as
``report.md``, ``report.csv`` and ``report.png`` (each to a temporary file,
then renamed: a report is never half-written). Rows without finished runs
are listed with empty cells, so the report can be written at any time. A
row on synthetic data (its args pass ``--dummy``, or it prunes such a row,
or its results.json says ``dummy``) is labelled ``synthetic (CIFAR-10 shape)`` in the
dataset column (the CSV's ``synthetic`` column), with a warning above the
table and in the plot's title: its accuracy measures nothing.

The ``reached by`` column says who chose each row's network at its budget: ``training``, the
``projection`` (it moved more than 5% of the channels: the accuracy is the projection's, not the
method's), a ``collapse`` the guard saw, or ``missed`` (outside the tolerance), per seed.
"""
from __future__ import annotations

import csv
import io
import os
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from utils.cli import human
from utils.plots import dataset_label
from .tables import Table, finished, load_table, read_results

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
CSV_FIELDS = ("row", "method", "model", "dataset", "synthetic", "seeds_done", "seeds_planned", "top1_key", "top1_mean",
              "top1_std", "top5_key", "top5_mean", "top5_std", "cost_convention", "setting", "macs_mean", "macs_reduction_mean", "macs_reduction_std", "params_mean",
              "params_reduction_mean", "params_reduction_std", "published_top1", "published_top5", "published_base",
              "published_macs_kept", "published_params_kept", "published_sparsity", "top1_minus_published", "published_source",
              "reached_by")


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def published_macs_kept(published: dict | None) -> float | None:
    """Where a published point sits on the MACs axis, as a fraction of dense."""
    if not published:
        return None
    if "macs_kept" in published:
        return published["macs_kept"]
    return 1.0 / published["speedup"] if "speedup" in published else None


# Flags that put a row at a parameter budget, and those that put it at a MACs budget (the plot's axis).
PARAMS_FLAGS = ("--target-params", "--sparse", "--density", "--initial-sparsity-conv", "--initial-sparsity-fc",
                "--prune-target-sparsity-conv", "--prune-target-sparsity-fc")
MACS_FLAGS = ("--target-macs", "--target", "--stage_pr")
CONVENTIONS = {"conv": "conv + linear multiply-accumulates (the papers' count)",
               "thop": "thop's count (BN and pooling modules too; HSIC-Lasso's numbers)"}


def top5_key(row) -> str:
    """The results.json key of the top-5 measured at the row's top-1: the best epoch's or the last."""
    return "best_top5" if row.top1 == "best_top1" else "top5"


def _ratios(values) -> str:
    """Ratios in a few characters: runs of equal values as ``value x count``."""
    runs = []
    for value in values:
        if runs and runs[-1][0] == value:
            runs[-1][1] += 1
        else:
            runs.append([value, 1])
    return "[" + ", ".join(f"{v:.3g}" + (f" x{n}" if n > 1 else "") for v, n in runs) + "]"


def setting(results: dict) -> str:
    """A run's setting from its results.json: GReg's / L1's stage ratios (or, found by a search, the
    layers' ratios), a sparse run's sparsity (1 - its density; and the share of zero weights now), a
    budget's target ('' for a run with none of these)."""
    parts = []
    if results.get("stage_pr"):
        parts.append(f"stage_pr {results['stage_pr']}")
    elif isinstance(results.get("layer_ratios"), list) and results["layer_ratios"]:
        parts.append(f"ratios {_ratios(results['layer_ratios'])}")
    density = {key: results.get(f"density{key}") for key in ("", "_conv", "_fc")}
    sparsity = {key: results.get(f"sparsity{key}", None if d is None else 1 - d) for key, d in density.items()}
    if sparsity[""] is not None:
        parts.append(f"sparsity {sparsity['']:.3g}")
    elif sparsity["_conv"] is not None or sparsity["_fc"] is not None:
        parts.append("sparsity " + ", ".join(f"{k[1:]} {v:.3g}" for k, v in sparsity.items() if k and v is not None))
    active = results.get("sparsity_active")
    if active is None and results.get("density_active") is not None:
        active = 1 - results["density_active"]
    if active is not None:
        parts.append(f"{active:.3f} zero now")
    budget = results.get("budget") or {}
    if budget.get("kind") and budget.get("target") is not None and not parts:
        parts.append(f"target {budget['kind']} {budget['target']:.4g}")
    return ", ".join(parts)


def parameter_axis(table: Table) -> bool:
    """The table compares at parameter budgets (the plot's x axis is parameters kept): some row sets a
    parameter budget or a sparsity, or is published at one, and none is at a MACs budget."""
    def kind(row) -> str | None:
        published = row.published or {}
        if any(arg in MACS_FLAGS for arg in row.args) or "speedup" in published or "macs_kept" in published:
            return "macs"
        if any(arg in PARAMS_FLAGS for arg in row.args) or "params_kept" in published or "sparsity" in published:
            return "params"
        return None
    kinds = {kind(row) for row in table.rows}
    return "params" in kinds and "macs" not in kinds


def synthetic_row(table: Table, row) -> bool:
    """The row trains on synthetic data: it passes ``--dummy``, or prunes a row that does."""
    return "--dummy" in row.args or any(synthetic_row(table, table.row(need)) for need in row.needs)


def collect(table: Table, runs_dir: Path, seeds: tuple[int, ...]) -> list[dict]:
    """One entry per row: the statistics of its finished runs."""
    entries = []
    for row in table.rows:
        results = [r for seed in seeds if finished(d := runs_dir / table.name / row.name / f"seed{seed}")
                   and (r := read_results(d)) is not None]
        synthetic = synthetic_row(table, row) or any(r.get("dummy") for r in results)
        top1 = _mean_std([r[row.top1] for r in results])
        top5 = _mean_std([r[top5_key(row)] for r in results if r.get(top5_key(row)) is not None])
        macs_red = _mean_std([r["macs_reduction"] for r in results])
        params_red = _mean_std([r["params_reduction"] for r in results])
        published = row.published or {}
        entry = dict(row=row.name, method=row.method, model=results[0]["model"] if results else None,
                     dataset=results[0]["dataset"] if results else None, synthetic=synthetic,
                     seeds_done=len(results),
                     seeds_planned=len(seeds), top1_key=row.top1, top1_mean=top1[0], top1_std=top1[1],
                     top5_key=top5_key(row), top5_mean=top5[0], top5_std=top5[1],
                     cost_convention="; ".join(dict.fromkeys(r["cost_convention"] for r in results
                                                             if r.get("cost_convention"))),
                     setting="; ".join(dict.fromkeys(s for r in results if (s := setting(r)))),
                     macs_mean=_mean_std([r["macs_pruned"] for r in results])[0],
                     macs_reduction_mean=macs_red[0], macs_reduction_std=macs_red[1],
                     params_mean=_mean_std([r["params_pruned"] for r in results])[0],
                     params_reduction_mean=params_red[0], params_reduction_std=params_red[1],
                     published_top1=published.get("top1"), published_top5=published.get("top5"),
                     published_base=published.get("base"),
                     published_macs_kept=published_macs_kept(published),
                     published_params_kept=published.get("params_kept"),
                     published_sparsity=published.get("sparsity"),
                     top1_minus_published=(top1[0] - published["top1"]
                                           if top1[0] is not None and "top1" in published else None),
                     published_source=published.get("source"),
                     reached_by="; ".join(dict.fromkeys(reached_by(r) for r in results if reached_by(r))))
        entries.append(entry)
    return entries


def reached_by(results: dict) -> str:
    """Who chose a run's network at its budget, in a few words ('' without a budget): the budget
    block's ``settled_by`` (gated methods) with the projection's share, or the collapse guard's epoch
    (a dip the run recovered from is named after who settled it);
    a peer's search says ``search`` (or ``missed``)."""
    budget = results.get("budget")
    if not budget:
        return ""
    collapse = budget.get("collapse")
    if collapse and collapse.get("recovered_epoch") is None:
        return f"collapse (epoch {collapse['epoch']})"
    settled = budget.get("settled_by", "training" if budget.get("within_tolerance") else "missed")
    if settled == "projection":
        settled = f"projection ({budget['projection']['share']:.0%} of channels)"
    if collapse:  # a dip the run recovered from
        settled += f" (dip in epoch {collapse['epoch']}, recovered by {collapse['recovered_epoch']})"
    return settled


def _pm(mean, std, digits=2, suffix="") -> str:
    if mean is None:
        return ""
    return f"{mean:.{digits}f}{suffix}" + (f" ± {std:.{digits}f}" if std is not None else "")


def markdown(table: Table, entries: list[dict]) -> str:
    top5 = any(e["top5_mean"] is not None or e["published_top5"] is not None for e in entries)
    head = ["row", "method", "model", "dataset", "seeds", "top-1 (%)", *(["top-5 (%)"] if top5 else []), "MACs",
            "MACs ↓ (%)", "params", "params ↓ (%)", "MACs counted", "setting", "reached by", "published top-1 (base)",
            *(["published top-5"] if top5 else []), "published at", "ours - published", "source"]
    top5_note = ", top-5 that epoch's (`best_top5` or `top5`)" if top5 else ""
    conventions = list(dict.fromkeys(c for e in entries for c in e["cost_convention"].split("; ") if c))
    counted = ([f"MACs counted: {'; '.join(f'`{c}`, {CONVENTIONS.get(c, c)}' for c in conventions)} "
                f"(results.json's `cost_convention`).", ""] if conventions else [])
    synthetic = [e["row"] for e in entries if e["synthetic"]]
    where = ("every row" if len(synthetic) == len(entries) > 1
             else f"row{'s' if len(synthetic) > 1 else ''} {', '.join(synthetic)}")
    warning = ([f"**Synthetic data** (`--dummy`) in {where}: random images of the dataset's shape, so {'their' if len(synthetic) > 1 else 'its'} "
                f"accuracy measures nothing (a test of the machinery, not a result).", ""] if synthetic else [])
    lines = [f"# {table.title}", "", *warning,
             f"Mean ± std over the finished seeds (`{table.path.name}`); top-1 is each row's `top1` key of "
             f"results.json{top5_note}; an empty cell: no finished run, or no published number.", "", *counted,
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for e in entries:
        published = ""
        if e["published_top1"] is not None:
            published = f"{e['published_top1']:.2f}" + (f" ({e['published_base']:.2f})" if e["published_base"] else "")
        where = []
        if e["published_macs_kept"] is not None:
            where.append(f"{100 * e['published_macs_kept']:.1f}% MACs ({1 / e['published_macs_kept']:.2f}x)")
        if e["published_params_kept"] is not None:
            where.append(f"{100 * e['published_params_kept']:.1f}% params")
        if e["published_sparsity"] is not None:
            where.append(f"sparsity {e['published_sparsity']:g}")
        diff = e["top1_minus_published"]
        dataset = dataset_label(e, e["synthetic"]) if e["dataset"] else ("synthetic" if e["synthetic"] else "")
        published_top5 = [f"{e['published_top5']:.2f}" if e["published_top5"] is not None else ""] if top5 else []
        cells = [e["row"], e["method"], e["model"] or "", dataset, f"{e['seeds_done']}/{e['seeds_planned']}",
                 _pm(e["top1_mean"], e["top1_std"]), *([_pm(e["top5_mean"], e["top5_std"])] if top5 else []),
                 human(e["macs_mean"]) if e["macs_mean"] is not None else "",
                 _pm(e["macs_reduction_mean"], e["macs_reduction_std"], 1),
                 human(e["params_mean"]) if e["params_mean"] is not None else "",
                 _pm(e["params_reduction_mean"], e["params_reduction_std"], 1), e["cost_convention"], e["setting"],
                 e["reached_by"], published, *published_top5, ", ".join(where),
                 f"{diff:+.2f}" if diff is not None else "", e["published_source"] or ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(entries: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for e in entries:
        writer.writerow({k: "" if e[k] is None else e[k] for k in CSV_FIELDS})
    return out.getvalue()


def figure(table: Table, entries: list[dict]) -> Figure:
    """Top-1 against MACs kept (parameters kept for a table at parameter budgets, :func:`parameter_axis`):
    one marker per method, filled for ours (error bars: std over seeds), and beside them the published
    numbers, hollow and larger, each labelled "published" in the legend and next to the point."""
    # Matplotlib is imported here, not with the module: reproduce.py's --help and its runs draw nothing.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.4, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    methods = list(dict.fromkeys(e["method"] for e in entries))
    axis = "params" if parameter_axis(table) else "macs"
    for e in entries:
        marker = MARKERS[methods.index(e["method"]) % len(MARKERS)]
        colour = f"C{methods.index(e['method']) % 10}"
        if e["top1_mean"] is not None:
            ax.errorbar(100 - e[f"{axis}_reduction_mean"], e["top1_mean"], yerr=e["top1_std"] or 0.0,
                        xerr=e[f"{axis}_reduction_std"] or 0.0, marker=marker, color=colour, linestyle="none",
                        markersize=7, capsize=3, label=e["method"])
        kept = e[f"published_{axis}_kept"]
        if e["published_top1"] is not None and kept is not None:
            ax.plot(100 * kept, e["published_top1"], marker=marker, linestyle="none", markersize=10,
                    markerfacecolor="none", markeredgecolor=colour, markeredgewidth=1.5,
                    label=f"{e['method']} (published)")
            ax.annotate("published", (100 * kept, e["published_top1"]), textcoords="offset points",
                        xytext=(6, 4), fontsize=6, color=colour)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="best")
    ax.set_xlabel("parameters kept (% of dense)" if axis == "params" else "MACs kept (% of dense)")
    ax.set_ylabel("top-1 (%)")
    synthetic = any(e["synthetic"] for e in entries) and "synthetic" not in table.title.lower()
    ax.set_title(table.title + ("\n(synthetic data: not a result)" if synthetic else ""), fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def _replace(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_report(table: Table, runs_dir: Path, seeds: tuple[int, ...]) -> list[Path]:
    """Write report.md, report.csv and report.png into ``runs_dir/<table>``; returns their paths."""
    entries = collect(table, runs_dir, seeds)
    directory = runs_dir / table.name
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / name for name in ("report.md", "report.csv", "report.png")]
    _replace(paths[0], lambda p: p.write_text(markdown(table, entries)))
    _replace(paths[1], lambda p: p.write_text(csv_text(entries)))
    _replace(paths[2], lambda p: figure(table, entries).savefig(p, format="png"))
    return paths



class ReportJob:
    """The report as a job of its own (SLURM's last, after every run has ended)."""

    def __init__(self, table_path: str, runs_dir: str, seeds: tuple[int, ...]):
        self.table_path, self.runs_dir, self.seeds = table_path, runs_dir, seeds

    def __call__(self) -> list[str]:
        return [str(p) for p in write_report(load_table(self.table_path), Path(self.runs_dir), self.seeds)]
