r"""Prune to a budget: a Lagrangian constraint on the expected cost.

Instead of a fixed lambda, ``--target-macs F`` / ``--target-params F`` ask for a
cost of F times the dense network's. With C the exact expected cost of the
gated network as a fraction of dense (the ``--reg macs`` / ``--reg params``
quantity divided by its dense value) and t the current target, the training
loss gets

.. math:: \mathcal{L}_{budget} = \lambda_1 (C - t) + \lambda_2 (C - t)^2

in place of the L0 penalty. The weights and gates *descend* on it, the two
multipliers *ascend*: while C > t, :math:`\lambda_1` grows and presses the
gates shut; if C undershoots, :math:`\lambda_1` shrinks (it may go negative)
and lets channels reopen; :math:`\lambda_2` grows with the squared gap and
pulls C towards t from both sides. Both start at 0.

The multipliers ascend with Adam (``maximize=True``), as in CoFi (Xia et al.,
2022), not plain SGD: the gates themselves move by Adam, about one learning
rate per step however large the multiplier, so an SGD multiplier, whose speed
is proportional to the gap, winds up while the cost lags the target and then
takes thousands of steps to unwind, overshooting by a wide margin. An Adam
multiplier rises and falls at the same rate, whatever scale the balance
between the budget and the loss needs.

The target is annealed linearly from 1.0 (dense) to F over the first
``warmup`` epochs (measured in fractional epochs, so it moves every step),
which lets the weights adapt while channels are removed, then held at F.

The constraint holds on the *expected* cost; the pruned network's cost is the
*deterministic* one (channels whose test gate is non-zero), which differs
while gates are not polarised. :meth:`BudgetConstraint.project` closes that
last gap when training ends outside the tolerance: it keeps the channels with
the largest logits, as many as the target allows.
"""
import torch
import torch.nn.functional as F
from torch import nn

from models.structure import CostModel

from . import hard_concrete

KINDS = ("macs", "params")
# How close (absolute, as a fraction of dense) the pruned cost must end to the target.
TOLERANCE = 0.02


def annealed_target(final: float, progress: float, warmup: float) -> float:
    """Target at ``progress`` epochs: linear from 1.0 to ``final`` over ``warmup`` epochs."""
    if warmup <= 0:
        return final
    return 1.0 - (1.0 - final) * min(1.0, progress / warmup)


def multiplier_optimizer(budget: "BudgetConstraint", lr: float) -> torch.optim.Optimizer:
    """Gradient *ascent* on the two multipliers: Adam with ``maximize=True`` (see the module notes)."""
    return torch.optim.Adam(budget.parameters(), lr=lr, maximize=True)


def load_multiplier_state(optimizer: torch.optim.Optimizer, state: dict) -> bool:
    """Restore the multiplier optimiser; False (and nothing loaded) for the SGD state of
    checkpoints from before the multipliers ascended with Adam: Adam then starts afresh
    from the saved multipliers."""
    if any("betas" not in group for group in state["param_groups"]):
        return False
    optimizer.load_state_dict(state)
    return True


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
        gates = model.gates
        self.log_alpha, self.expected_open, self.test_gates = gates.log_alpha, gates.expected_open, gates.test_gates
        self.kept, self.per_layer_sum, self.layer_of_channel = gates.kept, gates.per_layer_sum, gates.layer_of_channel
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

    def deterministic(self, gates: torch.Tensor | None = None) -> float:
        """Cost fraction of the pruned network: the channels whose test gate is non-zero.

        ``gates`` (``(total,)``) defaults to the model's own test gates.
        """
        kept = self.kept() if gates is None else self.per_layer_sum((gates > 0).float())
        macs, params = self.cost.pruned(kept)
        return (macs if self.kind == "macs" else params) / self.dense

    @torch.no_grad()
    def project(self, log_alpha: torch.Tensor) -> torch.Tensor | None:
        """Test gates of the k channels with the largest logits, k the largest whose cost is at most the target.

        The cost grows with k, so this is the closest network from below among
        those that keep channels in the order of their logits (what a common
        shift of every logit would keep). Where one expensive channel makes that
        fall short of the target by more than the tolerance, the cheapest
        network above the target is taken if it is within the tolerance (with
        the largest k at that cost).

        Kept channels keep their own test gate, so the network changes only
        where the budget demands; a reopened channel (test gate 0, when
        training ended under the target) takes the test gate of its logit
        shifted by the constant that puts the threshold midway between the
        k-th and (k+1)-th logits. Returns ``None`` where even one channel per
        layer costs more than the target and the tolerance, or where the best
        such network misses the tolerance and is further from the target than
        the network of the logits' own test gates.
        """
        order = torch.argsort(log_alpha, descending=True)
        ranked = log_alpha[order]
        counts = F.one_hot(self.layer_of_channel[order], len(self.cost.dense_widths))
        # widths[k] = channels per layer among the k largest logits, k = 0..total.
        widths = torch.cat([counts.new_zeros(1, counts.shape[1]), counts.cumsum(0)]).to(self.cost.dense_widths)
        fractions = self.fraction(widths.clamp(min=1))
        # Equal logits are kept or closed together: k is usable when logit k-1 > logit k.
        separable = torch.ones_like(fractions, dtype=torch.bool)
        separable[1:-1] = ranked[:-1] > ranked[1:]
        below = torch.nonzero(separable & (fractions <= self.target)).flatten()
        above = torch.nonzero(separable & (fractions > self.target)).flatten()
        k = int(below[-1]) if len(below) else None
        if (k is None or self.target - fractions[k] > TOLERANCE) and len(above) \
                and fractions[above[0]] - self.target <= TOLERANCE:
            # One channel too many is still better than a gap beyond the tolerance; at that cost,
            # keep every channel that adds nothing (a closed layer is priced as one channel).
            k = int(torch.nonzero(separable & (fractions <= fractions[above[0]])).flatten()[-1])
        if k is None:
            return None
        own = hard_concrete.deterministic(log_alpha)
        gap = abs(float(fractions[k]) - self.target)
        if gap > TOLERANCE and gap > abs(self.deterministic(own) - self.target):
            return None  # outside the tolerance and further from the target than the logits' own network
        kept = torch.zeros_like(log_alpha, dtype=torch.bool)
        kept[order[:k]] = True
        if 0 < k < len(ranked):
            shift = hard_concrete.PRUNE_THRESHOLD - (ranked[k - 1] + ranked[k]) / 2
        else:
            shift = hard_concrete.PRUNE_THRESHOLD - ranked[-1] + 1.0 if k else 0.0
        reopened = hard_concrete.deterministic(log_alpha + shift).clamp(min=torch.finfo(own.dtype).tiny)
        return torch.where(kept, torch.where(own > 0, own, reopened), torch.zeros_like(own))

    def final_gates(self) -> torch.Tensor | None:
        """The gates to freeze at the end of the penalty phase: the projection when the pruned
        cost is more than the tolerance off the target, else ``None`` (the model's test gates)."""
        if abs(self.deterministic() - self.target) <= TOLERANCE:
            return None
        return self.project(self.log_alpha().detach())

    @torch.no_grad()
    def report(self, finished: bool, epochs: int, fine_tune_epochs: int) -> dict:
        """Where the pruned cost stands against the target: reached by training, reached by the
        projection (and why training alone did not), or missed (by how much and why).

        ``finished``: the penalty phase is over (before, the message says so); ``epochs`` and
        ``fine_tune_epochs``: the run's ``--epoch`` and ``--fine_tune_epoch``.
        """
        log_alpha = self.log_alpha()
        expected = float(self.fraction(self.expected_open(log_alpha)))
        trained_open = hard_concrete.deterministic(log_alpha) > 0  # the gates' own test values
        final_open = self.test_gates() > 0
        achieved, trained, target = self.deterministic(), self.deterministic(trained_open), self.target
        closed, reopened = int((trained_open & ~final_open).sum()), int((final_open & ~trained_open).sum())
        report = dict(kind=self.kind, target=target, achieved=achieved, trained=trained, expected=expected,
                      lambda1=self.lambda1.item(), lambda2=self.lambda2.item(),
                      within_tolerance=abs(achieved - target) <= TOLERANCE,
                      projection=dict(closed=closed, reopened=reopened) if closed or reopened else None)
        reached = f"{self.kind} at {achieved:.3f} of dense, target {target:.3f} (within {TOLERANCE:.0%})"
        missed = (f"missed the {self.kind} target by {achieved - target:+.3f} of dense (achieved {achieved:.3f}, "
                  f"target {target:.3f})")
        next_channel = "the next channel by logit costs more than the rest of the budget"
        if not finished:
            message = "training in progress"
        elif report["projection"] is None and report["within_tolerance"]:
            message = reached
        elif report["projection"] is None:
            cheapest = float(self.fraction(torch.ones_like(self.cost.dense_widths)))
            why = (f"the cheapest network the gates can express, one channel per gated layer, costs {cheapest:.3f}"
                   if cheapest > target + TOLERANCE else f"{next_channel} and the tolerance")
            message = f"{missed}: {why}"
        else:
            if abs(expected - target) <= TOLERANCE:
                why = f"the expected cost ({expected:.3f}) met the target but the gates were not polarised"
            elif self.warmup >= epochs:
                why = f"the target was still being annealed (--target-warmup {self.warmup:g} >= --epoch {epochs})"
            else:
                why = (f"the constraint had not converged (expected {expected:.3f}, lambda1 "
                       f"{report['lambda1']:.3g}); train longer or raise --lr-lagrangian")
            moved = " and ".join(f"{verb} {n} channel{'s' * (n != 1)}" for verb, n in
                                 (("closed", closed), ("reopened", reopened)) if n)
            outcome = reached if report["within_tolerance"] else missed
            since = "" if report["within_tolerance"] else f", since {next_channel}"
            message = f"{outcome} after the budget projection {moved}{since}: training ended at {trained:.3f}, {why}"
            if fine_tune_epochs == 0:
                message += "; no --fine_tune_epoch follows to recover from the projection"
        report["message"] = message
        return report
