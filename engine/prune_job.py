"""A prune.py run after its command line: the dense source network, the run directory, and the
:class:`PruneJob` through which a ``prune`` method's phases reach the engine.

prune.py parses and checks its command line without importing torch (or this module), then calls
:func:`run`; the method's spec (pruning/specs.py) runs its phases through the job.
"""
import glob
import os
import re
import sys
from pathlib import Path

import torch

from models import NETWORKS, build_model, default_arch, save_pruned
from models.export import FORMAT as PRUNED_FORMAT
from models.export import build_pruned
from models.published import load_published, load_published_pruned, torchvision_resnet50
from pruning import METHODS
from pruning.method import PruningMethod
from pruning.specs import APIB_MODELS, GREG_ARCHS, TARGET_FLAGS, parse_ratio_list
from utils import distributed
from utils.checkpoint import FORMAT as CHECKPOINT_FORMAT
from utils.checkpoint import load_checkpoint, load_foreign
from utils.cli import lr_schedule
from utils.errors import UsageError, brief
from utils.run import fresh_out_dir, new_run_note

from .config import RunConfig
from .trainer import Trainer

NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000, "mnist": 10}

# What every prune.py run must agree on to be continued; each method adds its own settings.
IDENTITY = ("method", "dataset", "num_classes")


# ------------------------------------------------------------------------------- the source


def _torchvision_resnet50(state: dict) -> dict:
    """torchvision's ResNet50 state dict in this project's names (``layerS.j`` -> ``layers.k``)."""
    offsets, k = {}, 0
    for stage, blocks in enumerate((3, 4, 6, 3), start=1):
        for j in range(blocks):
            offsets[(stage, j)] = k
            k += 1
    out = {}
    for key, value in state.items():
        match = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", key)
        out[f"layers.{offsets[int(match.group(1)), int(match.group(2))]}.{match.group(3)}" if match else key] = value
    return out


def _unpruned(arch: dict) -> dict:
    """A compact network's arch that removed nothing (e.g. GReg's scratch training: L1 at ratios 0)
    as the dense network's arch; any other arch as it is."""
    compact = ("inner_widths", "stem_index", "stem_width")
    if arch.get("net") != "dense" or not any(key in arch for key in ("inner_widths", "stem_index")):
        return arch
    plain = {k: v for k, v in arch.items() if k not in compact}
    try:
        same = list(build_model(plain).gates.widths) == list(build_model(arch).gates.widths)
    except (TypeError, ValueError):
        return arch
    return plain if same else arch


def load_source(path: str, arch: str | None = None) -> dict:
    """``{'arch', 'state_dict', 'dataset', 'data_dir'}`` of a dense checkpoint or torchvision weights, or
    with ``arch`` of an authors' published checkpoint of that network (models/published.py)."""
    if arch is not None:
        network = load_published(path, arch)
        classes = network.arch["num_classes"]
        kind = NETWORKS[arch].data_kind
        dataset = kind if kind in ("mnist", "imagenet") else "cifar100" if classes == 100 else "cifar10"
        return dict(arch=network.arch, state_dict=network.state_dict(), dataset=dataset, data_dir=None,
                    kind=f"published {arch} checkpoint")
    try:
        state = load_checkpoint(path)
    except UsageError as e:
        if not str(e).endswith(f"is not a {CHECKPOINT_FORMAT} file"):
            raise
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(raw, dict) and raw.get("format") == PRUNED_FORMAT:
            raise UsageError(f"{path} is a pruned.pt (an already pruned network); prune.py prunes a dense "
                             f"baseline: its training checkpoint (best.pt of --net dense)") from e
        if isinstance(raw, dict) and "layer1.0.conv1.weight" in raw and "fc.weight" in raw:
            arch = default_arch("resnet50", int(raw["fc.weight"].shape[0]), net="dense")
            return dict(arch=arch, state_dict=_torchvision_resnet50(raw), dataset="imagenet", data_dir=None,
                        kind="torchvision ResNet50 weights")
        raise
    arch = _unpruned(state["arch"])
    if arch.get("net") != "dense" or any(key in arch for key in ("inner_widths", "stem_index")):
        what = "an already pruned" if arch.get("net") == "dense" else f"a gated (--net {arch.get('net')})"
        raise UsageError(f"{path} is {what} checkpoint; prune.py prunes a dense baseline: train one with "
                         f"--net dense and give its best.pt")
    args = state.get("args") or {}
    return dict(arch=arch, state_dict=state["model"], dataset=args.get("dataset"), data_dir=args.get("data_dir"),
                dummy=bool(args.get("dummy")), kind=f"dense checkpoint, epoch {state.get('epoch')}")


def _dataset_of(arch: dict) -> str:
    """The dataset a network of this head and images was trained on, where nothing else says."""
    kind = NETWORKS[arch["model"]].data_kind
    return kind if kind in ("mnist", "imagenet") else "cifar100" if arch["num_classes"] == 100 else "cifar10"


def _wider(arch: dict | None, compact) -> dict | None:
    """``arch`` as a dense network when it is the network ``compact`` was cut from (same family and gated
    layers, none narrower, some wider), else None."""
    if not arch or arch.get("model") != compact.arch["model"]:
        return None
    try:
        uncut = build_model(dict(arch, net="dense", back_dep=False))
    except (TypeError, ValueError, KeyError):
        return None
    widths, kept = list(uncut.gates.widths), list(compact.gates.widths)
    if len(widths) != len(kept) or any(w < k for w, k in zip(widths, kept)) or widths == kept:
        return None
    return uncut.arch


def pruned_source(path: str, arch: str | None) -> dict:
    """HSIC-Lasso's ``--ckpt_path``: the already pruned network to fine-tune, as :func:`load_source`'s
    record with ``pruned`` (the compact network) and ``arch`` the network it was cut from (the baseline of
    the reductions): a pruned.pt of this project (its record says what it was cut from: ``uncut_arch``, which
    prune.py's runs write, or ``arch``, the network a training run's gates were on; else the network itself),
    or the authors' pruned checkpoint of ``arch`` (widths read off its tensors)."""
    raw = load_foreign(path)
    if isinstance(raw, dict) and raw.get("format") == CHECKPOINT_FORMAT:
        raise UsageError(f"--ckpt_path {path} is a training checkpoint, not a pruned network: give its run's "
                         f"pruned.pt (python export.py {path} writes one)")
    if isinstance(raw, dict) and raw.get("format") == PRUNED_FORMAT:
        compact = build_pruned(raw)
        record = raw["arch"].get("source") or {}
        if arch is not None and arch != compact.arch["model"]:
            raise UsageError(f"--ckpt_path {path} holds a {compact.arch['model']}, not a {arch}")
        if record.get("sparse_layers"):
            raise UsageError(f"--ckpt_path {path} is an unstructured sparse network (its zeros are weights, not "
                             f"removed channels); HSIC-Lasso fine-tunes channel-pruned networks")
        uncut = _wider(record.get("uncut_arch"), compact) or _wider(record.get("arch"), compact)
        return dict(arch=uncut or compact.arch, state_dict=None, pruned=compact, data_dir=record.get("data_dir"),
                    dataset=record.get("dataset") or _dataset_of(compact.arch), dummy=bool(record.get("dummy")),
                    kind=f"pruned network (pruned.pt{', cut from a wider one' if uncut else ''})")
    if arch is None:
        raise UsageError(f"--ckpt_path {path} is not a pruned.pt of this project: name its network with --model "
                         f"(HSIC-Lasso's name: " + ", ".join(APIB_MODELS) + ") or --arch")
    compact, uncut = load_published_pruned(path, arch, raw)
    return dict(arch=uncut, state_dict=None, pruned=compact, dataset=_dataset_of(compact.arch), data_dir=None,
                kind=f"pruned {arch} checkpoint")


# Where GReg's spellings name the network (its main.py): the data folder is DIR/<dataset>.
GREG_KINDS = ("greg", "pretrained", "scratch")


def named_source(args, ctx) -> dict:
    """The dense network the command names (prune.py's ``resolve_spellings``), as :func:`load_source` gives it."""
    kind = args.source_kind
    if kind in GREG_KINDS and args.arch is None:
        raise UsageError(f"--arch {args.authors_arch}: GReg's {args.authors_arch} is not a network of this project "
                         f"(GReg's networks here: " + ", ".join(f"{k} = {v}" for k, v in GREG_ARCHS.items()) + ")")
    if kind == "greg":
        matches = sorted(glob.glob(args.base_model_path))
        if len(matches) != 1:
            raise UsageError(f"--base_model_path {args.base_model_path}: "
                             f"{len(matches) or 'no'} file{'s' if len(matches) != 1 else ''} match; GReg's code takes "
                             f"exactly one (utils.py check_path)")
        args.checkpoint = matches[0]
        raw = load_foreign(args.checkpoint)
        if isinstance(raw, dict) and raw.get("format") == CHECKPOINT_FORMAT:  # one of ours (e.g. its scratch run)
            source = load_source(args.checkpoint)
            if source["arch"]["model"] != args.arch:
                raise UsageError(f"--base_model_path {args.checkpoint} holds a {source['arch']['model']}, not GReg's "
                                 f"{args.authors_arch} ({args.arch})")
            return source
    if kind == "pretrained":
        if args.arch != "resnet50":
            raise UsageError(f"--pretrained --arch {args.authors_arch}: torchvision's weights are read for resnet50 only "
                             f"here; give a checkpoint")
        args.checkpoint = str(torchvision_resnet50(ctx))
        return load_source(args.checkpoint)
    if kind == "scratch":
        return fresh_source(args, ctx)
    if kind == "pruned":
        return pruned_source(args.checkpoint, args.arch)
    return load_source(args.checkpoint, args.arch)


def fresh_source(args, ctx) -> dict:
    """GReg's scratch training (its README's Step 3: ``--method L1 --stage_pr [0,0,0,0,0]`` and no base
    model): the network freshly initialised under the run's seed; every ratio must be 0."""
    ratios = parse_ratio_list(args.stage_pr)
    if any(r != 0 for r in (ratios.values() if isinstance(ratios, dict) else ratios)):
        raise UsageError("no checkpoint: GReg's code would prune a randomly initialised network; give the trained "
                         "network (CHECKPOINT, --base_model_path or --pretrained), or --stage_pr of zeros to train "
                         "it from scratch")
    dataset = args.dataset or ("imagenet" if NETWORKS[args.arch].data_kind == "imagenet" else "cifar10")
    classes = args.num_classes or NUM_CLASSES.get(dataset)
    if classes is None:
        raise UsageError(f"--dataset {dataset}: give --num_classes to train a network from scratch")
    if args.seed is None:
        args.seed = ctx.gather(int(torch.randint(0, 2 ** 31 - 1, ()).item()))[0]
    torch.manual_seed(args.seed)
    model = build_model(default_arch(args.arch, classes, net="dense"))
    return dict(arch=model.arch, state_dict=model.state_dict(), dataset=dataset, data_dir=None,
                kind=f"freshly initialised {args.arch} (no checkpoint: trained from scratch, as GReg's main.py "
                     f"without --base_model_path)")


def dense_model(source: dict):
    model = build_model(source["arch"])
    state = dict(source["state_dict"])
    for key, value in model.state_dict().items():  # torchvision's files lack num_batches_tracked
        state.setdefault(key, value)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UsageError(f"the weights do not fit a {source['arch']['model']} ({brief(str(e))})") from e
    return model


# ------------------------------------------------------------------------------- the job


class PruneJob:
    """One prune.py run as its method sees it: the command line, the dense source network, the run
    directory, and the engine's training for each phase (:meth:`train`, :meth:`fine_tune`).
    ``pruned``: the already pruned network HSIC-Lasso's ``--ckpt_path`` names (its compact model;
    ``source['arch']`` is then the network it was cut from, without weights), else None."""

    def __init__(self, args, source: dict, ctx: distributed.Context):
        self.args, self.source, self.ctx = args, source, ctx
        self.imagenet = source["arch"]["model"] == "resnet50"
        self.kind = "imagenet" if args.dataset == "imagenet" else "cifar"
        self.pruned = source.get("pruned")
        model = build_model(source["arch"])  # the baseline's cost needs no weights
        model.cost.convention = args.cost_convention
        macs, params = model.cost.dense()
        self.baseline = dict(macs=macs, params=params, widths=list(model.gates.widths), arch=dict(model.arch))
        self.run_dir: Path | None = None

    def dense_model(self):
        """A fresh copy of the dense network, with the source's weights, on the CPU, pricing its MACs in
        the run's cost convention."""
        model = dense_model(self.source)
        model.cost.convention = self.args.cost_convention
        return model

    @property
    def dense_macs(self) -> int:
        return self.baseline["macs"]

    def absolute_target(self) -> int | None:
        """The MACs target of ``--target`` / ``--target-macs``, in MACs (None without one)."""
        args = self.args
        if args.target is not None:
            if args.target >= self.dense_macs:
                raise UsageError(f"--target {args.target}: the dense {self.source['arch']['model']} has "
                                 f"{self.dense_macs} MACs; the target must be below")
            args.target_macs = args.target / self.dense_macs
            return args.target
        return None if args.target_macs is None else round(args.target_macs * self.dense_macs)

    def start(self, label: str, how: str) -> Path:
        """Open the run directory (``runs/<model>_<data>_<method>_<label>`` unless given) once the
        command is known to be good; rank 0's choices of directory and seed hold for every rank."""
        args = self.args
        name = args.project or (f"{self.source['arch']['model']}_{'dummy-' if args.dummy else ''}{args.dataset}_"
                                f"{args.method}_{label}")
        self.run_dir = Path(self.ctx.gather(str(_run_dir(args, name)))[0])
        if args.seed is None:
            args.seed = self.ctx.gather(int(torch.randint(0, 2 ** 31 - 1, ()).item()))[0]
        self.log(f"{args.method} on {self.source['kind']} {args.checkpoint or ''}: {how}")
        return self.run_dir

    def log(self, message: str) -> None:
        if self.ctx.is_main:
            print(message)

    def config(self, settings: tuple[str, ...] = (), **fields) -> RunConfig:
        """The engine's configuration of one phase: this command's data and run flags, ``fields``
        (the phase's optimisation), identified by :data:`IDENTITY` plus ``settings``."""
        args = self.args
        values = dict(model=self.source["arch"]["model"], imagenet=self.imagenet, name=self.run_dir.name,
                      identity=IDENTITY + tuple(settings),
                      source=str(Path(args.checkpoint).resolve()) if args.checkpoint else "none (from scratch)")
        values.update(fields)
        return RunConfig.from_namespace(args, **values)

    def train(self, config: RunConfig, method, start: dict | None = None, extra_results: dict | None = None,
              results_file: str = "results.json") -> int:
        """Run one phase through the engine (into ``config.out_dir``, continued if it holds a run)."""
        out_dir = Path(config.out_dir)
        config.resume = "auto" if (out_dir / "last.pt").exists() else None
        trainer = Trainer(config, method=method, start=start, baseline=self.baseline, extra_results=extra_results,
                          results_file=results_file)
        return trainer.fit()

    def fine_tune(self, cut: Path, schedule: dict, settings: tuple[str, ...], extra: dict, method=None) -> int:
        """Fine-tune the cut network in ``cut`` (a pruned.pt) into the run directory, dense, with the
        weights' ``schedule`` (``lr`` and ``lr_schedule`` or ``lr_cosine``); ``method(model, config)``
        builds the fine-tuning's in-loop method (default: none, a plain network)."""
        payload = load_checkpoint(cut, PRUNED_FORMAT)
        start = dict(arch={k: v for k, v in payload["arch"].items() if k != "source"}, state_dict=payload["state_dict"])
        config = self.config(settings, out_dir=str(self.run_dir), **schedule)
        return self.train(config, method or (lambda model, _: PruningMethod(model)), start=start, extra_results=extra)

    def read_checkpoint(self, path: Path) -> dict:
        return load_checkpoint(path)

    def read_cut(self, cut: Path) -> dict:
        """The source record a cut network was saved with (its seed, the method's own record)."""
        return load_checkpoint(cut, PRUNED_FORMAT)["arch"]["source"]

    def save_cut(self, model, path: Path, gates: torch.Tensor, **info) -> None:
        """The cut network, as a pruned.pt of the kept channels (``info`` goes to its source record)."""
        save_pruned(model, path, dict(dataset=self.args.dataset, data_dir=self.args.data_dir, dummy=self.args.dummy,
                                      seed=self.args.seed, **info), gates=gates)


def _run_dir(args, name: str) -> Path:
    """The run directory: --resume DIR, --out-dir, or runs/<name> (a fresh one unless --resume auto)."""
    if args.resume not in (None, "auto"):
        run_dir = Path(args.resume)
        if not (run_dir / "last.pt").exists() and not (run_dir / "regularize" / "last.pt").exists():
            raise UsageError(f"{run_dir} holds no prune.py run to continue")
        return run_dir
    if args.out_dir:
        run_dir = Path(args.out_dir)
        if run_dir.exists() and any(run_dir.iterdir()) and args.resume is None:
            raise UsageError(f"{run_dir} already holds a run; continue it with --resume auto --out-dir {run_dir}")
        return run_dir
    if args.resume == "auto":
        return Path("runs") / name
    run_dir = fresh_out_dir(Path("runs") / name)
    note = new_run_note(Path("runs") / name, run_dir)
    if note:
        print(note, file=sys.stderr)
    return run_dir


def run(args) -> int:
    """Every phase of the run, under one process group when torchrun starts several processes."""
    ctx = distributed.init()
    try:
        return run_phases(args, ctx)
    finally:
        distributed.shutdown(ctx)


def run_phases(args, ctx: distributed.Context) -> int:
    """``args``: prune.py's parse_args(), the authors' spellings resolved."""
    spec = METHODS.get(args.method)
    args.method = spec.name
    if args.screen and ctx.is_main:
        print("--screen (GReg's --screen_print): no effect here; the log is always printed")
    source = named_source(args, ctx)
    arch = source["arch"]
    imagenet = arch["model"] == "resnet50"
    if source.get("dummy") and not args.dummy and args.dataset is None and args.data_dir is None:
        # A baseline trained on synthetic data is pruned on synthetic data unless real data is named.
        args.dummy = True
        if ctx.is_main:
            print(f"{args.checkpoint} was trained on synthetic data (--dummy); pruning on the same "
                  f"(give --dataset/--data-dir for real data)")
    args.dataset = args.dataset or source["dataset"] or ("imagenet" if imagenet else "cifar10")
    if args.source_kind in GREG_KINDS and args.data_dir is None:
        args.data_dir = os.path.join(args.data_path or "./data", args.dataset)  # GReg's data/__init__.py, main.py:224
    args.data_dir = args.data_dir or source["data_dir"] or (None if imagenet else "./data")
    if args.data_dir is None and not args.dummy:
        raise UsageError("give the ImageNet directory with --data-dir (or --dummy for synthetic data)")
    if args.num_classes is not None and args.num_classes != arch["num_classes"]:
        raise UsageError(f"--num_classes {args.num_classes}: {args.checkpoint} has {arch['num_classes']} classes")
    args.num_classes = arch["num_classes"]
    given = next((dest for dest in TARGET_FLAGS if getattr(args, dest) is not None), None)
    if given is not None and given not in spec.targets:
        raise UsageError(spec.target_refusal(TARGET_FLAGS[given]))
    spec.check_args(args)
    if args.cost_convention is None:
        # HSIC-Lasso's own numbers (its --target, its train.py's report) are thop's.
        hsic_count = args.target is not None or args.ckpt_path is not None
        args.cost_convention = "thop" if spec.name == "hsic" and hsic_count else "conv"
    job = PruneJob(args, source, ctx)
    for key, value in spec.defaults(job.kind).items():
        if getattr(args, key) is None:
            setattr(args, key, lr_schedule(value) if key == "lr_ft" and isinstance(value, str) else value)
    return spec.run(job)
