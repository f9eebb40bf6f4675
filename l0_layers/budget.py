r"""Prune to a budget: a Lagrangian constraint on the expected cost.

Instead of a fixed lambda, ``--target-macs F`` / ``--target-params F`` ask for a
cost of F times the dense network's. With C the exact expected cost of the
gated network as a fraction of dense (the ``--reg macs`` / ``--reg params``
quantity divided by its dense value) and t the current target, the training
loss gets

.. math:: \mathcal{L}_{budget} = \lambda_1 (C - t) + \lambda_2 (C - t)^2

in place of the L0 penalty. The weights and gates *descend* on it, the two
multipliers *ascend* (their own SGD with ``maximize=True``): while C > t,
:math:`\lambda_1` grows and presses the gates shut; if C undershoots,
:math:`\lambda_1` shrinks (it may go negative) and lets channels reopen;
:math:`\lambda_2` grows with the squared gap and damps oscillation. Both start
at 0.

The target is annealed linearly from 1.0 (dense) to F over the first
``warmup`` epochs (measured in fractional epochs, so it moves every step),
which lets the weights adapt while channels are removed, then held at F.
"""
import torch
from torch import nn

from models.structure import CostModel

KINDS = ("macs", "params")


def annealed_target(final: float, progress: float, warmup: float) -> float:
    """Target at ``progress`` epochs: linear from 1.0 to ``final`` over ``warmup`` epochs."""
    if warmup <= 0:
        return final
    return 1.0 - (1.0 - final) * min(1.0, progress / warmup)


class BudgetConstraint(nn.Module):
    """The Lagrangian budget term and its two multipliers."""

    def __init__(self, model, kind: str, target: float, warmup: float):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not 0.0 < target <= 1.0:
            raise ValueError(f"target must be in (0, 1], got {target}")
        self.kind, self.target, self.warmup = kind, target, warmup
        # The multipliers are this module's only parameters (its optimiser
        # ascends them): the gates are read through bound methods, not
        # submodules, and widths are priced with its own cost records.
        self.expected_open, self.kept = model.gates.expected_open, model.gates.kept
        self.cost = CostModel(model.weight_layers, model.gates.num_layers)
        self.dense = float(self.cost.dense()[0 if kind == "macs" else 1])
        self.lambda1 = nn.Parameter(torch.zeros(()))
        self.lambda2 = nn.Parameter(torch.zeros(()))

    def target_at(self, progress: float) -> float:
        return annealed_target(self.target, progress, self.warmup)

    def fraction(self, widths: torch.Tensor) -> torch.Tensor:
        """Cost of the network with these per-layer widths, as a fraction of dense."""
        cost = self.cost.macs(widths) if self.kind == "macs" else self.cost.params(widths)
        return cost / self.dense

    def forward(self, progress: float, expected_open: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(Lagrangian term, expected cost fraction C) at ``progress`` epochs."""
        expected = self.fraction(self.expected_open() if expected_open is None else expected_open)
        gap = expected - self.target_at(progress)
        return self.lambda1 * gap + self.lambda2 * gap * gap, expected

    def deterministic(self) -> float:
        """Cost fraction of the pruned network (channels with test gate > 0)."""
        macs, params = self.cost.pruned(self.kept())
        return (macs if self.kind == "macs" else params) / self.dense
