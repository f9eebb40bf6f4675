"""The command line shared by the three training scripts.

Each script passes its :class:`Recipe` (the paper's defaults for that model);
the flags are the reference's, spelled as it spells them (``--lamba``,
``--lr_vgg``, ``--gpu_id`` ...) plus this project's additions. Aliases the
reference uses in different scripts map to one destination: ``--epoch`` and
``--epochs``, ``--lr_vgg`` and ``--lr``, ``--lr_gate`` and ``--lr_adam``,
``--gpu`` and ``--gpu_id``.
"""
import argparse
import dataclasses
import sys
from dataclasses import dataclass

from l0_layers import NETS
from l0_layers.hard_concrete import DEFAULT_TEMPERATURE
from pruning import sparse
from pruning.penalty import REGS
from utils.cli import (DefaultsFormatter, OneLineParser, density_type, fraction_type, milestone_list,
                       nonneg_float, nonneg_int, positive_float, positive_int)


@dataclass(frozen=True)
class Recipe:
    """One model's training recipe: the defaults of its script (spec section 5)."""

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

    def for_net(self, net: str | None) -> "Recipe":
        """This recipe, or with ``--net dense`` the dense baseline's."""
        return dataclasses.replace(self, **dict(self.dense)) if net == "dense" else self

    def for_sparse(self, method: str) -> "Recipe":
        """The recipe of ``--sparse method``: the sparse-training code's schedule (pruning/sparse.py)."""
        return dataclasses.replace(self, **sparse.training_recipe("imagenet" if self.imagenet else "cifar", method))
    print_freq: int = 100


def build_parser(recipe: Recipe, prog: str | None = None) -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description=f"Train and prune {recipe.model} with L0-HC or Dep-L0 gates.",
                      formatter_class=DefaultsFormatter)

    g = p.add_argument_group("method")
    g.add_argument("--net", choices=NETS,
                   help="gate logits: free per channel (hc), dependency MLP (dep), or no gates (dense baseline); "
                        "default dep, or dense with --sparse")
    g.add_argument("--back_dep", action="store_true", help="backward dependency: the MLP chain runs last layer to first")
    g.add_argument("--lamba", type=nonneg_float, default=recipe.lamba, help="L0 penalty coefficient lambda")
    g.add_argument("--reg", choices=REGS, default="paper",
                   help="penalty: the reference's (paper), or lambda * expected MACs / params")
    g.add_argument("--temp", type=positive_float, default=DEFAULT_TEMPERATURE, help="hard-concrete temperature beta")
    g.add_argument("--width-mult", type=positive_float, default=1.0,
                   help="scale every channel width of the model (1.0: the paper's model)")

    g = p.add_argument_group("budget (instead of --lamba)")
    target = g.add_mutually_exclusive_group()
    target.add_argument("--target-macs", type=fraction_type, metavar="F",
                        help="prune to F times the dense MACs (a Lagrangian constraint replaces the L0 penalty)")
    target.add_argument("--target-params", type=fraction_type, metavar="F", help="prune to F times the dense parameters")
    g.add_argument("--target-warmup", type=nonneg_float, metavar="EPOCHS",
                   help="epochs over which the target falls linearly from 1.0 to F (default: a quarter of --epoch)")
    g.add_argument("--lr-lagrangian", type=positive_float, default=0.003,
                   help="Adam lr of the two multipliers (gradient ascent)")

    g = p.add_argument_group("unstructured sparse training (instead of gates; pruning/sparse.py)")
    g.add_argument("--sparse", choices=sparse.METHODS,
                   help="train from scratch with per-weight masks: DSR, SET, DeepR or a static random mask "
                        "(selects the method's own schedule unless a flag overrides it)")
    g.add_argument("--density", type=density_type, metavar="D", help="fraction of every sparse tensor's weights active")
    g.add_argument("--n-prune-params", type=positive_int, metavar="N",
                   help="DSR's N_p: weights to reallocate per period (default: the code's 20,000 of WRN-28-2 or "
                        "400,000 of ResNet50, scaled by this network's sparse weights)")
    g.add_argument("--rewire-fraction", type=density_type, metavar="F",
                   help="SET's fraction of each tensor's active weights replaced per period (default: the code's "
                        "value for the density)")
    g.add_argument("--stop-rewire-epoch", type=nonneg_int, metavar="E",
                   help="no reallocation from epoch E on (default 190 CIFAR / 95 ImageNet)")
    g.add_argument("--DeepR_eta", type=positive_float, default=sparse.DEEPR_ETA,
                   help="DeepR's eta: the gradient noise has std sqrt(2 eta T)")
    g.add_argument("--L1-loss-coeff", type=nonneg_float, default=sparse.DEEPR_L1,
                   help="DeepR's L1 coefficient on the sparse weights")

    g = p.add_argument_group("data")
    if recipe.imagenet:
        g.add_argument("data", nargs="?", metavar="DIR", help="ImageNet-style folder with train/ and val/")
        g.add_argument("--data-dir", dest="data_dir_flag", metavar="DIR", help="same as the positional DIR")
        g.set_defaults(dataset="imagenet")
    else:
        g.add_argument("--dataset", choices=("cifar10", "cifar100", "folder"),
                       help="dataset (default: cifar10, or cifar100 with --num_classes 100); folder reads "
                            "DIR/train/<class>/* and DIR/val/<class>/*, resized to 32x32")
        g.add_argument("--data-dir", default="./data", help="where the dataset lives (CIFAR is downloaded there)")
    g.add_argument("--num_classes", type=positive_int,
                   help="number of classes (CIFAR: 10 or 100 selects the dataset; default: from the data)")
    g.add_argument("--dummy", action="store_true", help="synthetic data of the right shape: no download, runs anywhere")
    g.add_argument("-j", "-w", "--workers", type=nonneg_int, default=recipe.workers,
                   help="data-loading processes (-w is the reference CIFAR scripts' spelling)")

    g = p.add_argument_group("optimisation")
    g.add_argument("-b", "--batch-size", type=positive_int, default=recipe.batch_size,
                   help="global mini-batch size, split evenly over torchrun processes")
    g.add_argument("--lr_vgg", "--lr", dest="lr", type=positive_float, default=recipe.lr, help="SGD lr of the weights")
    g.add_argument("--lr_gate", "--lr_adam", dest="lr_gate", type=positive_float, default=recipe.gate_lr,
                   help="Adam lr of the gate parameters")
    g.add_argument("--lr_decay", type=positive_float, default=recipe.lr_decay,
                   help="factor applied to the weight lr at each milestone")
    g.add_argument("--milestones", type=milestone_list, default=recipe.milestones,
                   help="comma-separated epochs at which the learning rates decay")
    g.add_argument("--gen_optim", choices=("Adam", "SGD"), default="Adam",
                   help="optimiser of the gate parameters (SGD: one SGD over all parameters, as the reference's "
                        "ResNet50 script: the gates get the weights' lr, momentum, schedule and weight decay)")
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


def parse_args(recipe: Recipe, argv=None, prog=None) -> argparse.Namespace:
    # --net dense selects the dense baseline's recipe: its defaults, unless a flag overrides them.
    # --sparse selects its method's schedule the same way.
    pre = OneLineParser(prog=prog, add_help=False)
    pre.add_argument("--net")
    pre.add_argument("--sparse", choices=sparse.METHODS)
    known = pre.parse_known_args(argv)[0]
    chosen = recipe.for_sparse(known.sparse) if known.sparse else recipe.for_net(known.net)
    parser = build_parser(chosen, prog)
    args = parser.parse_args(argv)
    _check_sparse(parser, args, argv)
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
        if args.dataset is None:
            if args.num_classes not in (None, 10, 100):
                parser.error(f"--num_classes {args.num_classes}: CIFAR has 10 or 100 (use --dataset folder for other data)")
            args.dataset = cifar.get(args.num_classes, "cifar10")
        elif args.dataset != "folder" and args.num_classes not in (None, int(args.dataset[5:])):
            parser.error(f"--num_classes {args.num_classes} contradicts --dataset {args.dataset}")
    if (args.target_macs or args.target_params) and args.net == "dense":
        parser.error("a budget (--target-macs/--target-params) needs gates: use --net hc or --net dep")
    if (args.target_macs or args.target_params) and args.epochs == 0:
        parser.error("a budget (--target-macs/--target-params) needs penalty epochs: --epoch must be at least 1")
    if args.target_warmup is None:
        args.target_warmup = args.epochs / 4
    if args.back_dep and args.net != "dep":
        parser.error(f"--back_dep applies to --net dep, not --net {args.net}")
    return args


def _check_sparse(parser, args, argv) -> None:
    """``--sparse`` trains a dense network's weights under masks; resolve ``--net`` and refuse what
    does not combine."""
    given = set(a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv))
    if not args.sparse:
        args.net = args.net or "dep"
        extra = [f for f in ("--density", "--n-prune-params", "--rewire-fraction", "--stop-rewire-epoch",
                             "--DeepR_eta", "--L1-loss-coeff") if f in given]
        if extra:
            parser.error(f"{extra[0]} belongs to unstructured sparse training: add --sparse {{{','.join(sparse.METHODS)}}}")
        return
    if args.net not in (None, "dense"):
        parser.error(f"--sparse {args.sparse} does not combine with --net {args.net}: it masks single weights of a "
                     f"dense network, the gates remove whole channels, and no published method does both; "
                     f"leave --net out (or --net dense)")
    args.net = "dense"
    gates_only = ("--lamba", "--reg", "--temp", "--back_dep", "--lr_gate", "--lr_adam", "--gen_optim", "--target-macs",
                  "--target-params", "--target-warmup", "--lr-lagrangian", "--fine_tune_epoch")
    for flag in gates_only:
        if flag in given:
            parser.error(f"{flag} belongs to the gates (L0-HC / Dep-L0); --sparse {args.sparse} trains without them")
    if args.density is None:
        parser.error(f"--sparse {args.sparse} needs --density D (the fraction of each sparse tensor's weights kept)")
    own = {"--n-prune-params": "dsr", "--rewire-fraction": "set", "--DeepR_eta": "deepr", "--L1-loss-coeff": "deepr"}
    for flag, method in own.items():
        if flag in given and args.sparse != method:
            parser.error(f"{flag} is {method}'s setting, not --sparse {args.sparse}'s")
    if "--stop-rewire-epoch" in given and args.sparse == "static":
        parser.error("--stop-rewire-epoch: static sparse training never reallocates")
