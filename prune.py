"""Prune a dense baseline with a peer method of Dep-L0, then fine-tune it: L1, GReg-1, GReg-2, HSIC-Lasso, IMP.

The input is a dense training checkpoint (``train_*.py --net dense``, its
``best.pt``), or for ResNet50 torchvision's pretrained weights from a local
file. The ratios are GReg's (``--stage_pr``), or found for a MACs target:

    # GReg's published ResNet56 rows (their ratios, their recipe):
    python prune.py runs/resnet56_cifar10_dense/best.pt --method GReg-1 --stage_pr '[0,0.75,0.75,0.32,0]'
    python prune.py runs/resnet56_cifar10_dense/best.pt --method GReg-2 --stage_pr '[0,0.75,0.75,0.32,0]'
    # ResNet50 from torchvision's weights:
    python prune.py resnet50-0676ba61.pth --data-dir /path/to/imagenet --method GReg-1 --stage_pr '[0,0.6,0.6,0.6,0.21,0]'
    # At the MACs of a Dep-L0 run (one global ratio; see pruning/selection.py):
    python prune.py runs/resnet56_cifar10_dense/best.pt --method l1 --target-macs 0.5
    # HSIC-Lasso's published commands (absolute MACs; pruning/hsic.py):
    python prune.py runs/vgg16_cifar10_dense/best.pt --method hsic --target 107000000 --omega 40 --alpha 5e-5 --tolerance 0.01
    python prune.py runs/resnet56_cifar10_dense/best.pt --method hsic --target 57000000 --omega 5 --alpha 8e-4 --tolerance 0.01
    python prune.py resnet50-0676ba61.pth --data-dir /path/to/imagenet --method hsic --target 1550000000 --omega 1 --alpha 7e-5 --tolerance 0.01
    # HSIC-Lasso's train.py: fine-tune an already pruned network (its pruned checkpoint, or a pruned.pt) alone:
    python prune.py --model vgg16 --dataset cifar10 --lr 0.1 --batch_size 256 --ckpt_path vgg16pruned.pth.tar
    # Iterative magnitude pruning of single weights to a density (DSR's code's IMP; pruning/sparse.py):
    python prune.py runs/resnet56_cifar10_dense/best.pt --method imp --density 0.1 --cubic
    python prune.py resnet50-0676ba61.pth --data-dir /path/to/imagenet --method imp --density 0.2

Every option of GReg's own code keeps its spelling and its per-dataset value
(CIFAR: its README's commands; ImageNet: its defaults). L1 removes the filters
with the smallest mean absolute weight at once; GReg first runs its
regularisation phase (pruning/greg.py) in ``<run>/regularize/``; HSIC-Lasso
searches one Lasso penalty on a calibration batch for the MACs target. The cut is
the project's export (``pruned.pt`` there, ``<run>/cut.pt`` for L1 and HSIC), and the
fine-tuning runs through the same engine as every training, into ``<run>``:
``results.json`` (the keys of a Dep-L0 run plus ``method``, the ratios and the
pruning phase's statistics), ``best.pt``, ``pruned.pt``, TensorBoard events.
``--resume auto --out-dir <run>`` continues any phase exactly where it stopped.

Without data: ``python prune.py CHECKPOINT --dummy ...``.

The methods are the registry's ``prune`` methods (pruning/registry.py): each
declares its flags, its defaults per kind of data, its run name and its
phases, and runs them through the :class:`PruneJob` this script hands it.
"""
import argparse
import glob
import os
import re
import sys
from pathlib import Path

import torch

from engine.config import RunConfig
from engine.trainer import Trainer
from models import MODEL_CLASSES, build_model, default_arch, save_pruned
from models.export import build_pruned
from models.published import load_published, load_published_pruned, torchvision_resnet50
from models.export import FORMAT as PRUNED_FORMAT
from models.structure import CONVENTIONS
from pruning import METHODS, PruningMethod
from pruning.selection import PICK_RULES, parse_ratio_list, parse_skip_layers
from utils import distributed
from utils.checkpoint import FORMAT as CHECKPOINT_FORMAT
from utils.checkpoint import load_checkpoint, load_foreign
from utils.cli import OneLineParser, density_type, nonneg_int, positive_float, positive_int
from utils.data import DATASETS
from utils.errors import UsageError, brief, run_reporting_errors
from utils.run import fresh_out_dir, new_run_note

# The authors' names of the networks, as their command lines give them, and the networks here.
# GReg's code (MingSun-Tse/Regularization-Pruning, model/__init__.py, main.py:101-109): its CIFAR
# resnet56 is akamaster's option A; its ImageNet networks are torchvision's.
GREG_ARCHS = {"resnet56": "resnet56a", "resnet50": "resnet50"}
# HSIC-Lasso's code (songxmu/APIB, main.py:30-50).
APIB_MODELS = {"vgg16": "vgg16_apib", "resnet56": "resnet56a", "resnet110": "resnet110a", "googlenet": "googlenet",
               "resnet50": "resnet50"}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000, "mnist": 10}

# What every prune.py run must agree on to be continued; each method adds its own settings.
IDENTITY = ("method", "dataset", "num_classes")
TARGET_FLAGS = {"stage_pr": "--stage_pr", "target_macs": "--target-macs", "target": "--target", "density": "--density"}


def build_parser() -> argparse.ArgumentParser:
    methods = METHODS.of_kind("prune")
    p = OneLineParser(prog="prune.py", description="Prune a dense baseline with a peer method of Dep-L0 ("
                                                   + ", ".join(spec.summary for spec in methods) + "), then fine-tune.",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", nargs="?",
                   help="a dense training checkpoint (best.pt of --net dense), or torchvision ResNet50 weights "
                        "(or give it with the authors' --base_model_path / --ckpt, or --pretrained)")
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=sorted(METHODS.names("prune")),
                   metavar="{" + ",".join(spec.name for spec in methods) + "}",
                   help="; ".join(f"{spec.name}: {spec.summary}" for spec in methods) + "; also spelled "
                        + ", ".join(a for spec in methods for a in spec.aliases)
                        + " (required, except with HSIC-Lasso's --target, whose README gives no method)")
    # One of these is required, except with HSIC-Lasso's --ckpt_path (parse_args checks it).
    which = g.add_mutually_exclusive_group()
    which.add_argument("--stage_pr", metavar="LIST", help="GReg's ratios: ResNet56 [stem,s1,s2,s3,fc], ResNet50 "
                                                          "[stem,l1,l2,l3,l4,fc], VGG 1-12:0.5 or one per layer")
    which.add_argument("--target-macs", type=positive_float, metavar="F",
                       help="keep F of the dense MACs (L1/GReg: one global ratio, within 0.01; HSIC: its search)")
    which.add_argument("--target", type=positive_int, metavar="MACS",
                       help="the same in absolute MACs (counted by --cost-convention), HSIC's --target")
    which.add_argument("--density", type=density_type, metavar="D",
                       help="IMP: the fraction of each sparse tensor's weights kept (pruning/sparse.py)")
    g.add_argument("--pick_pruned", choices=PICK_RULES, default="min",
                   help="which filters L1 and GReg-1 remove: the smallest mean |W| (min), the largest, at random")
    g.add_argument("--arch", "-a", metavar="NAME",
                   help="CHECKPOINT is an authors' published baseline (GReg's, HSIC-Lasso's or akamaster's format) of "
                        "this registered network, e.g. resnet56a, vgg16_apib (docs/networks.md); with GReg's "
                        "--base_model_path or --pretrained, or without a checkpoint, GReg's name of it: "
                        + ", ".join(f"{k} ({v})" for k, v in GREG_ARCHS.items()))
    g.add_argument("--cost-convention", choices=CONVENTIONS,
                   help="how --target / --target-macs and the results count MACs: conv + linear multiply-accumulates "
                        "(conv), or what thop counts (thop: BN and pooling modules too). Default: thop for HSIC-Lasso's "
                        "absolute --target (its authors' count), else conv")
    g = p.add_argument_group("the authors' spellings (their READMEs' commands run as written)")
    g.add_argument("--base_model_path", metavar="PATH",
                   help="GReg's: the checkpoint its main.py saved (a shell pattern matching one file, as its code "
                        "globs it); --arch / -a is GReg's name of the network")
    g.add_argument("--pretrained", action="store_true",
                   help="GReg's: torchvision's ImageNet weights of --arch (resnet50: resnet50-0676ba61.pth from "
                        "torch.hub's cache, downloaded there if absent)")
    g.add_argument("--ckpt", metavar="PATH", help="HSIC-Lasso's: the checkpoint (its published baselines)")
    g.add_argument("--ckpt_path", metavar="PATH",
                   help="HSIC-Lasso's train.py: fine-tune this already pruned network with HSIC-Lasso's recipe, no "
                        "search (its prune.py's pruned checkpoint, with --model; or a pruned.pt of this project)")
    g.add_argument("--model", dest="apib_model", metavar="NAME",
                   help="HSIC-Lasso's name of the network: " + ", ".join(f"{k} ({v})" for k, v in APIB_MODELS.items()))
    g.add_argument("--data_path", metavar="DIR",
                   help="the data folder as the authors' code reads it: GReg's DIR/<dataset> (default ./data), "
                        "HSIC-Lasso's DIR; with a CHECKPOINT of ours, --data-dir")
    g.add_argument("--project", metavar="NAME", help="GReg's experiment name: the run directory runs/NAME")
    g.add_argument("--screen", "--screen_print", dest="screen", action="store_true",
                   help="GReg's --screen_print (its README writes --screen): no effect, the log is always printed")
    for spec in methods:
        spec.add_arguments(p)
    g = p.add_argument_group("fine-tuning (defaults: CIFAR / ImageNet; GReg and L1, then HSIC)")
    g.add_argument("--epochs", "--ft-epochs", dest="epochs", type=nonneg_int,
                   help="fine-tune epochs (120 / 90; HSIC 350 / 350)")
    g.add_argument("--lr_ft", type=lr_schedule, help="GReg and L1: lr from each epoch on, {0:0.01,60:0.001,"
                                                     "90:0.0001} (CIFAR) / {0:0.01,30:0.001,60:0.0001,75:0.00001}")
    g.add_argument("--lr", type=positive_float,
                   help="HSIC: lr₀ of the cosine ½lr₀(1 + cos(π·epoch/epochs)) (0.1 / 0.01)")
    g.add_argument("-b", "--batch-size", "--batch_size", dest="batch_size", type=positive_int,
                   help="fine-tune batch (128 / 256; HSIC 256 / 64), split over torchrun processes")
    g.add_argument("--wd", "--weight-decay", "-wd", dest="weight_decay", type=float,
                   help="weight decay of both phases (5e-4 / 1e-4; HSIC 2e-4)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum of both phases")
    g = p.add_argument_group("data (default: the checkpoint's)")
    g.add_argument("--dataset", choices=DATASETS)
    g.add_argument("--data-dir", "--data_dir", dest="data_dir", metavar="DIR")
    g.add_argument("--num_classes", type=positive_int, help="must match the checkpoint (a check)")
    g.add_argument("--dummy", action="store_true", help="synthetic data of the right shape")
    g.add_argument("-j", "-w", "--workers", type=nonneg_int, default=min(4, os.cpu_count() or 1),
                   help="data-loading processes (default: 4, or the machine's cores if fewer)")
    g.add_argument("--limit-batches", type=positive_int, metavar="N", help="at most N train and N val batches per epoch")
    g = p.add_argument_group("run")
    g.add_argument("--out-dir", metavar="DIR", help="run directory (default runs/<model>_<data>_<method>_<ratios>)")
    g.add_argument("--resume", metavar="auto|DIR", help="continue the run in --out-dir (auto: or start it) or DIR")
    g.add_argument("--seed", type=nonneg_int, help="random seed (default: drawn at random and recorded)")
    g.add_argument("--gpu", "--gpu_id", dest="gpu", type=nonneg_int, help="CUDA device index")
    g.add_argument("-p", "--print-freq", type=positive_int, default=100, help="iterations between progress lines")
    g.add_argument("--save_epoch", type=nonneg_int, default=0, help="also keep epoch_<k>.pt every k epochs")
    g.add_argument("--amp", action="store_true", help="mixed precision")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    g.add_argument("--loader", choices=("auto", "device", "workers"), default="auto",
                   help="CIFAR on CUDA: keep the training set on the GPU")
    return p


def lr_schedule(text: str) -> dict[int, float]:
    """GReg's ``--lr_ft``: ``{0:0.01,60:0.001,90:0.0001}`` (braces optional): lr from each epoch on."""
    body = text.strip().removeprefix("{").removesuffix("}")
    try:
        schedule = {int(k): float(v) for k, v in (item.split(":") for item in body.split(",") if item.strip())}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected EPOCH:LR,EPOCH:LR,..., got {text!r}") from None
    if 0 not in schedule or any(v <= 0 for v in schedule.values()) or any(k < 0 for k in schedule):
        raise argparse.ArgumentTypeError(f"needs a positive lr from epoch 0 on, got {text!r}")
    return schedule


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
        dataset = (network.data_kind if network.data_kind in ("mnist", "imagenet")
                   else "cifar100" if classes == 100 else "cifar10")
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
    kind = MODEL_CLASSES[arch["model"]].data_kind
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
    """The dense network the command names (:func:`resolve_spellings`), as :func:`load_source` gives it."""
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
    dataset = args.dataset or ("imagenet" if MODEL_CLASSES[args.arch].data_kind == "imagenet" else "cifar10")
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
    if not hasattr(args, "source_kind"):  # a namespace straight from build_parser()
        resolve_spellings(build_parser(), args)
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


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked as far as it can be without reading the checkpoint
    (reproduce.py checks a table's rows with it before running any)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = [TARGET_FLAGS[dest] for dest in TARGET_FLAGS if getattr(args, dest) is not None]
    if args.ckpt_path is not None and given:
        parser.error(f"--ckpt_path fine-tunes an already pruned network (HSIC-Lasso's train.py): {given[0]} has "
                     f"nothing to prune there")
    if args.ckpt_path is None and not given:
        parser.error("one of the arguments " + " ".join(TARGET_FLAGS.values()) + " is required (or HSIC-Lasso's "
                     "--ckpt_path PRUNED, to fine-tune an already pruned network)")
    if args.epochs == 0:
        parser.error("--epochs 0 fine-tunes nothing (no results.json); give at least 1")
    if args.target_macs is not None and args.target_macs >= 1.0:
        parser.error(f"--target-macs {args.target_macs:g}: must be below 1 (a fraction of the dense MACs)")
    try:  # what can be checked without the network: the syntax and range of the ratios and layer ids
        if args.stage_pr is not None:
            parse_ratio_list(args.stage_pr)
        parse_skip_layers(args.skip_layers)
    except UsageError as e:
        parser.error(str(e))
    resolve_spellings(parser, args)
    return args


def resolve_spellings(parser, args) -> None:
    """The authors' spellings onto this script's: where the network comes from
    (``args.source_kind``: ``checkpoint`` (CHECKPOINT), ``greg`` (``--base_model_path``), ``pretrained``,
    ``scratch`` (none: GReg's scratch training), ``apib`` (``--ckpt`` / ``--model``)), the registered
    network (``args.arch``; None for an authors' network this project lacks, refused when the run
    starts), the data folder and the method. Parse-time errors are one line."""
    named = [(flag, value) for flag, value in (("CHECKPOINT", args.checkpoint), ("--base_model_path",
                                                args.base_model_path), ("--ckpt", args.ckpt),
                                               ("--ckpt_path", args.ckpt_path)) if value]
    if len(named) > 1:
        parser.error(f"{named[0][0]} and {named[1][0]} both name the checkpoint; give one")
    if args.pretrained and named:
        parser.error(f"--pretrained (torchvision's weights) and {named[0][0]} both name the network's weights; give one")
    if args.data_path is not None and args.data_dir is not None:
        parser.error("--data_path and --data-dir both name the data folder; give one")
    args.authors_arch = None
    if args.ckpt_path is not None:
        # HSIC-Lasso's train.py: fine-tune a pruned network; the network is in the file (a pruned.pt of
        # ours) or named by --model (its pruned checkpoints, as its train.py needs it) or --arch.
        args.source_kind = "pruned"
        if args.method is not None and METHODS.get(args.method).name != "hsic":
            parser.error(f"--ckpt_path is HSIC-Lasso's fine-tuning of a pruned network (its train.py); "
                         f"--method {args.method} prunes a dense checkpoint: give it as CHECKPOINT")
        if args.apib_model is not None and args.arch is not None:
            parser.error("--model and --arch both name the network; give one")
        if args.apib_model is not None and args.apib_model not in APIB_MODELS:
            parser.error(f"--model {args.apib_model}: HSIC-Lasso's networks here are " + ", ".join(APIB_MODELS))
        if args.arch is not None and args.arch not in MODEL_CLASSES:
            parser.error(f"argument --arch: invalid choice: {args.arch!r} (choose from {', '.join(sorted(MODEL_CLASSES))})")
        if args.apib_model is not None:
            args.authors_arch, args.arch = args.apib_model, APIB_MODELS[args.apib_model]
        args.checkpoint = args.ckpt_path
        args.data_dir = args.data_dir or args.data_path
        args.method = "hsic"
        return
    if args.apib_model is not None or args.ckpt is not None:
        args.source_kind = "apib"
        if args.apib_model is None:
            parser.error("--ckpt (HSIC-Lasso's spelling) takes its --model NAME: " + ", ".join(APIB_MODELS))
        if args.arch is not None:
            parser.error("--model and --arch both name the network; give one")
        if not named:
            parser.error(f"--model {args.apib_model}: give the checkpoint (--ckpt PATH)")
        if args.apib_model not in APIB_MODELS:
            parser.error(f"--model {args.apib_model}: HSIC-Lasso's networks here are " + ", ".join(APIB_MODELS))
        args.authors_arch, args.arch = args.apib_model, APIB_MODELS[args.apib_model]
        args.checkpoint = args.ckpt or args.checkpoint
        args.data_dir = args.data_dir or args.data_path
    elif args.checkpoint is not None:
        args.source_kind = "checkpoint"
        if args.arch is not None and args.arch not in MODEL_CLASSES:
            parser.error(f"argument --arch: invalid choice: {args.arch!r} (choose from {', '.join(sorted(MODEL_CLASSES))})")
        args.data_dir = args.data_dir or args.data_path
    else:
        args.source_kind = "greg" if args.base_model_path else "pretrained" if args.pretrained else "scratch"
        if args.arch is None:
            if args.source_kind == "scratch":
                parser.error("give the network to prune: CHECKPOINT (or GReg's --base_model_path / --pretrained with "
                             "--arch, HSIC-Lasso's --ckpt with --model)")
            parser.error(f"{'--base_model_path' if args.base_model_path else '--pretrained'} takes GReg's name of the "
                         f"network: --arch / -a NAME (" + ", ".join(GREG_ARCHS) + ")")
        args.authors_arch, args.arch = args.arch, GREG_ARCHS.get(args.arch)
        if args.source_kind == "scratch" and args.stage_pr is None:
            parser.error("without a checkpoint prune.py trains from scratch as GReg's code does: give --stage_pr of "
                         "zeros, or the network to prune (CHECKPOINT, --base_model_path, --pretrained)")
    if args.method is None:
        if args.target is None and args.source_kind != "apib":
            parser.error("the following arguments are required: --method")
        args.method = "hsic"  # HSIC-Lasso's main.py has no --method: its README's commands give none


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_reporting_errors("prune.py", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
