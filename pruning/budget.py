r"""Prune to a budget: a controller that drives the kept network's cost to a target.

Instead of a fixed lambda, ``--target-macs F`` / ``--target-params F`` ask for a
cost of F times the dense network's. The budget is not in the paper or in the
authors' code; its design follows from two ways the obvious Lagrangian fails
on real data (issue 24):

* **A surrogate that can be met by shrinking.** The expected cost C (the
  ``--reg macs`` / ``--reg params`` quantity over its dense value, each channel
  counted by :math:`P(z \neq 0)`) can reach the target with every gate in the
  band where a channel is open at test time but scaled almost to zero: the
  pruned network then keeps every channel (a kept cost of 1.0 against C =
  0.23). Behind each gate sits a BatchNorm, so a uniform shrink costs the
  training loss nothing, and the constraint takes that free direction. The
  controller therefore measures the **kept cost** :math:`K` (channels whose
  test gate is open, :meth:`BudgetConstraint.kept_fraction`) and acts on
  :math:`\max(C, K)`: shrinking without closing earns nothing.
* **A multiplier in the wrong units, pressing every gate.** A Lagrangian
  term :math:`\lambda (C - t)` adds :math:`\lambda\,\partial C/\partial\theta`
  to the gates' gradient, but the gates move by Adam, about one learning rate
  per step whatever the gradient's size: once :math:`\lambda` exceeds the
  (tiny) force of the cross-entropy on the gates, every gate falls at once,
  and L0-HC's logits, which all start at 3, fall together into the band. So
  the controller does not add a term to the loss. After each optimiser step
  it **pushes** the gates that the current target does not keep
  (:meth:`BudgetConstraint.keep_set`: the first channels of the projection's
  own order, :meth:`BudgetConstraint.channel_order`, as many as the annealed
  target pays for, so the method's own logits choose) towards closing, along
  the gradient of their expected cost normalised per parameter group
  (:meth:`BudgetConstraint.push_`):

  .. math:: \theta \leftarrow \theta - \lambda_1\,s\,\nabla_\theta C_{out} / \mathrm{rms}(\nabla_\theta C_{out}),
            \qquad s = \max\big(\eta_{group},\; \tfrac{D}{T}\,\Delta p\,\tfrac{\eta_{group}}{\eta_{max}}\big)

  so :math:`\lambda_1` is dimensionless. The step s is the gate learning rate
  or, if that is too small for the schedule, the pace that carries a logit
  the distance D = ``TRAVEL`` from its initial 3 to the pruning threshold
  within the warm-up T (at least one epoch; :math:`\Delta p` the step's share
  of an epoch), whichever is larger: at the default ``--lr_gate 1e-3`` a
  gate needs 5,400 steps to close, and a short run would otherwise leave the
  whole decision to the projection. Kept gates feel no push; the
  cross-entropy keeps training every gate, so a channel it defends rises back
  into the keep set and another leaves it.

The push ratio follows a damped integral controller on the kept gap:

.. math::
    g_t = \max(C_t, K_t) - t(p), \qquad
    r_t = \rho\,r_{t-1} + (1-\rho)\,\Delta\max(C, K)_t, \qquad
    \lambda_1 \leftarrow \mathrm{clip}\big(\lambda_1 + \eta_\lambda\,(g_t + H\,r_t),\; -\Lambda,\; \Lambda\big)

:math:`\eta_\lambda` the gain (``--lr-lagrangian``, default 0.05), H =
``DAMPING_STEPS`` (50): the controller reacts to the gap predicted H steps
ahead from its smoothed rate of change (:math:`\rho` = ``RATE_DECAY``), so
it stops pressing while the cost is already falling fast enough, and
:math:`\Lambda` = ``MAX_PUSH`` bounds the push at 1.5 learning rates per
step, so it cannot wind up. A negative :math:`\lambda_1` (the kept cost below
the target) pushes gates back up, the band first. Everything is on the
device: no host synchronisation per step.

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
push can no longer move those gates. Budget runs therefore give each
generator weight matrix the learning rate :math:`\eta / d_{i-1}`
(:meth:`~l0_layers.ChannelGates.param_groups`), so that a pre-activation moves
by at most about :math:`\eta(1 + \log 100)` per step, like a bias. Runs with
``--lamba`` keep the reference's single learning rate and its penalty exactly.

Two guards keep a result honest. :func:`shrinking_collapse` looks at every
penalty epoch for the signs of a shrinking collapse (most open channels
nearly closed, or top-1 back at chance) and the run says so in one line and
in results.json. And the pruned network's cost is the *kept* one, which may
still differ from the target when training ends: :meth:`BudgetConstraint.project`
closes that last gap, keeping the channels first in
:meth:`BudgetConstraint.channel_order`; a projection that moves more than
``PROJECTION_LIMIT`` (5%) of the channels marks the run as not converged
(``settled_by: "projection"``): its accuracy is the projection's.
"""
import torch
from torch import nn

from l0_layers import hard_concrete
from l0_layers.gates import LOGIT_INIT_MEAN
from models.structure import CostModel

KINDS = ("macs", "params")
# How close (absolute, as a fraction of dense) the pruned cost must end to the target.
TOLERANCE = 0.02
# A channel the projection reopens gets at least the test gate of a logit this far above the pruning
# threshold (about 0.14).
REOPEN_MARGIN = 1.0
# An open channel whose test gate is below this passes less than a tenth of its signal.
NEAR_ZERO_GATE = 0.1
# A shrinking collapse: more than this share of the open channels near zero, or top-1 at chance.
COLLAPSE_SHARE = 0.5
# The projection is a last small step: a run whose projection moved a larger share of the channels
# did not reach its budget by training, and its result is the projection's (``converged`` false).
PROJECTION_LIMIT = 0.05
# The damping of lambda1 (see the module notes): it ascends on the gap predicted this many steps
# ahead from the gap's rate of change, smoothed over about 1 / (1 - RATE_DECAY) steps.
DAMPING_STEPS = 50.0
RATE_DECAY = 0.9
# The logit distance a gate travels from its initial value to the pruning threshold (about 5.4).
TRAVEL = LOGIT_INIT_MEAN - hard_concrete.PRUNE_THRESHOLD
# The push never exceeds this many gate learning rates per step: the controller cannot wind up.
MAX_PUSH = 3.0


def annealed_target(final: float, progress: float, warmup: float) -> float:
    """Target at ``progress`` epochs: linear from 1.0 to ``final`` over ``warmup`` epochs."""
    if warmup <= 0:
        return final
    return 1.0 - (1.0 - final) * min(1.0, progress / warmup)


def shrinking_collapse(test_gates: torch.Tensor, top1: float, peak_top1: float, num_classes: int,
                       after_warmup: bool = False) -> dict | None:
    """The signs of a shrinking collapse in one evaluated epoch, or None.

    A constraint that shrinks every channel instead of choosing channels leaves many gates in the
    band where a channel is open at test time (it counts fully in the pruned cost) but scaled almost
    to zero: more than ``COLLAPSE_SHARE`` of the open channels have a test gate below
    ``NEAR_ZERO_GATE``. Its symptom is validation top-1 back at chance (at most 1.5 times
    ``100 / num_classes``) after the network had learned (top-1 ``peak_top1`` at least twice chance)
    or, ``after_warmup``, once the warm-up is over whether it had learned or not.
    """
    gates = test_gates.detach().float()
    open_gates = gates[gates > 0]
    near_zero = float((open_gates < NEAR_ZERO_GATE).float().mean()) if len(open_gates) else 0.0
    chance = 100.0 / num_classes
    at_chance = top1 <= 1.5 * chance and (peak_top1 >= 2 * chance or after_warmup)
    if near_zero <= COLLAPSE_SHARE and not at_chance:
        return None
    return dict(near_zero_share=near_zero, top1=top1, peak_top1=peak_top1, chance=chance, at_chance=at_chance)


def collapse_message(epoch: int, signs: dict) -> str:
    """The guard's one line for ``epoch`` (1-based) with :func:`shrinking_collapse`'s ``signs``."""
    what = []
    if signs["near_zero_share"] > COLLAPSE_SHARE:
        what.append(f"{signs['near_zero_share']:.0%} of the open channels have a test gate below {NEAR_ZERO_GATE:g}")
    if signs["at_chance"]:
        what.append(f"top-1 is at chance ({signs['top1']:.2f}%, chance {signs['chance']:.2f}%; best so far "
                    f"{signs['peak_top1']:.2f}%)")
    return (f"collapse guard, epoch {epoch}: {' and '.join(what)}: the gates shrink every channel instead of "
            f"choosing channels; lower --lr_gate or --lr-lagrangian, or lengthen --target-warmup")


def recovered(collapse: dict | None) -> bool:
    """Whether the guard's finding was a dip the run climbed out of (and did not fall back into)."""
    return collapse is not None and collapse.get("recovered_epoch") is not None


def recovery_message(epoch: int, collapse: dict, top1: float) -> str:
    """The guard's one line when a run it flagged is healthy again in ``epoch`` (1-based)."""
    return (f"collapse guard, epoch {epoch}: recovered from epoch {collapse['epoch']}'s collapse (top-1 "
            f"{top1:.2f}%, the open channels' test gates no longer near zero); the result counts as the "
            f"method's unless it falls back")


class BudgetConstraint(nn.Module):
    """The budget controller: the push ratio lambda1, its damped update, and the normalised push."""

    def __init__(self, model, kind: str, target: float, warmup: float, gain: float = 0.05):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not 0.0 < target <= 1.0:
            raise ValueError(f"target must be in (0, 1], got {target}")
        self.kind, self.target, self.warmup, self.gain = kind, target, warmup, gain
        # The multipliers are this module's only parameters (its optimiser
        # ascends them): the gates are read through bound methods, not
        # submodules, and widths are priced with its own cost records.
        gates = model.gates
        self.log_alpha, self.expected_open, self.test_gates = gates.log_alpha, gates.expected_open, gates.test_gates
        self.kept, self.per_layer_sum, self.layer_of_channel = gates.kept, gates.per_layer_sum, gates.layer_of_channel
        self.tie_key, self.temperature = gates.tie_key, gates.temperature
        self.layer_names = [layer.name for layer in model.gated_layers]
        self.register_buffer("closable", torch.tensor([layer.closable for layer in model.gated_layers]),
                             persistent=False)
        self.cost = CostModel(model.weight_layers, model.gates.num_layers)
        self.dense = float(self.cost.dense("conv")[0 if kind == "macs" else 1])
        # The controller's state (buffers, checkpointed): the push ratio, the last kept cost and
        # its smoothed per-step change.
        self.register_buffer("lambda1", torch.zeros(()))
        self.register_buffer("last_kept", torch.zeros(()))
        self.register_buffer("kept_rate", torch.zeros(()))
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))

    def target_at(self, progress: float) -> float:
        return annealed_target(self.target, progress, self.warmup)

    def fraction(self, widths: torch.Tensor) -> torch.Tensor:
        """Cost of the network with these per-layer widths, as a fraction of dense."""
        cost = self.cost.macs(widths) if self.kind == "macs" else self.cost.params(widths)
        return cost / self.dense

    def kept_fraction(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """K: the cost fraction of the channels whose test gate is open (a closed layer priced as one
        channel, as the export keeps it), a 0-d tensor on the gates' device (no host sync)."""
        open_counts = self.per_layer_sum((log_alpha.detach() > hard_concrete.PRUNE_THRESHOLD).float())
        return self.fraction(open_counts.clamp(min=1))

    @torch.no_grad()
    def forward(self, progress: float, log_alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""One controller step with the step's logits: returns ``(C, K)``, the expected and the kept
        cost fractions, and updates :math:`\lambda_1` (see the module notes):

        .. math::
            g_t = \max(C_t, K_t) - t(p), \quad
            r_t = \rho\, r_{t-1} + (1 - \rho)(\max(C_t, K_t) - \max(C_{t-1}, K_{t-1})), \\
            \lambda_1 \leftarrow \mathrm{clip}\big(\lambda_1 + \eta\,(g_t + H r_t), -\Lambda, \Lambda\big)

        with :math:`\rho` = ``RATE_DECAY``, H = ``DAMPING_STEPS``, :math:`\Lambda` = ``MAX_PUSH`` and
        :math:`\eta` the gain (``--lr-lagrangian``).
        """
        expected = self.fraction(self.expected_open(log_alpha.detach()))
        kept = torch.maximum(expected, self.kept_fraction(log_alpha))
        first = self.steps_seen == 0
        change = torch.where(first, torch.zeros_like(kept), kept - self.last_kept)
        self.kept_rate.mul_(RATE_DECAY).add_((1 - RATE_DECAY) * change)
        self.last_kept.copy_(kept)
        self.steps_seen.add_(1)
        signal = kept - self.target_at(progress) + DAMPING_STEPS * self.kept_rate
        self.lambda1.add_(self.gain * signal).clamp_(-MAX_PUSH, MAX_PUSH)
        return expected, kept

    @torch.no_grad()
    def keep_set(self, log_alpha: torch.Tensor, progress: float) -> torch.Tensor:
        """The channels the current target keeps, ``(total,)`` bool: the first k of
        :meth:`channel_order`, k the largest whose network costs at most ``target_at(progress)``
        (every layer that may not close keeps its first channel). Computed on the device, without
        a host synchronisation."""
        return self._keep(log_alpha, progress)[0]

    def _keep(self, log_alpha: torch.Tensor, progress: float) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`keep_set` and each channel's marginal cost (the order's, reused by the push)."""
        order, _, marginal, forced = self._ranked(log_alpha)
        fractions = self._prefix_fractions(order)
        position = torch.arange(len(fractions), device=fractions.device)
        fits = (fractions <= self.target_at(progress)) & (position >= forced)
        k = torch.where(fits, position, torch.full_like(position, forced)).max()
        keep = torch.zeros_like(log_alpha, dtype=torch.bool)
        keep[order] = position[:-1] < k
        return keep, marginal

    def push_(self, groups: list[dict], log_alpha_of, progress: float, epochs: float) -> None:
        r"""Push the gates the target does not keep towards closing, by :math:`\lambda_1` times the
        gate learning rate (see the module notes):

        .. math:: \theta \leftarrow \theta - \lambda_1\,\eta_{group}\,\nabla_\theta C_{out} /
                  \mathrm{rms}(\nabla_\theta C_{out})

        :math:`C_{out}` the expected cost of the channels outside :meth:`keep_set` (with
        :math:`\lambda_1 < 0`, of the channels inside it, which it then reopens), the rms taken
        over the group's non-zero entries. ``groups``: the gate optimiser's parameter groups
        (their current ``lr``; Dep-L0's generator weights have ``1/fan_in`` of it);
        ``log_alpha_of``: recomputes the logits from the parameters.
        """
        params = [p for group in groups for p in group["params"]]
        with torch.enable_grad():
            log_alpha = log_alpha_of()
            with torch.no_grad():
                keep, marginal = self._keep(log_alpha.detach(), progress)
            pushed = torch.where(self.lambda1 >= 0, ~keep, keep).to(log_alpha.dtype)
            probability = hard_concrete.prob_nonzero(log_alpha, self.temperature)
            cost = (probability * pushed * marginal.to(log_alpha.dtype)).sum()
            grads = iter(torch.autograd.grad(cost, params, allow_unused=True))
        top = max(group["lr"] for group in groups)
        pace = TRAVEL / max(self.warmup, 1.0) * epochs  # per step, in logit units
        with torch.no_grad():
            for group in groups:
                present = [(p, g) for p in group["params"] if (g := next(grads)) is not None]
                if not present:
                    continue
                square = sum((g.double() ** 2).sum() for _, g in present)
                count = sum((g != 0).sum() for _, g in present).clamp(min=1)
                rms = (square / count).sqrt().clamp(min=1e-30).float()
                step = max(group["lr"], pace * group["lr"] / top)
                for p, g in present:
                    p.sub_(self.lambda1 * step * g / rms)

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
        order, key, marginal, forced = self._ranked(log_alpha)
        return order, key, marginal, int(forced)

    def _ranked(self, log_alpha: torch.Tensor):
        """:meth:`channel_order` with the forced count as a 0-d tensor (no host synchronisation)."""
        with torch.enable_grad():
            widths = self.expected_open(log_alpha.detach()).detach().double().requires_grad_()
            marginal, = torch.autograd.grad(self.fraction(widths), widths)
        marginal = marginal[self.layer_of_channel]
        key = (log_alpha.double() - hard_concrete.PRUNE_THRESHOLD) / marginal
        order = torch.arange(len(key), device=key.device)
        order = order[torch.sort(self.tie_key(log_alpha).double()[order], descending=True, stable=True).indices]
        order = order[torch.sort(key[order], descending=True, stable=True).indices]
        order, forced = self._forced_first(order)
        return order, key, marginal, forced

    def _forced_first(self, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``order`` with each unclosable layer's first channel moved to the front (in order), and
        their count as a 0-d tensor; without host synchronisation (no boolean indexing), as the
        budget's every step uses it."""
        position = torch.arange(len(order), device=order.device)
        # The first position of each layer in the order (the minimum position per layer).
        first = torch.full((len(self.closable),), len(order), dtype=torch.long, device=order.device)
        first = first.scatter_reduce(0, self.layer_of_channel[order], position, reduce="amin")
        first = first.masked_fill(self.closable, len(order))  # closable layers force nothing
        forced = torch.zeros(len(order) + 1, dtype=torch.bool, device=order.device).scatter_(0, first, True)[:-1]
        return order[torch.sort((~forced).to(torch.uint8), stable=True).indices], forced.sum()

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
        layers = self.layer_of_channel[order]
        counts = torch.zeros(len(order), len(self.cost.dense_widths), device=order.device)
        counts.scatter_(1, layers[:, None], 1.0)  # one-hot, without one_hot's range check (a host sync)
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
    def report(self, finished: bool, epochs: int, fine_tune_epochs: int, collapse: dict | None = None) -> dict:
        """Where the pruned cost stands against the target: reached by training, reached by the
        projection (and why training alone did not), or missed (by how much and why); whether
        the network is still connected; and whether the result is training's own (``converged``).

        ``finished``: the penalty phase is over (before, the message says so); ``epochs`` and
        ``fine_tune_epochs``: the run's ``--epoch`` and ``--fine_tune_epoch``; ``collapse``: the
        collapse guard's first finding (:func:`shrinking_collapse`, with its ``epoch`` and the
        ``recovered_epoch`` from which the run was healthy again to the end of its penalty phase,
        or None), if any.

        ``converged`` is true only when the cost is within the tolerance, the projection moved at
        most ``PROJECTION_LIMIT`` of the channels and the guard saw no collapse that lasted (a dip
        the run recovered from does not count); ``settled_by``
        says who chose the network: ``training``, the ``projection`` (more than that share moved),
        or nobody (``missed``).
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
                      lambda1=self.lambda1.item(),
                      within_tolerance=abs(achieved - target) <= TOLERANCE and not cut,
                      projection=dict(closed=closed, reopened=reopened, share=(closed + reopened) / total)
                      if closed or reopened else None,
                      disconnected=cut, collapse=collapse)
        projected = report["projection"] is not None and report["projection"]["share"] > PROJECTION_LIMIT
        report["settled_by"] = ("missed" if not report["within_tolerance"] else
                                "projection" if projected else "training")
        report["converged"] = report["settled_by"] == "training" and (collapse is None or recovered(collapse))
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
        if finished and projected:
            message = (f"not converged: the projection, not training, chose {report['projection']['share']:.1%} of the "
                       f"channels (more than {PROJECTION_LIMIT:.0%}), so this network is the projection's; {message}")
        if finished and recovered(collapse):
            message += (f"; the collapse guard fired in epoch {collapse['epoch']} and the run recovered from epoch "
                        f"{collapse['recovered_epoch']}")
        elif finished and collapse is not None:
            message += f"; the collapse guard fired in epoch {collapse['epoch']}, so this result is not the method's"
        if finished and cut:
            message += (f"; the network is disconnected: {', '.join(cut)} has no open channel, so everything after "
                        f"it sees zeros")
        report["message"] = message
        return report
