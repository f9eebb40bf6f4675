r"""Prune to a budget: a Lagrangian constraint on the expected cost.

Instead of a fixed lambda, ``--target-macs F`` / ``--target-params F`` ask for a
cost of F times the dense network's. With C the exact expected cost of the
gated network as a fraction of dense (the ``--reg macs`` / ``--reg params``
quantity divided by its dense value) and t the current target, the training
loss gets

.. math:: \mathcal{L}_{budget} = N \big(\lambda_1 (C - t) + \lambda_2 (C - t)^2\big)

in place of the L0 penalty, N the number of gated channels. The factor N
makes the multipliers prices per channel: a channel of average cost adds
about 1/N to C, so its gate feels about :math:`\lambda_1` whatever the width
of the network. Without it the force on one gate would shrink with the width
(ResNet56 has 1024 channels, VGG16 4224), and the multiplier would need
proportionally longer to reach it: a full-width network took several times
as many steps to land as the same network at 1/8 width. The weights and gates *descend* on it, the two
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

Dep-L0's generator under a budget: a pre-activation :math:`W_i a_{i-1} + b_i`
sums :math:`d_{i-1}` weights times inputs of size up to :math:`\log 100`, and
Adam moves every weight by about one learning rate per step, all of a row in
the same direction, so the pre-activation moves by up to
:math:`\eta\,d_{i-1}\log 100` per step (15 at ``--lr_gate 0.05`` for a
64-wide layer). The tanh saturates within a few steps, to exactly
:math:`\pm\log 100` in float32, where its gradient is exactly zero: the
constraint can no longer move those gates. Budget runs therefore give each
generator weight matrix the learning rate :math:`\eta / d_{i-1}`
(:meth:`~l0_layers.ChannelGates.param_groups`), so that a pre-activation moves
by at most about :math:`\eta(1 + \log 100)` per step, like a bias. Runs with
``--lamba`` keep the reference's single learning rate.

The constraint holds on the *expected* cost; the pruned network's cost is the
*deterministic* one (channels whose test gate is non-zero), which differs
while gates are not polarised. :meth:`BudgetConstraint.project` closes that
last gap when training ends outside the tolerance, or when the gates have
closed a layer whose closure cuts the network: it keeps the channels first in
:meth:`BudgetConstraint.channel_order`, as many as the target allows.
"""
import torch
import torch.nn.functional as F
from torch import nn

from l0_layers import hard_concrete
from models.structure import CostModel

KINDS = ("macs", "params")
# How close (absolute, as a fraction of dense) the pruned cost must end to the target.
TOLERANCE = 0.02
# A channel the projection reopens gets at least the test gate of a logit this far above the pruning
# threshold (about 0.14).
REOPEN_MARGIN = 1.0


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
        self.tie_key = gates.tie_key
        self.channels = float(sum(gates.widths))
        self.layer_names = [layer.name for layer in model.gated_layers]
        self.register_buffer("closable", torch.tensor([layer.closable for layer in model.gated_layers]),
                             persistent=False)
        self.cost = CostModel(model.weight_layers, model.gates.num_layers)
        self.dense = float(self.cost.dense("conv")[0 if kind == "macs" else 1])
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
        return self.channels * (self.lambda1 * gap + self.lambda2 * gap * gap), expected

    def deterministic(self, gates: torch.Tensor | None = None) -> float:
        """Cost fraction of the pruned network: the channels whose test gate is non-zero.

        ``gates`` (``(total,)``) defaults to the model's own test gates.
        """
        kept = self.kept() if gates is None else self.per_layer_sum((gates > 0).float())
        macs, params = self.cost.pruned(kept, "conv")
        return (macs if self.kind == "macs" else params) / self.dense

    def disconnected(self, gates: torch.Tensor | None = None) -> list[int]:
        """Gated layers with no open channel whose closure cuts the network (every VGG layer, the
        ResNet stems; a residual block's inner layer may close: the block passes its shortcut on)."""
        kept = self.kept() if gates is None else self.per_layer_sum((gates > 0).float())
        return [layer for layer, n in enumerate(kept.tolist()) if n == 0 and not self.closable[layer]]

    @torch.no_grad()
    def channel_order(self, log_alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        r"""``(order, key, marginal, forced)``: every channel, from the first to keep to the first
        to close, with its key and the marginal cost of its layer (per channel, float64).

        The key of channel :math:`c` in layer :math:`l` is its logit's margin over the
        pruning threshold per unit of the cost it adds,

        .. math:: \kappa_c = (\log\alpha_c - \log(1/11)) / \partial C / \partial S_l,

        with the derivative of the cost fraction taken at the expected open counts
        :math:`S`: the force the constraint itself puts on that gate. It is the order in
        which a common rise of the multiplier would close channels (and a common fall
        reopen them), so at equal logits the cut falls on the expensive layers first, as
        the cost-aware constraint would make it, not on whichever layer comes first.
        Equal keys (Dep-L0's tanh saturates to exactly :math:`\pm\log 100`) are ordered
        by :meth:`~l0_layers.ChannelGates.tie_key` (the generator's pre-activation for
        Dep-L0), then by channel index: the order is strict and deterministic.

        The ``forced`` first entries are, for each layer that may not close fully, its
        first channel in that order: they are always kept, so that the projection never
        disconnects the network.
        """
        with torch.enable_grad():
            widths = self.expected_open(log_alpha.detach()).detach().double().requires_grad_()
            marginal, = torch.autograd.grad(self.fraction(widths), widths)
        marginal = marginal[self.layer_of_channel]
        key = (log_alpha.double() - hard_concrete.PRUNE_THRESHOLD) / marginal
        order = torch.arange(len(key), device=key.device)
        order = order[torch.sort(self.tie_key(log_alpha).double()[order], descending=True, stable=True).indices]
        order = order[torch.sort(key[order], descending=True, stable=True).indices]
        # The first position of each layer in the order (the minimum position per layer).
        position = torch.arange(len(order), device=order.device)
        first = torch.full((len(self.closable),), len(order), dtype=torch.long, device=order.device)
        first = first.scatter_reduce(0, self.layer_of_channel[order], position, reduce="amin")
        forced = torch.zeros_like(order, dtype=torch.bool)
        forced[first[~self.closable]] = True
        return torch.cat([order[forced], order[~forced]]), key, marginal, int(forced.sum())

    @torch.no_grad()
    def project(self, log_alpha: torch.Tensor) -> torch.Tensor | None:
        """Test gates of the first k channels of :meth:`channel_order`, k the largest whose cost
        is at most the target.

        The cost grows with k, so this is the closest network from below among those
        that keep channels in that order. Where one expensive channel makes that fall
        short of the target by more than the tolerance, the cheapest network above the
        target is taken if it is within the tolerance (with the largest k at that cost).

        Kept channels keep their own test gate, so the network changes only where the
        budget demands; a reopened channel (test gate 0, when training ended under the
        target, or a layer's forced channel) takes the test gate of its logit shifted by
        the multiple of its cost that puts the threshold midway between the keys of the
        last kept and the first closed channel, and at least the gate of a logit
        ``REOPEN_MARGIN`` above the threshold (about 0.14): the gates stay frozen through
        fine-tuning, and a channel reopened at a gate of 1e-38 would be counted in the
        cost while passing nothing on. Returns ``None`` where the cheapest connected
        network costs more than the target and the tolerance, or where the best network
        in that order misses the tolerance and is further from the target than the
        network of the logits' own test gates, if that one is connected
        (:meth:`why_not_projected` says which).
        """
        choice = self._choose(log_alpha)
        if choice is None:
            return None
        order, key, marginal, forced, k = choice
        own = hard_concrete.deterministic(log_alpha)
        kept = torch.zeros_like(log_alpha, dtype=torch.bool)
        kept[order[:k]] = True
        if k == len(order):
            boundary = key[order[forced:]].min() if forced < k else key.min()
        elif k <= forced:
            boundary = key[order[k]]
        else:
            boundary = (key[order[k - 1]] + key[order[k]]) / 2
        shifted = (log_alpha.double() - boundary * marginal).clamp(min=hard_concrete.PRUNE_THRESHOLD + REOPEN_MARGIN)
        reopened = hard_concrete.deterministic(shifted.to(log_alpha.dtype))
        return torch.where(kept, torch.where(own > 0, own, reopened), torch.zeros_like(own))

    def _choose(self, log_alpha: torch.Tensor):
        """``(order, key, marginal, forced, k)`` of the projection, or ``None`` (see :meth:`project`)."""
        order, key, marginal, forced = self.channel_order(log_alpha)
        fractions = self._prefix_fractions(order)
        usable = torch.arange(len(fractions), device=fractions.device) >= forced
        below = torch.nonzero(usable & (fractions <= self.target)).flatten()
        above = torch.nonzero(usable & (fractions > self.target)).flatten()
        k = int(below[-1]) if len(below) else None
        if (k is None or self.target - fractions[k] > TOLERANCE) and len(above) \
                and fractions[above[0]] - self.target <= TOLERANCE:
            # One channel too many is still better than a gap beyond the tolerance; at that cost,
            # keep every channel that adds nothing (a closed layer is priced as one channel).
            k = int(torch.nonzero(usable & (fractions <= fractions[above[0]])).flatten()[-1])
        if k is None:
            return None
        gap = abs(float(fractions[k]) - self.target)
        own = hard_concrete.deterministic(log_alpha)
        if gap > TOLERANCE and gap > abs(self.deterministic(own) - self.target) and not self.disconnected(own):
            return None  # outside the tolerance and further from the target than the logits' own network
        return order, key, marginal, forced, k

    def _prefix_fractions(self, order: torch.Tensor) -> torch.Tensor:
        """Cost fraction of keeping the first k channels of ``order``, k = 0..total (a closed
        layer priced as one channel, as the export keeps it)."""
        counts = F.one_hot(self.layer_of_channel[order], len(self.cost.dense_widths))
        widths = torch.cat([counts.new_zeros(1, counts.shape[1]), counts.cumsum(0)]).to(self.cost.dense_widths)
        return self.fraction(widths.clamp(min=1))

    @torch.no_grad()
    def why_not_projected(self, log_alpha: torch.Tensor) -> str:
        """Why :meth:`project` gave ``None``, computed, not assumed."""
        order, _, _, forced = self.channel_order(log_alpha)
        fractions = self._prefix_fractions(order)
        cheapest = float(fractions[forced])
        if cheapest > self.target + TOLERANCE:
            return f"the cheapest network the gates can express, one channel per gated layer, costs {cheapest:.3f}"
        below = torch.nonzero((torch.arange(len(fractions), device=fractions.device) >= forced)
                              & (fractions <= self.target)).flatten()
        k = int(below[-1])
        step = float(fractions[k + 1] - fractions[k])
        name = self.layer_names[int(self.layer_of_channel[order[k]])]
        own = self.deterministic(hard_concrete.deterministic(log_alpha))
        return (f"the next channel in the projection's order ({name}) adds {step:.3f} of dense, so no network "
                f"of that order is within {TOLERANCE:.0%} of the target, and the closest ({float(fractions[k]):.3f}) "
                f"is further from it than the trained network ({own:.3f})")

    def final_gates(self) -> torch.Tensor | None:
        """The gates to freeze at the end of the penalty phase: the projection when the pruned
        cost is more than the tolerance off the target or the network is disconnected, else
        ``None`` (the model's test gates)."""
        if abs(self.deterministic() - self.target) <= TOLERANCE and not self.disconnected():
            return None
        return self.project(self.log_alpha().detach())

    @torch.no_grad()
    def report(self, finished: bool, epochs: int, fine_tune_epochs: int) -> dict:
        """Where the pruned cost stands against the target: reached by training, reached by the
        projection (and why training alone did not), or missed (by how much and why); and
        whether the network is still connected.

        ``finished``: the penalty phase is over (before, the message says so); ``epochs`` and
        ``fine_tune_epochs``: the run's ``--epoch`` and ``--fine_tune_epoch``.
        """
        log_alpha = self.log_alpha()
        expected = float(self.fraction(self.expected_open(log_alpha)))
        trained_open = hard_concrete.deterministic(log_alpha) > 0  # the gates' own test values
        final_open = self.test_gates() > 0
        achieved, trained, target = self.deterministic(), self.deterministic(trained_open), self.target
        closed, reopened = int((trained_open & ~final_open).sum()), int((final_open & ~trained_open).sum())
        total = len(final_open)
        cut = [self.layer_names[layer] for layer in self.disconnected()]
        report = dict(kind=self.kind, target=target, achieved=achieved, trained=trained, expected=expected,
                      lambda1=self.lambda1.item(), lambda2=self.lambda2.item(),
                      within_tolerance=abs(achieved - target) <= TOLERANCE and not cut,
                      projection=dict(closed=closed, reopened=reopened, share=(closed + reopened) / total)
                      if closed or reopened else None,
                      disconnected=cut)
        reached = f"{self.kind} at {achieved:.3f} of dense, target {target:.3f} (within {TOLERANCE:.0%})"
        missed = (f"missed the {self.kind} target by {achieved - target:+.3f} of dense (achieved {achieved:.3f}, "
                  f"target {target:.3f})")
        if not finished:
            message = "training in progress"
        elif report["projection"] is None and report["within_tolerance"]:
            message = reached
        elif report["projection"] is None:
            message = f"{missed}: {self.why_not_projected(log_alpha)}" if abs(achieved - target) > TOLERANCE \
                else f"{self.kind} at {achieved:.3f} of dense, target {target:.3f}"
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
            moved += f" ({(closed + reopened) / total:.1%} of {total})"
            outcome = reached if abs(achieved - target) <= TOLERANCE else missed
            message = f"{outcome} after the budget projection {moved}: training ended at {trained:.3f}, {why}"
            if fine_tune_epochs == 0:
                message += "; no --fine_tune_epoch follows to recover from the projection"
        if finished and cut:
            message += (f"; the network is disconnected: {', '.join(cut)} has no open channel, so everything after "
                        f"it sees zeros")
        report["message"] = message
        return report
