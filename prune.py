"""Prune a dense baseline with a peer method of Dep-L0, then fine-tune it: L1, GReg-1, GReg-2, HSIC-Lasso, IMP.

The input is a dense training checkpoint (``train_*.py --net dense``, its
``best.pt``), or for ResNet50 torchvision's pretrained weights from a local
file. The ratios are GReg's (``--stage_pr``), or found for a MACs target:

    # GReg's published ResNet56 rows (their ratios, their recipe):
    python prune.py runs/resnet56_cifar10_dense/best.pt --method GReg-1 --stage_pr [0,0.75,0.75,0.32,0]
    python prune.py runs/resnet56_cifar10_dense/best.pt --method GReg-2 --stage_pr [0,0.75,0.75,0.32,0]
    # ResNet50 from torchvision's weights:
    python prune.py resnet50-0676ba61.pth --data-dir /path/to/imagenet --method GReg-1 --stage_pr [0,0.6,0.6,0.6,0.21,0]
    # At the MACs of a Dep-L0 run (one global ratio; see pruning/selection.py):
    python prune.py runs/resnet56_cifar10_dense/best.pt --method l1 --target-macs 0.5
    # HSIC-Lasso's published commands (absolute MACs; pruning/hsic.py):
    python prune.py runs/vgg16_cifar10_dense/best.pt --method hsic --target 107000000 --omega 40 --alpha 5e-5 --tolerance 0.01
    python prune.py runs/resnet56_cifar10_dense/best.pt --method hsic --target 57000000 --omega 5 --alpha 8e-4 --tolerance 0.01
    python prune.py resnet50-0676ba61.pth --data-dir /path/to/imagenet --method hsic --target 1550000000 --omega 1 --alpha 7e-5 --tolerance 0.01
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
"""
import argparse
import os
import re
import sys
import time
from argparse import Namespace
from pathlib import Path

import torch

from engine.cli import Recipe
from engine.trainer import Trainer
from models import build_model, default_arch, save_pruned
from models.export import FORMAT as PRUNED_FORMAT
from pruning import GReg, PruningMethod, hsic
from pruning.sparse import IMP, SCHEDULES, check_density
from pruning.selection import PICK_RULES, decision, layer_ratios, parse_ratio_list, ratios_for_macs
from utils.checkpoint import FORMAT as CHECKPOINT_FORMAT
from utils.checkpoint import load_checkpoint
from utils.cli import OneLineParser, density_type, nonneg_int, positive_float, positive_int
from utils.data import DATASETS, DeviceNormalize, build_datasets
from utils import distributed
from utils.errors import EXIT_PREEMPTED, UsageError, run_reporting_errors
from utils.logger import EventFile
from utils.run import StopSignals, fresh_out_dir, select_device
from utils.sampling import ResumableSampler, SeededDataset

METHODS = {"l1": "l1", "L1": "l1", "greg1": "greg1", "GReg-1": "greg1", "greg2": "greg2", "GReg-2": "greg2",
           "hsic": "hsic", "HSIC-Lasso": "hsic", "imp": "imp", "IMP": "imp"}
# GReg's settings per kind of data (L1 fine-tunes as GReg does): CIFAR from its README's ResNet56
# commands, ImageNet its defaults.
GREG_DEFAULTS = {
    "cifar": dict(update_reg_interval=10, stabilize_reg_interval=10000, batch_size_prune=128, epochs=120,
                  lr_ft="0:0.01,60:0.001,90:0.0001", batch_size=128, weight_decay=5e-4),
    "imagenet": dict(update_reg_interval=5, stabilize_reg_interval=40000, batch_size_prune=64, epochs=90,
                     lr_ft="0:0.01,30:0.001,60:0.0001,75:0.00001", batch_size=256, weight_decay=1e-4),
}
# HSIC-Lasso's code: a calibration batch of its loaders' size, then 350 cosine epochs (its train.py's
# defaults; CIFAR lr and batch from its README's VGG16 command, ImageNet its loader's batch of 64).
HSIC_DEFAULTS = {
    "cifar": dict(calib_batch_size=128, epochs=350, lr=0.1, batch_size=256, weight_decay=2e-4),
    "imagenet": dict(calib_batch_size=64, epochs=350, lr=0.01, batch_size=64, weight_decay=2e-4),
}
# IMP's settings: a run continues only with the ones it started with.
IMP_SETTINGS = ("density", "prune_iterations", "cubic")
# IMP prunes at the end of every second epoch from epoch 0, then trains 10 more epochs (the code's
# --prune-epoch-frequency 2 --start-pruning-after-epoch 0 --post-prune-epochs 10).
IMP_EVERY, IMP_POST_EPOCHS = 2, 10
# A regularisation phase ends by its own rule; this only bounds the epoch loop.
REGULARIZE_EPOCHS = 1_000_000
IDENTITY = ("method", "dataset", "num_classes", "layer_ratios", "pick_pruned")
# HSIC-Lasso's cut is decided by these; a continued run must have been started with the same.
HSIC_SETTINGS = ("target", "omega", "alpha", "tolerance", "calib_batch_size", "resnet50_y")
# The regularisation phase also continues only with the settings it started with.
GREG_SETTINGS = ("update_reg_interval", "stabilize_reg_interval", "reg_upper_limit", "reg_upper_limit_pick",
                 "reg_granularity_pick", "reg_granularity_prune", "reg_granularity_recover", "mag_ratio_limit",
                 "batch_size_prune", "lr_prune")


def _lr_schedule(text: str) -> dict[int, float]:
    """GReg's ``--lr_ft``: ``{0:0.01,60:0.001,90:0.0001}`` (braces optional): lr from each epoch on."""
    body = text.strip().removeprefix("{").removesuffix("}")
    try:
        schedule = {int(k): float(v) for k, v in (item.split(":") for item in body.split(",") if item.strip())}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected EPOCH:LR,EPOCH:LR,..., got {text!r}") from None
    if 0 not in schedule or any(v <= 0 for v in schedule.values()) or any(k < 0 for k in schedule):
        raise argparse.ArgumentTypeError(f"needs a positive lr from epoch 0 on, got {text!r}")
    return schedule


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="prune.py", description="Prune a dense baseline with L1, GReg-1, GReg-2 or HSIC-Lasso, "
                                                   "then fine-tune.",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a dense training checkpoint (best.pt of --net dense), or torchvision ResNet50 weights")
    g = p.add_argument_group("method")
    g.add_argument("--method", required=True, choices=sorted(METHODS), metavar="{l1,greg1,greg2,hsic,imp}",
                   help="L1 (Li et al. 2017), GReg-1 or GReg-2 (Wang et al. 2021), HSIC-Lasso (Guo et al. 2023), "
                        "iterative magnitude pruning of single weights (imp, as DSR's code runs it); the spellings "
                        "L1, GReg-1, GReg-2, HSIC-Lasso, IMP too")
    which = g.add_mutually_exclusive_group(required=True)
    which.add_argument("--stage_pr", metavar="LIST", help="GReg's ratios: ResNet56 [stem,s1,s2,s3,fc], ResNet50 "
                                                          "[stem,l1,l2,l3,l4,fc], VGG 1-12:0.5 or one per layer")
    which.add_argument("--target-macs", type=positive_float, metavar="F",
                       help="keep F of the dense MACs (L1/GReg: one global ratio, within 0.01; HSIC: its search)")
    which.add_argument("--target", type=positive_int, metavar="MACS",
                       help="the same in absolute MACs (conv + linear multiply-accumulates), HSIC's --target")
    which.add_argument("--density", type=density_type, metavar="D",
                       help="IMP: the fraction of each sparse tensor's weights kept (pruning/sparse.py)")
    g.add_argument("--pick_pruned", choices=PICK_RULES, default="min",
                   help="which filters L1 and GReg-1 remove: the smallest mean |W| (min), the largest, at random")
    g = p.add_argument_group("GReg's regularisation phase (defaults: CIFAR / ImageNet)")
    g.add_argument("--update_reg_interval", type=positive_int, help="K_u: iterations between updates (10 / 5)")
    g.add_argument("--stabilize_reg_interval", type=nonneg_int, help="K_s: iterations after the last stop (10000 / 40000)")
    g.add_argument("--reg_upper_limit", type=positive_float, default=1.0, help="a layer stops above this coefficient")
    g.add_argument("--reg_upper_limit_pick", type=positive_float, default=1e-2, help="GReg-2 picks at this coefficient")
    g.add_argument("--reg_granularity_pick", type=positive_float, default=1e-5, help="GReg-2's phase-1 increment")
    g.add_argument("--reg_granularity_prune", type=positive_float, default=1e-4, help="the pruned filters' increment")
    g.add_argument("--reg_granularity_recover", type=float, default=-1e-4, help="GReg-2's kept filters' coefficient")
    g.add_argument("--mag_ratio_limit", type=positive_float, default=1000.0, help="the magnitude-ratio stop")
    g.add_argument("--batch_size_prune", type=positive_int, help="batch of the regularisation phase (128 / 64)")
    g.add_argument("--lr_prune", type=positive_float, default=1e-3, help="constant SGD lr of the regularisation phase")
    g = p.add_argument_group("HSIC-Lasso's search (defaults: its code's; CIFAR / ImageNet)")
    g.add_argument("--omega", type=positive_int, default=1, help="ω: channels every group keeps at least")
    g.add_argument("--alpha", type=positive_float, default=1e-6,
                   help="α₀: the Lasso penalty the search starts from (its first upper bracket)")
    g.add_argument("--tolerance", type=positive_float, default=0.01, help="the search stops within target·(1 ± tol)")
    g.add_argument("--calib-batch-size", type=positive_int, metavar="N",
                   help="N: calibration images (128 / 64); the kernels hold 8·N²·(channels + groups) bytes")
    g.add_argument("--resnet50-y", choices=hsic.Y_SOURCES, default="fc",
                   help="what ResNet50's conv2 channels are judged against: the pooled classifier input, as the "
                        "authors' code does, or conv3's output")
    g.add_argument("--lasso-threads", type=positive_int, default=min(8, os.cpu_count() or 1),
                   help="groups solved at once (the result does not depend on it)")
    g = p.add_argument_group("IMP (iterative magnitude pruning)")
    g.add_argument("--prune-iterations", type=positive_int, default=20,
                   help=f"K: prunes, one at the end of every {IMP_EVERY}nd epoch from epoch 0, then "
                        f"{IMP_POST_EPOCHS} epochs: {IMP_EVERY}(K-1)+{IMP_POST_EPOCHS} epochs in all")
    g.add_argument("--cubic", action="store_true",
                   help="the cubic schedule (density d+(1-d)(1-i/K)^3 after prune i; the code's WRN runs) instead "
                        "of the same fraction 1-d^(1/K) each time (its ResNet50 runs)")
    g = p.add_argument_group("fine-tuning (defaults: CIFAR / ImageNet; GReg and L1, then HSIC)")
    g.add_argument("--epochs", "--ft-epochs", dest="epochs", type=nonneg_int,
                   help="fine-tune epochs (120 / 90; HSIC 350 / 350)")
    g.add_argument("--lr_ft", type=_lr_schedule, help="GReg and L1: lr from each epoch on, {0:0.01,60:0.001,"
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
    g.add_argument("-j", "-w", "--workers", type=nonneg_int, default=4, help="data-loading processes")
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


def load_source(path: str) -> dict:
    """``{'arch', 'state_dict', 'dataset', 'data_dir'}`` of a dense checkpoint or torchvision weights."""
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
    arch = state["arch"]
    if arch.get("net") != "dense" or any(key in arch for key in ("inner_widths", "stem_index")):
        what = "an already pruned" if arch.get("net") == "dense" else f"a gated (--net {arch.get('net')})"
        raise UsageError(f"{path} is {what} checkpoint; prune.py prunes a dense baseline: train one with "
                         f"--net dense and give its best.pt")
    args = state.get("args") or {}
    return dict(arch=arch, state_dict=state["model"], dataset=args.get("dataset"), data_dir=args.get("data_dir"),
                kind=f"dense checkpoint, epoch {state.get('epoch')}")


def dense_model(source: dict):
    model = build_model(source["arch"])
    state = dict(source["state_dict"])
    for key, value in model.state_dict().items():  # torchvision's files lack num_batches_tracked
        state.setdefault(key, value)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UsageError(f"the weights do not fit a {source['arch']['model']} ({str(e).splitlines()[0][:120]})") from e
    return model


# ------------------------------------------------------------------------------- the phases


def _common_args(args, **overrides) -> Namespace:
    """The engine's arguments for one phase of this run."""
    values = dict(net="dense", back_dep=False, lamba=0.0, reg="paper", temp=2.0 / 3.0, width_mult=1.0,
                  target_params=None, target_warmup=0.0, lr_lagrangian=0.0, lr_gate=0.0, lr_decay=1.0,
                  milestones=(), gen_optim="Adam", fine_tune_epoch=0, max_grad_norm=None, compile=False,
                  sync_bn=False, lr_schedule=None, dataset=args.dataset, data_dir=args.data_dir,
                  num_classes=args.num_classes, dummy=args.dummy, workers=args.workers,
                  limit_batches=args.limit_batches, momentum=args.momentum, weight_decay=args.weight_decay,
                  gpu=args.gpu, seed=args.seed, print_freq=args.print_freq, save_epoch=args.save_epoch,
                  amp=args.amp, channels_last=args.channels_last, loader=args.loader, method=args.method,
                  stage_pr=args.stage_pr, target_macs=args.target_macs, layer_ratios=args.layer_ratios,
                  pick_pruned=args.pick_pruned, source=str(Path(args.checkpoint).resolve()), lr_cosine=False,
                  **{key: getattr(args, key) for key in GREG_SETTINGS + HSIC_SETTINGS})
    values.update(overrides)
    return Namespace(**values)


def regularize(args, recipe: Recipe, source: dict, run_dir: Path) -> int:
    """GReg's regularisation phase in ``run_dir/regularize``; its pruned.pt is the cut network."""
    directory = run_dir / "regularize"
    phase = _common_args(args, batch_size=args.batch_size_prune, lr=args.lr_prune, epochs=REGULARIZE_EPOCHS,
                         out_dir=str(directory), resume="auto" if (directory / "last.pt").exists() else None)
    variant = 1 if args.method == "greg1" else 2

    def method(model, phase_args):
        generator = torch.Generator().manual_seed(phase_args.seed)
        return GReg(model, args.layer_ratios, variant, args.update_reg_interval, args.stabilize_reg_interval,
                    args.reg_upper_limit, args.reg_upper_limit_pick, args.reg_granularity_pick,
                    args.reg_granularity_prune, args.reg_granularity_recover, args.mag_ratio_limit,
                    args.pick_pruned, generator)

    trainer = Trainer(recipe, phase, method=method, start=source, identity=IDENTITY + GREG_SETTINGS,
                      extra_results=dict(phase="regularize", stage_pr=args.stage_pr, target_macs=args.target_macs,
                                         layer_ratios=args.layer_ratios), results_file="regularize.json")
    args.seed = phase.seed
    return trainer.fit()


def cut_l1(args, source: dict, run_dir: Path, ctx: distributed.Context) -> None:
    """L1: remove the filters now, from the pretrained weights; ``run_dir/cut.pt`` is the network
    (written by rank 0, there for every rank on return)."""
    if not ctx.is_main:
        ctx.barrier()
        return
    model = dense_model(source)
    generator = torch.Generator().manual_seed(args.seed)
    gates = decision(model, args.layer_ratios, rule=args.pick_pruned, generator=generator)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_pruned(model, run_dir / "cut.pt", dict(dataset=args.dataset, data_dir=args.data_dir, seed=args.seed),
                gates=gates)
    ctx.barrier()


def calibration_batch(args, device: torch.device) -> torch.Tensor:
    """HSIC-Lasso's calibration images: the first ``--calib-batch-size`` of the training set's epoch 0
    under the run's seed, with the training augmentation, normalised, on ``device``."""
    train_set, _, _ = build_datasets(args.dataset, args.data_dir, dummy=args.dummy, num_classes=args.num_classes)
    n = args.calib_batch_size
    if len(train_set) < n:
        raise UsageError(f"--calib-batch-size {n}: the training set has only {len(train_set)} images")
    sampler = ResumableSampler(train_set, distributed.Context(), args.seed, n)
    sampler.start_at(0, 0)
    dataset = SeededDataset(train_set)
    images = torch.stack([dataset[key][0] for key, _ in zip(sampler, range(n))])
    return DeviceNormalize(args.dataset, device)(images.to(device))


def cut_hsic(args, source: dict, run_dir: Path, target: int, ctx: distributed.Context) -> int:
    """HSIC-Lasso: calibrate, search alpha, slice the kept channels from the pretrained weights into
    ``run_dir/cut.pt`` (rank 0; the other ranks wait for the file). Returns an exit status."""
    cut = run_dir / "cut.pt"
    with StopSignals() as stop:
        if not ctx.is_main:
            # A file, not a collective: the search may outlast the process group's timeout, and
            # torchrun ends every rank when rank 0 fails.
            while not cut.exists():
                if stop.received is not None:
                    return EXIT_PREEMPTED
                time.sleep(1.0)
            return 0
        device = select_device(args.gpu, ctx)
        model = dense_model(source).to(device)
        n = args.calib_batch_size
        images = calibration_batch(args, device)
        print(f"HSIC-Lasso: {n} calibration images (seed {args.seed}); the groups' kernels take "
              f"{hsic.kernel_memory(model, n) / 2 ** 20:.0f} MiB")
        groups = hsic.calibration_groups(dense_model(source).to(device), images, args.resnet50_y)
        dense_macs, _ = model.cost.dense()
        search = hsic.HsicSearch(groups, model.gates.widths, lambda counts: model.cost.pruned(torch.tensor(counts))[0],
                                 args.omega, args.lasso_threads, should_stop=lambda: stop.received is not None)
        (run_dir / "search").mkdir(parents=True, exist_ok=True)
        events = EventFile(run_dir / "search")

        def report(step, decision):
            print(f"  alpha {decision.alpha:.4e}: {decision.macs} MACs ({decision.macs / dense_macs:.4f} of dense; "
                  f"target {target}), kept {sum(len(k) for k in decision.kept)} of "
                  f"{sum(g.width for g in groups)} channels, {decision.seconds:.1f}s"
                  + (f", {decision.unconverged} fits at the iteration limit" if decision.unconverged else ""))
            for tag, value in (("alpha", decision.alpha), ("macs", decision.macs),
                               ("macs_fraction", decision.macs / dense_macs)):
                events.add_scalar(f"hsic/{tag}", value, step)
            events.flush()

        try:
            decision = search.run(target, args.alpha, args.tolerance, report)
        except hsic.SearchStopped:
            print("stopped during the HSIC search (nothing to save: it is deterministic and runs again on "
                  "--resume auto)")
            return EXIT_PREEMPTED
        finally:
            events.close()
        within = abs(decision.macs - target) <= args.tolerance * target
        if not within:
            print(f"warning: the search ended at alpha {decision.alpha:.3e} with {decision.macs} MACs, outside "
                  f"{target} ± {args.tolerance:g} (its alpha floor, as in the authors' code)", file=sys.stderr)
        settings = {key: getattr(args, key) for key in HSIC_SETTINGS}
        record = dict(settings, alpha_found=decision.alpha, macs=decision.macs,
                      within_tolerance=within, calib_seed=args.seed,
                      kept_widths={g.name: len(k) for g, k in zip(groups, decision.kept)}, search=search.history)
        save_pruned(model.cpu(), cut, dict(dataset=args.dataset, data_dir=args.data_dir, seed=args.seed, hsic=record),
                    gates=search.gates(decision))
        print(f"HSIC-Lasso: alpha {decision.alpha:.4e} keeps {decision.macs} MACs; cut network in {cut}")
        return 0


def fine_tune(args, recipe: Recipe, cut: Path, baseline: dict, run_dir: Path, extra: dict) -> int:
    payload = load_checkpoint(cut, PRUNED_FORMAT)
    start = dict(arch={k: v for k, v in payload["arch"].items() if k != "source"}, state_dict=payload["state_dict"])
    schedule = dict(lr=args.lr, lr_cosine=True) if args.method == "hsic" else dict(lr=args.lr_ft[0],
                                                                                    lr_schedule=args.lr_ft)
    phase = _common_args(args, batch_size=args.batch_size, epochs=args.epochs, out_dir=str(run_dir),
                         resume="auto" if (run_dir / "last.pt").exists() else None, **schedule)
    identity = IDENTITY + HSIC_SETTINGS if args.method == "hsic" else IDENTITY
    trainer = Trainer(recipe, phase, method=lambda model, _: PruningMethod(model), start=start, baseline=baseline,
                      identity=identity, extra_results=extra)
    return trainer.fit()


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
    return Path("runs") / name if args.resume == "auto" else fresh_out_dir(Path("runs") / name)


def run(args) -> int:
    """Every phase of the run, under one process group when torchrun starts several processes."""
    ctx = distributed.init()
    try:
        return run_phases(args, ctx)
    finally:
        distributed.shutdown(ctx)


def run_phases(args, ctx: distributed.Context) -> int:
    args.method = METHODS[args.method]
    source = load_source(args.checkpoint)
    arch = source["arch"]
    imagenet = arch["model"] == "resnet50"
    args.dataset = args.dataset or source["dataset"] or ("imagenet" if imagenet else "cifar10")
    args.data_dir = args.data_dir or source["data_dir"] or (None if imagenet else "./data")
    if args.data_dir is None and not args.dummy:
        raise UsageError("give the ImageNet directory with --data-dir (or --dummy for synthetic data)")
    if args.num_classes is not None and args.num_classes != arch["num_classes"]:
        raise UsageError(f"--num_classes {args.num_classes}: {args.checkpoint} has {arch['num_classes']} classes")
    args.num_classes = arch["num_classes"]
    if args.method == "imp":
        return run_imp(args, source, ctx)
    if args.density is not None:
        raise UsageError(f"--density is IMP's (--method imp); {args.method} takes --stage_pr, --target-macs or --target")
    hsic_run = args.method == "hsic"
    if hsic_run and args.stage_pr is not None:
        raise UsageError("HSIC-Lasso finds its own widths: give --target MACS or --target-macs F, not --stage_pr")
    if hsic_run and args.lr_ft is not None:
        raise UsageError("--lr_ft is GReg's schedule; HSIC-Lasso fine-tunes with a cosine from --lr")
    if not hsic_run and args.lr is not None:
        raise UsageError("--lr is HSIC-Lasso's cosine lr; L1 and GReg fine-tune with --lr_ft")
    defaults = HSIC_DEFAULTS if hsic_run else GREG_DEFAULTS
    for key, value in defaults["imagenet" if args.dataset == "imagenet" else "cifar"].items():
        if getattr(args, key) is None:
            setattr(args, key, _lr_schedule(value) if key == "lr_ft" else value)
    model = dense_model(source)
    dense_macs, dense_params = model.cost.dense()
    if args.target is not None:
        if args.target >= dense_macs:
            raise UsageError(f"--target {args.target}: the dense {arch['model']} has {dense_macs} MACs; the target "
                             f"must be below")
        args.target_macs = args.target / dense_macs
    target = args.target
    if target is None and args.target_macs is not None:
        target = round(args.target_macs * dense_macs)
    args.layer_ratios = None
    if hsic_run:
        spec = f"target{args.target}" if args.target is not None else f"macs{args.target_macs:g}"
        how = (f"target {target} MACs ({target / dense_macs:.4f} of dense {dense_macs}), --omega {args.omega}, "
               f"--alpha {args.alpha:g}, --tolerance {args.tolerance:g}")
    elif args.stage_pr is not None:
        args.layer_ratios = layer_ratios(model, parse_ratio_list(args.stage_pr))
        spec = "pr" + args.stage_pr.strip("[]").replace(",", "_").replace(":", "-")
        how = f"--stage_pr {args.stage_pr}"
    else:
        ratio, args.layer_ratios = ratios_for_macs(model, args.target_macs)
        spec = f"target{args.target}" if args.target is not None else f"macs{args.target_macs:g}"
        how = f"{target} MACs ({args.target_macs:.4f} of dense): global ratio {ratio:.4f}"
    recipe = Recipe(model=arch["model"], imagenet=imagenet, lr=args.lr_prune, weight_decay=args.weight_decay,
                    milestones=(), lr_decay=1.0, gate_decay=None, epochs=args.epochs, fine_tune_epochs=0,
                    batch_size=args.batch_size, lamba=0.0, workers=args.workers)
    name = f"{arch['model']}_{'dummy-' if args.dummy else ''}{args.dataset}_{args.method}_{spec}"
    run_dir = _run_dir(args, name)
    # Rank 0's choices, for every rank.
    run_dir = Path(ctx.gather(str(run_dir))[0])
    if args.seed is None:
        args.seed = ctx.gather(int(torch.randint(0, 2 ** 31 - 1, ()).item()))[0]
    if ctx.is_main:
        print(f"{args.method} on {source['kind']} {args.checkpoint}: {how}")
    baseline = dict(macs=dense_macs, params=dense_params, widths=list(model.gates.widths))
    extra = dict(method=args.method, stage_pr=args.stage_pr, target_macs=args.target_macs, target=target,
                 layer_ratios=args.layer_ratios, pick_pruned=args.pick_pruned, source=str(args.checkpoint))
    if args.method == "l1":
        cut = run_dir / "cut.pt"
        if not cut.exists():
            cut_l1(args, source, run_dir, ctx)
        args.seed = load_checkpoint(cut, PRUNED_FORMAT)["arch"]["source"]["seed"]  # the run's, when continued
    elif hsic_run:
        cut = run_dir / "cut.pt"
        if not cut.exists():
            status = cut_hsic(args, source, run_dir, target, ctx)
            if status != 0:
                return status
        record = load_checkpoint(cut, PRUNED_FORMAT)["arch"]["source"]["hsic"]
        for key in HSIC_SETTINGS:
            if record[key] != getattr(args, key):
                raise UsageError(f"{cut} was cut with --{key.replace('_', '-')} {record[key]}, this command asks "
                                 f"for {getattr(args, key)}; continue it with matching flags")
        args.seed = record["calib_seed"]  # the run's, when continued
        extra.update(hsic_alpha=record["alpha_found"], omega=args.omega, calib_batch_size=args.calib_batch_size,
                     calib_seed=record["calib_seed"], hsic=record)
    else:
        cut = run_dir / "regularize" / "pruned.pt"
        if not (run_dir / "last.pt").exists():
            status = regularize(args, recipe, source, run_dir)
            if status != 0:
                return status
        phase = load_checkpoint(run_dir / "regularize" / "last.pt")
        args.seed = phase["args"]["seed"]  # the run's, when continued
        extra["pruning_phase"] = (phase["results"] or {}).get("pruning_phase")
        extra["greg"] = {key: getattr(args, key) for key in (
            "update_reg_interval", "stabilize_reg_interval", "reg_upper_limit", "reg_upper_limit_pick",
            "reg_granularity_pick", "reg_granularity_prune", "reg_granularity_recover", "mag_ratio_limit",
            "batch_size_prune", "lr_prune")}
    if hsic_run:
        extra.update(lr=args.lr, lr_schedule="cosine")
    else:
        extra["lr_ft"] = {str(k): v for k, v in args.lr_ft.items()}
    return fine_tune(args, recipe, cut, baseline, run_dir, extra)


def run_imp(args, source: dict, ctx: distributed.Context) -> int:
    """IMP: the dense network pruned to ``--density`` while it trains, through the engine, into one run
    directory."""
    if args.lr is not None:
        raise UsageError("--lr is HSIC-Lasso's cosine lr; IMP follows the code's schedule, or --lr_ft")
    arch = source["arch"]
    model = dense_model(source)
    check_density(model, args.density)
    kind = "imagenet" if args.dataset == "imagenet" else "cifar"
    defaults = SCHEDULES[kind]["imp"]
    schedule = args.lr_ft or defaults["lr"]
    args.lr_ft = schedule
    args.batch_size = args.batch_size or defaults["batch_size"]
    args.weight_decay = defaults["weight_decay"] if args.weight_decay is None else args.weight_decay
    last_prune = IMP_EVERY * (args.prune_iterations - 1) + 1  # the epoch whose end brings the last prune
    if args.epochs is None:
        args.epochs = last_prune - 1 + IMP_POST_EPOCHS
    elif args.epochs < last_prune:
        raise UsageError(f"--epochs {args.epochs}: IMP's last prune comes at the end of epoch {last_prune} "
                         f"(--prune-iterations {args.prune_iterations}, one every {IMP_EVERY} epochs); give at least that")
    if args.momentum == 0:
        raise UsageError("IMP trains with Nesterov momentum, as the code: --momentum must be above 0")
    spec = f"d{args.density:g}" + ("_cubic" if args.cubic else "")
    name = f"{arch['model']}_{'dummy-' if args.dummy else ''}{args.dataset}_imp_{spec}"
    run_dir = Path(ctx.gather(str(_run_dir(args, name)))[0])  # rank 0's, for every rank
    if args.seed is None:
        args.seed = ctx.gather(int(torch.randint(0, 2 ** 31 - 1, ()).item()))[0]
    if ctx.is_main:
        print(f"imp on {source['kind']} {args.checkpoint}: density {args.density:g} in {args.prune_iterations} prunes "
              f"({'cubic' if args.cubic else 'exponential'}), {args.epochs} epochs")
    macs, params = model.cost.dense()
    baseline = dict(macs=macs, params=params, widths=list(model.gates.widths))
    lr = max(schedule.values())
    recipe = Recipe(model=arch["model"], imagenet=kind == "imagenet", lr=lr, weight_decay=args.weight_decay,
                    milestones=(), lr_decay=1.0, gate_decay=None, epochs=args.epochs, fine_tune_epochs=0,
                    batch_size=args.batch_size, lamba=0.0, workers=args.workers)
    args.layer_ratios = None
    phase = _common_args(args, batch_size=args.batch_size, epochs=args.epochs, out_dir=str(run_dir),
                         resume="auto" if (run_dir / "last.pt").exists() else None, lr=lr, lr_schedule=schedule,
                         nesterov=True, **{key: getattr(args, key) for key in IMP_SETTINGS})

    def method(model, phase_args):
        return IMP(model, args.density, phase_args.seed, args.prune_iterations, args.cubic, every=IMP_EVERY)

    extra = dict(method="imp", source=str(args.checkpoint), lr_ft={str(k): v for k, v in schedule.items()},
                 nesterov=True)
    trainer = Trainer(recipe, phase, method=method, start=source, baseline=baseline,
                      identity=("method", "dataset", "num_classes") + IMP_SETTINGS, extra_results=extra)
    return trainer.fit()


def parse_args(argv=None) -> Namespace:
    """The command line, checked as far as it can be without reading the checkpoint
    (reproduce.py checks a table's rows with it before running any)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.target_macs is not None and args.target_macs >= 1.0:
        parser.error(f"--target-macs {args.target_macs:g}: must be below 1 (a fraction of the dense MACs)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_reporting_errors("prune.py", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
