"""IMP, iterative magnitude pruning of single weights, as DSR's code runs it (``prune.py --method imp``).

The dense network trains on while it is pruned to ``--density``: one prune at the
end of every second epoch from epoch 0, ``--prune-iterations`` prunes in all
(the rule, exponential or ``--cubic``, is :class:`pruning.sparse.IMP`'s), then 10
more epochs, with the code's Nesterov SGD and its lr schedule for the data
(``SCHEDULES[kind]['imp']``, or ``--lr_ft``), into one run directory.
"""
from utils.cli import positive_int
from utils.errors import UsageError

from .registry import MethodSpec, register
from .sparse import IMP, SCHEDULES, check_density

# A run continues only with the settings it started with.
IMP_SETTINGS = ("density", "prune_iterations", "cubic")
# The code's --prune-epoch-frequency 2 --start-pruning-after-epoch 0 --post-prune-epochs 10.
IMP_EVERY, IMP_POST_EPOCHS = 2, 10


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
                       help=f"K: prunes, one at the end of every {IMP_EVERY}nd epoch from epoch 0, then "
                            f"{IMP_POST_EPOCHS} epochs: {IMP_EVERY}(K-1)+{IMP_POST_EPOCHS} epochs in all")
        g.add_argument("--cubic", action="store_true",
                       help="the cubic schedule (density d+(1-d)(1-i/K)^3 after prune i; the code's WRN runs) "
                            "instead of the same fraction 1-d^(1/K) each time (its ResNet50 runs)")

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

    def defaults(self, kind: str) -> dict:
        code = SCHEDULES[kind]["imp"]
        return dict(lr_ft=code["lr"], batch_size=code["batch_size"], weight_decay=code["weight_decay"])

    def run_label(self, args) -> str:
        return f"d{args.density:g}" + ("_cubic" if args.cubic else "")

    def run(self, job) -> int:
        args = job.args
        check_density(job.dense_model(), args.density)
        last_prune = IMP_EVERY * (args.prune_iterations - 1) + 1  # the epoch whose end brings the last prune
        if args.epochs is None:
            args.epochs = last_prune - 1 + IMP_POST_EPOCHS
        elif args.epochs < last_prune:
            raise UsageError(f"--epochs {args.epochs}: IMP's last prune comes at the end of epoch {last_prune} "
                             f"(--prune-iterations {args.prune_iterations}, one every {IMP_EVERY} epochs); give "
                             f"at least that")
        args.layer_ratios = None
        job.start(self.run_label(args), f"density {args.density:g} in {args.prune_iterations} prunes "
                                        f"({'cubic' if args.cubic else 'exponential'}), {args.epochs} epochs")
        schedule = args.lr_ft
        config = job.config(self.settings, out_dir=str(job.run_dir), lr=max(schedule.values()), lr_schedule=schedule,
                            nesterov=True)

        def method(model, config):
            return IMP(model, args.density, config.seed, args.prune_iterations, args.cubic, every=IMP_EVERY)

        extra = dict(method="imp", source=str(args.checkpoint), lr_ft={str(k): v for k, v in schedule.items()},
                     nesterov=True)
        return job.train(config, method, start=job.source, extra_results=extra)


register(IterativeMagnitudePruning())
