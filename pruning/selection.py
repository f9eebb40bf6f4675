r"""Which filters to remove: per-layer ratios, their GReg spelling, the L1 score, a MACs target.

The peers that prune filters by hand-set ratios (L1, GReg-1, GReg-2) name them
as GReg's code does (``--stage_pr``):

- ResNets: one ratio per stage, stem first and classifier last: ResNet56
  ``[stem, stage1, stage2, stage3, fc]``, ResNet50 ``[stem, l1, l2, l3, l4, fc]``.
  A stage's ratio applies to every *non-last* conv of its blocks (ResNet56:
  conv1; ResNet50: conv1 and conv2), i.e. to this project's gated layers; the
  last conv of a block, the shortcuts and the classifier are never pruned.
- VGG: a ratio per layer index (convs 0..12, the classifier 13), written
  ``1-12:0.5,0:0.2`` (inclusive ranges, unlisted = 0) or as a plain list.

A layer of N filters with ratio r loses :math:`\min(\lceil rN \rceil, N - 1)`
filters, those with the smallest score :math:`\frac{1}{|W_f|}\sum |W_f|` (the
mean absolute weight of the filter, GReg's ``_get_score``; the same ranking as
Li et al.'s L1 norm). All of it is read from and written to the gated-layer
records of ``models/structure.py``: a decision is one gate value per channel. The syntax of
``--stage_pr`` and ``--skip_layers`` is read in ``pruning/specs.py`` (prune.py checks it without torch).
"""
import math

import torch

from utils.errors import UsageError

from .specs import parse_ratio_list, parse_skip_layers

# How close (absolute, as a fraction of dense) --target-macs must be met.
TARGET_TOLERANCE = 0.01


def stage_of_layers(model) -> tuple[list[int], int, str]:
    """``(stage of each gated layer, number of entries a stage list has, what they are)``: the
    network's own declaration (VGG's "stages" are its layer indices; the classifier is last)."""
    try:
        return model.stage_of_layers()
    except NotImplementedError as e:
        raise UsageError(str(e)) from None


def stage_list(model, ratios) -> list[float]:
    """A parsed ``--stage_pr`` as one ratio per entry of the network's stage list: VGG's
    ``INDEX:RATIO`` form filled with 0; one-line errors for that form on a ResNet, an index past
    the list, or a list of the wrong length."""
    _, entries, what = stage_of_layers(model)
    family = model.arch["model"]
    if isinstance(ratios, dict):
        if not model.stages_are_layers:
            raise UsageError(f"--stage_pr INDEX:RATIO is VGG's form; {family} takes {entries} ratios ({what})")
        bad = [i for i in ratios if i >= entries]
        if bad:
            raise UsageError(f"--stage_pr: {family} has layer indices 0-{entries - 1}, got {bad[0]}")
        ratios = [ratios.get(i, 0.0) for i in range(entries)]
    if len(ratios) != entries:
        raise UsageError(f"--stage_pr: {family} takes {entries} ratios ({what}), got {len(ratios)}")
    return list(ratios)


def layer_ratios(model, ratios, skip: list[str] = ()) -> list[float]:
    """The ratio of each gated layer from a parsed ``--stage_pr`` (one-line errors for a list of the
    wrong length, a classifier ratio, or the VGG form on a ResNet); 0 for the layers ``--skip_layers``
    names (:func:`skipped`)."""
    stages, entries, what = stage_of_layers(model)
    family = model.arch["model"]
    ratios = stage_list(model, ratios)
    if ratios[-1] != 0.0:
        raise UsageError("--stage_pr: the classifier's ratio must be 0 (its outputs are the classes; GReg's code "
                         "would shrink them towards zero and never remove one)")
    # An entry no gated layer belongs to (an option-A ResNet's or GoogLeNet's stem, APIB VGG16's hidden
    # Linear) has nothing to prune: a ratio there would be silently ignored.
    idle = [i for i in range(entries - 1) if i not in set(stages) and ratios[i] != 0.0]
    if idle:
        raise UsageError(f"--stage_pr: entry {idle[0]} of {family}'s {entries} ({what}) has no prunable layer; "
                         f"its ratio must be 0")
    out = [ratios[s] for s in stages]
    if skip:
        out = [0.0 if s else r for r, s in zip(out, skipped(model, list(skip), [g.conv for g in model.gated_layers]))]
    return out


def skipped(model, skip: list[str], names: list[str]) -> list[bool]:
    """Which of the weight layers ``names`` GReg's ``--skip_layers`` excludes (their ratio becomes 0),
    by its code's rule: on a single-branch network the layer index written exactly
    (``meta_pruner.py:194``); on a ResNet every layer whose ``'stage.block.conv'`` id starts with an
    entry (``meta_pruner.py:218-221``; so ``1.1`` also matches block 10 of stage 1)."""
    if not skip:
        return [False] * len(names)
    ids = dict(zip((w.name for w in model.weight_layers), greg_ids(model)))
    if model.stages_are_layers:
        return [str(ids[name][0]) in skip for name in names]
    text = {name: f"{ids[name][0]}.{ids[name][1]}.{ids[name][2]}" for name in names}
    return [any(text[name].startswith(s) for s in skip) for name in names]


def greg_ids(model) -> list[tuple]:
    try:
        return model.greg_ids()
    except NotImplementedError as e:
        raise UsageError(f"{e} (GReg's --skip_layers and --wg weight follow its ResNet and single-branch "
                         f"layer names)") from None


def weight_layer_ratios(model, ratios, skip: list[str] = ()) -> list[float]:
    """GReg's ``--wg weight`` ratios: every conv and linear layer takes its stage's entry of
    ``--stage_pr`` (``meta_pruner.py:198-235``: on a ResNet the stem, the shortcuts and the classifier
    included, and ``--skip_layers`` has no effect; on a single-branch network its layer index's entry,
    ``--skip_layers`` by index). One-line errors for a list of the wrong length."""
    ids = greg_ids(model)
    ratios = stage_list(model, ratios)
    out = [ratios[stage] for stage, _, _ in ids]
    if model.stages_are_layers:
        names = [w.name for w in model.weight_layers]
        out = [0.0 if s else r for r, s in zip(out, skipped(model, list(skip), names))]
    return out


def uniform_layers(model) -> list[bool]:
    """The gated layers a single global ratio prunes: every stage but the stem (ResNets), every
    conv but the first (VGG; GReg's published VGG command, ``[1-15:0.7]``, spares it too)."""
    stages, _, _ = stage_of_layers(model)
    return [s != 0 for s in stages]


def pruned_count(width: int, ratio: float) -> int:
    """GReg's and Li et al.'s count: ``min(ceil(ratio * width), width - 1)``."""
    return min(math.ceil(ratio * width), width - 1)


@torch.no_grad()
def filter_scores(model, on_device: bool = False) -> list[torch.Tensor]:
    """Per gated layer, the mean absolute weight of each filter of the producing conv (on the CPU, or
    with ``on_device`` where the weights are: no transfer, for GReg's updates during training)."""
    scores = [model.get_submodule(g.conv).weight.detach().abs().flatten(1).mean(1).float()
              for g in model.gated_layers]
    return scores if on_device else [score.cpu() for score in scores]


def pick(scores: torch.Tensor, n: int, rule: str = "min", generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of the ``n`` filters to remove: the lowest scores (``min``, ties by index), the
    highest (``max``), or ``n`` at random (``rand``)."""
    if rule == "rand":
        return torch.randperm(len(scores), generator=generator)[:n].sort().values
    order = torch.sort(scores, descending=rule == "max", stable=True).indices
    return order[:n].sort().values


def decision(model, ratios: list[float], scores: list[torch.Tensor] | None = None, rule: str = "min",
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Gate values (``(total,)``, 1 kept, 0 removed) of removing, per gated layer, its ratio's count
    of filters by ``rule`` on ``scores`` (default: the model's current :func:`filter_scores`)."""
    scores = filter_scores(model) if scores is None else scores
    gates = []
    for layer, ratio, score in zip(model.gated_layers, ratios, scores):
        z = torch.ones(layer.width)
        z[pick(score, pruned_count(layer.width, ratio), rule, generator)] = 0.0
        gates.append(z)
    return torch.cat(gates)


def macs_fraction(model, ratios: list[float]) -> float:
    """MACs of the network these ratios leave, as a fraction of dense (counts only, no weights)."""
    kept = torch.tensor([g.width - pruned_count(g.width, r) for g, r in zip(model.gated_layers, ratios)])
    dense, _ = model.cost.dense()
    return model.cost.pruned(kept)[0] / dense


def search_budget(target: float, achieved: float, ratio: float) -> dict:
    """results.json's ``budget`` block of a ratio found for ``--target-macs`` (the same keys a gated
    run's has where they apply): the MACs fraction reached, within ``TARGET_TOLERANCE`` by
    construction (:func:`ratios_for_macs` refuses a target it cannot meet), settled by the search."""
    within = abs(achieved - target) <= TARGET_TOLERANCE
    return dict(kind="macs", target=target, achieved=achieved, within_tolerance=within, tolerance=TARGET_TOLERANCE,
                settled_by="search" if within else "missed", converged=within,
                message=f"macs at {achieved:.3f} of dense, target {target:.3f} (within {TARGET_TOLERANCE:.0%}): global "
                        f"ratio {ratio:.4f} found by bisection")


def ratios_for_macs(model, target: float, skip: list[str] = ()) -> tuple[float, list[float]]:
    """``(r, per-layer ratios)``: one global ratio r on the :func:`uniform_layers` (less those
    ``--skip_layers`` names), found by bisection, whose network's MACs are within
    ``TARGET_TOLERANCE`` of ``target`` times dense.

    The MACs fall as r grows, in steps (counts are whole filters, and at one r every layer of a
    width loses its next filter together). Where that step jumps over the tolerance band, the
    layers whose count differs between the two sides of the step take the larger count one at a
    time, in network order, as many as bring the MACs closest to the target (so a few layers prune
    one filter more than r gives). A target that still cannot be met is a one-line error naming
    the closest network."""
    prunable = uniform_layers(model)
    if skip:
        names = [g.conv for g in model.gated_layers]
        prunable = [p and not s for p, s in zip(prunable, skipped(model, list(skip), names))]

    def ratios(r):
        return [r if p else 0.0 for p in prunable]

    floor = macs_fraction(model, ratios(1.0 - 1e-12))
    if target < floor - TARGET_TOLERANCE:
        raise UsageError(f"--target-macs {target:g}: the smallest network of this rule (one filter per pruned layer) "
                         f"keeps {floor:.3f} of the dense MACs")
    low, high = 0.0, 1.0 - 1e-12  # MACs(low) > target >= MACs(high), once the target is below dense
    for _ in range(80):
        middle = (low + high) / 2
        if macs_fraction(model, ratios(middle)) > target:
            low = middle
        else:
            high = middle
    widths = [g.width for g in model.gated_layers]
    counts_low = [pruned_count(w, r) for w, r in zip(widths, ratios(low))]
    counts_high = [pruned_count(w, r) for w, r in zip(widths, ratios(high))]
    candidates, counts = [], list(counts_low)
    candidates.append(list(counts))
    for layer in range(len(widths)):
        if counts_high[layer] != counts[layer]:
            counts[layer] = counts_high[layer]
            candidates.append(list(counts))

    def as_ratios(counts):
        # A ratio whose count is exactly this one: ceil((c - 0.5) / N * N) = c.
        return [0.0 if c == 0 else (c - 0.5) / w for c, w in zip(counts, widths)]

    best = min(candidates, key=lambda c: abs(macs_fraction(model, as_ratios(c)) - target))
    fraction = macs_fraction(model, as_ratios(best))
    if abs(fraction - target) > TARGET_TOLERANCE:
        raise UsageError(f"--target-macs {target:g}: no network of this rule lands within {TARGET_TOLERANCE} of it; "
                         f"the closest keeps {fraction:.3f}")
    return low, as_ratios(best)



def plan(spec, job) -> int | None:
    """L1's and GReg's start (``spec``: their RatioMethod, pruning/specs.py): set ``args.layer_ratios``
    from ``--stage_pr`` or for the MACs target, open the run; returns the absolute MACs target (or None)."""
    args, model = job.args, job.dense_model()
    target = job.absolute_target()
    skip = parse_skip_layers(args.skip_layers)
    unstructured = getattr(args, "wg", "filter") == "weight"
    if unstructured:
        args.layer_ratios = weight_layer_ratios(model, parse_ratio_list(args.stage_pr), skip)
        sizes = [model.get_submodule(w.name).weight.numel() for w in model.weight_layers]
        pruned = sum(pruned_count(n, r) if r > 0 else 0 for n, r in zip(sizes, args.layer_ratios))
        how = (f"--wg weight --stage_pr {args.stage_pr}: {pruned} single weights of {sum(sizes)} conv and linear "
               f"weights (sparsity {pruned / sum(sizes):.4f})")
    elif args.stage_pr is not None:
        args.layer_ratios = layer_ratios(model, parse_ratio_list(args.stage_pr), skip)
        how = f"--stage_pr {args.stage_pr}"
    else:
        ratio, args.layer_ratios = ratios_for_macs(model, args.target_macs, skip)
        how = f"{target} MACs ({args.target_macs:.4f} of dense): global ratio {ratio:.4f}"
        args.budget = search_budget(args.target_macs, macs_fraction(model, args.layer_ratios), ratio)
    if skip:
        how += f", --skip_layers {args.skip_layers}"
        if unstructured and not model.stages_are_layers:
            how += (" (no effect with --wg weight on a ResNet, as in GReg's code, meta_pruner.py:211-221: "
                    "every layer takes its stage's ratio)")
    job.start(spec.run_label(args), how)
    return target
