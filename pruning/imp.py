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
the code's, as for ``--sparse``. Its declaration: ``IterativeMagnitudePruning`` in pruning/specs.py.
"""
from utils.errors import UsageError

from .sparse import IMP, check_layer_densities, layer_densities, sparse_layers


def run(spec, job) -> int:
    """Every phase of ``prune.py --method imp`` (``spec``: its declaration)."""
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
    job.start(spec.run_label(args), f"density {args.density:g} in {args.prune_iterations} prunes "
                                    f"({'cubic' if args.cubic else 'exponential'}), {args.epochs} epochs")
    schedule = args.lr_ft
    config = job.config(spec.settings, out_dir=str(job.run_dir), lr=max(schedule.values()), lr_schedule=schedule,
                        nesterov=True)

    def method(model, config):
        return IMP(model, args.density, config.seed, args.prune_iterations, args.cubic, start=start, every=every,
                   conv=conv, fc=fc, granularity=args.sub_kernel_granularity,
                   shortcuts=args.sparse_resnet_downsample, l1=args.L1_loss_coeff,
                   group_lasso=args.conv_group_lasso)

    extra = dict(method="imp", source=str(args.checkpoint), lr_ft={str(k): v for k, v in schedule.items()},
                 nesterov=True)
    return job.train(config, method, start=job.source, extra_results=extra)
