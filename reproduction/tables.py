"""Paper tables as data: ``experiments/<table>.toml``, read into the runs that reproduce them.

A table file (TOML, read by the standard library's ``tomllib``) holds a
``title``, the ``seeds`` and one ``[[row]]`` per method and setting::

    [[row]]
    name = "greg1"                 # the row's id (--only, placeholders, run directories)
    method = "GReg-1"              # its label in the report and the plot legend
    script = "prune.py"            # train_vgg.py | train_resnet56.py | train_resnet50.py | prune.py
    args = ["{dense}/best.pt", "--method", "GReg-1", "--target-macs", "0.39"]
    gpus = 1                       # optional: >1 runs the script under torchrun
    top1 = "best_top1"             # optional: the results.json key the report averages (or "top1")
    published = { top1 = 93.18, base = 93.36, speedup = 2.55, source = "GReg Tab. 2" }   # optional
    authors = "python main.py --method GReg-1 ..."   # optional: the authors' command this row stands for
    seed_offset = 1000             # optional: the run's --seed is the table's seed plus this

``{name}`` in an argument is the run directory of row ``name`` with the same
seed: that row runs first and the path must exist before this one starts
(a peer reads its dense baseline's ``best.pt``). Each run is one row and one
seed, in ``<runs>/<table>/<row>/seed<k>/``; ``reproduce.py`` adds ``--seed``,
``--out-dir`` and, for a started run, ``--resume auto``, so a row must not
set them. ``published`` holds a paper's number for the same setting:
``top1`` (and the paper's ``base``), where it sits (``speedup`` = dense MACs /
pruned MACs, or ``macs_kept``, a fraction; ``params_kept`` for parameter
budgets; ``sparsity``, the fraction of weights removed, for unstructured
rows), ``top5`` where the paper gives it, and its ``source``. ``authors`` is
the command line, in the authors' own repository, that the row reproduces;
``reproduce.py --dry-run`` prints it under the row's command. ``seed_offset``
gives a row its own random draws while its runs stay ``seed<k>`` and read the
runs of seed k: the authors' "same mask, fresh initialisation" runs, whose
source run has the same mask and, with the same seed, the same start.

Nothing here imports torch: the submitit jobs import this module to run a row.
"""
import json
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from utils.errors import UsageError

REPO_ROOT = Path(__file__).resolve().parent.parent
TABLES_DIR = REPO_ROOT / "experiments"
SCRIPTS = ("train_vgg.py", "train_resnet56.py", "train_resnet50.py", "prune.py")
# Flags reproduce.py sets itself for every run: a row that sets one would fight it.
RUN_FLAGS = ("--seed", "--out-dir", "--resume")
ROW_KEYS = {"name", "method", "script", "args", "gpus", "top1", "published", "authors", "seed_offset"}
PUBLISHED_KEYS = {"top1", "top5", "base", "speedup", "macs_kept", "params_kept", "sparsity", "source"}
TOP1_KEYS = ("best_top1", "top1")
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
PLACEHOLDER = re.compile(r"\{([A-Za-z][A-Za-z0-9_-]*)\}")


@dataclass(frozen=True)
class Row:
    name: str
    method: str
    script: str
    args: tuple[str, ...]
    gpus: int
    top1: str
    published: dict | None
    needs: tuple[str, ...]  # rows named in placeholders, in order of first use
    authors: str | None = None  # the authors' command line this row stands for
    seed_offset: int = 0        # added to the table's seed for this row's --seed


@dataclass(frozen=True)
class Table:
    name: str
    path: Path
    title: str
    seeds: tuple[int, ...]
    rows: tuple[Row, ...]   # dependencies first

    def row(self, name: str) -> Row:
        for row in self.rows:
            if row.name == name:
                return row
        raise UsageError(f"{self.name}: unknown row {name!r} (rows: {', '.join(r.name for r in self.rows)})")


@dataclass(frozen=True)
class Run:
    """One row with one seed, and where it lives."""

    row: Row
    seed: int
    run_dir: Path
    needs: tuple[Path, ...]   # files of other runs this one reads (a dense baseline's best.pt)
    after: tuple[str, ...]    # keys of the runs that must finish first

    @property
    def key(self) -> str:
        return f"{self.row.name}/seed{self.seed}"

    def argv(self, resume: bool, data_dir: str | None = None) -> list[str]:
        """The script's arguments: the row's, then the seed, the run directory, and the data."""
        argv = [_substitute(arg, self.run_dir.parent.parent, self.seed) for arg in self.row.args]
        argv += ["--seed", str(self.seed + self.row.seed_offset), "--out-dir", str(self.run_dir)]
        argv += ["--data-dir", data_dir] if data_dir else []
        return argv + (["--resume", "auto"] if resume else [])

    def command(self, resume: bool, data_dir: str | None = None, gpus: int | None = None) -> list[str]:
        """The full command line: ``python SCRIPT ...``, or under torchrun for more than one GPU
        (``gpus``, default the row's)."""
        gpus = gpus or self.row.gpus
        script = str(REPO_ROOT / self.row.script)
        launcher = [sys.executable]
        if gpus > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
        return launcher + [script] + self.argv(resume, data_dir)


def _substitute(arg: str, table_dir: Path, seed: int) -> str:
    return PLACEHOLDER.sub(lambda m: str(table_dir / m.group(1) / f"seed{seed}"), arg)


def table_path(name: str) -> Path:
    """``experiments/<name>.toml``, or a path to a .toml file."""
    if name.endswith(".toml"):
        path = Path(name)
        if not path.is_file():
            raise UsageError(f"no table file {name}")
        return path
    path = TABLES_DIR / f"{name}.toml"
    if not NAME.fullmatch(name) or not path.is_file():
        known = sorted(p.stem for p in TABLES_DIR.glob("*.toml"))
        raise UsageError(f"unknown table {name!r} (tables: {', '.join(known)}; or give a path to a .toml file)")
    return path


def load_table(name: str) -> Table:
    path = table_path(name)
    where = path.name
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"{where}: cannot read the table ({e})") from e
    unknown = set(data) - {"title", "seeds", "row"}
    if unknown:
        raise UsageError(f"{where}: unknown key {sorted(unknown)[0]!r} (expected title, seeds, [[row]])")
    title = data.get("title")
    seeds = data.get("seeds")
    if not isinstance(title, str) or not title:
        raise UsageError(f"{where}: needs a title")
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) < len(seeds)
            or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds)):
        raise UsageError(f"{where}: seeds must be a list of distinct non-negative integers, got {seeds!r}")
    entries = data.get("row")
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"{where}: needs at least one [[row]]")
    rows = [_row(entry, where, i) for i, entry in enumerate(entries, start=1)]
    names = [r.name for r in rows]
    for row in rows:
        if names.count(row.name) > 1:
            raise UsageError(f"{where}: two rows are named {row.name!r}")
        for need in row.needs:
            if need not in names:
                raise UsageError(f"{where}: row {row.name!r} refers to {{{need}}}, which is no row of this table")
    return Table(path.stem, path, title, tuple(seeds), tuple(_dependencies_first(rows, where)))


def _row(entry, where: str, index: int) -> Row:
    if not isinstance(entry, dict):
        raise UsageError(f"{where}: row {index} is not a table")
    name = entry.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UsageError(f"{where}: row {index} needs a name of letters, digits, '-' and '_', got {name!r}")
    what = f"{where}: row {name!r}"
    unknown = set(entry) - ROW_KEYS
    if unknown:
        raise UsageError(f"{what}: unknown key {sorted(unknown)[0]!r} (expected {', '.join(sorted(ROW_KEYS))})")
    method, script, args = entry.get("method"), entry.get("script"), entry.get("args", [])
    if not isinstance(method, str) or not method:
        raise UsageError(f"{what}: needs a method label")
    if script not in SCRIPTS:
        raise UsageError(f"{what}: script must be one of {', '.join(SCRIPTS)}, got {script!r}")
    if not isinstance(args, list) or any(not isinstance(a, str) for a in args):
        raise UsageError(f"{what}: args must be a list of strings")
    for arg in args:
        if arg.split("=", 1)[0] in RUN_FLAGS:
            raise UsageError(f"{what}: sets {arg.split('=', 1)[0]}, which reproduce.py sets for every run")
    gpus = entry.get("gpus", 1)
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise UsageError(f"{what}: gpus must be a positive integer, got {gpus!r}")
    top1 = entry.get("top1", "best_top1")
    if top1 not in TOP1_KEYS:
        raise UsageError(f"{what}: top1 must be one of {', '.join(TOP1_KEYS)}, got {top1!r}")
    published = entry.get("published")
    if published is not None:
        _check_published(published, what)
    needs = tuple(dict.fromkeys(m.group(1) for arg in args for m in PLACEHOLDER.finditer(arg)))
    if name in needs:
        raise UsageError(f"{what}: refers to its own run directory {{{name}}}")
    authors = entry.get("authors")
    if authors is not None and (not isinstance(authors, str) or not authors.strip()):
        raise UsageError(f"{what}: authors must be the authors' command line as a string, got {authors!r}")
    seed_offset = entry.get("seed_offset", 0)
    if not isinstance(seed_offset, int) or isinstance(seed_offset, bool) or seed_offset < 0:
        raise UsageError(f"{what}: seed_offset must be a non-negative integer, got {seed_offset!r}")
    return Row(name, method, script, tuple(args), gpus, top1, published, needs, authors, seed_offset)


def _check_published(published, what: str) -> None:
    if not isinstance(published, dict):
        raise UsageError(f"{what}: published must be a table")
    unknown = set(published) - PUBLISHED_KEYS
    if unknown:
        raise UsageError(f"{what}: published has an unknown key {sorted(unknown)[0]!r} "
                         f"(expected {', '.join(sorted(PUBLISHED_KEYS))})")
    for key in PUBLISHED_KEYS - {"source"}:
        value = published.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise UsageError(f"{what}: published {key} must be a positive number, got {value!r}")
    if "top1" not in published or not isinstance(published.get("source"), str):
        raise UsageError(f"{what}: published needs top1 and its source")


def _dependencies_first(rows: list[Row], where: str) -> list[Row]:
    """The rows in file order, except that a row comes after the rows it needs."""
    by_name = {r.name: r for r in rows}
    ordered, placed, visiting = [], set(), []

    def place(row: Row) -> None:
        if row.name in placed:
            return
        if row.name in visiting:
            cycle = " -> ".join(visiting[visiting.index(row.name):] + [row.name])
            raise UsageError(f"{where}: the rows depend on each other in a cycle: {cycle}")
        visiting.append(row.name)
        for need in row.needs:
            place(by_name[need])
        visiting.pop()
        placed.add(row.name)
        ordered.append(row)

    for row in rows:
        place(row)
    return ordered


def plan(table: Table, runs_dir: Path, seeds: tuple[int, ...] | None = None,
         only: list[str] | None = None) -> list[Run]:
    """Every run of the table (or of the ``only`` rows), dependencies first."""
    rows = [table.row(name) for name in only] if only else list(table.rows)
    selected = {r.name for r in rows}
    table_dir = runs_dir / table.name
    runs = []
    for row in (r for r in table.rows if r.name in selected):
        for seed in seeds or table.seeds:
            needs = tuple(Path(_substitute(arg, table_dir, seed)) for arg in row.args if PLACEHOLDER.search(arg))
            runs.append(Run(row, seed, table_dir / row.name / f"seed{seed}", needs,
                            tuple(f"{need}/seed{seed}" for need in row.needs if need in selected)))
    return runs


# ------------------------------------------------------------------------------- run states


def read_results(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return None


def finished(run_dir: Path) -> bool:
    """The run reached its end: every epoch done (results.json, rewritten after each epoch) and the
    network exported (``pruned.pt``, written once after the last epoch, by the training scripts and
    by prune.py's fine-tuning alike); or the run only evaluated a network (a training script's
    ``-e``: results.json with ``evaluated_only``, no epoch and no pruned.pt)."""
    results = read_results(run_dir)
    return (results is not None and isinstance(results.get("epochs_done"), int)
            and results["epochs_done"] >= results.get("epochs_total", float("inf"))
            and ((run_dir / "pruned.pt").is_file() or results.get("evaluated_only") is True))


def started(run_dir: Path) -> bool:
    """Something of the run is on disk: it continues with ``--resume auto`` (which starts afresh
    where no checkpoint was saved yet)."""
    return run_dir.is_dir() and any(run_dir.iterdir())
