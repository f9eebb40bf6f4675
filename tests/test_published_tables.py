"""The tables of the peers' published experiments, in miniature: GReg's Tables 1-4
(experiments/greg_tab*.toml) and HSIC-Lasso's five published commands (experiments/hsic_*.toml);
and this project's own tables (``OWN``) the same way, so that every shipped table is smoked here or
in tests/test_dsr_tables.py.

Each table is rewritten into a smoke version by rewriting its rows' arguments, not by hand:
synthetic data (``--dummy``), one epoch of one batch of 8, narrow training networks
(``--width-mult``), GReg's regularisation in a few iterations (K_u 1, K_s 1, large increments),
HSIC-Lasso's search on 8 calibration images at ω 1 and half the MACs (``--target-macs 0.5``: its
absolute ``--target`` belongs to the full-size network). Where a row prunes a published network
(torchvision's ResNet50 weights through ``--pretrained``, HSIC-Lasso's checkpoints under
``checkpoints/apib/``), a narrow dense network of the same architecture, trained here for one
batch, stands in for it; the dense row that evaluates the published network (a training script's
``-e``) evaluates that stand-in. Every smoke row must pass its script's parser through
``reproduce.py --dry-run``; a few rows per table (those of ``RUN``) run end to end in this process,
through the scripts' own entry points, and must finish (results.json complete, pruned.pt written,
or for the evaluated dense row results.json with ``evaluated_only``). The full tables' rows are checked by tests/test_reproduce.py (parsers, published
numbers); here also that each table's rows say what the authors ran and where they sit.
"""
import json
import re
import shutil
from pathlib import Path

import pytest

import prune
import reproduce
from engine.cli import main as train_main
from reproduction.tables import TABLES_DIR, finished, load_table, plan

pytestmark = pytest.mark.usefixtures("one_thread")

# The rows of each table that run end to end (dependencies listed first); the rest only parse.
RUN = {
    "greg_tab1_resnet56a_cifar10": ["dense", "greg1-x359"],
    "greg_tab2_resnet56a_cifar10": ["dense", "greg2"],
    "greg_tab3_resnet50_imagenet": ["dense", "greg2-x306"],
    "greg_tab4_resnet50_imagenet": ["dense", "greg1", "hc"],
    "hsic_vgg16_cifar10": ["dense", "hsic"],
    "hsic_resnet56_cifar10": ["dense", "hsic"],
    "hsic_resnet110_cifar10": ["dense", "hsic"],
    "hsic_googlenet_cifar10": ["dense", "hsic"],
    "hsic_resnet50_imagenet": ["dense", "hsic", "dep-bwd"],
}
TABLES = sorted(RUN)
# This project's own tables (the Dep-L0 paper's, at lambdas or at equal cost), smoked the same way.
OWN = {
    "tiny": [],  # run in full by tests/test_reproduce.py
    "vgg16_cifar10": ["dep-fwd"],
    "vgg16_cifar100": [],
    "vgg16_cifar10_macs": ["dense", "greg1"],
    "resnet56_cifar10": ["hc"],
    "resnet56_cifar100": [],
    "resnet56_cifar10_macs": ["dense", "hsic"],
    "resnet50_imagenet": [],
    "resnet50_imagenet_macs": ["dense", "l1"],
}

# The script of the published network's architecture, and how narrow its smoke version is.
TRAIN_SCRIPT = {"vgg16_apib": "train_vgg.py", "resnet56a": "train_resnet56.py", "resnet110a": "train_resnet56.py",
                "googlenet": "train_resnet56.py", "resnet50": "train_resnet50.py"}
WIDTH = {"train_vgg.py": "0.125", "train_resnet56.py": "0.125", "train_resnet50.py": "0.0625"}
SMALL = {"--epochs": "1", "--ft-epochs": "1", "--batch_size": "8", "-b": "8", "--batch_size_prune": "8",
         "--calib-batch-size": "8", "--update_reg_interval": "1", "--stabilize": "1", "--stabilize_reg_interval": "1",
         "--omega": "1"}
RUN_FLAGS = ["--dummy", "--limit-batches", "1", "-j", "0"]


def _value(args, flag):
    return args[args.index(flag) + 1] if flag in args else None


def _drop(args, flag, takes_value=True):
    if flag in args:
        i = args.index(flag)
        del args[i:i + 1 + takes_value]


def evaluates(row) -> bool:
    """A training script's row that only evaluates a published network (``-e``: the table's dense base)."""
    return row.script != "prune.py" and "-e" in row.args


def published_source(row) -> str | None:
    """The architecture of the published network a row prunes or evaluates (torchvision's ResNet50
    through --pretrained, or an authors' checkpoint file given with --arch / --init-weights), None for
    a run's own files."""
    args = list(row.args)
    if evaluates(row):
        return _value(args, "--arch") or "resnet50"
    if row.script != "prune.py":
        return None
    if "--pretrained" in args:
        return _value(args, "--arch")
    if args and not args[0].startswith(("-", "{")):
        return _value(args, "--arch")
    return None


def smoke_args(row, sources: dict) -> list[str]:
    """The row's arguments in miniature (see the module docstring); ``sources`` maps an architecture
    to the tiny dense checkpoint that stands for its published network."""
    args = list(row.args)
    if evaluates(row):  # the published weights: the tiny network standing for them, evaluated on one batch
        _drop(args, "--pretrained", takes_value=False)
        _drop(args, "--init-weights")
        return args + ["--init-weights", sources.get(published_source(row), "tiny.pt"), "--width-mult",
                       WIDTH[row.script], "-b", "8", *RUN_FLAGS]
    if row.script != "prune.py":
        _drop(args, "--epoch")
        _drop(args, "--epochs")
        gated = "--sparse" not in args  # --fine_tune_epoch is the gates' flag
        return args + ["--width-mult", WIDTH[row.script], "--epoch", "1", *(["--fine_tune_epoch", "0"] * gated),
                       "-b", "8", *RUN_FLAGS]
    arch = published_source(row)
    if arch is not None:
        if "--pretrained" in args:
            args.remove("--pretrained")
        else:
            args = args[1:]
        _drop(args, "--arch")
        args.insert(0, sources.get(arch, f"tiny-{arch}.pt"))
    if "--target" in args:
        i = args.index("--target")
        args[i:i + 2] = ["--target-macs", "0.5"]
    for i, arg in enumerate(args[:-1]):
        if arg in SMALL and not args[i + 1].startswith("-"):
            args[i + 1] = SMALL[arg]
    if _value(args, "--method") in ("GReg-1", "GReg-2"):
        args += ["--reg_granularity_prune", "0.5", "--reg_granularity_pick", "0.01"]
        for flag in ("--update_reg_interval", "--batch_size_prune"):
            if flag not in args:
                args += [flag, SMALL[flag]]
        if "--stabilize" not in args and "--stabilize_reg_interval" not in args:
            args += ["--stabilize_reg_interval", "1"]
    if "--batch_size" not in args and "-b" not in args:
        args += ["-b", "8"]
    if "--epochs" not in args and "--ft-epochs" not in args:  # the method's default fine-tune is long
        args += ["--epochs", "1"]
    return args + RUN_FLAGS


def smoke_table(name: str, sources: dict, where: Path) -> Path:
    """``experiments/<name>.toml`` with every row's arguments in miniature, as a table file."""
    table = load_table(name)
    lines = [f"title = {json.dumps('smoke: ' + table.title)}", "seeds = [0]", ""]
    for row in table.rows:
        lines += ["[[row]]", f"name = {json.dumps(row.name)}", f"method = {json.dumps(row.method)}",
                  f"script = {json.dumps(row.script)}", f"args = {json.dumps(smoke_args(row, sources))}", ""]
    path = where / f"{name}_smoke.toml"
    path.write_text("\n".join(lines))
    return path


def _run(script: str, argv: list[str]) -> None:
    """One run through the script's own entry point, in this process."""
    if script == "prune.py":
        assert prune.main(argv) == 0, argv
        return
    module = __import__(script.removesuffix(".py"))
    with pytest.raises(SystemExit) as stop:
        train_main(module.RECIPE, argv)
    assert stop.value.code in (0, None), argv


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Tiny dense networks standing for the published ones, made on first use (one per architecture)."""
    root = tmp_path_factory.mktemp("sources")

    class Sources(dict):
        def __missing__(self, arch):
            script = TRAIN_SCRIPT[arch]
            out = root / arch
            argv = ["--net", "dense", "--width-mult", WIDTH[script], "--epoch", "1", "-b", "8", *RUN_FLAGS,
                    "--seed", "0", "--out-dir", str(out)]
            if arch != "resnet50":
                argv += ["--arch", arch, "--num_classes", "10"]
            else:
                argv += ["--fine_tune_epoch", "0"]
            _run(script, argv)
            self[arch] = str(out / "best.pt")
            return self[arch]

    return Sources()


def test_every_shipped_table_is_smoked():
    """Here, or (the DSR paper's tables) in tests/test_dsr_tables.py."""
    from test_dsr_tables import TABLES as DSR_TABLES
    shipped = {p.stem for p in TABLES_DIR.glob("*.toml")}
    assert {t for t in shipped if t.startswith(("greg_tab", "hsic_"))} == set(RUN)
    assert shipped == set(RUN) | set(OWN) | set(DSR_TABLES)


@pytest.mark.parametrize("name", TABLES + sorted(OWN))
def test_table_in_miniature_parses_and_runs(name, sources, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    table = load_table(name)
    runs = RUN.get(name, OWN.get(name))
    # The published networks its runs need, made (or found) before the table is checked.
    needed = {published_source(table.row(r)) for r in runs} - {None}
    for arch in needed:
        sources[arch]
    path = smoke_table(name, {arch: sources[arch] for arch in needed} | _absent(table, needed), tmp_path)
    assert reproduce.main([str(path), "--dry-run"]) == 0, capsys.readouterr().err
    smoke = load_table(str(path))
    assert [r.name for r in smoke.rows] == [r.name for r in table.rows]
    for run in plan(smoke, tmp_path / "runs", only=runs):
        _run(run.row.script, run.argv(resume=False))
        assert finished(run.run_dir), run.key
        results = json.loads((run.run_dir / "results.json").read_text())
        args = list(run.row.args)
        if "--wg" in args:  # unstructured: the same shape, GReg's share of the weights at zero
            assert results["unstructured"]["weight_sparsity"] > 0.75 and results["macs_reduction"] == 0
        elif _value(args, "--stage_pr") not in (None, "[0,0,0,0,0]") or "--target-macs" in args:
            assert results["macs_reduction"] > 0, run.key
        if evaluates(run.row):  # the dense base, evaluated: no epoch, no checkpoint, a finished row
            assert results["evaluated_only"] and results["epochs_total"] == 0 and results["macs_reduction"] == 0
            assert not list(run.run_dir.glob("*.pt")), run.key
    capsys.readouterr()


def _absent(table, needed) -> dict:
    """Rows that only parse may name a published network no run here needs: a path that is not read."""
    return {arch: f"tiny-{arch}.pt" for arch in {published_source(r) for r in table.rows} - {None} - needed}


# ----------------------------------------------------------------- what the full tables say


@pytest.mark.parametrize("name", TABLES)
def test_rows_carry_the_authors_command_and_the_cost_they_compare_at(name):
    table = load_table(name)
    text = table.path.read_text()
    assert "Time on one GPU" in text and "ESTIMATED, not measured" in text
    # The dense base evaluated with -e stands for no command of the authors' READMEs.
    assert all(row.authors for row in table.rows if not evaluates(row)), [r.name for r in table.rows if not r.authors]
    methods = {row.method for row in table.rows}
    assert {"Dep-L0 (fwd)", "Dep-L0 (bwd)", "L0-HC"} <= methods
    for row in table.rows:
        if evaluates(row):
            assert row.authors is None and "--net" in row.args and _value(list(row.args), "--net") == "dense"
        elif row.script == "prune.py":
            assert row.authors.startswith(("python main.py", "CUDA_VISIBLE_DEVICES")), row.name
        else:  # Dep-L0 and L0-HC: a budget, on the peer's network
            assert ("--target-macs" in row.args) != ("--target-params" in row.args), row.name
            if row.script != "train_resnet50.py":
                assert "--arch" in row.args, row.name


GREG_RATIOS = {  # speed-up: GReg's README ratios and the MACs fraction they leave (prune.py's count)
    "x149": ("[0,0.3,0.3,0.3,0.14,0]", "0.6714"), "x231": ("[0,0.6,0.6,0.6,0.21,0]", "0.4333"),
    "x256": ("[0,0.74,0.74,0.6,0.21,0]", "0.3900"), "x306": ("[0,0.68,0.68,0.68,0.5,0]", "0.3264"),
}


def test_greg_resnet50_rows_are_its_readme_commands_at_equal_macs():
    table = load_table("greg_tab3_resnet50_imagenet")
    for tag, (ratios, fraction) in GREG_RATIOS.items():
        for method in ("GReg-1", "GReg-2"):
            row = table.row(f"{method.lower().replace('-', '')}-{tag}")
            assert _value(list(row.args), "--stage_pr") == ratios and "--pretrained" in row.args
            assert f"--method {method} --screen --stage_pr {ratios}" in row.authors
            assert row.published["speedup"] == float(tag[1] + "." + tag[2:])
        for dep in ("dep-fwd", "dep-bwd", "hc"):
            assert _value(list(table.row(f"{dep}-{tag}").args), "--target-macs") == fraction


@pytest.mark.parametrize("tag, ratios", [("x149", GREG_RATIOS["x149"][0]), ("x306", GREG_RATIOS["x306"][0])])
def test_greg_fractions_are_what_the_ratios_leave(tag, ratios, one_thread):
    from models import build_model, default_arch
    from pruning.selection import layer_ratios, macs_fraction
    from pruning.specs import parse_ratio_list
    model = build_model(default_arch("resnet50", 1000, net="dep"))
    fraction = macs_fraction(model, layer_ratios(model, parse_ratio_list(ratios)))
    assert f"{fraction:.4f}" == GREG_RATIOS[tag][1]


HSIC = {  # table: (--target, --omega, --alpha, thop's dense count of the authors' network)
    "hsic_vgg16_cifar10": ("107000000", "40", "5e-5", 314570240),
    "hsic_resnet56_cifar10": ("57000000", "5", "8e-4", 127619776),
    "hsic_resnet110_cifar10": ("96000000", "5", "8e-9", 257086144),
    "hsic_googlenet_cifar10": ("568000000", "9", "4e-8", 1531976704),
    "hsic_resnet50_imagenet": ("1550000000", "1", "7e-5", 4133742592),
}


@pytest.mark.parametrize("name", sorted(HSIC))
def test_hsic_rows_are_its_published_commands_then_its_fine_tuning(name):
    target, omega, alpha, dense = HSIC[name]
    table = load_table(name)
    row = table.row("hsic")
    args = list(row.args)
    assert (_value(args, "--target"), _value(args, "--omega"), _value(args, "--alpha")) == (target, omega, alpha)
    assert _value(args, "--tolerance") == "0.01" and _value(args, "--cost-convention") == "thop"
    assert _value(args, "--ft-epochs") == "350" and _value(args, "--wd") == "2e-4"
    assert re.search(rf"--target {target} .*--omega {omega} --tolerance 0.01 --alpha {alpha} && python train.py",
                     row.authors)
    for dep in ("dep-fwd", "dep-bwd", "hc"):
        assert _value(list(table.row(dep).args), "--target-macs") == f"{int(target) / dense:.4f}"


def test_a_prune_row_on_imagenet_needs_the_data_dir(tmp_path, monkeypatch, capsys):
    """A prune.py row that reads ImageNet itself (--pretrained --dataset imagenet) needs --data-dir,
    as the training script's rows do."""
    monkeypatch.chdir(tmp_path)
    table = tmp_path / "t.toml"
    table.write_text('title = "t"\nseeds = [0]\n[[row]]\nname = "g"\nmethod = "GReg-1"\nscript = "prune.py"\n'
                     'args = ["--dataset", "imagenet", "--arch", "resnet50", "--pretrained", "--method", "GReg-1", '
                     '"--stage_pr", "[0,0.3,0.3,0.3,0.14,0]"]\n')
    assert reproduce.main([str(table), "--dry-run"]) == 2
    assert "row 'g' reads ImageNet" in capsys.readouterr().err
    data = tmp_path / "imagenet"
    data.mkdir()
    assert reproduce.main([str(table), "--dry-run", "--data-dir", str(data)]) == 0
    shutil.rmtree(data)
