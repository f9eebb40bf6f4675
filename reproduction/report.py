"""A table's report: Markdown, CSV and a top-1 vs MACs plot of its finished runs.

For each row: mean +- standard deviation over the finished seeds of top-1
(the row's ``top1`` key of results.json, ``best_top1`` by default), MACs and
parameters with their reductions from dense, next to the published number
and the difference (ours - published). Written into ``<runs>/<table>/`` as
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
              "top1_std", "macs_mean", "macs_reduction_mean", "macs_reduction_std", "params_mean",
              "params_reduction_mean", "params_reduction_std", "published_top1", "published_base",
              "published_macs_kept", "published_params_kept", "top1_minus_published", "published_source",
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
        macs_red = _mean_std([r["macs_reduction"] for r in results])
        params_red = _mean_std([r["params_reduction"] for r in results])
        published = row.published or {}
        entry = dict(row=row.name, method=row.method, model=results[0]["model"] if results else None,
                     dataset=results[0]["dataset"] if results else None, synthetic=synthetic,
                     seeds_done=len(results),
                     seeds_planned=len(seeds), top1_key=row.top1, top1_mean=top1[0], top1_std=top1[1],
                     macs_mean=_mean_std([r["macs_pruned"] for r in results])[0],
                     macs_reduction_mean=macs_red[0], macs_reduction_std=macs_red[1],
                     params_mean=_mean_std([r["params_pruned"] for r in results])[0],
                     params_reduction_mean=params_red[0], params_reduction_std=params_red[1],
                     published_top1=published.get("top1"), published_base=published.get("base"),
                     published_macs_kept=published_macs_kept(published),
                     published_params_kept=published.get("params_kept"),
                     top1_minus_published=(top1[0] - published["top1"]
                                           if top1[0] is not None and "top1" in published else None),
                     published_source=published.get("source"),
                     reached_by="; ".join(dict.fromkeys(reached_by(r) for r in results if reached_by(r))))
        entries.append(entry)
    return entries


def reached_by(results: dict) -> str:
    """Who chose a run's network at its budget, in a few words ('' without a budget): the budget
    block's ``settled_by`` (gated methods) with the projection's share, or the collapse guard's epoch;
    a peer's search says ``search`` (or ``missed``)."""
    budget = results.get("budget")
    if not budget:
        return ""
    if budget.get("collapse"):
        return f"collapse (epoch {budget['collapse']['epoch']})"
    settled = budget.get("settled_by", "training" if budget.get("within_tolerance") else "missed")
    if settled == "projection":
        return f"projection ({budget['projection']['share']:.0%} of channels)"
    return settled


def _pm(mean, std, digits=2, suffix="") -> str:
    if mean is None:
        return ""
    return f"{mean:.{digits}f}{suffix}" + (f" ± {std:.{digits}f}" if std is not None else "")


def markdown(table: Table, entries: list[dict]) -> str:
    head = ["row", "method", "model", "dataset", "seeds", "top-1 (%)", "MACs", "MACs ↓ (%)", "params",
            "params ↓ (%)", "reached by", "published top-1 (base)", "published at", "ours - published", "source"]
    synthetic = [e["row"] for e in entries if e["synthetic"]]
    where = ("every row" if len(synthetic) == len(entries) > 1
             else f"row{'s' if len(synthetic) > 1 else ''} {', '.join(synthetic)}")
    warning = ([f"**Synthetic data** (`--dummy`) in {where}: random images of the dataset's shape, so {'their' if len(synthetic) > 1 else 'its'} "
                f"accuracy measures nothing (a test of the machinery, not a result).", ""] if synthetic else [])
    lines = [f"# {table.title}", "", *warning,
             f"Mean ± std over the finished seeds (`{table.path.name}`); top-1 is each row's `top1` key of "
             f"results.json; an empty cell: no finished run, or no published number.", "",
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
        diff = e["top1_minus_published"]
        dataset = dataset_label(e, e["synthetic"]) if e["dataset"] else ("synthetic" if e["synthetic"] else "")
        cells = [e["row"], e["method"], e["model"] or "", dataset, f"{e['seeds_done']}/{e['seeds_planned']}",
                 _pm(e["top1_mean"], e["top1_std"]), human(e["macs_mean"]) if e["macs_mean"] is not None else "",
                 _pm(e["macs_reduction_mean"], e["macs_reduction_std"], 1),
                 human(e["params_mean"]) if e["params_mean"] is not None else "",
                 _pm(e["params_reduction_mean"], e["params_reduction_std"], 1), e["reached_by"], published,
                 ", ".join(where),
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
    """Top-1 against MACs kept: one marker per method, filled for ours (error bars: std over
    seeds), hollow for the published numbers."""
    # Matplotlib is imported here, not with the module: reproduce.py's --help and its runs draw nothing.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.4, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    methods = list(dict.fromkeys(e["method"] for e in entries))
    for e in entries:
        marker = MARKERS[methods.index(e["method"]) % len(MARKERS)]
        colour = f"C{methods.index(e['method']) % 10}"
        if e["top1_mean"] is not None:
            ax.errorbar(100 - e["macs_reduction_mean"], e["top1_mean"], yerr=e["top1_std"] or 0.0,
                        xerr=e["macs_reduction_std"] or 0.0, marker=marker, color=colour, linestyle="none",
                        markersize=7, capsize=3, label=e["method"])
        if e["published_top1"] is not None and e["published_macs_kept"] is not None:
            ax.plot(100 * e["published_macs_kept"], e["published_top1"], marker=marker, linestyle="none",
                    markersize=8, markerfacecolor="none", markeredgecolor=colour,
                    label=f"{e['method']} (published)")
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="best")
    ax.set_xlabel("MACs kept (% of dense)")
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
