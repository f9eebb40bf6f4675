"""Every method's declaration (its :class:`~pruning.registry.MethodSpec`), registered here.

A spec is what the command lines read: a method's names, its flags and their defaults, what it
refuses, the settings that identify its runs, its run name, and the schedules its defaults come
from. None of it imports torch, so that every script answers ``--help`` and a mistaken flag at
once; the method itself (the in-loop :class:`~pruning.method.PruningMethod` a training run
builds, or the phases a prune.py run goes through) lives in its own module, imported by the
spec's :meth:`~pruning.registry.MethodSpec.build` or :meth:`~pruning.registry.MethodSpec.run`
when a run starts.

The methods, in registration order (the order of ``--help``): ``--net dense`` (method.py),
``--net hc`` / ``--net dep`` (l0.py), ``--sparse {dsr,set,deepr,static}`` (sparse.py; ``--tied``:
tied.py), and prune.py's L1 (l1.py), GReg-1 / GReg-2 (greg.py), HSIC-Lasso (hsic.py) and IMP (imp.py).
"""
import re

from l0_layers import DEFAULT_TEMPERATURE
from utils.cli import (density_type, fraction_type, nonneg_float, nonneg_int, positive_float, positive_int,
                       sparsity_type, usable_cpus)
from utils.errors import UsageError

from .registry import MethodSpec, register

# -- the training scripts' methods ----------------------------------------------------------------


class DenseTraining(MethodSpec):
    """``--net dense``: the baseline, trained with its own recipe (``Recipe.dense``), no gates."""

    name = "dense"
    selected_by = ("--net", "dense")
    settings = ("net", "sparse")
    summary = "plain training of the dense network (the peers' baseline)"

    def recipe_fields(self, recipe) -> dict:
        return dict(recipe.dense)

    def check(self, parser, args, given) -> None:
        check_gate_flags(parser, args)

    def arch_options(self, args) -> dict:
        return dict(net="dense", back_dep=False, temperature=args.temp)

    def build(self, model, config):
        from .method import PruningMethod
        return PruningMethod(model)


# The L0 penalty's forms (--reg; pruning/penalty.py): the reference's, or lambda * expected MACs / params.
REGS = ("paper", "macs", "params")


def check_gate_flags(parser, args) -> None:
    """What the gates' flags need, whatever ``--net`` (L0-HC, Dep-L0 and the dense baseline share it):
    a budget needs gates and penalty epochs, ``--back_dep`` the dependency MLP."""
    if args.target_macs or args.target_params:
        if args.net == "dense":
            parser.error("a budget (--target-macs/--target-params) needs gates: use --net hc or --net dep")
        if args.epochs == 0:
            parser.error("a budget (--target-macs/--target-params) needs penalty epochs: --epoch must be at least 1")
    if args.back_dep and args.net != "dep":
        parser.error(f"--back_dep applies to --net dep, not --net {args.net}")


class L0Training(MethodSpec):
    """``--net hc`` (L0-HC) and ``--net dep`` (Dep-L0, ``--back_dep`` for the backward chain): the
    training scripts' methods, with the L0 penalty (``--lamba``) or a budget (``--target-macs``);
    pruning/l0.py."""

    name = "l0"
    aliases = ("hc", "dep")
    selected_by = ("--net", "hc|dep")
    settings = ("net", "back_dep", "reg", "temp", "lamba", "target_macs", "target_params", "sparse")
    summary = "L0-HC / Dep-L0: hard-concrete gates with the L0 penalty or a budget"
    # Every option string add_arguments adds (--sparse refuses them: SparseTraining.gate_flags).
    flags = ("--lamba", "--reg", "--temp", "--back_dep", "--lr_gate", "--lr_adam", "--gen_optim", "--target-macs",
             "--target-params", "--target-warmup", "--lr-lagrangian")

    def add_arguments(self, parser, recipe=None, **context) -> None:
        g = parser.add_argument_group("gates: L0-HC and Dep-L0 (--net hc / dep)")
        g.add_argument("--back_dep", action="store_true",
                       help="backward dependency: the MLP chain runs last layer to first")
        g.add_argument("--lamba", type=nonneg_float, default=recipe.lamba, help="L0 penalty coefficient lambda")
        g.add_argument("--reg", choices=REGS, default="paper",
                       help="penalty: the reference's (paper), or lambda * expected MACs / params")
        g.add_argument("--temp", type=positive_float, default=DEFAULT_TEMPERATURE, help="hard-concrete temperature beta")
        g.add_argument("--lr_gate", "--lr_adam", dest="lr_gate", type=positive_float, default=recipe.gate_lr,
                       help="Adam lr of the gate parameters")
        g.add_argument("--gen_optim", choices=("Adam", "SGD"), default="Adam",
                       help="optimiser of the gate parameters (SGD: one SGD over all parameters, as the reference's "
                            "ResNet50 script: the gates get the weights' lr, momentum, schedule and weight decay)")
        # The gate lr's factor at the milestones: the recipe's (None: constant), or --lr_decay's.
        parser.set_defaults(gate_decay=recipe.gate_decay, gate_decay_is_lr_decay=recipe.gate_decay_is_lr_decay)

        g = parser.add_argument_group("budget (instead of --lamba)")
        target = g.add_mutually_exclusive_group()
        target.add_argument("--target-macs", type=fraction_type, metavar="F",
                            help="prune to F times the dense MACs (a budget controller replaces the L0 penalty)")
        target.add_argument("--target-params", type=fraction_type, metavar="F",
                            help="prune to F times the dense parameters")
        g.add_argument("--target-warmup", type=nonneg_float, metavar="EPOCHS",
                       help="epochs over which the target falls linearly from 1.0 to F (default: a quarter of --epoch)")
        g.add_argument("--lr-lagrangian", type=positive_float, default=0.05,
                       help="gain of the budget controller: its push ratio lambda1 moves by this times the damped "
                            "gap between the kept cost and the target, per step")

    def check(self, parser, args, given) -> None:
        check_gate_flags(parser, args)
        if args.target_warmup is None:
            args.target_warmup = args.epochs / 4

    def run_label(self, args) -> str:
        name = args.net + ("_back" if args.back_dep else "")
        if args.target_macs or args.target_params:
            return name + (f"_macs{args.target_macs:g}" if args.target_macs else f"_params{args.target_params:g}")
        return name + f"_lam{args.lamba:g}"

    def arch_options(self, args) -> dict:
        return dict(net=args.net, back_dep=args.back_dep, temperature=args.temp)

    def build(self, model, config):
        from .l0 import L0Method
        return L0Method(model, config, config.lr_decay if config.gate_decay_is_lr_decay else config.gate_decay)


# --sparse: the four methods of Mostafa & Wang's code (pruning/sparse.py).
SPARSE_METHODS = ("dsr", "set", "deepr", "static")

# The code's learning schedules and settings. "cifar" is WRN-28-2's (wrnet_*.yaml), used for VGG16 and
# ResNet56 unchanged: both train on CIFAR with the same batch (100) and so the same iterations per epoch.
SCHEDULES = {
    "cifar": dict(
        reference_sparse_weights=1_451_520, n_prune_params=20_000, n_prune_params_kernels=2_000,
        stop_rewire_epoch=190,
        rewire_periods={0: 100, 25: 200, 80: 400, 140: 800},
        deepr_temperatures={0: 1e-5, 25: 1e-8, 80: 1e-12, 140: 1e-15},
        # SET's --rewire-fraction by density (wrnet_experiments.yaml: sparsity 0.9 ... 0.5).
        set_fractions={0.1: 0.138, 0.2: 0.07, 0.3: 0.046, 0.4: 0.034, 0.5: 0.028},
        train=dict(epochs=200, lr=0.1, milestones=(60, 120, 160), lr_decay=0.2, weight_decay=5e-4, batch_size=100),
        long=dict(epochs=400, milestones=(120, 220, 350)),  # static sparse (wrnet_schedule_long.yaml)
        deepr=dict(weight_decay=0.0),
        # IMP's weight decay: the code's command-line default is 1e-4, but its pruning jobs resume the dense
        # run with its optimizer (main.py:383), whose saved parameter group brings the dense run's 5e-4.
        imp=dict(lr={0: 0.0, 1: 0.02, 25: 0.004, 35: 0.0008}, weight_decay=5e-4, batch_size=100),
    ),
    "imagenet": dict(
        reference_sparse_weights=22_724_608, n_prune_params=400_000, n_prune_params_kernels=40_000,
        stop_rewire_epoch=95,
        rewire_periods={0: 1000, 25: 2000, 50: 4000, 75: 8000},
        deepr_temperatures={0: 1e-5, 25: 1e-8, 50: 1e-12, 75: 1e-15},
        set_fractions={0.2: 0.089, 0.1: 0.14},  # resnet_experiments.yaml
        train=dict(epochs=100, lr=0.1, milestones=(30, 60, 90), lr_decay=0.1, weight_decay=1e-4, batch_size=256),
        long=dict(epochs=200, milestones=(60, 120, 180)),
        deepr=dict(),  # its ResNet50 DeepR command keeps the default weight decay, 1e-4
        imp=dict(lr={0: 0.0, 1: 0.01, 25: 0.001, 35: 0.0001}, weight_decay=1e-4, batch_size=256),
    ),
}
DEEPR_ETA = 0.01
DEEPR_L1 = 1e-5


def training_recipe(kind: str, method: str) -> dict:
    """The Recipe fields of ``--sparse method`` on ``kind`` ('cifar' or 'imagenet') data: the code's
    schedule (Nesterov SGD; static sparse the long one; DeepR's CIFAR runs without weight decay)."""
    schedule = SCHEDULES[kind]
    fields = dict(schedule["train"], fine_tune_epochs=0, nesterov=True)
    if method == "static":
        fields.update(schedule["long"])
    if method == "deepr":
        fields.update(schedule["deepr"])
    return fields


# The code's schedule files (--schedule-file, learning_schedules/*.yaml): their keys, and the names here.
SCHEDULE_KEYS = {"lr_schedule": "lr", "rewire_period_schedule": "rewire_periods",
                 "DeepR_temperature_schedule": "deepr_temperatures"}


def _schedule_number(path, key: str, epoch, value, positive_int_value: bool):
    """One ``- epoch : value`` entry of a schedule file, checked (one line on a problem)."""
    if isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string; the code would fail on it
        try:
            value = float(value)
        except ValueError:
            raise UsageError(f"--schedule-file {path}: {key} at epoch {epoch}: {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (
            float("inf"), float("-inf")):
        raise UsageError(f"--schedule-file {path}: {key} at epoch {epoch}: {value!r} is not a finite number")
    if positive_int_value and (value != int(value) or value < 1):
        raise UsageError(f"--schedule-file {path}: {key} at epoch {epoch}: {value!r} is not a whole number of "
                         f"iterations >= 1")
    if value < 0:
        raise UsageError(f"--schedule-file {path}: {key} at epoch {epoch}: {value!r} is negative")
    return int(value) if positive_int_value else float(value)


def read_schedule_file(path: str) -> dict:
    """The code's ``--schedule-file`` (``learning_schedules/*.yaml``): three lists of ``- first epoch :
    value`` (``lr_schedule``, ``rewire_period_schedule``, ``DeepR_temperature_schedule``), each value
    holding from its epoch to the next entry's (main.py's ``get_schedule_val``). Returns ``{lr,
    rewire_periods, deepr_temperatures}`` as ``{epoch: value}`` dicts. A file the code could not use
    as intended (unreadable, not YAML, a key missing or unknown, epochs not increasing from 0, a
    value not a number) is one line (``UsageError``)."""
    try:
        import yaml
    except ImportError:
        raise UsageError("--schedule-file reads YAML: install PyYAML (pip install pyyaml)") from None
    try:
        with open(path) as stream:
            loaded = yaml.safe_load(stream)
    except OSError as e:
        raise UsageError(f"--schedule-file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise UsageError(f"--schedule-file {path}: not valid YAML{where}: {problem}") from None
    if not isinstance(loaded, dict):
        raise UsageError(f"--schedule-file {path}: expected the keys {', '.join(SCHEDULE_KEYS)}")
    unknown = [str(k) for k in loaded if k not in SCHEDULE_KEYS]
    if unknown:
        raise UsageError(f"--schedule-file {path}: unknown key {unknown[0]!r} (the code's keys: "
                         f"{', '.join(SCHEDULE_KEYS)})")
    out = {}
    for key, name in SCHEDULE_KEYS.items():
        if key not in loaded:
            raise UsageError(f"--schedule-file {path}: no {key} (the code needs all of {', '.join(SCHEDULE_KEYS)})")
        entries = loaded[key]
        if not isinstance(entries, list) or not entries:
            raise UsageError(f"--schedule-file {path}: {key} must be a list of '- epoch : value' entries")
        schedule = {}
        for entry in entries:
            if not isinstance(entry, dict) or len(entry) != 1:
                raise UsageError(f"--schedule-file {path}: {key}: each entry must be one '- epoch : value', got "
                                 f"{entry!r}")
            (epoch, value), = entry.items()
            if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
                raise UsageError(f"--schedule-file {path}: {key}: {epoch!r} is not an epoch (a whole number >= 0)")
            if schedule and epoch <= max(schedule):
                raise UsageError(f"--schedule-file {path}: {key}: epoch {epoch} comes after epoch {max(schedule)}; "
                                 f"the epochs must increase")
            if not schedule and epoch != 0:
                raise UsageError(f"--schedule-file {path}: {key} starts at epoch {epoch}; it must start at 0")
            schedule[epoch] = _schedule_number(path, key, epoch, value, key == "rewire_period_schedule")
        out[name] = schedule
    if max(out["lr"].values()) <= 0:
        raise UsageError(f"--schedule-file {path}: every learning rate of lr_schedule is 0")
    return out


class SparseTraining(MethodSpec):
    """``--sparse {dsr,set,deepr,static}``: a dense network trained from scratch under per-weight masks,
    with the code's schedule for the data (``SCHEDULES``) unless a flag overrides it."""

    selected_by = ("--sparse", "")
    settings = ("net", "sparse", "density", "tied")
    summary = "unstructured sparse training (DSR, SET, DeepR, static; static with --tied: tied weights)"
    flags = ("--density", "--n-prune-params", "--rewire-fraction", "--stop-rewire-epoch", "--DeepR_eta",
             "--L1-loss-coeff", "--initial-sparsity-conv", "--initial-sparsity-fc", "--sub-kernel-granularity",
             "--tied", "--rescale-tied-gradient", "--threshold-prune", "--rewire-scaling", "--conv-group-lasso",
             "--big-new-weights", "--sparse-resnet-downsample", "--copy-mask-from", "--schedule-file")
    # The gates' flags and their fine-tuning's, which --sparse refuses (no published method both masks
    # weights and gates channels).
    gate_flags = (*L0Training.flags, "--fine_tune_epoch")
    # Flags that only some of the four methods take (the code ignores them elsewhere; refused here).
    method_flags = {"--DeepR_eta": ("deepr",), "--threshold-prune": ("dsr", "set"), "--rewire-scaling": ("dsr", "set"),
                    "--big-new-weights": ("dsr", "set", "deepr"), "--tied": ("static",)}

    def __init__(self, name: str):
        self.name = name
        self.selected_by = ("--sparse", name)

    def recipe_fields(self, recipe) -> dict:
        return training_recipe("imagenet" if recipe.imagenet else "cifar", self.name)

    def add_arguments(self, parser, **context) -> None:
        if "--density" in parser._option_string_actions:
            return  # the four methods share one group
        g = parser.add_argument_group("unstructured sparse training (instead of gates; pruning/sparse.py)")
        g.add_argument("--density", type=density_type, metavar="D",
                       help="fraction of every sparse tensor's weights active")
        g.add_argument("--initial-sparsity-conv", type=sparsity_type, metavar="S",
                       help="the code's flag: every sparse conv tensor at density 1-S (instead of --density)")
        g.add_argument("--initial-sparsity-fc", type=sparsity_type, metavar="S",
                       help="the code's flag: every sparse linear tensor at density 1-S (instead of --density)")
        g.add_argument("--sub-kernel-granularity", type=int, choices=(2, 4),
                       help="4: mask single weights (default, every published run); 2: whole k x k kernels of the "
                            "convs (the code's command-line default)")
        g.add_argument("--n-prune-params", type=positive_int, metavar="N",
                       help="DSR's N_p: weights (kernels with --sub-kernel-granularity 2) to reallocate per period "
                            "(default: the code's 20,000 of WRN-28-2 or 400,000 of ResNet50, 2,000 / 40,000 for "
                            "kernels, scaled by this network's sparse weights)")
        g.add_argument("--rewire-fraction", type=density_type, metavar="F",
                       help="SET's fraction of each tensor's active weights replaced per period (default: the code's "
                            "value for the density)")
        g.add_argument("--threshold-prune", action="store_true",
                       help="SET: drop by DSR's adaptive global threshold instead of a fraction per tensor (DSR: "
                            "always)")
        g.add_argument("--rewire-scaling", action="store_true",
                       help="SET: regrow across tensors in proportion to their survivors, as DSR (DSR: always)")
        g.add_argument("--stop-rewire-epoch", type=nonneg_int, metavar="E",
                       help="no reallocation from epoch E on (default 190 CIFAR / 95 ImageNet)")
        g.add_argument("--DeepR_eta", type=positive_float, default=DEEPR_ETA,
                       help="DeepR's eta: the gradient noise has std sqrt(2 eta T)")
        g.add_argument("--L1-loss-coeff", type=nonneg_float, metavar="C",
                       help="the loss gets C times the L1 norm of the sparse (or tied) weights (default: DeepR 1e-5, "
                            "else 0)")
        g.add_argument("--conv-group-lasso", action="store_true",
                       help="--L1-loss-coeff's term is a group lasso over each conv's k x k kernels")
        g.add_argument("--big-new-weights", action="store_true",
                       help="a regrown weight starts at a draw from the initial distribution instead of 0")
        g.add_argument("--sparse-resnet-downsample", action="store_true",
                       help="ResNet50: the 1x1 projection shortcuts are sparse (or tied) too")
        g.add_argument("--tied", action="store_true", default=None,
                       help="--sparse static only: tie each sparse tensor's weights to round(D*n) shared values "
                            "through a fixed random index (HashedNet; pruning/tied.py) instead of masking them")
        g.add_argument("--rescale-tied-gradient", action="store_true",
                       help="the code's flag with --tied: divides the tied gradient after the step, so it changes "
                            "nothing (as in the code)")
        g.add_argument("--copy-mask-from", metavar="CHECKPOINT",
                       help="start from the masks of a sparse run's checkpoint (or run directory) of the same "
                            "network instead of random ones")
        g.add_argument("--schedule-file", metavar="YAML",
                       help="the code's schedule file (learning_schedules/*.yaml): lr, reallocation period and "
                            "DeepR temperature per epoch, replacing --lr / --milestones / --lr_decay")

    def own_flags(self) -> tuple[str, ...]:
        return self.flags

    def foreign_flag_message(self, flag: str, args) -> str:
        return f"{flag} belongs to unstructured sparse training: add --sparse {{{','.join(SPARSE_METHODS)}}}"

    def check(self, parser, args, given) -> None:
        sparse = args.sparse
        if args.net not in (None, "dense"):
            parser.error(f"--sparse {sparse} does not combine with --net {args.net}: it masks single weights "
                         f"of a dense network, the gates remove whole channels, and no published method does both; "
                         f"leave --net out (or --net dense)")
        args.net = "dense"
        for flag in self.gate_flags:
            if flag in given:
                parser.error(f"{flag} belongs to the gates (L0-HC / Dep-L0); --sparse {sparse} trains "
                             f"without them")
        if (args.density is None and args.initial_sparsity_conv is None and args.initial_sparsity_fc is None
                and not args.copy_mask_from):
            parser.error(f"--sparse {sparse} needs --density D (the fraction of each sparse tensor's "
                         "weights kept)")
        if args.tied and sparse != "static":
            parser.error("--tied is static training's: the code's rewiring, DeepR and pruning act on sparse "
                         "tensors, and a tied network has none; use --sparse static --tied")
        for flag, methods in self.method_flags.items():
            if flag in given and sparse not in methods:
                names = " or ".join(f"--sparse {m}" for m in methods)
                parser.error(f"{flag} is a setting of {names}, not of --sparse {sparse}")
        threshold = sparse == "dsr" or args.threshold_prune
        if "--n-prune-params" in given and not threshold:
            parser.error(f"--n-prune-params is dsr's setting (or set's with --threshold-prune), not --sparse "
                         f"{sparse}'s")
        if "--rewire-fraction" in given and (sparse != "set" or threshold):
            parser.error(f"--rewire-fraction is set's setting without --threshold-prune, not --sparse {sparse}'s"
                         + (" with --threshold-prune" if sparse == "set" else ""))
        if "--stop-rewire-epoch" in given and sparse == "static":
            parser.error("--stop-rewire-epoch: static sparse training never reallocates")
        if args.tied:
            # The code's tied runs train on the ordinary schedule (wrnet_schedule.yaml, resnet_schedule.yaml), not
            # static sparse training's long one.
            normal = SCHEDULES["imagenet" if args.dataset == "imagenet" else "cifar"]["train"]
            for field, flags in (("epochs", ("--epoch", "--epochs")), ("milestones", ("--milestones",))):
                if not any(flag in given for flag in flags):
                    setattr(args, field, tuple(normal[field]) if field == "milestones" else normal[field])
        if args.rescale_tied_gradient and not args.tied:
            parser.error("--rescale-tied-gradient applies to tied weights: add --tied")
        if args.tied and args.copy_mask_from:
            parser.error("--copy-mask-from: a tied network has no mask to copy (leave out --tied)")
        if args.sub_kernel_granularity == 2 and sparse == "deepr":
            parser.error("--sub-kernel-granularity 2: the code's DeepR fails with kernel masks (its noise and sign "
                         "checks are per weight); DeepR masks single weights")
        if args.L1_loss_coeff is None:
            args.L1_loss_coeff = DEEPR_L1 if sparse == "deepr" else 0.0
        if args.conv_group_lasso and args.L1_loss_coeff == 0:
            parser.error("--conv-group-lasso shapes the --L1-loss-coeff term, which is 0 here: give "
                         "--L1-loss-coeff C")
        if args.sparse_resnet_downsample and args.arch != "resnet50":
            parser.error(f"--sparse-resnet-downsample is ResNet50's (the code's imagenet_resnet50); --arch "
                         f"{args.arch} has no downsample to make sparse")
        if args.schedule_file:
            for flag in ("--lr", "--lr_vgg", "--milestones", "--lr_decay"):
                if flag in given:
                    parser.error(f"{flag}: --schedule-file {args.schedule_file} sets the learning rate of every "
                                 f"epoch; leave {flag} out")
            try:
                schedule = read_schedule_file(args.schedule_file)
            except UsageError as e:
                parser.error(str(e))
            args.lr_schedule, args.lr = schedule["lr"], max(schedule["lr"].values())
            args.rewire_periods, args.deepr_temperatures = schedule["rewire_periods"], schedule["deepr_temperatures"]

    def run_label(self, args) -> str:
        label = self.name + ("_tied" if args.tied else "")
        if args.density is not None:
            label += f"_d{args.density:g}"
        for kind in ("conv", "fc"):
            value = getattr(args, f"initial_sparsity_{kind}")
            if value is not None:
                label += f"_s{kind}{value:g}"
        if args.copy_mask_from:
            label += "_copied"
        if args.sub_kernel_granularity == 2:
            label += "_kernels"
        return label

    def arch_options(self, args) -> dict:
        return dict(net="dense", back_dep=False, temperature=args.temp)

    def build(self, model, config):
        from .sparse import sparse_method
        return sparse_method(model, config, "imagenet" if config.imagenet else "cifar")


# -- prune.py's methods -----------------------------------------------------------------------------

# The authors' names of the networks, as their command lines give them, and the networks here.
# GReg's code (MingSun-Tse/Regularization-Pruning, model/__init__.py, main.py:101-109): its CIFAR
# resnet56 is akamaster's option A; its ImageNet networks are torchvision's.
GREG_ARCHS = {"resnet56": "resnet56a", "resnet50": "resnet50"}
# HSIC-Lasso's code (songxmu/APIB, main.py:30-50).
APIB_MODELS = {"vgg16": "vgg16_apib", "resnet56": "resnet56a", "resnet110": "resnet110a", "googlenet": "googlenet",
               "resnet50": "resnet50"}

# prune.py's targets, by argparse dest: a method takes some of them (MethodSpec.targets), one is required
# (except with HSIC-Lasso's --ckpt_path).
TARGET_FLAGS = {"stage_pr": "--stage_pr", "target_macs": "--target-macs", "target": "--target", "density": "--density"}
# Picking rules of GReg's --pick_pruned: the lowest scores (the method), the highest, or at random.
PICK_RULES = ("min", "max", "rand")


def parse_ratio_list(text: str) -> list[float] | dict[int, float]:
    """GReg's ``--stage_pr``: ``[0,0.75,0.75,0.32,0]`` (brackets optional) as a list, or the VGG
    form ``1-12:0.5,0:0.2`` as ``{layer index: ratio}``."""
    body = text.strip().removeprefix("[").removesuffix("]").strip()
    if not body:
        raise UsageError("--stage_pr is empty")
    items = [item.strip() for item in body.split(",") if item.strip()]
    if any(":" in item for item in items):
        out = {}
        for item in items:
            match = re.fullmatch(r"(\d+)(?:-(\d+))?:(.+)", item)
            if not match:
                raise UsageError(f"--stage_pr item {item!r}: expected INDEX:RATIO or FIRST-LAST:RATIO")
            first, last = int(match.group(1)), int(match.group(2) or match.group(1))
            if last < first:
                raise UsageError(f"--stage_pr item {item!r}: the range runs backwards")
            ratio = _ratio(match.group(3), item)
            for index in range(first, last + 1):
                out[index] = ratio
        return out
    return [_ratio(item, item) for item in items]


def _ratio(text: str, item: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--stage_pr: {item!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise UsageError(f"--stage_pr: a ratio must be in [0, 1), got {text}")
    return value


def parse_skip_layers(text: str | None) -> list[str]:
    """GReg's ``--skip_layers``: ``[1.0,2.0,2.3]`` (brackets optional) as its list of strings
    (``utils.py:336``'s ``strlist_to_list``: split at commas, blanks dropped)."""
    if not text:
        return []
    body = text.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    items = [item.strip() for item in body.split(",") if item.strip()]
    bad = [item for item in items if not re.fullmatch(r"\d+(\.(\d+|-1|None))*\.?", item)]
    if bad:
        raise UsageError(f"--skip_layers item {bad[0]!r}: expected a layer id such as 2.3 (stage.block) or, on VGG, "
                         f"a layer index")
    return items


# GReg's settings per kind of data (L1 fine-tunes as GReg does): CIFAR from its README's ResNet56
# commands, ImageNet its defaults.
FINE_TUNE_DEFAULTS = {
    "cifar": dict(update_reg_interval=10, stabilize_reg_interval=10000, batch_size_prune=128, epochs=120,
                  lr_ft="0:0.01,60:0.001,90:0.0001", batch_size=128, weight_decay=5e-4),
    "imagenet": dict(update_reg_interval=5, stabilize_reg_interval=40000, batch_size_prune=64, epochs=90,
                     lr_ft="0:0.01,30:0.001,60:0.0001,75:0.00001", batch_size=256, weight_decay=1e-4),
}


class RatioMethod(MethodSpec):
    """What L1 and GReg share: per-layer ratios from ``--stage_pr`` or found for a MACs target
    (pruning/selection.py's ``plan``), and GReg's fine-tuning (``--lr_ft``, piecewise constant)."""

    kind = "prune"
    targets = ("stage_pr", "target_macs", "target")
    settings = ("layer_ratios", "pick_pruned", "wg")

    def target_refusal(self, flag: str) -> str:
        return f"{flag} is IMP's (--method imp); {self.name} takes --stage_pr, --target-macs or --target"

    def add_arguments(self, parser, **context) -> None:
        if "--skip_layers" in parser._option_string_actions:
            return  # L1, GReg-1 and GReg-2 share it
        parser.add_argument_group("L1's and GReg's layers").add_argument(
            "--skip_layers", metavar="LIST",
            help="GReg's layers left unpruned: ResNets every layer whose id stage.block.conv starts with an entry "
                 "([1.0,2.3]: block 0 of stage 1, block 3 of stage 2), VGG layer indices ([0,2,6])")

    def check_args(self, args) -> None:
        if args.lr is not None:
            raise UsageError("--lr is HSIC-Lasso's cosine lr; L1 and GReg fine-tune with --lr_ft")
        if getattr(args, "wg", "filter") == "weight" and args.stage_pr is None:
            raise UsageError("--wg weight prunes single weights at --stage_pr's ratios; a MACs target does not apply "
                             "(unstructured pruning leaves the MACs and the parameter count as they are)")

    def defaults(self, kind: str) -> dict:
        return FINE_TUNE_DEFAULTS[kind]

    def run_label(self, args) -> str:
        if args.stage_pr is not None:
            label = "pr" + args.stage_pr.strip("[]").replace(",", "_").replace(":", "-")
            return ("wgweight_" if getattr(args, "wg", "filter") == "weight" else "") + label
        return f"target{args.target}" if args.target is not None else f"macs{args.target_macs:g}"

    def results(self, args, target: int | None) -> dict:
        """What the fine-tuning's results.json adds (the ratios and their schedule; with ``--wg weight``
        ``layer_ratios`` has one entry per conv and linear layer, in the order of ``unstructured``'s
        ``layer_sparsity``)."""
        out = dict(method=args.method, stage_pr=args.stage_pr, target_macs=args.target_macs, target=target,
                   layer_ratios=args.layer_ratios, pick_pruned=args.pick_pruned, source=str(args.checkpoint),
                   skip_layers=args.skip_layers, wg=getattr(args, "wg", "filter"), lr_ft={str(k): v for k, v in args.lr_ft.items()})
        if getattr(args, "budget", None):
            out["budget"] = args.budget
        return out

    def fine_tune(self, job, cut, extra: dict, method=None) -> int:
        """Fine-tune ``cut`` with GReg's ``--lr_ft`` (``method``: the in-loop method of the fine-tuning,
        default none: a plain network)."""
        args = job.args
        return job.fine_tune(cut, dict(lr=args.lr_ft[0], lr_schedule=args.lr_ft), self.settings, extra, method=method)


class L1(RatioMethod):
    """``prune.py --method l1``: the smallest filters removed at once, then GReg's fine-tuning (pruning/l1.py)."""

    name = "l1"
    aliases = ("L1",)
    summary = "L1 (Li et al. 2017): the smallest filters removed at once"

    def check_args(self, args) -> None:
        super().check_args(args)
        if getattr(args, "wg", "filter") == "weight":
            raise UsageError("--wg weight is implemented for GReg-1 and GReg-2 (unstructured GReg); L1 here removes "
                             "whole filters")

    def run(self, job) -> int:
        from .l1 import run
        return run(self, job)


class GRegSpec(RatioMethod):
    """``prune.py --method greg1 / greg2``: the regularisation phase through the engine in
    ``<run>/regularize/`` (its pruned.pt is the cut network), then GReg's fine-tuning (pruning/greg.py)."""

    def __init__(self, variant: int):
        self.variant = variant
        self.name = f"greg{variant}"
        self.aliases = (f"GReg-{variant}",)
        self.summary = f"GReg-{variant} (Wang et al. 2021): growing regularisation, then the cut"

    def add_arguments(self, parser, **context) -> None:
        super().add_arguments(parser, **context)
        if "--update_reg_interval" in parser._option_string_actions:
            return  # GReg-1 and GReg-2 share one group
        g = parser.add_argument_group("GReg's regularisation phase (defaults: CIFAR / ImageNet)")
        g.add_argument("--wg", choices=("filter", "weight"), default="filter",
                       help="GReg's weight group: whole filters (the cut network is smaller), or single weights "
                            "(unstructured: a same-shape network with the pruned weights at 0)")
        g.add_argument("--update_reg_interval", type=positive_int, help="K_u: iterations between updates (10 / 5)")
        g.add_argument("--stabilize_reg_interval", "--stabilize", dest="stabilize_reg_interval", type=nonneg_int,
                       help="K_s: iterations after the last stop (10000 / 40000); --stabilize is the spelling of "
                            "GReg's README (an abbreviation its argparse accepts)")
        g.add_argument("--reg_upper_limit", type=positive_float, default=1.0, help="a layer stops above this coefficient")
        g.add_argument("--reg_upper_limit_pick", type=positive_float, default=1e-2, help="GReg-2 picks at this coefficient")
        g.add_argument("--reg_granularity_pick", type=positive_float, default=1e-5, help="GReg-2's phase-1 increment")
        g.add_argument("--reg_granularity_prune", type=positive_float, default=1e-4, help="the pruned filters' increment")
        g.add_argument("--reg_granularity_recover", type=float, default=-1e-4, help="GReg-2's kept filters' coefficient")
        g.add_argument("--mag_ratio_limit", type=positive_float, default=1000.0, help="the magnitude-ratio stop")
        g.add_argument("--batch_size_prune", type=positive_int, help="batch of the regularisation phase (128 / 64)")
        g.add_argument("--lr_prune", type=positive_float, default=1e-3, help="constant SGD lr of the regularisation phase")

    def run(self, job) -> int:
        from .greg import run
        return run(self, job)


# HSIC-Lasso's code: a calibration batch of its loaders' size, then 350 cosine epochs (its train.py's
# defaults; CIFAR lr and batch from its README's VGG16 command, ImageNet lr from its README's ResNet50
# command and the batch of its loader, see FINE_TUNE_BATCH).
HSIC_DEFAULTS = {
    "cifar": dict(calib_batch_size=128, epochs=350, lr=0.1, batch_size=256, weight_decay=2e-4),
    "imagenet": dict(calib_batch_size=64, epochs=350, lr=0.01, batch_size=64, weight_decay=2e-4),
}
# The fine-tune batch, by --batch-from: its code's, or its README's train.py commands'. On ImageNet they
# differ: train.py:303 builds the training loader with batch_size=64 whatever --batch_size says, and the
# README's ResNet50 command passes --batch_size 128. On CIFAR the loader reads --batch_size (its
# dataset/cifar10.py:26-28) and the README's VGG16 command gives 256.
FINE_TUNE_BATCH = {"code": {"cifar": 256, "imagenet": 64}, "readme": {"cifar": 256, "imagenet": 128}}
# The cut is decided by these; a continued run must have been started with the same.
HSIC_SETTINGS = ("target", "omega", "alpha", "tolerance", "calib_batch_size", "resnet50_y")


# What ResNet50's conv2 channels are judged against (--resnet50-y; pruning/hsic.py).
Y_SOURCES = ("fc", "conv3")


class HsicLasso(MethodSpec):
    """``prune.py --method hsic``: calibrate, search the Lasso penalty for the MACs target, slice the
    kept channels into ``<run>/cut.pt``, fine-tune with a cosine lr (pruning/hsic.py)."""

    name = "hsic"
    aliases = ("HSIC-Lasso",)
    kind = "prune"
    targets = ("target_macs", "target")
    settings = HSIC_SETTINGS
    summary = "HSIC-Lasso (Guo et al. 2023): channels chosen by a Lasso on HSIC kernels"

    def add_arguments(self, parser, **context) -> None:
        g = parser.add_argument_group("HSIC-Lasso's search (defaults: its code's; CIFAR / ImageNet)")
        g.add_argument("--omega", type=positive_int, default=1, help="ω: the channels the floor's bisection aims every group at (as the authors' code, "
                            "its last fit stands when none keeps exactly ω)")
        g.add_argument("--alpha", type=positive_float, default=1e-6,
                       help="α₀: the Lasso penalty the search starts from (its first upper bracket)")
        g.add_argument("--tolerance", type=positive_float, default=0.01,
                       help="the search stops within target·(1 ± tol)")
        g.add_argument("--calib-batch-size", type=positive_int, metavar="N",
                       help="N: calibration images (128 / 64); the kernels hold 8·N²·(channels + groups) bytes")
        g.add_argument("--resnet50-y", choices=Y_SOURCES, default="fc",
                       help="what ResNet50's conv2 channels are judged against: the pooled classifier input, as "
                            "the authors' code does, or conv3's output")
        g.add_argument("--lasso-threads", type=positive_int, default=min(8, usable_cpus()),
                       help="groups solved at once: 8, or the CPUs this process may use if fewer (the result does "
                            "not depend on it)")
        g.add_argument("--batch-from", choices=tuple(FINE_TUNE_BATCH), default="code",
                       help="HSIC-Lasso's fine-tune batch when -b is not given: code, the default, is what its "
                            "code runs (ImageNet 64: its train.py:303 hard-codes it), readme its README's train.py "
                            "command (ImageNet 128); CIFAR 256 either way")

    def target_refusal(self, flag: str) -> str:
        if flag == "--stage_pr":
            return "HSIC-Lasso finds its own widths: give --target MACS or --target-macs F, not --stage_pr"
        return f"{flag} is IMP's (--method imp); hsic takes --stage_pr, --target-macs or --target"

    def check_args(self, args) -> None:
        kind = "imagenet" if args.dataset == "imagenet" else "cifar"
        batch_from = getattr(args, "batch_from", "code")
        if args.batch_size is None:
            args.batch_size = FINE_TUNE_BATCH[batch_from][kind]
        elif kind == "imagenet" and batch_from == "code" and args.batch_size != FINE_TUNE_BATCH["code"][kind]:
            args.batch_note = (f"-b {args.batch_size}: HSIC-Lasso's train.py would fine-tune with 64 (train.py:303 "
                               f"ignores its --batch_size on ImageNet); this run takes {args.batch_size} as given")
        if args.lr_ft is not None:
            raise UsageError("--lr_ft is GReg's schedule; HSIC-Lasso fine-tunes with a cosine from --lr")
        if getattr(args, "wg", "filter") != "filter" or getattr(args, "skip_layers", None):
            raise UsageError("--wg and --skip_layers are GReg's (--method GReg-1 / GReg-2); HSIC-Lasso chooses its "
                             "channels itself")

    def defaults(self, kind: str) -> dict:
        return HSIC_DEFAULTS[kind]

    def run_label(self, args) -> str:
        return f"target{args.target}" if args.target is not None else f"macs{args.target_macs:g}"

    def run(self, job) -> int:
        from .hsic import run
        return run(self, job)


# IMP: a run continues only with the settings it started with.
IMP_SETTINGS = ("density", "prune_iterations", "cubic")
# The code's --prune-epoch-frequency 2 --start-pruning-after-epoch 0 --post-prune-epochs 10 (every published
# command's; main.py's own default for the start is 20).
IMP_EVERY, IMP_START, IMP_POST_EPOCHS = 2, 0, 10


class IterativeMagnitudePruning(MethodSpec):
    """``prune.py --method imp``: iterative magnitude pruning of single weights to ``--density``, as
    DSR's code runs it (pruning/imp.py)."""

    name = "imp"
    aliases = ("IMP",)
    kind = "prune"
    targets = ("density",)
    settings = IMP_SETTINGS
    summary = "iterative magnitude pruning of single weights (imp, as DSR's code runs it)"

    def add_arguments(self, parser, **context) -> None:
        g = parser.add_argument_group("IMP (iterative magnitude pruning)")
        g.add_argument("--prune-iterations", type=positive_int, default=20,
                       help=f"K: prunes, one at the end of every {IMP_EVERY}nd epoch from epoch {IMP_START}, then "
                            f"{IMP_POST_EPOCHS} epochs: {IMP_EVERY}(K-1)+{IMP_POST_EPOCHS} epochs in all (the "
                            f"flags below change those)")
        g.add_argument("--cubic", action="store_true",
                       help="the cubic schedule (density d+(1-d)(1-i/K)^3 after prune i; the code's WRN runs) "
                            "instead of the same fraction 1-d^(1/K) each time (its ResNet50 runs)")
        g.add_argument("--start-pruning-after-epoch", type=nonneg_int, default=IMP_START, metavar="E",
                       help="the first prune at the end of epoch E (0-based)")
        g.add_argument("--prune-epoch-frequency", type=positive_int, default=IMP_EVERY, metavar="N",
                       help="one prune every N epochs")
        g.add_argument("--post-prune-epochs", type=nonneg_int, default=IMP_POST_EPOCHS, metavar="N",
                       help="epochs after the epoch of the last prune (the default --epochs: E + N(K-1) + this)")
        g.add_argument("--prune-target-sparsity-conv", type=sparsity_type, metavar="S",
                       help="the conv tensors' target density is 1-S instead of --density")
        g.add_argument("--prune-target-sparsity-fc", type=sparsity_type, metavar="S",
                       help="the linear tensors' target density is 1-S instead of --density")
        g.add_argument("--sub-kernel-granularity", type=int, choices=(2, 4), default=4,
                       help="4: prune single weights; 2: whole k x k kernels of the convs (by mean |w|)")
        g.add_argument("--sparse-resnet-downsample", action="store_true",
                       help="ResNet50: prune the 1x1 projection shortcuts too")
        g.add_argument("--L1-loss-coeff", type=nonneg_float, default=0.0, metavar="C",
                       help="the loss gets C times the L1 norm of the pruned tensors")
        g.add_argument("--conv-group-lasso", action="store_true",
                       help="--L1-loss-coeff's term is a group lasso over each conv's k x k kernels")
        g.add_argument("--schedule-file", metavar="YAML",
                       help="the code's schedule file (learning_schedules/*_prune_schedule.yaml): its lr_schedule "
                            "replaces --lr_ft")

    def target_refusal(self, flag: str) -> str:
        return f"IMP prunes single weights to a density: give --density D, not {flag}"

    def check_args(self, args) -> None:
        if args.lr is not None:
            raise UsageError("--lr is HSIC-Lasso's cosine lr; IMP follows the code's schedule, or --lr_ft")
        if args.momentum == 0:
            raise UsageError("IMP trains with Nesterov momentum, as the code: --momentum must be above 0")
        if getattr(args, "wg", "filter") != "filter" or getattr(args, "skip_layers", None):
            raise UsageError("--wg and --skip_layers are GReg's (--method GReg-1 / GReg-2); IMP prunes every "
                             "sparse tensor to --density")
        if args.conv_group_lasso and args.L1_loss_coeff == 0:
            raise UsageError("--conv-group-lasso shapes the --L1-loss-coeff term, which is 0 here: give --L1-loss-coeff C")
        if args.schedule_file:
            if args.lr_ft is not None:
                raise UsageError(f"--lr_ft: --schedule-file {args.schedule_file} sets the learning rate of every "
                                 f"epoch; leave --lr_ft out")
            args.lr_ft = read_schedule_file(args.schedule_file)["lr"]

    def defaults(self, kind: str) -> dict:
        code = SCHEDULES[kind]["imp"]
        return dict(lr_ft=code["lr"], batch_size=code["batch_size"], weight_decay=code["weight_decay"])

    def run_label(self, args) -> str:
        label = f"d{args.density:g}"
        for kind in ("conv", "fc"):
            value = getattr(args, f"prune_target_sparsity_{kind}", None)
            if value is not None:
                label += f"_s{kind}{value:g}"
        if getattr(args, "sub_kernel_granularity", 4) == 2:
            label += "_kernels"
        return label + ("_cubic" if args.cubic else "")

    def run(self, job) -> int:
        from .imp import run
        return run(self, job)


register(DenseTraining())
register(L0Training())
for _name in SPARSE_METHODS:
    register(SparseTraining(_name))
register(L1())
register(GRegSpec(1))
register(GRegSpec(2))
register(HsicLasso())
register(IterativeMagnitudePruning())
