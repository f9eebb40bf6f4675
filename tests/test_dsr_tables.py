"""The DSR paper's tables (experiments/wrn28_2_cifar10.toml, resnet50_imagenet_params.toml,
lenet300_100_mnist.toml) and what their reports show.

Every row of each table is rewritten into a miniature (synthetic data, one batch, one epoch, a
small width) and passes its script's parser; one or two rows per table (a dependency and the row
that reads it) run end to end through reproduce.py and the real scripts. The report's top-5,
cost-convention and setting columns and the plot's published points are checked on fake
results.json files.
"""
import csv
import json
import subprocess
import tomllib
from pathlib import Path

import pytest

import reproduce
from conftest import script_command, script_env
from reproduction.report import collect, figure, parameter_axis, setting, write_report
from reproduction.tables import load_table

# table -> the rows run end to end (dependencies come along), the network's miniature flags
TABLES = {
    "wrn28_2_cifar10": (("dsr-s90", "copied-mask-s90"), ["--layers", "10", "--width-mult", "0.25"]),
    "resnet50_imagenet_params": (("imp-s90",), ["--width-mult", "0.0625"]),
    "lenet300_100_mnist": (("tied-s98", "dep-fwd-s90"), ["--width-mult", "0.25"]),
}
# Flags (with their value) that the miniature replaces or drops.
DROPPED = {"--epoch", "--epochs", "-b", "--milestones", "--width-mult", "--layers", "--prune-iterations",
           "--post-prune-epochs", "--start-pruning-after-epoch", "--stop-rewire-epoch", "--n-prune-params"}
TRAIN_TAIL = ["--dummy", "--limit-batches", "1", "--epoch", "1", "-b", "4", "-j", "0"]
PRUNE_TAIL = ["--dummy", "--limit-batches", "1", "-b", "4", "-j", "0", "--prune-iterations", "1",
              "--start-pruning-after-epoch", "0", "--post-prune-epochs", "1"]
TIMEOUT = 300


def _miniature_args(row, network: list[str]) -> list[str]:
    args, out, i = list(row.args), [], 0
    while i < len(args):
        if args[i] in DROPPED:
            i += 2
            continue
        out.append(args[i])
        i += 1
    if row.script == "prune.py":
        return out + PRUNE_TAIL
    extra = list(network)
    if "--width-mult" in row.args:  # a thin dense row keeps its own narrowing, on the miniature
        extra[extra.index("--width-mult") + 1] = str(float(extra[extra.index("--width-mult") + 1])
                                                      * float(row.args[row.args.index("--width-mult") + 1]))
    if row.script == "train_resnet50.py" and "--net" in out and out[out.index("--net") + 1] != "dense":
        extra += ["--fine_tune_epoch", "1"]
    return out + extra + TRAIN_TAIL


def _q(value: str) -> str:
    return json.dumps(value)


def miniature(name: str, rows: tuple[str, ...] | None = None) -> str:
    """The table as TOML text with every row (or ``rows`` and the rows they need) in miniature."""
    table = load_table(name)
    network = TABLES[name][1]
    keep = None
    if rows:
        keep, todo = set(), list(rows)
        while todo:
            row = table.row(todo.pop())
            keep.add(row.name)
            todo += [need for need in row.needs if need not in keep]
    text = [f"title = {_q(table.title + ' (miniature, synthetic data)')}", "seeds = [0]", ""]
    for row in table.rows:
        if keep is not None and row.name not in keep:
            continue
        text += ["[[row]]", f"name = {_q(row.name)}", f"method = {_q(row.method)}", f"script = {_q(row.script)}",
                 "args = [" + ", ".join(_q(a) for a in _miniature_args(row, network)) + "]",
                 f"top1 = {_q(row.top1)}"]
        if row.published:
            text.append("published = { " + ", ".join(f"{k} = {_q(v) if isinstance(v, str) else v}"
                                                      for k, v in row.published.items()) + " }")
        text.append("")
    return "\n".join(text)


@pytest.mark.parametrize("name", TABLES)
def test_every_row_has_the_authors_command_and_a_miniature_that_parses(name, tmp_path, monkeypatch, capsys):
    table = load_table(name)
    assert "Time on one GPU" in table.path.read_text() and "ESTIMATED" in table.path.read_text()
    for row in table.rows:
        assert row.authors and ("python main.py" in row.authors), (name, row.name)
    path = tmp_path / f"{name}_mini.toml"
    path.write_text(miniature(name))
    monkeypatch.chdir(tmp_path)
    assert reproduce.main([str(path), "--dry-run"]) == 0, capsys.readouterr().err
    assert len(load_table(str(path)).rows) == len(table.rows)


def test_the_wrn_table_has_every_job_of_the_authors_grid():
    table = load_table("wrn28_2_cifar10")
    jobs = {int(row.authors.rsplit("--job-idx ", 1)[1].split()[0]) for row in table.rows
            if row.authors.startswith("python main.py")}
    assert jobs == set(range(83))
    # 79-80: the copied mask with a fresh initialisation, a draw of its own (81-82 copy the source's start).
    fresh, copied = table.row("fresh-mask-s90"), table.row("copied-mask-s90")
    assert fresh.seed_offset > 0 and copied.seed_offset == 0 and fresh.args == copied.args
    by_method = {}
    for row in table.rows:
        by_method.setdefault(row.method, []).append(row)
    for method in ("DSR", "SET", "DeepR", "static sparse", "tied (HashedNet)", "iterative pruning", "thin dense",
                   "DSR (3x3 kernels)", "Dep-L0 (fwd)", "Dep-L0 (bwd)", "L0-HC"):
        assert len(by_method[method]) == 5, method
    assert all("--sub-kernel-granularity" in row.args for row in table.rows if row.method in ("DSR", "SET"))


def test_the_resnet50_table_carries_table_2_with_top5():
    table = load_table("resnet50_imagenet_params")
    published = {row.name: row.published for row in table.rows if row.published}
    assert published["dsr-s80"]["top5"] == 92.4 and published["dsr-s90"]["top5"] == 90.5
    assert {name for name in published} == {f"{m}-{s}" for m in ("dsr", "imp", "static", "thin") for s in ("s80", "s90")}
    assert all("top5" not in p for name, p in published.items() if not name.startswith("dsr"))
    assert {row.name for row in table.rows} >= {"dep-fwd-s80", "dep-bwd-s90", "hc-s80", "hc-s90"}


@pytest.mark.parametrize("name", TABLES)
def test_a_miniature_of_the_table_runs_end_to_end(name, tmp_path):
    rows = TABLES[name][0]
    path = tmp_path / f"{name}_mini.toml"
    path.write_text(miniature(name, rows))
    # Two runs at a time: the miniature's rows are independent, or a row and the one that reads it.
    proc = subprocess.run(script_command("reproduce.py", str(path), "--progress", "0", "--jobs", "2"), cwd=tmp_path,
                          env=script_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = load_table(str(path))
    for row in table.rows:
        results = json.loads((tmp_path / "runs" / path.stem / row.name / "seed0/results.json").read_text())
        assert results["cost_convention"] == "conv"
        assert 0 <= results["top5"] <= 100 and 0 <= results["best_top5"] <= 100
        if "--sparse" in row.args or row.script == "prune.py":
            assert 0 < results["sparsity"] < 1 and setting(results).startswith(f"sparsity {results['sparsity']:.3g}")
    md = (tmp_path / "runs" / path.stem / "report.md").read_text()
    assert "| top-5 (%) |" in md and "| MACs counted | setting |" in md and "`conv`, conv + linear" in md, md
    assert parameter_axis(table)


# ------------------------------------------------------------------------ the report, on fake results


def _fake(run: Path, **results) -> None:
    run.mkdir(parents=True)
    (run / "pruned.pt").write_bytes(b"")
    base = dict(model="resnet50", dataset="imagenet", epochs_done=2, epochs_total=2, macs_pruned=100,
                macs_reduction=0.0, params_pruned=10, params_reduction=71.0, cost_convention="conv")
    (run / "results.json").write_text(json.dumps(base | results))


FAKE = """title = "fake"
seeds = [0, 1]

[[row]]
name = "dsr"
method = "DSR"
script = "train_resnet50.py"
args = ["--sparse", "dsr", "--density", "0.2"]
top1 = "top1"
published = { top1 = 73.3, top5 = 92.4, sparsity = 0.8, params_kept = 0.286, source = "DSR Tab. 2" }

[[row]]
name = "dep"
method = "Dep-L0 (fwd)"
script = "train_resnet50.py"
args = ["--net", "dep", "--target-params", "0.2887"]

[[row]]
name = "greg"
method = "GReg-1"
script = "prune.py"
args = ["x.pt", "--method", "greg1", "--density", "0.5"]
"""


def test_report_shows_top5_convention_and_settings(tmp_path):
    (tmp_path / "t.toml").write_text(FAKE)
    table = load_table(str(tmp_path / "t.toml"))
    runs = tmp_path / "runs/t"
    for seed, (top1, top5) in enumerate(((73.0, 91.0), (74.0, 92.0))):
        _fake(runs / "dsr" / f"seed{seed}", top1=top1, best_top1=top1 + 1, top5=top5, best_top5=top5 + 1,
              density=0.2, sparsity=0.8, density_active=0.2, sparsity_active=0.8)
    _fake(runs / "dep/seed0", top1=70.0, best_top1=71.0, top5=89.0, best_top5=90.5, cost_convention="thop",
          budget=dict(kind="params", target=0.2887, settled_by="training", within_tolerance=True))
    _fake(runs / "greg/seed0", top1=60.0, best_top1=61.0, stage_pr="[0,0.75,0.75,0.32,0]",
          layer_ratios=[0.0, 0.75, 0.75, 0.75, 0.32])
    write_report(table, tmp_path / "runs", (0, 1))
    with open(runs / "report.csv") as f:
        dsr, dep, greg = csv.DictReader(f)
    # top-5 is the row's top-1 epoch's: the last (top1) for DSR, the best for the gated row.
    assert (dsr["top5_key"], float(dsr["top5_mean"]), dsr["published_top5"]) == ("top5", 91.5, "92.4")
    assert (dep["top5_key"], float(dep["top5_mean"])) == ("best_top5", 90.5)
    assert greg["top5_mean"] == "" and dsr["published_sparsity"] == "0.8"
    assert (dsr["cost_convention"], dep["cost_convention"]) == ("conv", "thop")
    assert dsr["setting"] == "sparsity 0.8, 0.800 zero now"
    assert dep["setting"] == "target params 0.2887"
    assert greg["setting"] == "stage_pr [0,0.75,0.75,0.32,0]"
    md = (runs / "report.md").read_text()
    assert "| top-1 (%) | top-5 (%) | MACs |" in md and "| published top-1 (base) | published top-5 | published at |" in md
    assert "| 73.50 ± 0.71 | 91.50 ± 0.71 |" in md, md
    assert "| 73.30 | 92.40 | 28.6% params, sparsity 0.8 |" in md, md
    assert "`conv`, conv + linear multiply-accumulates" in md and "`thop`, thop's count" in md
    assert setting(dict(layer_ratios=[0.0, 0.5, 0.5, 0.5])) == "ratios [0, 0.5 x3]"
    assert setting(dict(density=None, density_conv=0.1, density_fc=1.0, density_active=0.1)) == (
        "sparsity conv 0.9, fc 0, 0.900 zero now")


def test_report_without_top5_has_no_top5_column(tmp_path):
    (tmp_path / "t.toml").write_text(FAKE.split("[[row]]\nname = \"dep\"")[0].replace(
        "top5 = 92.4, ", ""))
    table = load_table(str(tmp_path / "t.toml"))
    _fake(tmp_path / "runs/t/dsr/seed0", top1=73.0, best_top1=73.0, density=0.2)
    write_report(table, tmp_path / "runs", (0,))
    assert "top-5" not in (tmp_path / "runs/t/report.md").read_text()


def test_the_plot_puts_published_points_beside_ours_on_the_parameter_axis(tmp_path):
    (tmp_path / "t.toml").write_text(FAKE)
    table = load_table(str(tmp_path / "t.toml"))
    _fake(tmp_path / "runs/t/dsr/seed0", top1=73.0, best_top1=73.0, top5=91.0, density=0.2)
    assert parameter_axis(table)
    ax = figure(table, collect(table, tmp_path / "runs", (0,))).axes[0]
    hollow = [line for line in ax.get_lines() if line.get_markerfacecolor() == "none"]
    assert len(hollow) == 1 and list(hollow[0].get_xydata()[0]) == pytest.approx([28.6, 73.3])
    ours = [line for line in ax.get_lines() if line not in hollow and len(line.get_xydata())]
    assert any(list(line.get_xydata()[0]) == pytest.approx([29.0, 73.0]) for line in ours)
    assert hollow[0].get_marker() == ours[0].get_marker() and hollow[0].get_markersize() > ours[0].get_markersize()
    labels = ax.get_legend_handles_labels()[1]
    assert "DSR (published)" in labels and "DSR" in labels
    assert [t.get_text() for t in ax.texts] == ["published"]
    assert ax.get_xlabel() == "parameters kept (% of dense)"


def test_the_shipped_parameter_tables_plot_parameters_and_the_macs_tables_macs():
    for name in TABLES:
        assert parameter_axis(load_table(name)), name
    for name in ("resnet56_cifar10_macs", "tiny", "resnet56_cifar10"):
        assert not parameter_axis(load_table(name)), name


def test_toml_of_the_miniature_is_valid():
    for name in TABLES:
        tomllib.loads(miniature(name, TABLES[name][0]))
