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
phases, and runs them through the ``PruneJob`` this script hands it (engine/prune_job.py, imported
once the command line is good: ``--help`` and a mistaken flag need no torch).
"""
import argparse
import sys

from models import CONVENTIONS, NETWORKS
from pruning import METHODS
from pruning.specs import APIB_MODELS, GREG_ARCHS, PICK_RULES, TARGET_FLAGS, parse_ratio_list, parse_skip_layers
from utils.cli import (DATASETS, OneLineParser, density_type, lr_schedule, nonneg_int, positive_float,
                       positive_int, usable_cpus)
from utils.errors import UsageError, run_reporting_errors


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
    g.add_argument("-j", "-w", "--workers", type=nonneg_int, default=min(4, usable_cpus()),
                   help="data-loading processes: 4, or the CPUs this process may use if fewer")
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
        if args.arch is not None and args.arch not in NETWORKS:
            parser.error(f"argument --arch: invalid choice: {args.arch!r} (choose from {', '.join(sorted(NETWORKS))})")
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
        if args.arch is not None and args.arch not in NETWORKS:
            parser.error(f"argument --arch: invalid choice: {args.arch!r} (choose from {', '.join(sorted(NETWORKS))})")
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

    def prune():
        from engine.prune_job import run  # torch and the engine: imported once the command line is good
        return run(args)

    return run_reporting_errors("prune.py", prune)


if __name__ == "__main__":
    sys.exit(main())
