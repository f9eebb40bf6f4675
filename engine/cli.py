"""The command line shared by the three training scripts, and their entry point (:func:`main`).

Each script passes its :class:`Recipe` (the paper's defaults for that model);
the flags are the reference's, spelled as it spells them (``--lamba``,
``--lr_vgg``, ``--gpu_id`` ...) plus this project's additions. Aliases the
reference uses in different scripts map to one destination: ``--epoch`` and
``--epochs``, ``--lr_vgg`` and ``--lr``, ``--lr_gate`` and ``--lr_adam``,
``--gpu`` and ``--gpu_id``.

Nothing here imports torch: the parser is built from the declarations of the registered networks
(``models.NETWORKS``) and methods (``pruning.METHODS``), so ``--help`` and a mistaken flag are
answered at once; :func:`main` imports the engine once the command line is good.
"""
import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass

from l0_layers import NETS
from models import CONVENTIONS, NETWORKS
from pruning import METHODS
from utils.cli import (DefaultsFormatter, OneLineParser, milestone_list, nonneg_float, nonneg_int, positive_float,
                       positive_int, program_name, usable_cpus)
from utils.errors import run_reporting_errors

from .config import RunConfig


@dataclass(frozen=True)
class Recipe:
    """One model's training recipe: the defaults of its script (the paper's, per model)."""

    model: str                   # vgg16 | resnet56 | resnet50
    imagenet: bool               # ImageNet-style data (positional DIR) or CIFAR
    lr: float                    # SGD lr of the weights
    weight_decay: float
    milestones: tuple[int, ...]  # epochs at which the weight lr is multiplied by lr_decay
    lr_decay: float
    gate_decay: float | None     # gate-lr factor at the same milestones; None: constant
    epochs: int
    fine_tune_epochs: int
    batch_size: int
    lamba: float
    workers: int
    gate_lr: float = 1e-3
    gate_decay_is_lr_decay: bool = False  # the gate lr decays by --lr_decay (ResNet56), not gate_decay
    # The dense baseline's recipe (``--net dense``): the fields it changes, e.g. the peers' own
    # base training (GReg's ResNet56: 200 epochs, lr 0.1 / 0.01 / 0.001 at 0 / 100 / 150, wd 5e-4).
    dense: tuple[tuple[str, object], ...] = ()
    nesterov: bool = False
    print_freq: int = 100

    def for_method(self, spec) -> "Recipe":
        """This recipe with the fields the method replaces (``--net dense``: the baseline's recipe;
        ``--sparse``: the sparse-training code's schedule)."""
        return dataclasses.replace(self, **spec.recipe_fields(self))


def main(recipe: Recipe, argv=None) -> None:
    """Entry point of the training scripts: parse, then train (the engine, and with it torch, is
    imported once the command line is good)."""
    prog = program_name()

    def train():
        config = parse_args(recipe, argv, prog)
        from .trainer import Trainer
        trainer = Trainer(config)
        return trainer.evaluate_only() if config.evaluate else trainer.fit()

    sys.exit(run_reporting_errors(prog, train))


def training_methods() -> list:
    return METHODS.of_kind("train")


def selected_method(net: str | None, sparse: str | None):
    """The registered method a training command selects: ``--sparse NAME``, or ``--net`` (default dep)."""
    if sparse:
        return METHODS.get(sparse)
    return METHODS.get(net or "dep")


# The images each script's data has: the CIFAR scripts read CIFAR, folders and MNIST.
SCRIPT_KINDS = {"cifar": ("cifar", "mnist"), "imagenet": ("imagenet",)}


def architectures(recipe: Recipe) -> list[str]:
    """The registered networks for this script's images (its own first)."""
    kinds = SCRIPT_KINDS[NETWORKS[recipe.model].data_kind]
    return [recipe.model] + sorted(n for n, net in NETWORKS.items() if net.data_kind in kinds and n != recipe.model)


def sparse_names() -> list[str]:
    return [spec.name for spec in training_methods() if spec.selected_by[0] == "--sparse"]


def build_parser(recipe: Recipe, prog: str | None = None) -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description=f"Train and prune {recipe.model} with L0-HC or Dep-L0 gates.",
                      formatter_class=DefaultsFormatter)

    g = p.add_argument_group("method")
    g.add_argument("--net", choices=NETS,
                   help="gate logits: free per channel (hc), dependency MLP (dep), or no gates (dense baseline); "
                        "default dep, or dense with --sparse")
    g.add_argument("--sparse", choices=sparse_names(),
                   help="train from scratch with per-weight masks: DSR, SET, DeepR or a static random mask "
                        "(selects the method's own schedule unless a flag overrides it)")
    g.add_argument(*(("-a", "--arch") if recipe.imagenet else ("--arch",)), choices=architectures(recipe),
                   default=recipe.model,
                   help="the network (models/): this script's paper network, or another registered one for the "
                        "same images")
    g.add_argument("--width-mult", type=positive_float, default=1.0,
                   help="scale every channel width of the model (1.0: the paper's model)")
    g.add_argument("--init-weights", metavar="PATH",
                   help="start from this checkpoint's weights instead of the initialisation (the gates start as "
                        "usual): an authors' published baseline of --arch (akamaster's, GReg's or HSIC-Lasso's "
                        "format), torchvision's ResNet50 file, or a training checkpoint of this project; names "
                        "mapped as prune.py --arch maps them, a file that does not fit is one error line"
                   + ("; --pretrained: torchvision's file from torch.hub's cache" if recipe.imagenet else ""))
    g.add_argument("--cost-convention", choices=CONVENTIONS, default="conv",
                   help="the MACs results.json reports: conv + linear multiply-accumulates (the papers'), or what "
                        "thop counts (BN and pooling modules too; HSIC-Lasso's numbers); a budget is always conv")
    g = p.add_argument_group("network options (of the --arch that declares them)")
    for name in architectures(recipe):
        NETWORKS[name].add_arguments(g)
    for spec in training_methods():
        spec.add_arguments(p, recipe=recipe)

    g = p.add_argument_group("data")
    if recipe.imagenet:
        g.add_argument("data", nargs="?", metavar="DIR", help="ImageNet-style folder with train/ and val/")
        g.add_argument("--data-dir", dest="data_dir_flag", metavar="DIR", help="same as the positional DIR")
        g.set_defaults(dataset="imagenet")
    else:
        g.add_argument("--dataset", choices=("cifar10", "cifar100", "folder", "mnist"),
                       help="dataset (default: cifar10, or cifar100 with --num_classes 100); folder reads "
                            "DIR/train/<class>/* and DIR/val/<class>/*, resized to 32x32")
        g.add_argument("--data-dir", default="./data", help="where the dataset lives (CIFAR is downloaded there)")
    g.add_argument("--num_classes", type=positive_int,
                   help="number of classes (CIFAR: 10 or 100 selects the dataset; default: from the data)")
    g.add_argument("--dummy", action="store_true", help="synthetic data of the right shape: no download, runs anywhere")
    g.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="CIFAR: train on the plain images, without random crop and flip (DSR's --no-augment)")
    g.add_argument("--validate-set", action="store_true", default=None,
                   help="train without the training set's last images (CIFAR 5000, MNIST and ImageNet 10000) and "
                        "report their accuracy every epoch (DSR's --validate-set)")
    workers = min(recipe.workers, usable_cpus())
    g.add_argument("-j", "-w", "--workers", type=nonneg_int, default=workers,
                   help=f"data-loading processes (-w is the reference CIFAR scripts' spelling); default: "
                        f"{recipe.workers}, or the CPUs this process may use if fewer (here {workers})")

    g = p.add_argument_group("optimisation")
    g.add_argument("-b", "--batch-size", type=positive_int, default=recipe.batch_size,
                   help="global mini-batch size, split evenly over torchrun processes")
    g.add_argument("--lr_vgg", "--lr", dest="lr", type=positive_float, default=recipe.lr, help="SGD lr of the weights")
    g.add_argument("--lr_decay", type=positive_float, default=recipe.lr_decay,
                   help="factor applied to the weight lr at each milestone")
    g.add_argument("--milestones", type=milestone_list, default=recipe.milestones,
                   help="comma-separated epochs at which the learning rates decay")
    g.add_argument("--momentum", "---momentum", dest="momentum", type=nonneg_float, default=0.9,
                   help="SGD momentum of the weights (---momentum: the reference CIFAR scripts' spelling)")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=recipe.nesterov,
                   help="Nesterov momentum (the sparse-training code's default)")
    g.add_argument("-wd", "--weight-decay", "--wd", dest="weight_decay", type=nonneg_float,
                   default=recipe.weight_decay, help="weight decay of all non-gate parameters")
    g.add_argument("--epoch", "--epochs", dest="epochs", type=nonneg_int, default=recipe.epochs,
                   help="training epochs with the penalty")
    g.add_argument("--fine_tune_epoch", type=nonneg_int, default=recipe.fine_tune_epochs,
                   help="epochs after --epoch with gates frozen at their test values and no penalty")

    g = p.add_argument_group("run")
    g.add_argument("--gpu", "--gpu_id", dest="gpu", type=nonneg_int,
                   help="CUDA device index (default: CUDA when present, else CPU)")
    g.add_argument("--seed", type=nonneg_int, help="random seed (default: drawn at random and recorded)")
    g.add_argument("--resume", metavar="PATH", help="continue from a checkpoint, a run directory, or 'auto': the "
                                                    "newest good checkpoint in --out-dir (a fresh start if none)")
    g.add_argument("--out-dir", metavar="DIR", help="run directory (default: runs/<model>_<data>_<net>[_back]_lam<lamba>)")
    g.add_argument("-p", "--print-freq", type=positive_int, default=recipe.print_freq, help="iterations between progress lines")
    g.add_argument("--limit-batches", type=positive_int, metavar="N", help="at most N train and N val batches per epoch")
    g.add_argument("--save_epoch", type=nonneg_int, default=0, help="also keep epoch_<k>.pt every k epochs (0: never)")
    g.add_argument("--max-grad-norm", type=positive_float, help="clip the gradient norm of all trainable parameters")
    if not recipe.imagenet:
        g.add_argument("-e", "--evaluate", action="store_true", help=EVALUATE_HELP)

    if recipe.imagenet:
        add_reference_flags(p)

    g = p.add_argument_group("speed")
    g.add_argument("--amp", action="store_true", help="mixed precision: bf16 autocast where supported, else fp16 "
                                                       "with a gradient scaler")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format for activations and weights")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--sync-bn", action="store_true", help="synchronise BatchNorm statistics across torchrun processes")
    g.add_argument("--loader", choices=("auto", "device", "workers"), default="auto",
                   help="CIFAR on CUDA: keep the training set on the GPU and augment there (auto/device) "
                        "or use DataLoader worker processes")
    return p


EVALUATE_HELP = ("evaluate model on validation set (pytorch/examples' -e) and stop, training nothing: the weights "
                 "of --resume (a checkpoint or run directory), else of --init-weights or --pretrained (then --net "
                 "dense by default); writes results.json (top-1, top-5, MACs, params, evaluated_only)")


def check_evaluate(parser, args, imagenet: bool) -> None:
    """``-e``: something to evaluate, and a published network evaluated as it is (no gates)."""
    if not args.evaluate:
        return
    published = bool(args.init_weights or getattr(args, "pretrained", False))
    if not published and not args.resume:
        pretrained = "--pretrained (torchvision's weights), " if imagenet else ""
        parser.error(f"-e/--evaluate: nothing to evaluate: give {pretrained}--init-weights FILE or --resume "
                     f"CHECKPOINT (for a run's checkpoint or pruned.pt: python evaluate.py CHECKPOINT --data-dir DIR)")
    if published and (args.sparse or args.net not in (None, "dense")):
        what = f"--sparse {args.sparse}" if args.sparse else f"--net {args.net}"
        parser.error(f"-e/--evaluate with {'--init-weights' if args.init_weights else '--pretrained'} evaluates the "
                     f"published network as it is: {what} would add its untrained gates or masks; leave it out "
                     f"(--net dense)")


def add_reference_flags(p: argparse.ArgumentParser) -> None:
    """The flags of pytorch/examples' imagenet/main.py, which the reference's ResNet50 script is built
    on: each honoured, or answered with the one line that says what does its job here
    (:func:`check_reference_flags`)."""
    g = p.add_argument_group("the reference ResNet50 script's pytorch/examples flags")
    g.add_argument("--start-epoch", type=nonneg_int, default=0,
                   help="as the reference: overwritten by the checkpoint's epoch with --resume (only 0 without)")
    g.add_argument("-e", "--evaluate", action="store_true", help=EVALUATE_HELP)
    g.add_argument("--pretrained", action="store_true",
                   help="start from torchvision's ImageNet weights (pretrained=True: resnet50-0676ba61.pth in "
                        "torch.hub's cache, downloaded there if absent), as --init-weights that file")
    g.add_argument("--world-size", type=int, default=-1, help="torchrun sets the processes (checked against it)")
    g.add_argument("--rank", type=int, default=-1, help="torchrun sets each process's rank (checked against it)")
    g.add_argument("--dist-url", default="tcp://224.66.41.62:23456", help="torchrun's rendezvous replaces it")
    g.add_argument("--dist-backend", choices=("nccl", "gloo"), default="nccl",
                   help="NCCL on CUDA, gloo on the CPU, as chosen by the engine")
    g.add_argument("--multiprocessing-distributed", action="store_true",
                   help="one process per GPU: start them with torchrun (says how)")


def check_reference_flags(parser, args) -> None:
    """Honour the pytorch/examples flags where they agree with how this engine runs, else one line."""
    if args.pretrained and args.init_weights:
        parser.error("--pretrained (torchvision's weights) and --init-weights both name the starting weights; give one")
    if args.pretrained and args.arch != "resnet50":
        parser.error(f"--pretrained: torchvision's weights are read for resnet50 only; give -a {args.arch}'s "
                     f"weights with --init-weights PATH")
    if args.start_epoch and not args.resume:
        parser.error(f"--start-epoch {args.start_epoch} without --resume: the reference only renumbers its epochs "
                     f"(a resumed checkpoint overwrites it); continue a run with --resume PATH or --resume auto")
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    launched = "WORLD_SIZE" in os.environ
    how = ("start one process per GPU with torchrun: torchrun --nproc_per_node=GPUS train_resnet50.py ... "
           "(torchrun sets the world size, ranks and rendezvous)")
    if args.multiprocessing_distributed and not launched:
        parser.error(f"--multiprocessing-distributed: {how}")
    if args.world_size > 1 and args.world_size != processes:
        parser.error(f"--world-size {args.world_size}: this run has {processes} process(es); {how}")
    if args.rank >= 0 and args.rank >= processes:
        parser.error(f"--rank {args.rank}: this run has {processes} process(es); {how}")


def parse_args(recipe: Recipe, argv=None, prog=None) -> RunConfig:
    """The training command line as the engine's :class:`RunConfig`."""
    # The method (--net / --sparse) selects its recipe first: --net dense the dense baseline's
    # defaults, --sparse its method's schedule, unless a flag overrides them.
    pre = OneLineParser(prog=prog, add_help=False)
    pre.add_argument("--net")
    pre.add_argument("--sparse", choices=sparse_names())
    pre.add_argument("-e", "--evaluate", action="store_true")
    pre.add_argument("--init-weights")
    pre.add_argument("--pretrained", action="store_true")
    pre.add_argument("--resume")
    known = pre.parse_known_args(argv)[0]
    # -e on a published network (--init-weights, --pretrained): the network as published, --net dense
    # unless a method is named (which check_evaluate refuses).
    evaluate_published = (known.evaluate and (known.init_weights or known.pretrained)
                          and known.net is None and known.sparse is None)
    spec = selected_method("dense" if evaluate_published else known.net if known.net in NETS else None,
                           known.sparse)
    chosen = recipe.for_method(spec)
    parser = build_parser(chosen, prog)
    args = parser.parse_args(argv)
    given = set(a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv))
    check_evaluate(parser, args, recipe.imagenet)
    if not args.sparse:
        args.net = args.net or ("dense" if spec.name == "dense" else "dep")
    for other in training_methods():
        for flag in other.own_flags():
            if flag in given and flag not in spec.own_flags():
                parser.error(other.foreign_flag_message(flag, args))
    spec.check(parser, args, given)
    if recipe.imagenet:
        check_reference_flags(parser, args)
    args.init_pretrained = bool(getattr(args, "pretrained", False))
    if args.epochs + args.fine_tune_epoch == 0 and not args.evaluate:
        parser.error("--epoch 0 with no fine-tuning epochs trains nothing (no results.json, an untrained "
                     "pruned.pt); give --epoch N")
    if args.nesterov and args.momentum == 0:
        parser.error("Nesterov momentum needs --momentum above 0 (or --no-nesterov)")
    if recipe.imagenet:
        if args.data and args.data_dir_flag and args.data != args.data_dir_flag:
            parser.error(f"two data directories given: {args.data} and --data-dir {args.data_dir_flag}")
        args.data_dir = args.data or args.data_dir_flag
        del args.data, args.data_dir_flag
        if args.data_dir is None and not args.dummy:
            parser.error("the ImageNet directory DIR is required (or --dummy for synthetic data)")
    else:
        cifar = {10: "cifar10", 100: "cifar100"}
        if args.dataset is None and NETWORKS[args.arch].data_kind == "mnist":
            args.dataset = "mnist"
        if args.dataset is None:
            if args.num_classes not in (None, 10, 100):
                parser.error(f"--num_classes {args.num_classes}: CIFAR has 10 or 100 (use --dataset folder for other data)")
            args.dataset = cifar.get(args.num_classes, "cifar10")
        elif args.dataset in cifar.values() and args.num_classes not in (None, int(args.dataset[5:])):
            parser.error(f"--num_classes {args.num_classes} contradicts --dataset {args.dataset}")
    if args.augment is False and args.dataset not in ("cifar10", "cifar100"):
        parser.error(f"--no-augment: only CIFAR is augmented by DSR's code (its flag does nothing to "
                     f"{args.dataset}); leave it out")
    if args.validate_set and args.dataset == "folder" and not args.dummy:
        parser.error("--validate-set: DSR's code holds out part of CIFAR, MNIST and ImageNet only, not --dataset folder")
    network = NETWORKS[args.arch]
    check_network(parser, args, given, network, architectures(recipe))
    options = network.options_from(args)
    # The run name spells the options as DSR's names do (wrn-28-2); a switched-off default says so.
    arch = args.arch + "".join(("" if value else f"-no{key.replace('_', '')}") if isinstance(value, bool)
                               else f"-{value}" for key, value in options.items())
    args.network_options = options
    name = f"{arch}_{'dummy-' if args.dummy else ''}{args.dataset}_{spec.run_label(args)}"
    return RunConfig.from_namespace(args, model=args.arch, imagenet=recipe.imagenet, method=spec.name, name=name,
                                    identity=("dataset", "num_classes", "width_mult", "augment", "validate_set", *options,
                                              *spec.settings))


def check_network(parser, args, given: set[str], network, names: list[str]) -> None:
    """The network's images must be the data's, and the options of the other networks ``names`` (the
    script's, whose flags the parser has) are refused."""
    mnist = args.dataset == "mnist"
    if network.data_kind == "mnist" and not mnist:
        parser.error(f"--arch {args.arch} takes MNIST's 1x28x28 images: add --dataset mnist")
    if mnist and network.data_kind != "mnist":
        parser.error(f"--dataset mnist gives 1x28x28 images; --arch {args.arch} takes {network.data_kind}'s")
    own = set(network.option_names())
    owner = {}  # each other network's option dest -> the network
    for name in names:
        for dest in NETWORKS[name].option_names():
            if dest not in own:
                owner.setdefault(dest, name)
    for action in parser._actions:
        if action.dest in owner and any(o in given for o in action.option_strings):
            parser.error(f"{action.option_strings[0]} is --arch {owner[action.dest]}'s option, "
                         f"not --arch {args.arch}'s")
