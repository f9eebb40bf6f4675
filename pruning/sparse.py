r"""Unstructured sparse training at a parameter budget: DSR, SET, DeepR, static sparse, and iterative
magnitude pruning (IMP), as the code of Mostafa & Wang (ICML 2019, IntelAI/dynamic-reparameterization)
runs them.

**Sparse tensors** (:func:`sparse_layers`): every conv and linear layer except the stem conv and the
1x1 projection shortcuts (the paper's rule, and its code's ResNet50); the classifier is sparse on
ResNet50, as in the method's ResNet50, and dense on the CIFAR models, as in the method's CIFAR network
(WRN-28-2, whose ``fc`` is a plain ``nn.Linear``); each network declares it (the layer records' roles
and ``sparse_classifier``; LeNet-300-100 has every layer sparse). BatchNorm and biases stay dense. Masks are per
weight (the code's ``--sub-kernel-granularity 4``, every published run) or, with 2, per k x k kernel of
every conv; the code's other switches are :class:`SparseMethod`'s and the spec's (``--initial-sparsity-*``,
``--threshold-prune`` / ``--rewire-scaling`` alone, ``--L1-loss-coeff``, ``--conv-group-lasso``,
``--big-new-weights``, ``--sparse-resnet-downsample``, ``--copy-mask-from``, ``--schedule-file``); tied
weights (``--tied``) are pruning/tied.py's.

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
for ResNet50 (:data:`pruning.specs.SCHEDULES`, declared with ``--sparse``'s flags). :math:`N_p` is the
same fraction of the sparse tensors' size as in the code's setting (20,000 of WRN-28-2's 1,451,520
sparse weights; 400,000 of ResNet50's 22,724,608).

**Cost**: params = the non-zero weights of the sparse tensors + every dense parameter; MACs = per layer,
its non-zero weights × its output positions (:meth:`models.structure.CostModel.sparse`).
"""
import functools

import torch

from models.export import sparse_cost
from utils.errors import UsageError

from .method import PruningMethod
from .specs import DEEPR_ETA, DEEPR_L1, SCHEDULES

THRESHOLD_START = 1e-3


def schedule_value(schedule: dict, epoch: int):
    """The value of a ``{first epoch: value}`` schedule at ``epoch`` (the code's get_schedule_val)."""
    return schedule[max(k for k in schedule if k <= epoch)]


def sparse_layers(model, shortcuts: bool = False) -> list:
    """The weight-layer records whose weights are sparse (see the module docstring); with ``shortcuts``
    the 1x1 projection shortcuts too (the code's ``--sparse-resnet-downsample``, ResNet50 only)."""
    roles = ("body", "shortcut") if shortcuts else ("body",)
    return [w for w in model.weight_layers if w.role in roles or (w.role == "classifier" and model.sparse_classifier)]


def is_linear(model, record) -> bool:
    """Whether a sparse tensor is a linear layer's (the code's ``DynamicLinear``, which takes
    ``--initial-sparsity-fc``) rather than a conv's (``DynamicConv2d``, ``--initial-sparsity-conv``)."""
    return isinstance(model.get_submodule(record.name), torch.nn.Linear)


def layer_densities(model, layers, density: float | None, conv: float | None = None,
                    fc: float | None = None) -> list[float]:
    """Each sparse tensor's density: ``fc`` for a linear layer, ``conv`` for a conv, where given, else
    ``density``; a tensor left without one is refused (one line)."""
    out = []
    for record in layers:
        linear = is_linear(model, record)
        value = fc if linear else conv
        value = density if value is None else value
        if value is None:
            kind = "fc" if linear else "conv"
            raise UsageError(f"{record.name} is a {'linear' if linear else 'conv'} layer: give --density D or "
                             f"--initial-sparsity-{kind} S")
        out.append(value)
    return out


def mask_shape(weight: torch.Tensor, granularity: int) -> torch.Size:
    """The shape of a tensor's mask: one entry per weight (``--sub-kernel-granularity 4``), or with 2
    one per k x k kernel of a conv (the code's ``SparseTensor``: ``mask`` of ``size[:granularity]``;
    a linear layer's 2-d mask is per weight either way)."""
    return weight.shape[:2] if granularity == 2 and weight.dim() == 4 else weight.shape


def default_n_prune_params(kind: str, sparse_weights: int, granularity: int = 4) -> int:
    """N_p: the code's number (of weights; of kernels with ``granularity`` 2, its kernel runs') scaled by
    this network's sparse weights against the code's network's."""
    schedule = SCHEDULES[kind]
    code = schedule["n_prune_params"] if granularity == 4 else schedule["n_prune_params_kernels"]
    return max(1, round(code * sparse_weights / schedule["reference_sparse_weights"]))


def default_rewire_fraction(kind: str, density: float) -> float | None:
    """SET's fraction for ``density`` from the code's experiments, or None where it has none."""
    for d, fraction in SCHEDULES[kind]["set_fractions"].items():
        if abs(d - density) < 1e-9:
            return fraction
    return None


def sparsity_keys(results: dict) -> dict:
    """results.json's ``sparsity`` (1 - the density the run was set to: DSR's s), or ``sparsity_conv`` /
    ``sparsity_fc`` where the conv and linear tensors were set apart, and ``sparsity_active``, the share of
    the sparse (or tied) weights that are zero (or shared) now."""
    out = {}
    for key in ("", "_conv", "_fc"):
        density = results.get(f"density{key}")
        if density is not None:
            out[f"sparsity{key}"] = round(1.0 - density, 12)
    out["sparsity_active"] = 1.0 - results["density_active"]
    return out


def active_count(n: int, density: float) -> int:
    """Active weights of a tensor of ``n`` at ``density``: the code's int(d·n + 0.1)."""
    return int(density * n + 0.1)


# -- the rules, on one tensor (flat weights, flat bool mask) --------------------------------------


def initial_masks(sizes: list[int], density, generator: torch.Generator) -> list[torch.Tensor]:
    """A uniformly random mask with :func:`active_count` active positions per tensor (flat, bool, CPU);
    ``density`` is one for every tensor or a list, one per tensor."""
    densities = density if isinstance(density, (list, tuple)) else [density] * len(sizes)
    masks = []
    for n, d in zip(sizes, densities):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.randperm(n, generator=generator)[:active_count(n, d)]] = True
        masks.append(mask)
    return masks


def l1_term(weights: list[torch.Tensor], group_lasso: bool = False) -> torch.Tensor:
    """The code's ``L1Loss`` over the sparse tensors (main.py: the loss gets ``--L1-loss-coeff`` times
    it): :math:`\\sum |w|`, or with ``--conv-group-lasso`` for a conv tensor the group lasso over its
    k x k kernels, :math:`\\sum_{o,i} \\sqrt{\\sum_{h,w} w_{oihw}^2 + 10^{-12}}` (a linear tensor keeps
    :math:`\\sum |w|`)."""
    terms = []
    for w in weights:
        if group_lasso and w.dim() == 4:
            terms.append(torch.sqrt(w.pow(2).sum(-1).sum(-1) + 1e-12).sum())
        else:
            terms.append(w.abs().sum())
    return torch.stack(terms).sum()


def new_weight_std(record, linear: bool) -> float:
    """The std of a weight the code grows with ``--big-new-weights`` (its ``reinitialize_unused``): a
    conv's :math:`\\sqrt{2/(k^2 C_{out})}`, a linear layer's :math:`1/\\sqrt{C_{in}}` (both normal)."""
    if linear:
        return 1.0 / record.in_channels ** 0.5
    return (2.0 / (record.kernel ** 2 * record.out_channels)) ** 0.5


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


@torch.no_grad()
def initialize_as_code(model) -> None:
    """The code's initialisation of every conv and linear layer: a conv He-normal with fan-out,
    N(0, 2/(k²·C_out)), a linear layer (an nn.Linear head, or DynamicLinear's U(±1/sqrt(fan_in)), the
    same distribution: LeNet-300-100's hidden layers) PyTorch's uniform; biases 0."""
    for record in model.weight_layers:
        layer = model.get_submodule(record.name)
        if isinstance(layer, torch.nn.Linear):
            layer.reset_parameters()
        else:
            layer.weight.normal_(0.0, (2.0 / (record.kernel ** 2 * record.out_channels)) ** 0.5)
        if layer.bias is not None:
            layer.bias.zero_()


# -- the methods ----------------------------------------------------------------------------------


class SparseMethod(PruningMethod):
    """Masks on the sparse tensors, re-applied after every optimiser step; no rewiring.

    ``density`` None starts with every weight active (IMP); else a random mask at ``density`` (or at
    ``densities``, one per sparse tensor: the code's conv / fc sparsities) and, with ``initialize``,
    the code's initialisation. ``seed`` seeds the method's own generator (positions, the rounding
    draw, new weights), the same on every rank, so masks agree across torchrun processes; its state
    is checkpointed.

    The code's switches (keyword-only): ``granularity`` 4 masks single weights, 2 whole k x k kernels
    of every conv (``--sub-kernel-granularity``; a kernel's magnitude is its mean |w|);
    ``shortcuts`` makes ResNet50's projection shortcuts sparse too (``--sparse-resnet-downsample``);
    ``big_new_weights`` starts a regrown weight at a draw from the initial distribution instead of 0;
    ``l1`` adds ``l1`` times :func:`l1_term` to the loss (``--L1-loss-coeff``; ``group_lasso``: per
    kernel, ``--conv-group-lasso``); ``masks`` replaces the random masks (``--copy-mask-from``)."""

    name = "sparse"
    network_name = "active weights per sparse tensor"

    def __init__(self, model, density: float | None, seed: int, initialize: bool = True, *,
                 densities: list[float] | None = None, granularity: int = 4, shortcuts: bool = False,
                 big_new_weights: bool = False, l1: float = 0.0, group_lasso: bool = False,
                 masks: list[torch.Tensor] | None = None):
        super().__init__(model)
        self.layers = sparse_layers(model, shortcuts)
        self.weights = [model.get_submodule(w.name).weight for w in self.layers]
        self.linear = [is_linear(model, w) for w in self.layers]
        self.density = density
        self.start_densities = list(densities) if densities is not None else (
            None if density is None else [density] * len(self.layers))
        self.granularity, self.shortcuts, self.big_new_weights = granularity, shortcuts, big_new_weights
        self.l1, self.group_lasso = l1, group_lasso
        self.copied_masks = masks is not None
        self.generator = torch.Generator().manual_seed(seed)
        device = self.weights[0].device
        shapes = [mask_shape(w, granularity) for w in self.weights]
        if self.start_densities is None:
            drawn = [torch.ones(s.numel(), dtype=torch.bool) for s in shapes]
        else:
            drawn = initial_masks([s.numel() for s in shapes], self.start_densities, self.generator)
        if masks is not None:
            drawn = [m.reshape(-1).bool() for m in masks]
        # Contiguous (the weights' logical order) whatever the weights' memory format.
        self.masks = [m.view(s).to(device) for m, s in zip(drawn, shapes)]
        if self.start_densities is not None and initialize:
            self._initialize()
        self.optimizer = None
        self.epoch = 0
        self.reallocated_epoch = 0       # weights reallocated since the epoch began
        self.events = []                 # (iteration, reallocated, threshold) not yet logged
        self.apply_masks()

    def _initialize(self) -> None:
        initialize_as_code(self.model)

    def full_masks(self) -> list[torch.Tensor]:
        """The masks at the weights' shapes (a kernel mask broadcast over its k x k weights, a view)."""
        return [m if m.shape == w.shape else m.view(*m.shape, 1, 1).expand(w.shape)
                for m, w in zip(self.masks, self.weights)]

    # -- the engine's hooks ------------------------------------------------------------------

    def attach_optimizer(self, optimizer) -> None:
        self.optimizer = optimizer

    def changes_gradients(self) -> bool:
        return True

    def loss(self, progress: float) -> torch.Tensor | None:
        if self.l1 == 0:
            return None
        return self.l1 * l1_term(self.weights, self.group_lasso)

    @torch.no_grad()
    def after_backward(self) -> None:
        """Zero the gradients of inactive weights: what the code's masked forward gives them, so that
        gradient clipping and DeepR's noise see the code's gradients."""
        pairs = [(w.grad, m) for w, m in zip(self.weights, self.full_masks()) if w.grad is not None]
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
        full = self.full_masks()
        torch._foreach_mul_(self.weights, full)
        if self.optimizer is not None:
            buffers = [self.optimizer.state.get(w, {}).get("momentum_buffer") for w in self.weights]
            pairs = [(b, m) for b, m in zip(buffers, full) if b is not None]
            if pairs:
                torch._foreach_mul_([b for b, _ in pairs], [m for _, m in pairs])

    def _flat(self):
        """(magnitudes, masks) as flat tensors: per mask entry, a weight copy to read (a kernel's mean
        |w| with kernel masks, the code's ``prune_*`` rules), and mask views to edit."""
        scores = []
        for w, m in zip(self.weights, self.masks):
            w = w.detach()
            scores.append(w.reshape(-1) if m.shape == w.shape
                          else w.abs().sum((2, 3)).reshape(-1) / (w.shape[2] * w.shape[3]))
        return scores, [m.view(-1) for m in self.masks]

    @torch.no_grad()
    def _fill_new(self, before: list[torch.Tensor]) -> None:
        """With ``big_new_weights``: every position active now and not in ``before`` (the masks before a
        reallocation) gets a draw from the initial distribution (:func:`new_weight_std`) instead of 0."""
        if not self.big_new_weights:
            return
        seed = int(torch.randint(2 ** 62, (), generator=self.generator))
        for layer, (record, w, old) in enumerate(zip(self.layers, self.weights, before)):
            new = self.masks[layer] & ~old
            if new.shape != w.shape:
                new = new.view(*new.shape, 1, 1).expand(w.shape)
            draw = torch.Generator(device=w.device).manual_seed(seed + layer)
            values = torch.randn(w.shape, generator=draw, device=w.device, dtype=w.dtype)
            values.mul_(new_weight_std(record, self.linear[layer]))
            w.copy_(torch.where(new, values, w))

    def _record(self, iteration: int, reallocated: int, threshold: float | None = None) -> None:
        self.reallocated_epoch += reallocated
        self.events.append((iteration, reallocated, threshold))

    # -- what it decides ---------------------------------------------------------------------

    def active(self) -> list[int]:
        """Active weights per sparse tensor (a kernel mask entry counts its k x k weights)."""
        return [int(m.sum()) * (w.numel() // m.numel()) for m, w in zip(self.masks, self.weights)]

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
        return {"--density": self.density, "--layer-densities": self.start_densities,
                "--sub-kernel-granularity": self.granularity, "--sparse-resnet-downsample": self.shortcuts,
                "--big-new-weights": self.big_new_weights, "--L1-loss-coeff": self.l1,
                "--conv-group-lasso": self.group_lasso, "--copy-mask-from": self.copied_masks}

    def state_dict(self) -> dict:
        return dict(masks=[m.cpu().clone() for m in self.masks], generator=self.generator.get_state(),
                    epoch=self.epoch, reallocated_epoch=self.reallocated_epoch, events=list(self.events),
                    settings=self.settings(), layers=self.sparse_layer_names())

    def load_state_dict(self, state: dict) -> list[str]:
        for flag, value in state["settings"].items():
            if self.settings().get(flag) != value:
                raise UsageError(f"the checkpoint's run used {flag} {value}, this command {self.settings().get(flag)}; "
                                 f"resume it with matching flags")
        self.masks = [m.to(w.device).view(mask_shape(w, self.granularity)).clone()
                      for m, w in zip(state["masks"], self.weights)]
        self.generator.set_state(state["generator"])
        self.epoch, self.reallocated_epoch = state["epoch"], state["reallocated_epoch"]
        self.events = list(state["events"])
        self.apply_masks()
        return []

    def densities(self) -> list[float]:
        return [a / w.numel() for a, w in zip(self.active(), self.weights)]

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

    def reported_density(self) -> float | None:
        """results.json's ``density``: ``--density``, or the one density every tensor started at (the
        code's sparsity flags), else None (``density_conv`` / ``density_fc`` say it)."""
        if self.density is not None or not self.start_densities:
            return self.density
        return self.start_densities[0] if len(set(self.start_densities)) == 1 else None

    def results(self) -> dict:
        active = self.active()
        total = sum(w.numel() for w in self.weights)
        out = dict(super().results(), method=self.name, density=self.reported_density(),
                   density_active=sum(active) / total, sparse_weights_active=sum(active), sparse_weights_total=total,
                   layer_densities={w.name: d for w, d in zip(self.layers, self.densities())})
        if self.start_densities is not None and self.density is None:
            for kind, linear in (("density_conv", False), ("density_fc", True)):
                values = {d for d, lin in zip(self.start_densities, self.linear) if lin == linear}
                if values:
                    out[kind] = values.pop()
        out.update(sparsity_keys(out))
        if self.granularity != 4:
            out["sub_kernel_granularity"] = self.granularity
        if self.l1:
            out.update(l1_loss_coeff=self.l1, conv_group_lasso=self.group_lasso)
        for key, value in (("big_new_weights", self.big_new_weights), ("sparse_resnet_downsample", self.shortcuts),
                           ("copied_masks", self.copied_masks)):
            if value:
                out[key] = True
        return out

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
    """The code's ``--rewire``: after the step of every global iteration t ≠ 0 with t mod P(epoch) = 0,
    while the epoch is below ``stop_epoch``, every tensor drops weights and as many regrow.

    The drop is ``--threshold-prune``'s (|w| < H, H adapted to move about N_p weights a period) or
    else the int(f·M)+1 smallest of each tensor (``--rewire-fraction`` f); the regrowth is
    ``--rewire-scaling``'s (:func:`regrow_proportional`, across tensors) or else in each tensor as
    many as it dropped. DSR is both switches, SET neither (main.py's ``train``)."""

    threshold_prune = False
    rewire_scaling = False

    def __init__(self, model, density: float, seed: int, periods: dict, stop_epoch: int, initialize: bool = True,
                 **options):
        super().__init__(model, density, seed, initialize, **options)
        self.periods, self.stop_epoch = dict(periods), stop_epoch
        self.threshold = THRESHOLD_START
        self.fraction = None
        self.n_prune_params = None

    def reallocate(self, iteration: int) -> None:
        if iteration != 0 and self.epoch < self.stop_epoch and iteration % schedule_value(self.periods, self.epoch) == 0:
            self.rewire(iteration)

    @torch.no_grad()
    def rewire(self, iteration: int) -> None:
        weights, masks = self._flat()
        before = [m.clone() for m in self.masks] if self.big_new_weights else None
        if self.threshold_prune:
            dropped = [drop_below(w, m, self.threshold) for w, m in zip(weights, masks)]
        else:
            dropped = [drop_smallest(w, m, self.fraction) for w, m in zip(weights, masks)]
        removed = sum(d.numel() for d in dropped)
        if self.rewire_scaling:
            regrow_proportional(masks, dropped, self.generator)
            reallocated = removed
        else:
            reallocated = sum(grow_random(m, d, d.numel(), self.generator).numel() for m, d in zip(masks, dropped))
        self._record(iteration, reallocated, self.threshold if self.threshold_prune else None)
        if self.threshold_prune:
            if removed > 1.1 * self.n_prune_params:
                self.threshold /= 2.0
            elif removed < 0.9 * self.n_prune_params:
                self.threshold *= 2.0
        if before is not None:
            self._fill_new(before)
        self.apply_masks()

    def state_dict(self) -> dict:
        return dict(super().state_dict(), threshold=self.threshold)

    def load_state_dict(self, state: dict) -> list[str]:
        self.threshold = state.get("threshold", THRESHOLD_START)
        return super().load_state_dict(state)

    def settings(self) -> dict:
        out = dict(super().settings(), **{"--stop-rewire-epoch": self.stop_epoch, "--schedule-file periods": self.periods})
        if self.threshold_prune:
            out["--n-prune-params"] = self.n_prune_params
        else:
            out["--rewire-fraction"] = self.fraction
        if self.threshold_prune != type(self).threshold_prune or self.rewire_scaling != type(self).rewire_scaling:
            out.update({"--threshold-prune": self.threshold_prune, "--rewire-scaling": self.rewire_scaling})
        return out

    def results(self) -> dict:
        out = dict(super().results())
        if self.threshold_prune:
            out.update(threshold=self.threshold, n_prune_params=self.n_prune_params)
        else:
            out.update(rewire_fraction=self.fraction)
        if self.threshold_prune != type(self).threshold_prune or self.rewire_scaling != type(self).rewire_scaling:
            out.update(threshold_prune=self.threshold_prune, rewire_scaling=self.rewire_scaling)
        return out


class DSR(_PeriodicRewiring):
    """Dynamic sparse reparameterization (``--rewire --threshold-prune --rewire-scaling``): a global
    magnitude threshold H, adapted to reallocate about N_p weights a period, and regrowth in
    proportion to each tensor's survivors."""

    name = "dsr"
    threshold_prune = True
    rewire_scaling = True

    def __init__(self, model, density: float, seed: int, periods: dict, stop_epoch: int, n_prune_params: int,
                 initialize: bool = True, **options):
        super().__init__(model, density, seed, periods, stop_epoch, initialize, **options)
        self.n_prune_params = n_prune_params


class SET(_PeriodicRewiring):
    """Sparse evolutionary training (``--rewire``): each tensor replaces its int(f·M)+1 smallest weights
    by as many random ones. ``threshold_prune`` / ``rewire_scaling`` switch on the code's
    ``--threshold-prune`` (then ``n_prune_params`` is N_p and f is unused) and ``--rewire-scaling``
    one at a time (both: DSR)."""

    name = "set"

    def __init__(self, model, density: float, seed: int, periods: dict, stop_epoch: int, fraction: float | None,
                 initialize: bool = True, *, threshold_prune: bool = False, rewire_scaling: bool = False,
                 n_prune_params: int | None = None, **options):
        super().__init__(model, density, seed, periods, stop_epoch, initialize, **options)
        self.threshold_prune, self.rewire_scaling = threshold_prune, rewire_scaling
        self.fraction = None if threshold_prune else fraction
        self.n_prune_params = n_prune_params if threshold_prune else None
        if (self.fraction is None) == (self.n_prune_params is None):
            raise ValueError("SET needs its fraction, or with threshold_prune N_p (not both)")


class DeepR(SparseMethod):
    """Deep rewiring: an L1 term and Gaussian gradient noise on the active weights every step; a weight
    whose sign flips is dropped and a random one regrows.

    The noise of step t comes from a generator on the weights' device seeded with (seed, t): no state
    to checkpoint, identical on every rank, and a run resumed on another kind of device goes on."""

    name = "deepr"

    def __init__(self, model, density: float, seed: int, temperatures: dict, stop_epoch: int,
                 eta: float = DEEPR_ETA, l1: float = DEEPR_L1, initialize: bool = True, **options):
        super().__init__(model, density, seed, initialize, l1=l1, **options)
        if any(m.shape != w.shape for m, w in zip(self.masks, self.weights)):
            raise ValueError("DeepR masks single weights (the code's DeepR fails with kernel masks)")
        self.temperatures, self.stop_epoch, self.eta = dict(temperatures), stop_epoch, eta
        self.signs = [torch.sign(w.detach()).view(-1).clone() for w in self.weights]
        # The code leaves fully dense tensors alone; DeepR keeps each tensor's count, so this holds for the run.
        self.rewired = [not bool(m.all()) for m in self.masks]
        self.noise_seed = int(torch.randint(2 ** 62, (), generator=self.generator))
        self.iteration = 0
        self._count_active()

    def _count_active(self) -> None:
        """Active weights per tensor, kept on the host so that a step needs no count from the device."""
        self.active_counts = self.active()

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
        before = [m.clone() for m in self.masks] if self.big_new_weights else None
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
        if before is not None:
            self._fill_new(before)  # their recorded sign stays 0: a regrown weight's first sign is no flip
        self.apply_masks()  # zero what was dropped (after_step has masked the rest)

    def settings(self) -> dict:
        return dict(super().settings(), **{"--DeepR_eta": self.eta, "--stop-rewire-epoch": self.stop_epoch,
                                           "--schedule-file temperatures": self.temperatures})

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
    one at the end of every ``every``-th epoch from epoch ``start`` on. ``conv`` / ``fc`` are the
    targets of the conv and the linear tensors where they differ (the code's
    ``--prune-target-sparsity-conv`` / ``-fc``)."""

    name = "imp"

    def __init__(self, model, density: float | None, seed: int, iterations: int = 20, cubic: bool = False,
                 start: int = 0, every: int = 2, *, conv: float | None = None, fc: float | None = None, **options):
        super().__init__(model, None, seed, initialize=False, **options)
        self.target, self.iterations, self.cubic, self.start, self.every = density, iterations, cubic, start, every
        self.conv_target, self.fc_target = conv, fc
        per_layer = layer_densities(model, self.layers, density, conv, fc)
        # One target for every tensor, but where the network declares otherwise (LeNet-300-100's output
        # layer) or the conv and fc targets differ.
        self.targets = model.imp_densities(per_layer[0], self.layers) if len(set(per_layer)) == 1 else per_layer
        self.prunes_done = 0

    def end_epoch(self, epoch: int) -> None:
        super().end_epoch(epoch)
        if epoch >= self.start and (epoch - self.start) % self.every == 0 and self.prunes_done < self.iterations:
            self.prune()

    @torch.no_grad()
    def prune(self) -> None:
        weights, masks = self._flat()
        pruned = 0
        for w, m, d, full in zip(weights, masks, self.targets, self.weights):
            pruned += drop_smallest(w, m, imp_fraction(self.prunes_done, self.iterations, d, self.cubic)).numel() \
                * (full.numel() // m.numel())
        self.prunes_done += 1
        self.reallocated_epoch += pruned
        self.apply_masks()

    def settings(self) -> dict:
        out = {"--density": self.target, "--prune-iterations": self.iterations, "--cubic": self.cubic}
        extra = {"--prune-target-sparsity-conv": self.conv_target, "--prune-target-sparsity-fc": self.fc_target,
                 "--start-pruning-after-epoch": self.start, "--prune-epoch-frequency": self.every,
                 "--sub-kernel-granularity": self.granularity, "--sparse-resnet-downsample": self.shortcuts,
                 "--L1-loss-coeff": self.l1, "--conv-group-lasso": self.group_lasso}
        return dict(out, **extra)

    def state_dict(self) -> dict:
        return dict(super().state_dict(), prunes_done=self.prunes_done)

    def load_state_dict(self, state: dict) -> list[str]:
        self.prunes_done = state["prunes_done"]
        return super().load_state_dict(state)

    def results(self) -> dict:
        out = dict(super().results(), density=self.target, prune_iterations=self.iterations, cubic=self.cubic,
                   prunes_done=self.prunes_done)
        if self.conv_target is not None or self.fc_target is not None:
            for kind, linear in (("density_conv", False), ("density_fc", True)):
                values = {d for d, lin in zip(layer_densities(self.model, self.layers, self.target, self.conv_target,
                                                              self.fc_target), self.linear) if lin == linear}
                if values:
                    out[kind] = values.pop()
        if self.start or self.every != 2:
            out.update(start_pruning_after_epoch=self.start, prune_epoch_frequency=self.every)
        # IMP is set to its target density, not the one it starts from
        out.update(sparsity_keys(out))
        return out

    def epoch_message(self, epoch: int, results: dict) -> str | None:
        pruned, self.reallocated_epoch, self.events = self.reallocated_epoch, 0, []
        return (f"imp: prune {self.prunes_done}/{self.iterations} done; {results['sparse_weights_active']} of "
                f"{results['sparse_weights_total']} sparse weights left (density {results['density_active']:.4f})"
                + (f", {pruned} pruned this epoch" if pruned else ""))


def check_layer_densities(model, layers, densities: list[float], granularity: int = 4) -> None:
    """Refuse a density that leaves a sparse tensor without an active weight (or mask entry), one line."""
    for record, density in zip(layers, densities):
        if not 0.0 < density <= 1.0:
            raise UsageError(f"--density {density:g}: must be in (0, 1]")
        n = mask_shape(model.get_submodule(record.name).weight, granularity).numel()
        if active_count(n, density) == 0:
            what = "kernels" if granularity == 2 and model.get_submodule(record.name).weight.dim() == 4 else "weights"
            raise UsageError(f"--density {density:g} leaves {record.name} ({n} {what}) with no active weight; "
                             f"the smallest density that keeps one is {(1 - 0.1) / n:.3g}")


def check_density(model, density: float, shortcuts: bool = False, granularity: int = 4) -> None:
    """Refuse a density that leaves a sparse tensor without an active weight (one line)."""
    if not 0.0 < density <= 1.0:
        raise UsageError(f"--density {density:g}: must be in (0, 1]")
    layers = sparse_layers(model, shortcuts)
    check_layer_densities(model, layers, [density] * len(layers), granularity)


def sparse_method(model, args, kind: str) -> PruningMethod:
    """The method of ``--sparse {dsr,set,deepr,static}`` (with ``--tied``: tied weights) with the
    training scripts' arguments (the run's RunConfig), on ``kind`` ('cifar' or 'imagenet') data: the
    code's settings unless a flag overrides them."""
    get = functools.partial(getattr, args)
    shortcuts = bool(get("sparse_resnet_downsample", False))
    granularity = get("sub_kernel_granularity", None) or 4
    layers = sparse_layers(model, shortcuts)
    conv, fc = (None if s is None else 1.0 - s for s in (get("initial_sparsity_conv", None),
                                                          get("initial_sparsity_fc", None)))
    copy = get("copy_mask_from", None)
    masks = None
    if copy and args.density is None and conv is None and fc is None:
        masks = copied_masks(model, layers, copy, granularity)  # the run takes the file's density
        densities = [float(m.sum()) / m.numel() for m in masks]
    else:
        densities = layer_densities(model, layers, args.density, conv, fc)
    l1 = get("L1_loss_coeff", None)
    l1 = (DEEPR_L1 if args.sparse == "deepr" else 0.0) if l1 is None else l1
    group_lasso = bool(get("conv_group_lasso", False))
    if get("tied", None):
        from .tied import TiedWeights
        return TiedWeights(model, densities, args.seed, shortcuts=shortcuts,
                           rescale_gradient=bool(get("rescale_tied_gradient", False)), l1=l1, group_lasso=group_lasso)
    check_layer_densities(model, layers, densities, granularity)
    options = dict(densities=densities, granularity=granularity, shortcuts=shortcuts,
                   big_new_weights=bool(get("big_new_weights", False)), l1=l1, group_lasso=group_lasso)
    if copy:
        options["masks"] = masks if masks is not None else copied_masks(model, layers, copy, granularity,
                                                                         args.density, densities)
    schedule = SCHEDULES[kind]
    stop = schedule["stop_rewire_epoch"] if args.stop_rewire_epoch is None else args.stop_rewire_epoch
    periods = get("rewire_periods", None) or schedule["rewire_periods"]
    if args.sparse == "static":
        return StaticSparse(model, args.density, args.seed, **options)
    threshold_prune = args.sparse == "dsr" or bool(get("threshold_prune", False))
    n_prune_params = None
    if threshold_prune:
        total = sum(model.get_submodule(w.name).weight.numel() for w in layers)
        n_prune_params = args.n_prune_params or default_n_prune_params(kind, total, granularity)
    if args.sparse == "dsr":
        return DSR(model, args.density, args.seed, periods, stop, n_prune_params, **options)
    if args.sparse == "set":
        fraction = None
        if not threshold_prune:
            common = set(densities)
            fraction = args.rewire_fraction or (default_rewire_fraction(kind, common.pop()) if len(common) == 1
                                                else None)
            if fraction is None:
                known = ", ".join(f"{d:g}" for d in schedule["set_fractions"])
                given = f"--density {args.density:g}" if args.density is not None else "these densities"
                raise UsageError(f"SET's code sets --rewire-fraction only for the densities {known}; give "
                                 f"--rewire-fraction for {given}")
        return SET(model, args.density, args.seed, periods, stop, fraction, threshold_prune=threshold_prune,
                   rewire_scaling=bool(get("rewire_scaling", False)), n_prune_params=n_prune_params, **options)
    temperatures = get("deepr_temperatures", None) or schedule["deepr_temperatures"]
    return DeepR(model, args.density, args.seed, temperatures, stop, args.DeepR_eta, **options)


def copied_masks(model, layers, path: str, granularity: int, density: float | None = None,
                 densities: list[float] | None = None) -> list[torch.Tensor]:
    """``--copy-mask-from``: the masks of a sparse run's training checkpoint (a run directory: its
    last.pt) of the same network, for a static run on them (the code loads every ``*mask`` entry of
    the file's state dict). Another network, another granularity, a file without masks, or a
    ``--density`` whose active count differs from the file's is refused in one line."""
    from pathlib import Path

    from utils.checkpoint import load_checkpoint
    file = Path(path)
    if file.is_dir():
        file = file / "last.pt"
    if not file.exists():
        raise UsageError(f"--copy-mask-from {path}: no such file")
    state = load_checkpoint(file)
    method = state.get("method") or {}
    if "masks" not in method:
        raise UsageError(f"--copy-mask-from {path}: not a checkpoint of a sparse run (it holds no masks)")
    ours = dict(model.arch)
    theirs = dict(state.get("arch") or {})
    if {k: v for k, v in theirs.items() if k not in ("net", "back_dep", "temperature")} != \
            {k: v for k, v in ours.items() if k not in ("net", "back_dep", "temperature")}:
        raise UsageError(f"--copy-mask-from {path}: its network ({theirs.get('model')}, widths or options differ) is "
                         f"not this run's {ours.get('model')}; copy masks from a run of the same --arch, "
                         f"--width-mult, classes and options")
    names = method.get("layers") or [w.name for w in sparse_layers(model)]
    if names != [w.name for w in layers]:
        raise UsageError(f"--copy-mask-from {path}: its sparse layers differ from this run's "
                         f"(--sparse-resnet-downsample must match)")
    masks = method["masks"]
    shapes = [mask_shape(model.get_submodule(w.name).weight, granularity) for w in layers]
    if [tuple(m.shape) for m in masks] != [tuple(s) for s in shapes]:
        raise UsageError(f"--copy-mask-from {path}: its masks are of another --sub-kernel-granularity than "
                         f"this run's {granularity}")
    if densities is not None:
        expected = sum(active_count(s.numel(), d) for s, d in zip(shapes, densities))
        found = sum(int(m.sum()) for m in masks)
        if found != expected:
            given = f"--density {density:g}" if density is not None else "the given sparsities"
            raise UsageError(f"--copy-mask-from {path}: its masks keep {found} entries, {given} {expected}; "
                             f"leave the density out to train at the file's")
    return [m.bool() for m in masks]

