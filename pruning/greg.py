r"""GReg-1 and GReg-2 (Wang et al., "Neural Pruning via Growing Regularization", ICLR 2021).

The regularisation phase on a pretrained dense network, as the authors' code
(MingSun-Tse/Regularization-Pruning) runs it; the cut and the fine-tuning that
follow are ``prune.py``'s, through the shared engine.

Every prunable layer l (a gated layer of ``models/structure.py``: ResNet56's
block conv1, ResNet50's conv1 and conv2, VGG's convs) has one coefficient per
filter, :math:`\lambda_{l,f} \ge 0` at first 0 (GReg's ``[N_out, N_in]`` matrix,
whose columns are all equal at filter granularity). After ``loss.backward()``

.. math:: \nabla W_{l,f} \mathrel{+}= \lambda_{l,f}\, W_{l,f}

(no factor 2, weights only, on top of the optimiser's weight decay: SGD, constant
lr ``--lr_prune``, momentum, the run's weight decay). The coefficients are
updated at iterations :math:`0, K_u, 2K_u, \dots` before that iteration's step:

- **magnitude ratio**, per layer: :math:`h = \bar s_{kept} / \bar s_{pruned}` of
  the filter scores :math:`s_f` = mean :math:`|W_f|`, as an EMA
  :math:`h \leftarrow 0.9 h + 0.1 \cdot ratio` (the first value is the ratio);
- **GReg-1**: the pruned set is fixed at the start (the lowest scores of the
  pretrained weights); each update :math:`\lambda_{pruned} \mathrel{+}= \delta_{prune}`
  (1e-4). A layer stops when its :math:`\max\lambda >` ``--reg_upper_limit`` (1)
  or when every pruning layer's :math:`h \ge` ``--mag_ratio_limit`` (1000);
- **GReg-2**: phase 1, :math:`\lambda \mathrel{+}= \delta_{pick}` (1e-5) on *every*
  filter of the layer, the ratio measured against the tentative set (the current
  lowest scores), until :math:`\max\lambda \ge` ``--reg_upper_limit_pick`` (1e-2):
  then the pruned set is picked by the current scores. Phase 2:
  :math:`\lambda_{pruned} \mathrel{+}= \delta_{prune}`, :math:`\lambda_{kept} = \delta_{recover}`
  (-1e-4, set each update); a layer stops when its own :math:`h \ge` 1000 or
  :math:`\max\lambda >` 1. The EMA carries over from phase 1, as in the code.

Layers with ratio 0 stop at once with :math:`\lambda = 0`; a stopped layer's
coefficients stay as they are. When every layer has stopped the coefficients
stay fixed for ``--stabilize_reg_interval`` (:math:`K_s`) more iterations; the
phase ends after the step of iteration (stop + :math:`K_s`). The coefficients are
float32, accumulate and are compared with the limits in float32 as in the code
(a float32 tensor against a Python number), so the counts match it exactly: GReg-1
exceeds 1 after 10,000 updates; GReg-2 picks at update 1,001 (1000 additions of
1e-5 fall just short of 0.01 in float32) and ends after 10,901.

**Unstructured GReg** (``--wg weight``, GReg's Tab. 4; :class:`GRegUnstructured`): the group is one
weight (``pruner/reg_pruner.py`` with ``args.wg == 'weight'``). Every conv and linear layer takes its
stage's ratio (``pruner/meta_pruner.py:211-226``: on a ResNet the stem, shortcuts and classifier too,
:func:`pruning.selection.weight_layer_ratios`) and prunes :math:`\min(\lceil rN \rceil, N - 1)` of its N
weights, the smallest :math:`|w|` (GReg-1: of the pretrained weights, by ``--pick_pruned``; GReg-2:
of the weights at its pick). The coefficients are per weight, with the same schedule as above, but
with no magnitude ratio (the code skips it for single weights, ``reg_pruner.py:145,159,248,292-294``):
a layer stops only when its :math:`\max\lambda >` ``--reg_upper_limit``. At the end of the phase the
pruned weights are set to 0 (``_get_masks``, ``main.py:313-316``) and stay 0 through the fine-tuning,
re-zeroed after every optimiser step (``main.py:519-521``; :class:`MaskedFineTune`). The network
keeps its shape: its MACs and parameters are the dense network's, and ``results.json`` reports the
weight sparsity (:func:`unstructured_summary`).
"""
import math

import torch

from models.export import sparse_cost
from utils.errors import UsageError

from .method import PruningMethod
from .selection import decision, filter_scores, pick, plan, pruned_count

# The regularisation phase continues only with the settings it started with.
GREG_SETTINGS = ("wg", "update_reg_interval", "stabilize_reg_interval", "reg_upper_limit", "reg_upper_limit_pick",
                 "reg_granularity_pick", "reg_granularity_prune", "reg_granularity_recover", "mag_ratio_limit",
                 "batch_size_prune", "lr_prune")
# The phase ends by its own rule; this only bounds the engine's epoch loop.
REGULARIZE_EPOCHS = 1_000_000


class _RegularizationPhase(PruningMethod):
    """What both granularities share: the settings, the loop's hooks (an update before the step of
    every K_u-th iteration until every layer has stopped, then K_s stabilising iterations) and the
    bound on the updates left. A subclass makes the update (``_update``) and adds the coefficients
    to the gradients (``after_backward``)."""

    loss_name = "reg"
    ends_by_own_rule = True

    def __init__(self, model, ratios: list[float], variant: int, update_interval: int, stabilize_interval: int,
                 upper_limit: float, upper_limit_pick: float, granularity_pick: float, granularity_prune: float,
                 granularity_recover: float):
        super().__init__(model)
        if variant not in (1, 2):
            raise ValueError(f"GReg has variants 1 and 2, not {variant}")
        self.name = f"greg{variant}"
        self.variant, self.ratios = variant, list(ratios)
        self.update_interval, self.stabilize_interval = update_interval, stabilize_interval
        self.upper_limit, self.upper_limit_pick = upper_limit, upper_limit_pick
        self.granularity_pick, self.granularity_prune = granularity_pick, granularity_prune
        self.granularity_recover = granularity_recover
        self.iteration = 0          # training steps taken in this phase
        self.updates = 0            # coefficient updates made
        self.picked_at = None       # GReg-2: the update at which the pruned sets were picked
        self.stopped_at = None      # the iteration at which every layer had stopped
        self.done = False

    def changes_gradients(self) -> bool:
        return True

    def before_step(self, iteration: int) -> None:
        if self.stopped_at is None and self.iteration % self.update_interval == 0:
            self._update()

    def after_step(self, iteration: int) -> None:
        if self.stopped_at is not None and self.iteration == self.stopped_at + self.stabilize_interval:
            self.done = True
            self._end()
        self.iteration += 1

    def _end(self) -> None:
        """At the end of the phase (after its last step)."""

    def finished(self) -> bool:
        return self.done

    def updates_bound(self) -> int:
        """Updates after which every layer has stopped at the latest: the coefficients grow by
        ``--reg_granularity_prune`` per update up to ``--reg_upper_limit`` (GReg-2 first by
        ``--reg_granularity_pick`` up to ``--reg_upper_limit_pick``); the filters' magnitude ratio
        may stop a layer sooner."""
        bound = math.ceil(self.upper_limit / self.granularity_prune) + 1
        if self.variant == 2:
            bound += math.ceil(self.upper_limit_pick / self.granularity_pick) + 1
        return bound

    def _phase_state(self, done: str) -> str:
        """Where the phase is, for the epoch line."""
        if self.done:
            return done
        if self.stopped_at is not None:
            left = self.stopped_at + self.stabilize_interval - self.iteration
            return f"stabilising since iteration {self.stopped_at}, {left} iterations left"
        left = max(self.updates_bound() - self.updates, 0)
        return (f"{sum(self.finished_layers)}/{len(self.finished_layers)} layers stopped; at most {left} more "
                f"updates ({left * self.update_interval} iterations) and {self.stabilize_interval} stabilising "
                f"iterations left")


class GReg(_RegularizationPhase):
    """The regularisation phase of GReg-1 (``variant=1``) or GReg-2 (``variant=2``)."""

    def __init__(self, model, ratios: list[float], variant: int, update_interval: int, stabilize_interval: int,
                 upper_limit: float = 1.0, upper_limit_pick: float = 1e-2, granularity_pick: float = 1e-5,
                 granularity_prune: float = 1e-4, granularity_recover: float = -1e-4, mag_ratio_limit: float = 1000.0,
                 pick_rule: str = "min", generator: torch.Generator | None = None):
        super().__init__(model, ratios, variant, update_interval, stabilize_interval, upper_limit, upper_limit_pick,
                         granularity_pick, granularity_prune, granularity_recover)
        self.mag_ratio_limit = mag_ratio_limit
        layers = model.gated_layers
        self.convs = [model.get_submodule(g.conv) for g in layers]
        device = self.convs[0].weight.device
        widths = [g.width for g in layers]
        self.widths = widths
        # The coefficients and pruned sets of all layers live in one flat tensor each (self.reg and
        # self.pruned are per-layer views of them), so an update is a few whole-network operations
        # on the device and one transfer (see _update).
        self._reg = torch.zeros(sum(widths), device=device)
        self._pruned = torch.zeros(sum(widths), dtype=torch.bool, device=device)
        self.reg = list(self._reg.split(widths))
        self.pruned = list(self._pruned.split(widths))
        # GReg-1 picks from the pretrained weights with --pick_pruned; GReg-2 picks later, always by 'min'.
        if variant == 1:
            self._pruned.copy_(decision(model, self.ratios, rule=pick_rule, generator=generator) == 0)
        self.picked = [variant == 1 or r == 0 for r in self.ratios]
        self.hist = [None] * len(layers)
        self.finished_layers = [False] * len(layers)
        # Per channel: its layer, and per layer: its first channel, the filters it prunes, ratio > 0.
        self._layer = torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(widths)).to(device)
        starts = torch.tensor([0] + widths[:-1]).cumsum(0)
        self._start = starts.to(device)
        self._slot = (torch.arange(sum(widths)) - starts.repeat_interleave(torch.tensor(widths))).to(device)
        self._count = torch.tensor([pruned_count(w, r) for w, r in zip(widths, self.ratios)]).to(device)
        self._prunes = torch.tensor([r > 0 for r in self.ratios]).to(device)
        self._to_device()

    def _to_device(self) -> None:
        """The device's copy of the per-layer state the update reads (from the host lists)."""
        device = self._reg.device
        self._hist = torch.tensor([float("nan") if h is None else h for h in self.hist], dtype=torch.float64,
                                  device=device)
        self._has_hist = torch.tensor([h is not None for h in self.hist], device=device)
        self._finished = torch.tensor(self.finished_layers, device=device)
        self._picked = torch.tensor(self.picked, device=device)

    # -- the loop's hooks ----------------------------------------------------------------------

    @torch.no_grad()
    def after_backward(self) -> None:
        for conv, reg in zip(self.convs, self.reg):
            if conv.weight.grad is not None:
                conv.weight.grad.add_(reg.view(-1, *([1] * (conv.weight.dim() - 1))) * conv.weight)

    # -- the coefficient update ----------------------------------------------------------------

    @torch.no_grad()
    def _update(self) -> None:
        """One coefficient update of every layer that has not stopped, as the authors' code makes it
        layer after layer, computed for all layers at once on the device; the host learns the
        outcome (stopped and picked layers, magnitude ratios) from one transfer at the end.

        Per layer (``active``: not stopped, ratio > 0; a layer of ratio 0 stops at once):

        - GReg-1: pruned += delta_prune; h updated; stop when max lambda > the upper limit or when
          every layer's h (those with one) >= the ratio limit, where, as in the code's loop, the
          layers before it (and itself) have their new h and the layers after it their old one;
        - GReg-2 before its pick: lambda += delta_pick on every filter, h against the tentative set
          (the ratio's count of lowest scores, ties by index); picks when max lambda >= the pick
          limit, and then stops already if h >= the ratio limit or max lambda > the upper limit;
        - GReg-2 after: pruned += delta_prune, kept = delta_recover; h; stop as just said.
        """
        self.updates += 1
        layer, reg, pruned = self._layer, self._reg, self._pruned
        scores = torch.cat(filter_scores(self.model, on_device=True))
        self._finished |= ~self._prunes  # a layer of ratio 0 stops with lambda = 0
        active = ~self._finished
        if self.variant == 1:
            sets = pruned
            reg.copy_(torch.where(active[layer] & pruned, reg + self.granularity_prune, reg))
        else:
            picking, recovering = (active & ~self._picked)[layer], (active & self._picked)[layer]
            # The tentative pruned sets: within each layer, its count of lowest scores (stable order).
            order = torch.sort(scores, stable=True).indices
            order = order[torch.sort(layer[order], stable=True).indices]
            rank = torch.empty_like(order)
            rank[order] = torch.arange(len(order), device=order.device) - self._start[layer[order]]
            tentative = rank < self._count[layer]
            sets = torch.where(picking, tentative, pruned)
            reg.copy_(torch.where(picking, reg + self.granularity_pick, reg))
            reg.copy_(torch.where(recovering, torch.where(pruned, reg + self.granularity_prune,
                                                          self.granularity_recover), reg))
        # Magnitude ratio: mean score of the kept filters over that of the pruned ones (inf if none is).
        n = len(self.widths)
        n_pruned = self._per_layer(sets.float()).sum(1)
        n_kept = self._per_layer((~sets).float()).sum(1)
        s_pruned = self._per_layer(torch.where(sets, scores, 0.0)).sum(1)
        s_kept = self._per_layer(torch.where(sets, 0.0, scores)).sum(1)
        ratio = torch.where(n_pruned > 0, (s_kept / n_kept) / (s_pruned / n_pruned), float("inf")).double()
        old_hist, old_has = self._hist.clone(), self._has_hist.clone()
        self._hist.copy_(torch.where(active, torch.where(old_has, 0.9 * old_hist + 0.1 * ratio, ratio), old_hist))
        self._has_hist |= active
        reg_max = self._per_layer(reg, float("-inf")).amax(1)
        over = reg_max > self.upper_limit
        apart = self._hist >= self.mag_ratio_limit
        if self.variant == 1:
            ok_new = (~self._has_hist | apart).int()
            ok_old = (~old_has | (old_hist >= self.mag_ratio_limit)).int()
            before = ok_new.cummin(0).values.bool()  # every layer up to this one (new h) apart
            after = torch.cat([ok_old.flip(0).cummin(0).values.flip(0)[1:], ok_old.new_ones(1)]).bool()
            stops = active & ((before & after) | over)
            picks = torch.zeros_like(active)
        else:
            picks = active & ~self._picked & (reg_max >= self.upper_limit_pick)
            pruned.copy_(torch.where(picks[layer], tentative, pruned))
            self._picked |= picks
            stops = active & self._picked & (apart | over)  # picked before, or now (then stopped at the pick)
        self._finished |= stops
        # The update's one host sync.
        state = torch.cat([self._finished.double(), picks.double(), self._has_hist.double(), self._hist]).tolist()
        finished, picked, has_hist, hist = (state[i * n:(i + 1) * n] for i in range(4))
        self.finished_layers = [bool(f) for f in finished]
        self.hist = [h if has else None for h, has in zip(hist, has_hist)]
        if any(picked):
            self.picked = [p or bool(new) for p, new in zip(self.picked, picked)]
            self.picked_at = self.updates
        if all(self.finished_layers):
            self.stopped_at = self.iteration

    def _per_layer(self, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """A per-channel vector as a ``(layers, widest layer)`` matrix padded with ``fill``: per-layer
        sums and maxima as plain row reductions, in a fixed order (no atomic adds, whose order on a
        GPU varies: every rank must see the same magnitude ratios to stop at the same update)."""
        out = values.new_full((len(self.widths), max(self.widths)), fill)
        return out.index_put_((self._layer, self._slot), values)

    # -- what it decides, state, reporting -----------------------------------------------------

    @torch.no_grad()
    def channel_gates(self) -> torch.Tensor:
        """The pruned sets as gates (0 removed): GReg-1's from the start, GReg-2's once picked
        (before that, every channel is kept: nothing is decided yet)."""
        return torch.cat([(~p).float() if picked else torch.ones(len(p), device=p.device)
                          for p, picked in zip(self.pruned, self.picked)])

    def state_dict(self) -> dict:
        return dict(reg=[r.clone() for r in self.reg], pruned=[p.clone() for p in self.pruned],
                    picked=list(self.picked), hist=list(self.hist), finished_layers=list(self.finished_layers),
                    iteration=self.iteration, updates=self.updates, picked_at=self.picked_at,
                    stopped_at=self.stopped_at, done=self.done)

    def load_state_dict(self, state: dict) -> list[str]:
        self._reg.copy_(torch.cat(state["reg"]))
        self._pruned.copy_(torch.cat(state["pruned"]))
        self.picked, self.hist = list(state["picked"]), list(state["hist"])
        self.finished_layers = list(state["finished_layers"])
        self.iteration, self.updates = state["iteration"], state["updates"]
        self.picked_at, self.stopped_at, self.done = state["picked_at"], state["stopped_at"], state["done"]
        self._to_device()
        return []

    def _means(self) -> tuple[float, float, float]:
        """(mean coefficient of the pruned filters, of the kept ones, smallest magnitude ratio), over
        the layers that prune."""
        pruned = [r[p] for r, p, ratio in zip(self.reg, self.pruned, self.ratios) if ratio > 0 and p.any()]
        kept = [r[~p] for r, p, ratio in zip(self.reg, self.pruned, self.ratios) if ratio > 0]
        mean = lambda parts: float(torch.cat(parts).mean()) if parts else 0.0  # noqa: E731
        ratios = [h for h in self.hist if h is not None]
        return mean(pruned), mean(kept), min(ratios) if ratios else float("nan")

    def progress_scalars(self, progress: float) -> dict:
        pruned, kept, ratio = self._means()
        return {"greg/reg_pruned": pruned, "greg/reg_kept": kept, "greg/mag_ratio_min": ratio,
                "greg/layers_stopped": float(sum(self.finished_layers))}

    def log_epoch(self, writer, step: int, kept: list[int]) -> None:
        for layer, h, reg in zip(self.model.gated_layers, self.hist, self.reg):
            if h is not None:
                writer.add_scalar(f"greg/mag_ratio/{layer.name}", h, step)
            writer.add_scalar(f"greg/reg_max/{layer.name}", float(reg.max()), step)

    def results(self) -> dict:
        pruned, kept, ratio = self._means()
        return dict(method=self.name, pruning_phase=dict(
            iterations=self.iteration, updates=self.updates, picked_at_update=self.picked_at,
            stopped_at_iteration=self.stopped_at, done=self.done, reg_pruned_mean=pruned, reg_kept_mean=kept,
            mag_ratio=[h for h in self.hist], reg_max=[float(r.max()) for r in self.reg]))

    def epoch_message(self, epoch: int, results: dict) -> str | None:
        pruned, kept, ratio = self._means()
        state = self._phase_state("done")
        return (f"greg: iteration {self.iteration}, {self.updates} updates, {state}; coefficient pruned "
                f"{pruned:.3g} kept {kept:.3g}, smallest magnitude ratio {ratio:.3g}")


def unstructured_summary(model, names: list[str], pruned: list[int], decided: bool = True) -> dict:
    """``results.json``'s ``unstructured``: the weights in the pruned sets of the layers ``names``
    (``pruned`` per layer) against every conv and linear weight of the network, the zeros measured
    now, and the cost the zeros would save on hardware that skips them."""
    counts = dict(zip(names, pruned))
    sizes = {w.name: model.get_submodule(w.name).weight.numel() for w in model.weight_layers}
    total, removed = sum(sizes.values()), sum(pruned)
    with torch.no_grad():
        zeros = sum(int((model.get_submodule(name).weight == 0).sum()) for name in sizes)
    macs_nonzero, params_nonzero = sparse_cost(model, [w.name for w in model.weight_layers])
    return dict(
        wg="weight", sets_decided=decided, weights=total, pruned_weights=removed, weight_sparsity=removed / total,
        zero_weights=zeros, layer_sparsity={name: counts.get(name, 0) / size for name, size in sizes.items()},
        params_nonzero=params_nonzero, macs_nonzero=macs_nonzero,
        structure=("unchanged: unstructured pruning keeps every layer's shape, so macs_pruned and params_pruned "
                   "are the dense network's; weight_sparsity is the fraction of conv and linear weights that are "
                   "exact zeros (pruned_weights of weights); params_nonzero / macs_nonzero count only the "
                   "non-zero weights"))


class GRegUnstructured(_RegularizationPhase):
    """The regularisation phase of GReg-1 (``variant=1``) or GReg-2 (``variant=2``) with GReg's
    ``--wg weight``: one coefficient per weight, ``ratios`` one per weight layer (the model's
    ``weight_layers``).

    Within a layer the code's per-weight coefficients only ever hold two values, one shared by the
    pruned weights and one by the kept ones (GReg-2's phase 1: one for all), so they are kept as
    two float32 numbers per layer (``reg_pruned``, ``reg_kept``), updated and compared with the
    limits in float32 exactly as the code's tensor is, and expanded once per update into the
    tensor that multiplies the weights in the gradient: no transfer from the device during the
    phase, and the same coefficients, gradients and stop counts as the code.
    """

    def __init__(self, model, ratios: list[float], variant: int, update_interval: int, stabilize_interval: int,
                 upper_limit: float = 1.0, upper_limit_pick: float = 1e-2, granularity_pick: float = 1e-5,
                 granularity_prune: float = 1e-4, granularity_recover: float = -1e-4, pick_rule: str = "min",
                 generator: torch.Generator | None = None):
        super().__init__(model, ratios, variant, update_interval, stabilize_interval, upper_limit, upper_limit_pick,
                         granularity_pick, granularity_prune, granularity_recover)
        records = model.weight_layers
        if len(ratios) != len(records):
            raise ValueError(f"{len(ratios)} ratios for {len(records)} weight layers")
        self.names = [w.name for w in records]
        self.weights = [model.get_submodule(name).weight for name in self.names]
        # A ratio-0 layer prunes nothing (and a one-weight layer cannot lose its only weight).
        self.counts = [pruned_count(w.numel(), r) if r > 0 else 0 for w, r in zip(self.weights, self.ratios)]
        self.prunes = [c > 0 for c in self.counts]
        # The pruned sets, flat in the weights' logical order; GReg-1's from the pretrained weights.
        self.pruned = [torch.zeros(w.numel() if p else 0, dtype=torch.bool, device=w.device)
                       for w, p in zip(self.weights, self.prunes)]
        if variant == 1:
            for w, p, n in zip(self.weights, self.pruned, self.counts):
                if n:
                    p[pick(w.detach().abs().flatten(), n, pick_rule, generator).to(p.device)] = True
        zero = torch.zeros((), dtype=torch.float32)
        self.reg_pruned = [zero.clone() for _ in self.names]
        self.reg_kept = [zero.clone() for _ in self.names]
        self.coefficients = [None] * len(self.names)
        self.picked = [variant == 1 or not p for p in self.prunes]
        self.finished_layers = [False] * len(self.names)

    # -- the loop's hooks ----------------------------------------------------------------------

    @torch.no_grad()
    def after_backward(self) -> None:
        for w, coefficient in zip(self.weights, self.coefficients):
            if coefficient is not None and w.grad is not None:
                w.grad.add_(coefficient.view(w.shape) * w)  # the code's grad += reg * W, two roundings

    def _end(self) -> None:
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Set the pruned weights to 0 (the code's ``_get_masks`` and ``apply_mask_forward``)."""
        for w, p in zip(self.weights, self.pruned):
            if p.numel():
                w.mul_((~p).view(w.shape))

    # -- the coefficient update ----------------------------------------------------------------

    def _reg_max(self, layer: int) -> torch.Tensor:
        """The largest coefficient of the layer (float32): the pruned weights' value, and the kept
        weights' where there are any (there always are: at most N - 1 are pruned)."""
        if self.variant == 2 and not self.picked[layer]:
            return self.reg_pruned[layer]  # phase 1: one value for all
        return torch.maximum(self.reg_pruned[layer], self.reg_kept[layer])

    @torch.no_grad()
    def _update(self) -> None:
        """One update of every layer that has not stopped, in network order as the code's
        ``_update_reg``: GReg-1 ``_greg_1``, GReg-2 ``_greg_2`` (``reg_pruner.py:141-299``)."""
        self.updates += 1
        any_picked = False
        for layer in range(len(self.names)):
            if self.finished_layers[layer]:
                continue
            if not self.prunes[layer]:
                self.finished_layers[layer] = True  # ratio 0: stops at once, lambda = 0
                continue
            if self.variant == 1:
                self.reg_pruned[layer] = self.reg_pruned[layer] + self.granularity_prune
            elif self.picked[layer]:
                self.reg_pruned[layer] = self.reg_pruned[layer] + self.granularity_prune
                self.reg_kept[layer] = torch.tensor(self.granularity_recover, dtype=torch.float32)
            else:
                self.reg_pruned[layer] = self.reg_pruned[layer] + self.granularity_pick
                self.reg_kept[layer] = self.reg_pruned[layer].clone()
                if bool(self.reg_pruned[layer] >= self.upper_limit_pick):
                    # The pick: the smallest |w| of the weights as they are now.
                    w, p = self.weights[layer], self.pruned[layer]
                    p.zero_()
                    p[pick(w.detach().abs().flatten(), self.counts[layer], "min").to(p.device)] = True
                    self.picked[layer] = any_picked = True
            if self.picked[layer] and bool(self._reg_max(layer) > self.upper_limit):
                self.finished_layers[layer] = True
            self._expand(layer)
        if any_picked:
            self.picked_at = self.updates
        if all(self.finished_layers):
            self.stopped_at = self.iteration

    def _expand(self, layer: int) -> None:
        """The layer's coefficient tensor from its two values."""
        p = self.pruned[layer]
        if not self.picked[layer]:
            self.coefficients[layer] = torch.full(p.shape, float(self.reg_pruned[layer]), device=p.device)
            return
        pruned, kept = (torch.tensor(float(v), device=p.device) for v in (self.reg_pruned[layer], self.reg_kept[layer]))
        self.coefficients[layer] = torch.where(p, pruned, kept)

    # -- what it decides, state, reporting -----------------------------------------------------

    @torch.no_grad()
    def channel_gates(self) -> torch.Tensor:
        """Every channel stays: unstructured pruning removes none."""
        return torch.ones(sum(self.model.gates.widths), device=self.weights[0].device)

    def state_dict(self) -> dict:
        return dict(layers=list(self.names), pruned=[p.cpu().clone() for p in self.pruned],
                    reg_pruned=[float(v) for v in self.reg_pruned], reg_kept=[float(v) for v in self.reg_kept],
                    picked=list(self.picked), finished_layers=list(self.finished_layers), iteration=self.iteration,
                    updates=self.updates, picked_at=self.picked_at, stopped_at=self.stopped_at, done=self.done)

    def load_state_dict(self, state: dict) -> list[str]:
        if state["layers"] != self.names:
            raise UsageError("the checkpoint's regularisation phase has other layers than this network")
        for p, saved in zip(self.pruned, state["pruned"]):
            p.copy_(saved)
        self.reg_pruned = [torch.tensor(v, dtype=torch.float32) for v in state["reg_pruned"]]
        self.reg_kept = [torch.tensor(v, dtype=torch.float32) for v in state["reg_kept"]]
        self.picked, self.finished_layers = list(state["picked"]), list(state["finished_layers"])
        self.iteration, self.updates = state["iteration"], state["updates"]
        self.picked_at, self.stopped_at, self.done = state["picked_at"], state["stopped_at"], state["done"]
        for layer in range(len(self.names)):  # as the last update left them
            self.coefficients[layer] = None
            if self.prunes[layer] and self.updates:
                self._expand(layer)
        return []

    def _means(self) -> tuple[float, float]:
        """(mean coefficient of the pruned weights, of the kept ones) over the layers that prune."""
        layers = [i for i, p in enumerate(self.prunes) if p]
        if not layers:
            return 0.0, 0.0
        pruned = sum(float(self.reg_pruned[i]) * self.counts[i] for i in layers) / sum(self.counts[i] for i in layers)
        kept_n = [self.weights[i].numel() - self.counts[i] if self.picked[i] else self.weights[i].numel() for i in layers]
        kept_v = [float(self.reg_kept[i]) for i in layers]
        kept = sum(v * n for v, n in zip(kept_v, kept_n)) / max(sum(kept_n), 1)
        return pruned, kept

    def progress_scalars(self, progress: float) -> dict:
        pruned, kept = self._means()
        return {"greg/reg_pruned": pruned, "greg/reg_kept": kept, "greg/layers_stopped": float(sum(self.finished_layers))}

    def log_epoch(self, writer, step: int, kept: list[int]) -> None:
        for layer, name in enumerate(self.names):
            if self.prunes[layer]:
                writer.add_scalar(f"greg/reg_max/{name}", float(self._reg_max(layer)), step)

    def results(self) -> dict:
        pruned, kept = self._means()
        decided = all(self.picked)
        return dict(method=self.name, pruning_phase=dict(
            wg="weight", iterations=self.iteration, updates=self.updates, picked_at_update=self.picked_at,
            stopped_at_iteration=self.stopped_at, done=self.done, reg_pruned_mean=pruned, reg_kept_mean=kept,
            reg_max=[float(self._reg_max(i)) for i in range(len(self.names))]),
            unstructured=unstructured_summary(self.model, self.names, self.counts, decided))

    def epoch_message(self, epoch: int, results: dict) -> str | None:
        pruned, kept = self._means()
        state = self._phase_state("done: the pruned weights are zero")
        sparsity = results.get("unstructured", {}).get("weight_sparsity", float("nan"))
        return (f"greg (single weights): iteration {self.iteration}, {self.updates} updates, {state}; coefficient "
                f"pruned {pruned:.3g} kept {kept:.3g}; weight sparsity {sparsity:.4f}")


class MaskedFineTune(PruningMethod):
    """Fine-tuning the result of unstructured GReg: after every optimiser step the pruned weights are
    set back to 0 (GReg's ``main.py:519-521``, ``apply_mask_forward``: the weights only; their
    momentum is left as the code leaves it, which changes no kept weight). ``pruned``: per layer
    name, its pruned set (flat, the weight's logical order)."""

    def __init__(self, model, pruned: dict, name: str = "greg"):
        super().__init__(model)
        self.name = name
        self.names = [n for n, p in pruned.items() if p.numel()]
        self.weights = [model.get_submodule(n).weight for n in self.names]
        self.keep = [(~pruned[n]).to(w.device).view(w.shape) for n, w in zip(self.names, self.weights)]
        self.counts = {n: int(pruned[n].sum()) for n in self.names}
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        if self.weights:
            torch._foreach_mul_(self.weights, self.keep)

    def after_step(self, iteration: int) -> None:
        self.apply_masks()

    def results(self) -> dict:
        return dict(super().results(), unstructured=unstructured_summary(
            self.model, self.names, [self.counts[n] for n in self.names]))

    def epoch_message(self, epoch: int, results: dict) -> str | None:
        summary = results["unstructured"]
        return (f"{summary['zero_weights']} of {summary['weights']} conv and linear weights are 0 (weight sparsity "
                f"{summary['weight_sparsity']:.4f}); the network keeps its shape, MACs and parameter count")


def run(spec, job) -> int:
    """Every phase of ``prune.py --method greg1 / greg2`` (``spec``: its declaration, pruning/specs.py):
    the regularisation phase through the engine in ``<run>/regularize/`` (its pruned.pt is the cut
    network), then GReg's fine-tuning."""
    args = job.args
    target = plan(spec, job)
    phase_dir = job.run_dir / "regularize"
    unstructured = args.wg == "weight"
    if not (job.run_dir / "last.pt").exists():
        config = job.config(spec.settings + GREG_SETTINGS, batch_size=args.batch_size_prune, lr=args.lr_prune,
                            epochs=REGULARIZE_EPOCHS, out_dir=str(phase_dir))

        def method(model, config):
            generator = torch.Generator().manual_seed(config.seed)
            if unstructured:
                return GRegUnstructured(model, args.layer_ratios, spec.variant, args.update_reg_interval,
                                        args.stabilize_reg_interval, args.reg_upper_limit,
                                        args.reg_upper_limit_pick, args.reg_granularity_pick,
                                        args.reg_granularity_prune, args.reg_granularity_recover,
                                        args.pick_pruned, generator)
            return GReg(model, args.layer_ratios, spec.variant, args.update_reg_interval,
                        args.stabilize_reg_interval, args.reg_upper_limit, args.reg_upper_limit_pick,
                        args.reg_granularity_pick, args.reg_granularity_prune, args.reg_granularity_recover,
                        args.mag_ratio_limit, args.pick_pruned, generator)

        status = job.train(config, method, start=job.source, results_file="regularize.json",
                           extra_results=dict(phase="regularize", stage_pr=args.stage_pr,
                                              target_macs=args.target_macs, layer_ratios=args.layer_ratios))
        if status != 0:
            return status
    phase = job.read_checkpoint(phase_dir / "last.pt")
    args.seed = phase["args"]["seed"]  # the run's, when continued
    extra = dict(spec.results(args, target), pruning_phase=(phase["results"] or {}).get("pruning_phase"),
                 greg={key: getattr(args, key) for key in GREG_SETTINGS})
    if not unstructured:
        return spec.fine_tune(job, phase_dir / "pruned.pt", extra)
    pruned = dict(zip(phase["method"]["layers"], phase["method"]["pruned"]))
    return spec.fine_tune(job, phase_dir / "pruned.pt", extra,
                          method=lambda model, _: MaskedFineTune(model, pruned, spec.name))
