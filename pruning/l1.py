r"""L1 (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017) as the peers run it.

From the dense network's weights, every prunable layer loses at once its
:math:`\min(\lceil rN \rceil, N-1)` filters of smallest mean :math:`|W_f|` (the ratios and
the score are :mod:`pruning.selection`'s); the cut network (``<run>/cut.pt``) is
then fine-tuned as GReg fine-tunes (``--lr_ft``).
"""
import torch

from utils.errors import UsageError

from .registry import register
from .selection import RatioMethod, decision


class L1(RatioMethod):
    name = "l1"
    aliases = ("L1",)
    summary = "L1 (Li et al. 2017): the smallest filters removed at once"

    def check_args(self, args) -> None:
        super().check_args(args)
        if getattr(args, "wg", "filter") == "weight":
            raise UsageError("--wg weight is implemented for GReg-1 and GReg-2 (unstructured GReg); L1 here removes "
                             "whole filters")

    def run(self, job) -> int:
        args = job.args
        target = self.plan(job)
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
        return self.fine_tune(job, cut, self.results(args, target))


register(L1())
