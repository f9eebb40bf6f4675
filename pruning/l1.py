r"""L1 (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017) as the peers run it.

From the dense network's weights, every prunable layer loses at once its
:math:`\min(\lceil rN \rceil, N-1)` filters of smallest mean :math:`|W_f|` (the ratios and
the score are :mod:`pruning.selection`'s); the cut network (``<run>/cut.pt``) is
then fine-tuned as GReg fine-tunes (``--lr_ft``). Its declaration: ``L1`` in pruning/specs.py.
"""
import torch

from .selection import decision, plan


def run(spec, job) -> int:
    """Every phase of ``prune.py --method l1`` (``spec``: its declaration)."""
    args = job.args
    target = plan(spec, job)
    cut = job.run_dir / "cut.pt"
    if not cut.exists():
        if job.ctx.is_main:  # rank 0 writes the cut; the others read it
            model = job.dense_model()
            gates = decision(model, args.layer_ratios, rule=args.pick_pruned,
                             generator=torch.Generator().manual_seed(args.seed))
            job.run_dir.mkdir(parents=True, exist_ok=True)
            job.save_cut(model, cut, gates)
        job.ctx.barrier()
    args.seed = job.read_cut(cut)["seed"]  # the run's, when continued
    return spec.fine_tune(job, cut, spec.results(args, target))
