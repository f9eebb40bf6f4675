"""IMP, iterative magnitude pruning of single weights, as DSR's code runs it (``prune.py --method imp``).

The dense network trains on while it is pruned to ``--density``: one prune at the
end of every ``--prune-epoch-frequency``-th epoch (2) from epoch
``--start-pruning-after-epoch`` (0), ``--prune-iterations`` prunes in all (the
rule, exponential or ``--cubic``, is :class:`pruning.sparse.IMP`'s), then
``--post-prune-epochs`` (10) more epochs, with the code's Nesterov SGD and its lr
schedule for the data (``SCHEDULES[kind]['imp']``, or ``--lr_ft``, or the code's
``--schedule-file``), into one run directory. ``--prune-target-sparsity-conv`` /
``-fc`` give the conv and linear tensors their own targets; ``--sub-kernel-granularity``,
``--sparse-resnet-downsample``, ``--L1-loss-coeff`` and ``--conv-group-lasso`` are
the code's, as for ``--sparse``.
"""
from utils.cli import nonneg_float, nonneg_int, positive_int, sparsity_type
from utils.errors import UsageError

from .registry import MethodSpec, register
from .sparse import IMP, SCHEDULES, check_layer_densities, layer_densities, read_schedule_file, sparse_layers

# A run continues only with the settings it started with.
IMP_SETTINGS = ("density", "prune_iterations", "cubic")
# The code's --prune-epoch-frequency 2 --start-pruning-after-epoch 0 --post-prune-epochs 10 (every published
# command's; main.py's own default for the start is 20).
IMP_EVERY, IMP_START, IMP_POST_EPOCHS = 2, 0, 10


class IterativeMagnitudePruning(MethodSpec):
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
        args = job.args
        model = job.dense_model()
        if args.sparse_resnet_downsample and model.arch["model"] != "resnet50":
            raise UsageError(f"--sparse-resnet-downsample is ResNet50's (the code's imagenet_resnet50); "
                             f"{model.arch['model']} has no downsample to prune")
        layers = sparse_layers(model, args.sparse_resnet_downsample)
        conv, fc = (None if s is None else 1.0 - s for s in (args.prune_target_sparsity_conv,
                                                              args.prune_target_sparsity_fc))
        check_layer_densities(model, layers, layer_densities(model, layers, args.density, conv, fc),
                              args.sub_kernel_granularity)
        start, every = args.start_pruning_after_epoch, args.prune_epoch_frequency
        # The code's nEpochs_to_prune = start + every (K - 1) + post; the last prune ends epoch start + every (K - 1).
        last_prune = start + every * (args.prune_iterations - 1) + 1  # 1-based: the epoch whose end brings it
        if args.epochs is None:
            args.epochs = last_prune - 1 + args.post_prune_epochs
        elif args.epochs < last_prune:
            raise UsageError(f"--epochs {args.epochs}: IMP's last prune comes at the end of epoch {last_prune} "
                             f"(--prune-iterations {args.prune_iterations}, one every {every} epochs from epoch "
                             f"{start + 1}); give at least that")
        args.layer_ratios = None
        job.start(self.run_label(args), f"density {args.density:g} in {args.prune_iterations} prunes "
                                        f"({'cubic' if args.cubic else 'exponential'}), {args.epochs} epochs")
        schedule = args.lr_ft
        config = job.config(self.settings, out_dir=str(job.run_dir), lr=max(schedule.values()), lr_schedule=schedule,
                            nesterov=True)

        def method(model, config):
            return IMP(model, args.density, config.seed, args.prune_iterations, args.cubic, start=start, every=every,
                       conv=conv, fc=fc, granularity=args.sub_kernel_granularity,
                       shortcuts=args.sparse_resnet_downsample, l1=args.L1_loss_coeff,
                       group_lasso=args.conv_group_lasso)

        extra = dict(method="imp", source=str(args.checkpoint), lr_ft={str(k): v for k, v in schedule.items()},
                     nesterov=True)
        return job.train(config, method, start=job.source, extra_results=extra)


register(IterativeMagnitudePruning())
