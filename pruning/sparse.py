r"""Unstructured sparse training at a parameter budget: DSR, SET, DeepR, static sparse, and iterative
magnitude pruning (IMP), as the code of Mostafa & Wang (ICML 2019, IntelAI/dynamic-reparameterization)
runs them.

**Sparse tensors** (:func:`sparse_layers`): every conv and linear layer except the stem conv and the
1x1 projection shortcuts (the paper's rule, and its code's ResNet50); the classifier is sparse on
ResNet50, as in the method's ResNet50, and dense on the CIFAR models, as in the method's CIFAR network
(WRN-28-2, whose ``fc`` is a plain ``nn.Linear``); each network declares it (the layer records' roles
and ``sparse_classifier``; LeNet-300-100 has every layer sparse). BatchNorm and biases stay dense. Masks are per
weight (the code's ``--sub-kernel-granularity 4``, every published run).

**Start** (:func:`initial_masks`): in every sparse tensor of n weights, int(d·n + 0.1) positions
active, drawn uniformly at random, the same density d everywhere; every conv He-normal with fan-out,
:math:`\mathcal N(0, 2/(k^2 C_{out}))`, every linear layer (the classifier, LeNet-300-100's hidden
layers) PyTorch's U(±1/sqrt(fan_in)) with zero bias, BN 1 and 0.

**Masks are exact.** After backward the gradients of inactive weights are zeroed (what the code's
forward, which multiplies each weight by its mask, gives them), and after every optimiser step each
sparse weight and its momentum buffer are multiplied by the mask, so an inactive weight, and its
momentum, is exactly 0. A weight regrown by a rule below starts at 0 with a zero momentum.

**Reallocation rules** (every rule changes the masks only; the next :meth:`SparseMethod.apply_masks`
zeroes what they dropped):

- **DSR** (:class:`DSR`), after the step of every global iteration t ≠ 0 with t mod P = 0 while the
  epoch < the stop epoch: (1) each tensor l drops its active weights with :math:`|w| < H`
  (:func:`drop_below`; if all would go the first one stays), :math:`K_l` of them, :math:`R_l`
  survive; (2) :math:`K = \sum_l K_l` weights regrow at random inactive positions other than the ones
  just dropped, tensor l receiving round(:math:`K R_l / \sum R`) of what is left to place, the rounding
  difference going to one tensor drawn at random, repeated until all K are placed
  (:func:`regrow_proportional`); (3) :math:`H \leftarrow H/2` if :math:`K > 1.1 N_p`,
  :math:`H \leftarrow 2H` if :math:`K < 0.9 N_p`, :math:`H_0 = 10^{-3}`.
- **SET** (:class:`SET`), on the same iterations: each tensor drops its int(f·M_l) + 1 smallest
  :math:`|w|` of its M_l active weights (:func:`drop_smallest`) and regrows as many at random in
  itself.
- **DeepR** (:class:`DeepR`), every step while the epoch < the stop epoch: the loss gets
  :math:`c \sum |w|` (c = 1e-5), the gradient of every active weight
  :math:`\mathcal N(0, \sqrt{2 \eta T})` noise; after the step the active weights whose sign differs
  from the sign recorded after the previous step are dropped (:func:`drop_sign_flipped`) and as many
  regrow at random. The signs are recorded from the initialised weights, not (as in the code) from a
  first initialisation the model then overwrites, which makes the code's first step drop about half
  of the active weights.
- **static** (:class:`StaticSparse`): the initial mask never changes.
- **IMP** (:class:`IMP`, ``prune.py --method imp``): from a trained dense network, at the end of
  epochs 0, 2, ..., 2(K−1) each tensor drops its int(f_i·M_l) + 1 smallest active weights, with
  :math:`f = 1 - d^{1/K}` (exponential) or, with ``--cubic``, the fraction that takes the density
  from :math:`\delta_i` to :math:`\delta_{i+1}`, :math:`\delta_i = d + (1 - d)(1 - i/K)^3`; 10 epochs
  after the first prune of the last pair. d is the same for every tensor except where the network
  declares otherwise (``imp_densities``: LeNet-300-100's output layer stops at 0.1 below d = 0.1).

Schedules are the code's (``learning_schedules/*.yaml``): WRN-28-2's for the CIFAR models, ResNet50's
for ResNet50 (:data:`SCHEDULES`). :math:`N_p` is the same fraction of the sparse tensors' size as in
the code's setting (20,000 of WRN-28-2's 1,451,520 sparse weights; 400,000 of ResNet50's 22,724,608).

**Cost**: params = the non-zero weights of the sparse tensors + every dense parameter; MACs = per layer,
its non-zero weights × its output positions (:meth:`models.structure.CostModel.sparse`).
"""
from types import SimpleNamespace

import torch

from models.export import sparse_cost
from utils.cli import density_type, nonneg_float, nonneg_int, positive_float, positive_int
from utils.errors import UsageError

from .method import PruningMethod
from .registry import MethodSpec, register

METHODS = ("dsr", "set", "deepr", "static")


def schedule_value(schedule: dict, epoch: int):
    """The value of a ``{first epoch: value}`` schedule at ``epoch`` (the code's get_schedule_val)."""
    return schedule[max(k for k in schedule if k <= epoch)]


# The code's learning schedules and settings. "cifar" is WRN-28-2's (wrnet_*.yaml), used for VGG16 and
# ResNet56 unchanged: both train on CIFAR with the same batch (100) and so the same iterations per epoch.
SCHEDULES = {
    "cifar": dict(
        reference_sparse_weights=1_451_520, n_prune_params=20_000, stop_rewire_epoch=190,
        rewire_periods={0: 100, 25: 200, 80: 400, 140: 800},
        deepr_temperatures={0: 1e-5, 25: 1e-8, 80: 1e-12, 140: 1e-15},
        # SET's --rewire-fraction by density (wrnet_experiments.yaml: sparsity 0.9 ... 0.5).
        set_fractions={0.1: 0.138, 0.2: 0.07, 0.3: 0.046, 0.4: 0.034, 0.5: 0.028},
        train=dict(epochs=200, lr=0.1, milestones=(60, 120, 160), lr_decay=0.2, weight_decay=5e-4, batch_size=100),
        long=dict(epochs=400, milestones=(120, 220, 350)),  # static sparse (wrnet_schedule_long.yaml)
        deepr=dict(weight_decay=0.0),
        imp=dict(lr={0: 0.0, 1: 0.02, 25: 0.004, 35: 0.0008}, weight_decay=1e-4, batch_size=100),
    ),
    "imagenet": dict(
        reference_sparse_weights=22_724_608, n_prune_params=400_000, stop_rewire_epoch=95,
        rewire_periods={0: 1000, 25: 2000, 50: 4000, 75: 8000},
        deepr_temperatures={0: 1e-5, 25: 1e-8, 50: 1e-12, 75: 1e-15},
        set_fractions={0.2: 0.089, 0.1: 0.14},  # resnet_experiments.yaml
        train=dict(epochs=100, lr=0.1, milestones=(30, 60, 90), lr_decay=0.1, weight_decay=1e-4, batch_size=256),
        long=dict(epochs=200, milestones=(60, 120, 180)),
        deepr=dict(),  # its ResNet50 DeepR command keeps the default weight decay, 1e-4
        imp=dict(lr={0: 0.0, 1: 0.01, 25: 0.001, 35: 0.0001}, weight_decay=1e-4, batch_size=256),
    ),
}
THRESHOLD_START = 1e-3
DEEPR_ETA = 0.01
DEEPR_L1 = 1e-5


def training_recipe(kind: str, method: str) -> dict:
    """The Recipe fields of ``--sparse method`` on ``kind`` ('cifar' or 'imagenet') data: the code's
    schedule (Nesterov SGD; static sparse the long one; DeepR's CIFAR runs without weight decay)."""
    schedule = SCHEDULES[kind]
    fields = dict(schedule["train"], fine_tune_epochs=0, nesterov=True)
    if method == "static":
        fields.update(schedule["long"])
    if method == "deepr":
        fields.update(schedule["deepr"])
    return fields


def sparse_layers(model) -> list:
    """The weight-layer records whose weights are sparse (see the module docstring)."""
    return [w for w in model.weight_layers if w.role == "body" or (w.role == "classifier" and model.sparse_classifier)]


def default_n_prune_params(kind: str, sparse_weights: int) -> int:
    """N_p: the code's number scaled by this network's sparse weights against the code's network's."""
    schedule = SCHEDULES[kind]
    return max(1, round(schedule["n_prune_params"] * sparse_weights / schedule["reference_sparse_weights"]))


def default_rewire_fraction(kind: str, density: float) -> float | None:
    """SET's fraction for ``density`` from the code's experiments, or None where it has none."""
    for d, fraction in SCHEDULES[kind]["set_fractions"].items():
        if abs(d - density) < 1e-9:
            return fraction
    return None


def active_count(n: int, density: float) -> int:
    """Active weights of a tensor of ``n`` at ``density``: the code's int(d·n + 0.1)."""
    return int(density * n + 0.1)


# -- the rules, on one tensor (flat weights, flat bool mask) --------------------------------------


def initial_masks(sizes: list[int], density: float, generator: torch.Generator) -> list[torch.Tensor]:
    """A uniformly random mask with :func:`active_count` active positions per tensor (flat, bool, CPU)."""
    masks = []
    for n in sizes:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.randperm(n, generator=generator)[:active_count(n, density)]] = True
        masks.append(mask)
    return masks


def drop_below(weight: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """DSR: the active positions with |w| < threshold, all but the first if that is every active one.
    Removes them from ``mask``; returns them."""
    active = mask.nonzero().flatten()
    dropped = active[weight[active].abs() < threshold]
    if dropped.numel() == active.numel():
        dropped = dropped[1:]
    mask[dropped] = False
    return dropped


def drop_smallest(weight: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """SET and IMP: the int(fraction·M) + 1 active positions of smallest |w| (M active).
    Removes them from ``mask``; returns them."""
    active = mask.nonzero().flatten()
    order = weight[active].abs().argsort(stable=True)
    dropped = active[order[:int(fraction * active.numel()) + 1]]
    mask[dropped] = False
    return dropped


def drop_sign_flipped(weight: torch.Tensor, mask: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """DeepR: the active positions whose sign is opposite to ``signs`` (a recorded sign of 0, a
    weight regrown at 0, never counts). Removes them from ``mask``; returns them."""
    dropped = (mask & (torch.sign(weight) * signs < -0.5)).nonzero().flatten()
    mask[dropped] = False
    return dropped


def sample_without_replacement(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` distinct indices of ``range(n)``, every k-subset equally likely (CPU, long). A permutation
    of n when k is a sizeable part of it; else draws with replacement, keeping each index's first
    draw in draw order, until k are distinct: O(k) where a permutation of ResNet50's 18M inactive
    weights would cost a second a step (DeepR regrows a few weights every step)."""
    if 4 * k >= n:
        return torch.randperm(n, generator=generator)[:k]
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < k:
        merged = torch.cat([chosen, torch.randint(n, (2 * (k - chosen.numel()) + 8,), generator=generator)])
        unique, inverse = torch.unique(merged, return_inverse=True)
        first = torch.full((unique.numel(),), merged.numel(), dtype=torch.long)
        first.scatter_reduce_(0, inverse, torch.arange(merged.numel()), reduce="amin")
        chosen = unique[first.argsort()][:k]
    return chosen


def grow_random(mask: torch.Tensor, excluded: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Activate ``count`` positions drawn uniformly among the inactive ones not in ``excluded`` (fewer if
    fewer are free, as the code does); returns them."""
    if count <= 0:
        return excluded.new_empty(0)
    free = ~mask
    free[excluded] = False
    candidates = free.nonzero().flatten()
    count = min(int(count), candidates.numel())
    grown = candidates[sample_without_replacement(candidates.numel(), count, generator).to(candidates.device)]
    mask[grown] = True
    return grown


def regrow_proportional(masks: list[torch.Tensor], dropped: list[torch.Tensor],
                        generator: torch.Generator) -> list[int]:
    """DSR's regrowth of every dropped weight: each pass gives tensor l round(left·R_l/ΣR) (R_l its
    surviving weights, counted once before the first pass), the rounding difference to one tensor
    drawn at random (clamped at 0), until all are placed or no tensor has room. Returns the number
    grown per tensor.

    Two departures keep the budget exact where the code's loop does not: a clamped difference that
    leaves more to grow than was dropped is taken back one weight at a time from tensors drawn at
    random (the code grows the excess); and after a pass that places nothing because the tensors it
    chose are full, the shares are renormalised over the tensors with room (the code draws again, or
    loops forever when no rounding difference is left to draw)."""
    total = sum(d.numel() for d in dropped)
    shares = torch.tensor([float(m.sum()) for m in masks], dtype=torch.float64)
    shares /= shares.sum()
    grown = [0] * len(masks)
    placed = 0
    while placed < total:
        left = total - placed
        counts = torch.round(shares * left).long()
        difference = left - int(counts.sum())
        if difference:
            lucky = int(torch.randint(len(masks), (), generator=generator))
            counts[lucky] = max(0, int(counts[lucky]) + difference)
        while int(counts.sum()) > left:
            candidates = counts.nonzero().flatten()
            counts[candidates[int(torch.randint(candidates.numel(), (), generator=generator))]] -= 1
        added = 0
        for layer, (mask, excluded) in enumerate(zip(masks, dropped)):
            n = grow_random(mask, excluded, int(counts[layer]), generator).numel()
            grown[layer] += n
            added += n
        placed += added
        if added == 0:
            room = torch.tensor([float((~m).sum()) - float((~m)[d].sum()) for m, d in zip(masks, dropped)],
                                dtype=torch.float64)
            if not bool((room > 0).any()):
                break  # every tensor is full
            shares = torch.where(room > 0, shares, torch.zeros_like(shares))
            shares = shares / shares.sum() if float(shares.sum()) > 0 else (room > 0).double() / float((room > 0).sum())
    return grown


def imp_fraction(iteration: int, iterations: int, density: float, cubic: bool) -> float:
    """The fraction of its active weights each tensor drops at prune ``iteration`` (0-based) of
    ``iterations`` to reach ``density``: exponential 1 − d^(1/K), or the cubic schedule's step."""
    if not cubic:
        return 1.0 - density ** (1.0 / iterations)
    sparsity = 1.0 - density

    def remaining(i):
        return 1.0 - sparsity + sparsity * (1.0 - i / iterations) ** 3

    return 1.0 - remaining(iteration + 1) / remaining(iteration)


# -- the methods ----------------------------------------------------------------------------------


class SparseMethod(PruningMethod):
    """Per-weight masks on the sparse tensors, re-applied after every optimiser step; no rewiring.

    ``density`` None starts with every weight active (IMP); else a random mask at ``density`` and,
    with ``initialize``, the code's initialisation. ``seed`` seeds the method's own generator
    (positions, the rounding draw, DeepR's noise), the same on every rank, so masks agree across
    torchrun processes; its state is checkpointed."""

    name = "sparse"
    network_name = "active weights per sparse tensor"

    def __init__(self, model, density: float | None, seed: int, initialize: bool = True):
        super().__init__(model)
        self.layers = sparse_layers(model)
        self.weights = [model.get_submodule(w.name).weight for w in self.layers]
        self.density = density
        self.generator = torch.Generator().manual_seed(seed)
        device = self.weights[0].device
        if density is None:
            masks = [torch.ones(w.numel(), dtype=torch.bool) for w in self.weights]
        else:
            masks = initial_masks([w.numel() for w in self.weights], density, self.generator)
        # Contiguous (the weights' logical order) whatever the weights' memory format.
        self.masks = [m.view(w.shape).to(device) for m, w in zip(masks, self.weights)]
        if density is not None and initialize:
            self._initialize()
        self.optimizer = None
        self.epoch = 0
        self.reallocated_epoch = 0       # weights reallocated since the epoch began
        self.events = []                 # (iteration, reallocated, threshold) not yet logged
        self.apply_masks()

    @torch.no_grad()
    def _initialize(self) -> None:
        for record in self.model.weight_layers:
            layer = self.model.get_submodule(record.name)
            # Every linear layer as the code's (an nn.Linear head, or DynamicLinear's U(±1/sqrt(fan_in)),
            # the same distribution: LeNet-300-100's hidden layers), with a zero bias where there is one.
            if isinstance(layer, torch.nn.Linear):
                layer.reset_parameters()
                if layer.bias is not None:
                    layer.bias.zero_()
            else:
                layer.weight.normal_(0.0, (2.0 / (record.kernel ** 2 * record.out_channels)) ** 0.5)
                if layer.bias is not None:
                    layer.bias.zero_()

    # -- the engine's hooks ------------------------------------------------------------------

    def attach_optimizer(self, optimizer) -> None:
        self.optimizer = optimizer

    def changes_gradients(self) -> bool:
        return True

    @torch.no_grad()
    def after_backward(self) -> None:
        """Zero the gradients of inactive weights: what the code's masked forward gives them, so that
        gradient clipping and DeepR's noise see the code's gradients."""
        pairs = [(w.grad, m) for w, m in zip(self.weights, self.masks) if w.grad is not None]
        if pairs:
            torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def after_step(self, iteration: int) -> None:
        self.apply_masks()
        self.reallocate(iteration)

    def reallocate(self, iteration: int) -> None:
        """Change the masks after the step of ``iteration`` (0-based, global); default: never."""

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every inactive weight and its momentum buffer."""
        torch._foreach_mul_(self.weights, self.masks)
        if self.optimizer is not None:
            buffers = [self.optimizer.state.get(w, {}).get("momentum_buffer") for w in self.weights]
            pairs = [(b, m) for b, m in zip(buffers, self.masks) if b is not None]
            if pairs:
                torch._foreach_mul_([b for b, _ in pairs], [m for _, m in pairs])

    def _flat(self):
        """(weights, masks) as flat tensors: weight copies to read, mask views to edit."""
        return [w.detach().reshape(-1) for w in self.weights], [m.view(-1) for m in self.masks]

    def _record(self, iteration: int, reallocated: int, threshold: float | None = None) -> None:
        self.reallocated_epoch += reallocated
        self.events.append((iteration, reallocated, threshold))

    # -- what it decides ---------------------------------------------------------------------

    def active(self) -> list[int]:
        return [int(m.sum()) for m in self.masks]

    def network_key(self) -> torch.Tensor:
        """The active weights per sparse tensor: best_top1 compares only epochs of the same size
        (IMP's prunes and DSR's moves between tensors start the comparison afresh)."""
        return torch.tensor(self.active())

    def cost(self, kept: torch.Tensor) -> tuple[int, int]:
        return sparse_cost(self.model, self.sparse_layer_names())

    def sparse_layer_names(self) -> list[str]:
        return [w.name for w in self.layers]

    # -- state and reporting -----------------------------------------------------------------

    def settings(self) -> dict:
        """The method's resolved settings, ``{flag: value}``: a run resumes only with the same."""
        return {"--density": self.density}

    def state_dict(self) -> dict:
        return dict(masks=[m.cpu().clone() for m in self.masks], generator=self.generator.get_state(),
                    epoch=self.epoch, reallocated_epoch=self.reallocated_epoch, events=list(self.events),
                    settings=self.settings())

    def load_state_dict(self, state: dict) -> list[str]:
        for flag, value in state["settings"].items():
            if self.settings().get(flag) != value:
                raise UsageError(f"the checkpoint's run used {flag} {value}, this command {self.settings().get(flag)}; "
                                 f"resume it with matching flags")
        self.masks = [m.to(w.device).view(w.shape).clone() for m, w in zip(state["masks"], self.weights)]
        self.generator.set_state(state["generator"])
        self.epoch, self.reallocated_epoch = state["epoch"], state["reallocated_epoch"]
        self.events = list(state["events"])
        self.apply_masks()
        return []

    def densities(self) -> list[float]:
        return [a / m.numel() for a, m in zip(self.active(), self.masks)]

    def log_epoch(self, writer, step: int, kept: list[int]) -> None:
        """``sparse/density/<layer>`` per epoch; per reallocation period the number of weights
        reallocated (``sparse/reallocated``, at its iteration) and DSR's threshold (``sparse/H``)."""
        for record, density in zip(self.layers, self.densities()):
            writer.add_scalar(f"sparse/density/{record.name}", density, step)
        for iteration, reallocated, threshold in self.events:
            writer.add_scalar("sparse/reallocated", reallocated, iteration + 1)
            if threshold is not None:
                writer.add_scalar("sparse/H", threshold, iteration + 1)
        writer.add_scalar("sparse/reallocated_per_epoch", self.reallocated_epoch, step)

    def results(self) -> dict:
        active = self.active()
        total = sum(m.numel() for m in self.masks)
        return dict(super().results(), method=self.name, density=self.density, density_active=sum(active) / total,
                    sparse_weights_active=sum(active), sparse_weights_total=total,
                    layer_densities={w.name: d for w, d in zip(self.layers, self.densities())})

    def epoch_message(self, epoch: int, results: dict) -> str | None:
        """The epoch's line; also closes the epoch's reallocation record (the last hook of an epoch,
        on every rank, before its checkpoint)."""
        message = (f"{self.name}: {results['sparse_weights_active']} of {results['sparse_weights_total']} sparse "
                   f"weights active (density {results['density_active']:.4f}), "
                   f"{self.reallocated_epoch} reallocated this epoch")
        self.reallocated_epoch, self.events = 0, []
        return message


class StaticSparse(SparseMethod):
    """Static sparse training: the initial random mask never changes."""

    name = "static"


class _PeriodicRewiring(SparseMethod):
    """DSR and SET: reallocate after the step of every global iteration t ≠ 0 with t mod P(epoch) = 0,
    while the epoch is below ``stop_epoch``."""

    def __init__(self, model, density: float, seed: int, periods: dict, stop_epoch: int, initialize: bool = True):
        super().__init__(model, density, seed, initialize)
        self.periods, self.stop_epoch = dict(periods), stop_epoch

    def reallocate(self, iteration: int) -> None:
        if iteration != 0 and self.epoch < self.stop_epoch and iteration % schedule_value(self.periods, self.epoch) == 0:
            self.rewire(iteration)


class DSR(_PeriodicRewiring):
    """Dynamic sparse reparameterization: a global magnitude threshold H, adapted to reallocate about
    N_p weights a period, and regrowth in proportion to each tensor's survivors."""

    name = "dsr"

    def __init__(self, model, density: float, seed: int, periods: dict, stop_epoch: int, n_prune_params: int,
                 initialize: bool = True):
        super().__init__(model, density, seed, periods, stop_epoch, initialize)
        self.n_prune_params = n_prune_params
        self.threshold = THRESHOLD_START

    @torch.no_grad()
    def rewire(self, iteration: int) -> None:
        weights, masks = self._flat()
        dropped = [drop_below(w, m, self.threshold) for w, m in zip(weights, masks)]
        regrow_proportional(masks, dropped, self.generator)
        reallocated = sum(d.numel() for d in dropped)
        self._record(iteration, reallocated, self.threshold)
        if reallocated > 1.1 * self.n_prune_params:
            self.threshold /= 2.0
        elif reallocated < 0.9 * self.n_prune_params:
            self.threshold *= 2.0
        self.apply_masks()

    def state_dict(self) -> dict:
        return dict(super().state_dict(), threshold=self.threshold)

    def load_state_dict(self, state: dict) -> list[str]:
        self.threshold = state["threshold"]
        return super().load_state_dict(state)

    def settings(self) -> dict:
        return dict(super().settings(), **{"--n-prune-params": self.n_prune_params,
                                           "--stop-rewire-epoch": self.stop_epoch})

    def results(self) -> dict:
        return dict(super().results(), threshold=self.threshold, n_prune_params=self.n_prune_params)


class SET(_PeriodicRewiring):
    """Sparse evolutionary training: each tensor replaces its int(f·M)+1 smallest weights by as many
    random ones."""

    name = "set"

    def __init__(self, model, density: float, seed: int, periods: dict, stop_epoch: int, fraction: float,
                 initialize: bool = True):
        super().__init__(model, density, seed, periods, stop_epoch, initialize)
        self.fraction = fraction

    @torch.no_grad()
    def rewire(self, iteration: int) -> None:
        weights, masks = self._flat()
        reallocated = 0
        for w, m in zip(weights, masks):
            dropped = drop_smallest(w, m, self.fraction)
            reallocated += grow_random(m, dropped, dropped.numel(), self.generator).numel()
        self._record(iteration, reallocated)
        self.apply_masks()

    def settings(self) -> dict:
        return dict(super().settings(), **{"--rewire-fraction": self.fraction, "--stop-rewire-epoch": self.stop_epoch})

    def results(self) -> dict:
        return dict(super().results(), rewire_fraction=self.fraction)


class DeepR(SparseMethod):
    """Deep rewiring: an L1 term and Gaussian gradient noise on the active weights every step; a weight
    whose sign flips is dropped and a random one regrows.

    The noise of step t comes from a generator on the weights' device seeded with (seed, t): no state
    to checkpoint, identical on every rank, and a run resumed on another kind of device goes on."""

    name = "deepr"

    def __init__(self, model, density: float, seed: int, temperatures: dict, stop_epoch: int,
                 eta: float = DEEPR_ETA, l1: float = DEEPR_L1, initialize: bool = True):
        super().__init__(model, density, seed, initialize)
        self.temperatures, self.stop_epoch, self.eta, self.l1 = dict(temperatures), stop_epoch, eta, l1
        self.signs = [torch.sign(w.detach()).view(-1).clone() for w in self.weights]
        # The code leaves fully dense tensors alone; DeepR keeps each tensor's count, so this holds for the run.
        self.rewired = [not bool(m.all()) for m in self.masks]
        self.noise_seed = int(torch.randint(2 ** 62, (), generator=self.generator))
        self.iteration = 0
        self._count_active()

    def _count_active(self) -> None:
        """Active weights per tensor, kept on the host so that a step needs no count from the device."""
        self.active_counts = self.active()

    def loss(self, progress: float) -> torch.Tensor | None:
        if self.l1 == 0:
            return None
        return self.l1 * torch.stack([w.abs().sum() for w in self.weights]).sum()

    def before_step(self, iteration: int) -> None:
        self.iteration = iteration

    @torch.no_grad()
    def after_backward(self) -> None:
        super().after_backward()
        if self.epoch >= self.stop_epoch:
            return
        std = (2.0 * self.eta * schedule_value(self.temperatures, self.epoch)) ** 0.5
        noise = torch.Generator(device=self.weights[0].device)
        noise.manual_seed((self.noise_seed + 1_000_003 * self.iteration) % 2 ** 63)
        for weight, mask, rewired in zip(self.weights, self.masks, self.rewired):
            if weight.grad is not None and rewired:
                draw = torch.randn(weight.shape, generator=noise, device=weight.device, dtype=weight.dtype)
                weight.grad.add_(draw.mul_(std).mul_(mask))

    @torch.no_grad()
    def reallocate(self, iteration: int) -> None:
        """Drop the active weights whose sign flipped, and regrow as many per tensor at random among
        its inactive positions other than the dropped ones (fewer if fewer are free).

        One transfer from the device per step: the number of flips per tensor. The flips are found,
        dropped and replaced on the device: the regrown positions are the largest of uniform keys
        drawn for the free positions (every k-subset of them equally likely), from a generator on the
        weights' device seeded with (seed, t) like the noise, so nothing waits for the host."""
        if self.epoch >= self.stop_epoch:
            return
        weights, masks = self._flat()
        layers = [layer for layer, rewired in enumerate(self.rewired) if rewired]
        if not layers:
            return
        flipped = []
        for layer in layers:
            sign = torch.sign(weights[layer])
            # A recorded sign of 0 (a weight regrown at 0) never counts as a flip.
            flipped.append(masks[layer] & (sign * self.signs[layer] < -0.5))
            self.signs[layer] = sign
        counts = torch.stack([f.sum() for f in flipped]).tolist()  # the step's one host sync
        if not any(counts):
            return
        grow = torch.Generator(device=masks[0].device)
        grow.manual_seed((self.noise_seed + 1_000_003 * self.iteration + 500_001) % 2 ** 63)
        reallocated = 0
        for layer, dropped, count in zip(layers, flipped, counts):
            if count == 0:
                continue
            mask = masks[layer]
            free = mask.numel() - self.active_counts[layer]  # inactive and not just dropped
            grown = min(count, free)
            mask &= ~dropped
            if grown:
                keys = torch.rand(mask.numel(), generator=grow, device=mask.device)
                keys.masked_fill_(mask | dropped, -1.0)
                chosen = keys.topk(grown, sorted=False).indices
                # Only positions that were free (key >= 0) open, whatever the count says.
                mask[chosen] |= keys[chosen] >= 0
            self.active_counts[layer] += grown - count
            reallocated += grown
        self.reallocated_epoch += reallocated
        self.apply_masks()  # zero what was dropped (after_step has masked the rest)

    def settings(self) -> dict:
        return dict(super().settings(), **{"--DeepR_eta": self.eta, "--L1-loss-coeff": self.l1,
                                           "--stop-rewire-epoch": self.stop_epoch})

    def state_dict(self) -> dict:
        return dict(super().state_dict(), signs=[s.cpu().clone() for s in self.signs], noise_seed=self.noise_seed)

    def load_state_dict(self, state: dict) -> list[str]:
        self.signs = [s.to(w.device) for s, w in zip(state["signs"], self.weights)]
        self.noise_seed = state["noise_seed"]
        warnings = super().load_state_dict(state)
        self._count_active()
        return warnings

    def results(self) -> dict:
        return dict(super().results(), deepr_eta=self.eta, l1_loss_coeff=self.l1)


class IMP(SparseMethod):
    """Iterative magnitude pruning of a trained dense network to ``density`` in ``iterations`` prunes,
    one at the end of every ``every``-th epoch from epoch ``start`` on."""

    name = "imp"

    def __init__(self, model, density: float, seed: int, iterations: int = 20, cubic: bool = False,
                 start: int = 0, every: int = 2):
        super().__init__(model, None, seed, initialize=False)
        self.target, self.iterations, self.cubic, self.start, self.every = density, iterations, cubic, start, every
        # One target for every tensor, but where the network declares otherwise (LeNet-300-100's output layer).
        self.targets = model.imp_densities(density, self.layers)
        self.prunes_done = 0

    def end_epoch(self, epoch: int) -> None:
        super().end_epoch(epoch)
        if epoch >= self.start and (epoch - self.start) % self.every == 0 and self.prunes_done < self.iterations:
            self.prune()

    @torch.no_grad()
    def prune(self) -> None:
        weights, masks = self._flat()
        pruned = sum(drop_smallest(w, m, imp_fraction(self.prunes_done, self.iterations, d, self.cubic)).numel()
                     for w, m, d in zip(weights, masks, self.targets))
        self.prunes_done += 1
        self.reallocated_epoch += pruned
        self.apply_masks()

    def settings(self) -> dict:
        return {"--density": self.target, "--prune-iterations": self.iterations, "--cubic": self.cubic}

    def state_dict(self) -> dict:
        return dict(super().state_dict(), prunes_done=self.prunes_done)

    def load_state_dict(self, state: dict) -> list[str]:
        self.prunes_done = state["prunes_done"]
        return super().load_state_dict(state)

    def results(self) -> dict:
        return dict(super().results(), density=self.target, prune_iterations=self.iterations, cubic=self.cubic,
                    prunes_done=self.prunes_done)

    def epoch_message(self, epoch: int, results: dict) -> str | None:
        pruned, self.reallocated_epoch, self.events = self.reallocated_epoch, 0, []
        return (f"imp: prune {self.prunes_done}/{self.iterations} done; {results['sparse_weights_active']} of "
                f"{results['sparse_weights_total']} sparse weights left (density {results['density_active']:.4f})"
                + (f", {pruned} pruned this epoch" if pruned else ""))


def check_density(model, density: float) -> None:
    """Refuse a density that leaves a sparse tensor without an active weight (one line)."""
    if not 0.0 < density <= 1.0:
        raise UsageError(f"--density {density:g}: must be in (0, 1]")
    for record in sparse_layers(model):
        n = model.get_submodule(record.name).weight.numel()
        if active_count(n, density) == 0:
            raise UsageError(f"--density {density:g} leaves {record.name} ({n} weights) with no active weight; "
                             f"the smallest density that keeps one is {(1 - 0.1) / n:.3g}")


def sparse_method(model, args, kind: str) -> SparseMethod:
    """The method of ``--sparse {dsr,set,deepr,static}`` with the training scripts' arguments, on
    ``kind`` ('cifar' or 'imagenet') data: the code's settings unless a flag overrides them."""
    check_density(model, args.density)
    schedule = SCHEDULES[kind]
    stop = schedule["stop_rewire_epoch"] if args.stop_rewire_epoch is None else args.stop_rewire_epoch
    periods = schedule["rewire_periods"]
    if args.sparse == "static":
        return StaticSparse(model, args.density, args.seed)
    if args.sparse == "dsr":
        total = sum(model.get_submodule(w.name).weight.numel() for w in sparse_layers(model))
        n_prune_params = args.n_prune_params or default_n_prune_params(kind, total)
        return DSR(model, args.density, args.seed, periods, stop, n_prune_params)
    if args.sparse == "set":
        fraction = args.rewire_fraction or default_rewire_fraction(kind, args.density)
        if fraction is None:
            known = ", ".join(f"{d:g}" for d in schedule["set_fractions"])
            raise UsageError(f"SET's code sets --rewire-fraction only for the densities {known}; give "
                             f"--rewire-fraction for --density {args.density:g}")
        return SET(model, args.density, args.seed, periods, stop, fraction)
    return DeepR(model, args.density, args.seed, schedule["deepr_temperatures"], stop, args.DeepR_eta,
                 args.L1_loss_coeff)


class SparseTraining(MethodSpec):
    """``--sparse {dsr,set,deepr,static}``: a dense network trained from scratch under per-weight masks,
    with the code's schedule for the data (``SCHEDULES``) unless a flag overrides it."""

    selected_by = ("--sparse", "")
    settings = ("net", "sparse", "density")
    summary = "unstructured sparse training (DSR, SET, DeepR, static)"
    flags = ("--density", "--n-prune-params", "--rewire-fraction", "--stop-rewire-epoch", "--DeepR_eta",
             "--L1-loss-coeff")
    # The gates' flags, which --sparse refuses (no published method both masks weights and gates channels).
    gate_flags = ("--lamba", "--reg", "--temp", "--back_dep", "--lr_gate", "--lr_adam", "--gen_optim",
                  "--target-macs", "--target-params", "--target-warmup", "--lr-lagrangian", "--fine_tune_epoch")
    # Flags that only one of the four methods takes.
    one_method_flags = {"--n-prune-params": "dsr", "--rewire-fraction": "set", "--DeepR_eta": "deepr",
                        "--L1-loss-coeff": "deepr"}

    def __init__(self, name: str):
        self.name = name
        self.selected_by = ("--sparse", name)

    def recipe_fields(self, recipe) -> dict:
        return training_recipe("imagenet" if recipe.imagenet else "cifar", self.name)

    def add_arguments(self, parser, **context) -> None:
        if "--density" in parser._option_string_actions:
            return  # the four methods share one group
        g = parser.add_argument_group("unstructured sparse training (instead of gates; pruning/sparse.py)")
        g.add_argument("--density", type=density_type, metavar="D",
                       help="fraction of every sparse tensor's weights active")
        g.add_argument("--n-prune-params", type=positive_int, metavar="N",
                       help="DSR's N_p: weights to reallocate per period (default: the code's 20,000 of WRN-28-2 or "
                            "400,000 of ResNet50, scaled by this network's sparse weights)")
        g.add_argument("--rewire-fraction", type=density_type, metavar="F",
                       help="SET's fraction of each tensor's active weights replaced per period (default: the code's "
                            "value for the density)")
        g.add_argument("--stop-rewire-epoch", type=nonneg_int, metavar="E",
                       help="no reallocation from epoch E on (default 190 CIFAR / 95 ImageNet)")
        g.add_argument("--DeepR_eta", type=positive_float, default=DEEPR_ETA,
                       help="DeepR's eta: the gradient noise has std sqrt(2 eta T)")
        g.add_argument("--L1-loss-coeff", type=nonneg_float, default=DEEPR_L1,
                       help="DeepR's L1 coefficient on the sparse weights")

    def own_flags(self) -> tuple[str, ...]:
        return self.flags

    def foreign_flag_message(self, flag: str, args) -> str:
        return f"{flag} belongs to unstructured sparse training: add --sparse {{{','.join(METHODS)}}}"

    def check(self, parser, args, given) -> None:
        if args.net not in (None, "dense"):
            parser.error(f"--sparse {args.sparse} does not combine with --net {args.net}: it masks single weights "
                         f"of a dense network, the gates remove whole channels, and no published method does both; "
                         f"leave --net out (or --net dense)")
        args.net = "dense"
        for flag in self.gate_flags:
            if flag in given:
                parser.error(f"{flag} belongs to the gates (L0-HC / Dep-L0); --sparse {args.sparse} trains "
                             f"without them")
        if args.density is None:
            parser.error(f"--sparse {args.sparse} needs --density D (the fraction of each sparse tensor's "
                         f"weights kept)")
        for flag, method in self.one_method_flags.items():
            if flag in given and args.sparse != method:
                parser.error(f"{flag} is {method}'s setting, not --sparse {args.sparse}'s")
        if "--stop-rewire-epoch" in given and args.sparse == "static":
            parser.error("--stop-rewire-epoch: static sparse training never reallocates")

    def run_label(self, args) -> str:
        return f"{self.name}_d{args.density:g}"

    def arch_options(self, args) -> dict:
        return dict(net="dense", back_dep=False, temperature=args.temp)

    def build(self, model, config) -> SparseMethod:
        return sparse_method(model, SimpleNamespace(**config.to_dict()), "imagenet" if config.imagenet else "cifar")


for _name in METHODS:
    register(SparseTraining(_name))
