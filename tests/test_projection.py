"""The budget projection and what follows it: frozen gates and the export.

* :meth:`BudgetConstraint.project` (pruning/budget.py) against an
  independent reference written here with Python loops and exact rationals:
  the cost-aware key of every channel (its logit's margin over the pruning
  threshold per unit of the marginal cost of its layer, the marginal taken as
  a finite difference of a plain-Python cost at the expected open counts),
  the strict order (key, then the tie key: for L0-HC the logits given to
  ``project``, for Dep-L0 the generator's pre-activations; then index) with
  the first channel of every layer that may not close moved to the front,
  per-layer counts priced with ``model.cost.pruned`` (never the batched
  ``CostModel`` path the projection uses); the largest k at most the target,
  or the smallest k above it when that one is within the tolerance and the
  one below is not; ``None`` where that misses the tolerance and is further
  from the target than the logits' own network, unless that one is cut; the
  values of kept and reopened channels (a reopened one at least the test gate
  of a logit ``REOPEN_MARGIN`` above the threshold, so a frozen network passes
  its input on); unreachable targets; what the order does with cost
  (expensive layers close first), ties (saturated Dep-L0 logits; L0-HC ties
  split by the logits given, not the model's own) and connectivity (no VGG
  layer, no ResNet stem closes; a residual block's inner layer may);
  :meth:`final_gates`.
* :meth:`ChannelGates.freeze` with given gates or the current test gates, and
  a checkpoint of frozen gates restored by :func:`models.load_model_state`.
* A model frozen at a projection exports (models/export.py) to a network whose
  MACs/params, counted here by walking its modules, are the projected cost,
  and whose output is the gated model's.
"""
import math
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from l0_layers import hard_concrete
from pruning.budget import REOPEN_MARGIN, TOLERANCE, BudgetConstraint
from models import VGG, build_model, default_arch, export_pruned, load_model_state

NAMES = ("resnet56", "vgg16")
NETS = (("hc", False), ("dep", False), ("dep", True))
NET_IDS = ("hc", "dep", "dep-back")
# Written out here, not read from l0_layers: a test gate is 0 iff log_alpha <= log(1/11).
THRESHOLD = math.log(1.0 / 11.0)
# The least test gate of a reopened channel (about 0.14): that of a logit REOPEN_MARGIN above the threshold.
REOPEN_FLOOR = min(1.0, max(0.0, 1.2 / (1.0 + math.exp(-(THRESHOLD + REOPEN_MARGIN))) - 0.1))
# Keys of two layers this close (relative) may come in either order (see _reference_order).
NEAR = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name="resnet56", net="hc", back_dep=False, seed=0):
    torch.manual_seed(seed)
    return build_model(default_arch(name, 10, 0.125, net=net, back_dep=back_dep))


def _hand_vgg(width):
    """A five-layer VGG, every layer ``width`` wide, the i-th conv at 32 / 2**i pixels a side."""
    torch.manual_seed(0)
    return VGG(cfg=(width, "M") * 5, num_classes=10, net="hc")


def _set_hc(model, log_alpha):
    with torch.no_grad():
        model.gates.logits.log_alpha.copy_(torch.as_tensor(log_alpha, dtype=torch.float32))
    return model.gates.log_alpha().detach()


def _layers(model):
    """Gated layer of every channel, a Python list."""
    return [layer for layer, width in enumerate(model.gates.widths) for _ in range(width)]


def _fraction(model, kind, counts):
    """Cost fraction of the network keeping ``counts`` channels per gated layer (model.cost.pruned, 1-D)."""
    macs, params = model.cost.pruned(torch.tensor(list(counts)))
    dense_macs, dense_params = model.cost.dense()
    return macs / dense_macs if kind == "macs" else params / dense_params


def _python_cost(model, kind, widths, clamp=True):
    """MACs or params from the structure records with plain numbers (ints or Fractions); with
    ``clamp`` a closed layer is priced as one channel, as the export keeps it."""
    macs = params = 0
    for w in model.weight_layers:
        c_in = w.in_channels if w.in_gate is None else widths[w.in_gate]
        c_out = w.out_channels if w.out_gate is None else widths[w.out_gate]
        if clamp:
            c_in, c_out = max(1, c_in), max(1, c_out)
        macs += w.kernel * w.kernel * w.out_hw * c_in * c_out
        params += w.kernel * w.kernel * c_in * c_out + (int(w.bias) + 2 * int(w.bn is not None)) * c_out
    return macs if kind == "macs" else params


def _python_fraction(model, kind, counts):
    """The cost fraction of ``counts`` from the structure records (fast enough to price every prefix)."""
    return _python_cost(model, kind, counts) / _python_cost(model, kind, model.gates.widths)


def _counts(model, channels):
    counts = [0] * model.gates.num_layers
    layers = _layers(model)
    for c in channels:
        counts[layers[c]] += 1
    return counts


def _sigmoid(x):
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _test_gate(x):
    """The hard-concrete test gate of logit ``x``, in double precision."""
    return min(1.0, max(0.0, _sigmoid(x) * 1.2 - 0.1))


def _expected_open(model, values):
    """S_l = sum of P(z_c != 0) = sigmoid(log_alpha_c - beta log(0.1 / 1.1)) over the layer's channels."""
    shift = model.gates.temperature * math.log(0.1 / 1.1)
    open_ = [0.0] * model.gates.num_layers
    for layer, value in zip(_layers(model), values):
        open_[layer] += _sigmoid(value - shift)
    return open_


def _marginals(model, kind, expected):
    """dC/dS_l at the expected open counts, exact: the cost is bilinear in the widths with no
    term in the square of one width, so cost(S + e_l) - cost(S) (unclamped, in rationals) is the
    derivative; over the dense cost, as C is a fraction of it."""
    expected = [Fraction(s) for s in expected]
    dense = _python_cost(model, kind, model.gates.widths)
    base = _python_cost(model, kind, expected, clamp=False)
    marginals = []
    for layer in range(len(expected)):
        bumped = list(expected)
        bumped[layer] += 1
        marginals.append((_python_cost(model, kind, bumped, clamp=False) - base) / dense)
    return marginals


def _reference_order(model, log_alpha, kind, budget=None):
    """``(order, key, marginal, forced)`` with loops: key and marginal per channel (Fractions).

    Descending key, then descending tie key, then ascending index; then the first channel of
    every layer that may not close fully moves to the front (in that same order). The tie key
    is ``log_alpha`` itself for L0-HC (the logits given, whatever the model's own), the
    generator's pre-activations for Dep-L0 (as the generator computes them, in float32;
    test_saturated_dep_logits_are_ordered_by_pre_activation checks them against loops).

    With ``budget``, its :meth:`channel_order` is checked against this and taken where it differs
    only by swapping channels of different layers whose keys are within NEAR of each other (or
    equal only in exact arithmetic): the budget sums S in float32, so such an order is not
    decided by the keys. Keys within a layer share one marginal, so each layer's own order and
    first channel, hence the forced set, are exact.
    """
    values = log_alpha.tolist()
    layers = _layers(model)
    per_layer = _marginals(model, kind, _expected_open(model, values))
    marginal = [per_layer[layer] for layer in layers]
    key = [Fraction(value - THRESHOLD) / m for value, m in zip(values, marginal)]
    tie = model.gates.logits.pre_activations().tolist() if model.gates.net == "dep" else values

    def rank(c):
        return -key[c], -tie[c], c

    ranked = sorted(range(len(values)), key=rank)
    seen, forced = set(), []
    for c in ranked:
        if layers[c] not in seen:
            seen.add(layers[c])
            if not model.gated_layers[layers[c]].closable:
                forced.append(c)
    first = set(forced)
    order = forced + [c for c in ranked if c not in first]
    if budget is not None:
        got = budget.channel_order(log_alpha)[0].tolist()
        if got != order:
            assert sorted(got) == list(range(len(values))) and set(got[:len(forced)]) == first
            for part in (got[:len(forced)], got[len(forced):]):
                for c, d in zip(part[:-1], part[1:]):
                    near = layers[c] != layers[d] and abs(key[c] - key[d]) <= NEAR * max(abs(key[c]), abs(key[d]))
                    assert rank(c) < rank(d) or near, (c, d, float(key[c]), float(key[d]))
            order = got
    return order, key, marginal, len(forced)


def _reference(model, log_alpha, kind, target, budget=None):
    """The projection, computed with loops: ``None`` or a namespace with the kept channel set,
    its cost, the order, key, marginal, forced count, k, every prefix's cost and the boundary.

    Candidates are the prefixes of the order no shorter than the forced channels. Take the
    longest one whose cost is at most the target; if there is none, or it is more than
    TOLERANCE below, the longest one at the cost of the shortest one above the target when that
    is within TOLERANCE above; ``None`` if that is outside the tolerance and further from the
    target than the logits' own network (channels with log_alpha > THRESHOLD), unless that
    network is cut (a layer that may not close has none of them).

    The boundary: midway between the keys of the last kept and the first closed channel; the
    first closed one's key where only forced channels are kept; where every channel is kept,
    the least key of the channels not forced (of all, if every channel is forced).
    """
    order, key, marginal, forced = _reference_order(model, log_alpha, kind, budget)
    n, layers = len(order), _layers(model)
    counts = [0] * model.gates.num_layers
    costs = [_python_fraction(model, kind, counts)]
    for c in order:
        counts[layers[c]] += 1
        costs.append(_python_fraction(model, kind, counts))
    usable = range(forced, n + 1)
    below = [k for k in usable if costs[k] <= target]
    above = [k for k in usable if costs[k] > target]
    k = below[-1] if below else None
    if (k is None or target - costs[k] > TOLERANCE) and above and costs[above[0]] - target <= TOLERANCE:
        k = max(j for j in usable if costs[j] <= costs[above[0]])
    if k is None:
        return None
    own = _counts(model, [c for c, v in enumerate(log_alpha.tolist()) if v > THRESHOLD])
    trained = _python_fraction(model, kind, own)
    cut = any(count == 0 and not record.closable for count, record in zip(own, model.gated_layers))
    gap = abs(costs[k] - target)
    if gap > TOLERANCE and gap > abs(trained - target) and not cut:
        return None  # no better than the (connected) network the logits give on their own
    if k == n:
        boundary = min(key[c] for c in (order[forced:] if forced < n else order))
    elif k <= forced:
        boundary = key[order[k]]
    else:
        boundary = (key[order[k - 1]] + key[order[k]]) / 2
    return SimpleNamespace(kept=set(order[:k]), cost=costs[k], order=order, key=key, marginal=marginal,
                           forced=forced, k=k, costs=costs, boundary=boundary)


def _check_projection(model, budget, log_alpha, kind, target):
    """Every property of one projection; returns (gates, number reopened, number closed, reference) or None."""
    n = log_alpha.numel()
    gates = budget.project(log_alpha)
    ref = _reference(model, log_alpha, kind, target, budget)
    if ref is None:
        assert gates is None, (kind, target)
        return None
    assert gates is not None, (kind, target)
    assert gates.shape == (n,) and gates.dtype == log_alpha.dtype
    assert bool(((gates >= 0) & (gates <= 1)).all())
    kept = gates > 0
    kept_set = set(kept.nonzero().flatten().tolist())
    assert kept_set == ref.kept, (kind, target, len(kept_set), len(ref.kept))

    # Its cost, as the budget prices it and as model.cost.pruned does.
    cost = budget.deterministic(gates)
    counts = _counts(model, kept_set)
    assert cost == _fraction(model, kind, counts) == ref.cost
    # Connected: every layer that may not close keeps a channel.
    for layer, record in enumerate(model.gated_layers):
        assert record.closable or counts[layer] > 0, (kind, target, record.name)
    assert budget.disconnected(gates) == []
    # Within one layer the marginal is common, so a layer keeps its largest logits.
    layers = _layers(model)
    values = log_alpha.tolist()
    for layer in range(model.gates.num_layers):
        kept_values = [values[c] for c in kept_set if layers[c] == layer]
        closed_values = [values[c] for c in range(n) if layers[c] == layer and c not in kept_set]
        if kept_values and closed_values:
            assert min(kept_values) >= max(closed_values), (kind, target, layer)
    # At most the target and maximal, or the tolerance fallback; either way the next channel
    # of the order costs something.
    k = ref.k
    if k < n:
        more = _fraction(model, kind, _counts(model, kept_set | {ref.order[k]}))
        assert more > cost and (cost > target or more > target), (kind, target, k)
    if cost > target:
        assert cost - target <= TOLERANCE
        below = [j for j in range(ref.forced, n + 1) if ref.costs[j] <= target]
        assert not below or target - ref.costs[below[-1]] > TOLERANCE, (kind, target, k)

    # Values: a channel open on its own keeps its test gate; a reopened one (forced ones
    # included) takes the test gate of its logit minus the boundary key times its marginal, or
    # of a logit REOPEN_MARGIN above the threshold if that is more. The budget's boundary and
    # marginal each carry a relative error up to about NEAR (S in float32), and the test gate
    # moves by at most 0.3 per unit of logit.
    own = hard_concrete.deterministic(log_alpha)
    assert torch.equal(gates[kept & (own > 0)], own[kept & (own > 0)])
    reopened = kept & (own == 0)
    for c in reopened.nonzero().flatten().tolist():
        shift = ref.boundary * ref.marginal[c]
        want = _test_gate(max(float(Fraction(values[c]) - shift), THRESHOLD + REOPEN_MARGIN))
        assert abs(float(gates[c]) - want) <= 1e-6 + 0.6 * NEAR * abs(float(shift)), (kind, target, c)
    # Never below the floor (as the budget computes it: the floor's logit in the logits' dtype).
    floor = hard_concrete.deterministic(torch.tensor(THRESHOLD + REOPEN_MARGIN, dtype=log_alpha.dtype))
    assert abs(float(floor) - REOPEN_FLOOR) <= 1e-6
    assert bool((gates[reopened] >= floor).all()), (kind, target)
    return gates, int(reopened.sum()), int((~kept & (own > 0)).sum()), ref


# ---------------------------------------------------------------- projection


TARGETS = (0.2, 0.35, 0.5, 0.65, 0.8, 0.95)


@pytest.mark.parametrize("name", NAMES)
def test_reference_prices_as_the_cost_model(name):
    """The loops' cost of the reference equals model.cost.pruned, closed layers included; and
    the finite difference of the unclamped cost is a derivative (no width appears squared)."""
    model = _model(name)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        counts = [int(torch.randint(0, w + 1, (), generator=generator)) for w in model.gates.widths]
        counts[1] = 0
        for kind in ("macs", "params"):
            assert _python_fraction(model, kind, counts) == _fraction(model, kind, counts)
    assert _python_fraction(model, "macs", model.gates.widths) == 1.0
    widths = [Fraction(w, 3) for w in model.gates.widths]
    for kind in ("macs", "params"):
        for layer in range(model.gates.num_layers):
            bumped = [w + (i == layer) for i, w in enumerate(widths)]
            twice = [w + 2 * (i == layer) for i, w in enumerate(widths)]
            cost = [_python_cost(model, kind, w, clamp=False) for w in (widths, bumped, twice)]
            assert cost[2] - 2 * cost[1] + cost[0] == 0, (kind, layer)


@pytest.mark.parametrize("net,back_dep", NETS, ids=NET_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_channel_order_is_the_reference_order(name, net, back_dep):
    """channel_order: the reference's order (up to float-undecidable near ties) and forced
    count, its keys and marginals (the budget takes S in float32) closely."""
    model = _model(name, net, back_dep)
    if net == "hc":
        _set_hc(model, torch.empty(sum(model.gates.widths)).uniform_(-4.0, 4.0,
                                                                    generator=torch.Generator().manual_seed(2)))
    la = model.gates.log_alpha().detach()
    for kind in ("macs", "params"):
        budget = BudgetConstraint(model, kind, 0.5, warmup=1.0)
        order, key, marginal, forced = budget.channel_order(la)
        want_order, want_key, want_marginal, want_forced = _reference_order(model, la, kind, budget)
        assert order.tolist() == want_order and forced == want_forced
        assert forced == sum(not record.closable for record in model.gated_layers)
        torch.testing.assert_close(marginal, torch.tensor([float(m) for m in want_marginal], dtype=torch.float64),
                                   rtol=NEAR, atol=0)
        torch.testing.assert_close(key, torch.tensor([float(k) for k in want_key], dtype=torch.float64),
                                   rtol=NEAR, atol=1e-9)


@pytest.mark.parametrize("kind", ["macs", "params"])
@pytest.mark.parametrize("name", NAMES)
def test_projection_keeps_the_first_k_of_the_cost_aware_order(name, kind):
    model = _model(name)
    n = sum(model.gates.widths)
    budget = BudgetConstraint(model, kind, 0.5, warmup=1.0)
    reopened_cases = closed_cases = projected = 0
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        for scale in ("spread", "mostly_closed"):
            if scale == "spread":  # some closed, some fractional, some open
                la = torch.empty(n).uniform_(-4.0, 4.0, generator=generator)
            else:  # training ended far under the target: most test gates are 0
                la = torch.empty(n).uniform_(-9.0, -2.0, generator=generator)
            la = _set_hc(model, la)
            for target in TARGETS:
                budget.target = target
                result = _check_projection(model, budget, la, kind, target)
                if result is not None:
                    projected += 1
                    reopened_cases += result[1] > 0
                    closed_cases += result[2] > 0
    # The cases exercised both directions of the projection.
    assert projected >= 24 and reopened_cases >= 6 and closed_cases >= 6, (projected, reopened_cases, closed_cases)


@pytest.mark.parametrize("name", NAMES)
def test_projection_to_the_full_budget_keeps_everything(name):
    model = _model(name)
    n = sum(model.gates.widths)
    la = _set_hc(model, torch.empty(n).uniform_(-6.0, 4.0, generator=torch.Generator().manual_seed(3)))
    own = hard_concrete.deterministic(la)
    assert (own == 0).any()
    layers = torch.tensor(_layers(model))
    for kind in ("macs", "params"):
        budget = BudgetConstraint(model, kind, 1.0, warmup=1.0)
        gates = budget.project(la)
        assert gates is not None and bool((gates > 0).all())
        assert budget.deterministic(gates) == 1.0
        assert torch.equal(gates[own > 0], own[own > 0])
        _check_projection(model, budget, la, kind, 1.0)
        # Within a layer the closed ones reopen in the order of their logits.
        for layer in range(model.gates.num_layers):
            closed = ((own == 0) & (layers == layer)).nonzero().flatten()
            values = gates[closed][la[closed].argsort()]
            assert bool((values[1:] >= values[:-1]).all()), (kind, layer)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "one_float_step"])
def test_reopened_channel_next_to_its_neighbour_is_open(tied):
    """The cut between two closed channels of one layer whose logits are equal (the order splits
    ties) or one float32 step apart: the kept one's logit shifted by the boundary key times
    its marginal lands on, or one float step off, the threshold, where its test gate is 0 or
    about 1e-8 in float32, yet it must be kept and the other closed; it gets the floor, the test
    gate of a logit REOPEN_MARGIN above the threshold (about 0.14)."""
    model = _model("vgg16")
    n = sum(model.gates.widths)
    a, b = 40, 41  # both in layer 3 (channels 32..47), which channel 32 leads
    la = torch.empty(n).uniform_(-8.0, -3.2, generator=torch.Generator().manual_seed(0))  # all closed on their own
    la[32] = -3.0
    la[a] = -5.0
    la[b] = -5.0 if tied else torch.nextafter(torch.tensor(-5.0), torch.tensor(-100.0))
    la = _set_hc(model, la)
    layers = _layers(model)
    assert layers[a] == layers[b] == layers[32] == 3
    budget = BudgetConstraint(model, "macs", 0.5, warmup=1.0)
    order = _reference_order(model, la, "macs", budget)[0]
    p = order.index(a)
    assert order[p + 1] == b and p >= len(model.gated_layers)  # neither is forced
    # A target between the cost of the first p + 1 channels of the order and the first p + 2.
    lo = _fraction(model, "macs", _counts(model, order[:p + 1]))
    hi = _fraction(model, "macs", _counts(model, order[:p + 2]))
    assert lo < hi
    budget.target = (lo + hi) / 2
    _, key, marginal, _ = budget.channel_order(la)
    shifted = (la[a].double() - (key[a] + key[b]) / 2 * marginal[a]).float()
    if tied:  # exactly the threshold, whose float32 test gate is 0
        assert hard_concrete.deterministic(shifted) == 0
    else:
        assert 0 < hard_concrete.deterministic(shifted) < 1e-7
    gates, reopened, _, _ = _check_projection(model, budget, la, "macs", budget.target)
    assert reopened == p + 1 and int((gates > 0).sum()) == p + 1
    assert gates[a] > 0 and gates[b] == 0
    assert abs(float(gates[a]) - REOPEN_FLOOR) <= 1e-6


@pytest.mark.parametrize("kind", ["macs", "params"])
def test_equal_keys_are_split_by_index(kind):
    """L0-HC logits at a few levels: equal logits in layers of equal marginal cost have equal
    keys and equal tie keys; the cut may fall inside such a group, which then keeps its lowest
    indices (ResNet56's inner layers of one stage, but its first, share one marginal)."""
    model = _model("resnet56")
    n = sum(model.gates.widths)
    levels = torch.tensor([3.0, 1.0, -0.5, -2.0, -4.0, -7.0])
    budget = BudgetConstraint(model, kind, 0.5, warmup=1.0)
    split = across_layers = 0
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        la = _set_hc(model, levels[torch.randint(len(levels), (n,), generator=generator)])
        for target in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
            budget.target = target
            result = _check_projection(model, budget, la, kind, target)
            if result is None:
                continue
            gates, _, _, ref = result
            kept = (gates > 0).tolist()
            first = set(ref.order[:ref.forced])
            groups = {}
            for c in range(n):
                if c not in first:
                    groups.setdefault(ref.key[c], []).append(c)
            for group in groups.values():
                flags = [kept[c] for c in group]  # the group in index order
                assert flags == sorted(flags, reverse=True), (seed, target)  # kept ones first
                if any(flags) and not all(flags):
                    split += 1
                    across_layers += len({_layers(model)[c] for c in group}) > 1
            assert torch.equal(budget.project(la), gates)  # deterministic
    assert split > 0 and across_layers > 0, (split, across_layers)


def test_hc_ties_are_split_by_the_logits_given():
    """L0-HC, ``project(x)`` with x not the model's own logits: equal keys are ordered by x
    (then index), never by the model's own logits.

    The five-layer VGG, three channels a layer, in float64: channel 13 (last layer, x = -3) and
    channel 1 (first layer, x tuned to about -259 so that the budget's keys are exactly equal:
    the first layer's marginal is some 400 times the last's). By x, 13 comes first; by index, or
    by the model's own logits (set to rank 1 above 13), 1 would, and the expensive channel 1 does
    not fit the target that channel 13 does. Channels 4 and 5 (x = 2, one layer, equal keys) split
    by index, though the model's own logits rank 5 above 4."""
    model = _hand_vgg(3)
    c1, c13 = 1, 13
    x = torch.tensor([3.0, -200.0, -8.0] + [3.0, 2.0, 2.0] + [3.0, 2.0, -8.0] * 2 + [3.0, -3.0, -8.0],
                     dtype=torch.float64)
    budget = BudgetConstraint(model, "macs", 0.5, warmup=1.0)
    # Channel 1's marginal does not depend on its own logit (no self term): place its key on 13's.
    _, key, marginal, _ = budget.channel_order(x)
    x[c1] = THRESHOLD + float(key[c13] * marginal[c1])
    start = float(x[c1])
    for step in range(20):
        x[c1] = start + (-1) ** step * (step // 2) * math.ulp(start)
        _, key, _, _ = budget.channel_order(x)
        if key[c1] == key[c13]:
            break
    assert key[c1] == key[c13] and key[c1] < 0 < x[c13] - x[c1], "no exact tie"
    assert key[4] == key[5]
    # The model's own logits rank 1 above 13 and 5 above 4.
    own = 1.0 + 0.1 * torch.arange(15.0)
    own[c1], own[c13] = 5.0, -5.0
    _set_hc(model, own)
    order = budget.channel_order(x)[0].tolist()
    assert order.index(c13) + 1 == order.index(c1) and order.index(4) + 1 == order.index(5)
    for first, second in ((c13, c1), (4, 5)):
        p = order.index(first)
        with_first = _fraction(model, "macs", _counts(model, order[:p + 1]))
        with_both = _fraction(model, "macs", _counts(model, order[:p + 2]))
        assert with_both - with_first > TOLERANCE, (first, second)
        budget.target = with_first + TOLERANCE / 4
        gates, _, _, _ = _check_projection(model, budget, x, "macs", budget.target)
        assert gates[first] > 0 and gates[second] == 0, (first, second)
        # The same whatever the model's own logits.
        _set_hc(model, x.flip(0))
        assert torch.equal(budget.project(x), gates)
        _set_hc(model, own)


def _dep_pre_activations(model):
    """The Dep-L0 generator's W_i a_{i-1} + b_i with loops in double precision, in the layers' order."""
    generator = model.gates.logits
    a = [1.0] * generator.layers[0].in_features
    out = []
    for layer in generator.layers:
        weight, bias = layer.weight.tolist(), layer.bias.tolist()
        h = [sum(w * x for w, x in zip(row, a)) + b0 for row, b0 in zip(weight, bias)]
        a = [math.log(100.0) * math.tanh(v) for v in h]
        out.append(h)
    if generator.backward:
        out.reverse()
    return [v for h in out for v in h]


@pytest.mark.parametrize("back_dep", [False, True], ids=["dep", "dep-back"])
def test_saturated_dep_logits_are_ordered_by_pre_activation(back_dep):
    """Dep-L0's tanh saturates: many logits are exactly log(100) or -log(100) in float32. The
    projection still lands within the tolerance (it may split such a tie), and within a layer
    the tied channels it keeps are those of the largest generator pre-activations."""
    model = _model("resnet56", net="dep", back_dep=back_dep)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.gates.logits.layers:
            layer.weight.normal_(0.0, 1.0, generator=generator)
            layer.bias.normal_(0.0, 20.0, generator=generator)
    la = model.gates.log_alpha().detach()
    top = torch.tensor(math.log(100.0), dtype=torch.float32)
    assert la.max() == top and la.min() == -top
    assert (la == top).sum() > 20 and (la == -top).sum() > 20
    pre = _dep_pre_activations(model)
    torch.testing.assert_close(model.gates.tie_key(la).double(), torch.tensor(pre, dtype=torch.float64),
                               rtol=1e-5, atol=1e-4)
    layers = _layers(model)
    split = 0
    for target in (0.35, 0.45, 0.5, 0.6, 0.75, 0.9):
        budget = BudgetConstraint(model, "macs", target, warmup=1.0)
        result = _check_projection(model, budget, la, "macs", target)
        assert result is not None
        kept = (result[0] > 0).tolist()
        assert abs(budget.deterministic(result[0]) - target) <= TOLERANCE, target
        for layer in range(model.gates.num_layers):
            for level in (top, -top):
                group = [c for c in range(len(kept)) if layers[c] == layer and la[c] == level]
                kept_pre = [pre[c] for c in group if kept[c]]
                closed_pre = [pre[c] for c in group if not kept[c]]
                if kept_pre and closed_pre:
                    split += 1
                    assert min(kept_pre) > max(closed_pre), (target, layer, float(level))
    assert split > 0


@pytest.mark.parametrize("kind", ["macs", "params"])
def test_unreachable_target_is_none(kind):
    """ResNet56's shortcuts, conv2s and classifier are not gated: one channel per
    gated layer still costs a good part of the dense network."""
    model = _model("resnet56")
    n = sum(model.gates.widths)
    la = _set_hc(model, torch.empty(n).uniform_(-4.0, 4.0, generator=torch.Generator().manual_seed(0)))
    budget = BudgetConstraint(model, kind, 0.5, warmup=1.0)
    cheapest = float(budget.fraction(torch.ones_like(budget.cost.dense_widths)))
    assert cheapest == _fraction(model, kind, [1] * model.gates.num_layers) > 0.1
    for target in (0.01, cheapest - TOLERANCE - 0.005):
        budget.target = target
        assert budget.project(la) is None, target
        assert _reference(model, la, kind, target, budget) is None
        assert budget.why_not_projected(la).startswith("the cheapest network"), target
    budget.target = cheapest + 0.001
    gates, _, _, _ = _check_projection(model, budget, la, kind, budget.target)
    assert budget.deterministic(gates) <= budget.target


def test_tolerance_fallback_takes_one_channel_too_many():
    """ResNet56 at 1/8 width: the stem's second channel (3-input conv at 32x32, plus
    the first block's conv1 input) costs more than 2% of the MACs. Put its key in the
    middle of the order, with a target more than TOLERANCE above the network without
    it: the projection keeps it, ending above the target but within the tolerance."""
    model = _model("resnet56")
    n = sum(model.gates.widths)
    la = torch.empty(n).uniform_(-3.0, 3.0, generator=torch.Generator().manual_seed(1))
    la[0], la[2], la[3] = 9.0, 8.0, 7.9  # one stem channel, the first block's conv1 full, all first
    la = _set_hc(model, la)
    # The stem's marginal does not depend on its own logits (no self term): place its key.
    _, key, marginal, _ = _reference_order(model, la, "macs")
    others = sorted((key[c] for c in range(n) if c != 1), reverse=True)
    la[1] = THRESHOLD + float((others[n // 2 - 1] + others[n // 2]) / 2 * marginal[1])
    la = _set_hc(model, la)
    budget = BudgetConstraint(model, "macs", 0.5, warmup=1.0)
    order, key, _, forced = _reference_order(model, la, "macs", budget)
    p = order.index(1)
    assert forced == 1 and order[0] == 0 and max(order.index(2), order.index(3)) < p and n // 3 < p < 2 * n // 3
    assert key[order[p - 1]] > key[1] > key[order[p + 1]]  # tied with none
    without, with_it = order[:p], order[:p + 1]
    low, high = _fraction(model, "macs", _counts(model, without)), _fraction(model, "macs", _counts(model, with_it))
    jump = high - low
    assert jump > TOLERANCE, jump

    target = low + TOLERANCE + (jump - TOLERANCE) / 2
    budget.target = target
    gates = budget.project(la)
    assert gates is not None and set((gates > 0).nonzero().flatten().tolist()) == set(with_it)
    cost = budget.deterministic(gates)
    assert cost == high and target < cost <= target + TOLERANCE and target - low > TOLERANCE
    _check_projection(model, budget, la, "macs", target)

    # Within the tolerance below, the network without it is taken.
    budget.target = low + 0.9 * TOLERANCE
    gates = budget.project(la)
    assert set((gates > 0).nonzero().flatten().tolist()) == set(without)
    assert budget.deterministic(gates) == low
    _check_projection(model, budget, la, "macs", budget.target)


def _hand_vgg_with_a_big_jump():
    """The five-layer VGG, two channels a layer: each layer's first channel is forced, and
    the first layer's second channel, whose key divides by that 32x32 layer's large marginal
    cost, is last in the order and adds over 40% of the MACs."""
    model = _hand_vgg(2)
    la = _set_hc(model, torch.tensor([3.0, 2.5, 2.0, 0.5, 1.5, 1.4, 1.3, 1.2, 1.1, 1.0]))
    order, _, _, forced = _reference_order(model, la, "macs")
    assert order[:forced] == [8, 6, 4, 2, 0] and order[-1] == 1
    low = _fraction(model, "macs", [1, 2, 2, 2, 2])
    assert _fraction(model, "macs", [2, 2, 2, 2, 2]) == 1.0 and 1.0 - low > 0.4
    return model, la, low


def test_no_network_within_tolerance_gives_the_one_below():
    """With the target between the two sides of that jump, closer to the one below, neither
    side is within the tolerance and the projection stays below the target (the closest)."""
    model, la, low = _hand_vgg_with_a_big_jump()
    target = low + 0.45 * (1.0 - low)
    assert target - low > TOLERANCE and 1.0 - target > TOLERANCE
    budget = BudgetConstraint(model, "macs", target, warmup=1.0)
    gates = budget.project(la)
    assert gates is not None and torch.equal(gates > 0, torch.arange(10) != 1)
    assert budget.deterministic(gates) == low
    _check_projection(model, budget, la, "macs", target)


def test_projection_never_moves_further_from_the_target():
    """The same VGG with the target just above the middle of the jump: the network of the
    logits' own test gates (everything open) is closer than the one below, so the projection
    declines (None) rather than ending further from the target."""
    model, la, low = _hand_vgg_with_a_big_jump()
    target = (low + 1.0) / 2 + 0.005
    budget = BudgetConstraint(model, "macs", target, warmup=1.0)
    assert budget.deterministic(hard_concrete.deterministic(la)) == 1.0
    assert 1.0 - target > TOLERANCE
    assert budget.project(la) is None
    assert _reference(model, la, "macs", target, budget) is None
    assert "further from it than the trained network" in budget.why_not_projected(la)
    # Just below the middle, the network below is the closer one and is taken.
    budget.target = (low + 1.0) / 2 - 0.005
    gates = budget.project(la)
    assert gates is not None and budget.deterministic(gates) == low


def test_a_cut_network_is_projected_even_further_from_the_target():
    """The rule above holds only for a connected network of the logits' own: a cut one is
    projected even where the projection ends further from the target.

    The five-layer VGG, two channels a layer, its last layer fully closed; the first layer's
    second channel is last but one in the order and adds about half the MACs. The cut network
    lies more than the tolerance above a target 60% of the way up that jump, so no network of
    the order is within the tolerance above, and the one below (the jump's foot) is further
    from the target than the cut one. project() and final_gates() still take it, connected,
    where the rule for a connected network would give None and leave the cut one in place.

    (A cut network within the tolerance never comes to this: the forced channels and those
    open on their own make a prefix of the order at its very cost, a closed layer being priced
    as one channel, so the projection lands within the tolerance.)"""
    model = _hand_vgg(2)
    la = _set_hc(model, torch.tensor([3.0, 2.5, 2.0, 0.5, 1.5, 1.4, 1.3, 1.2, -5.0, -5.5]))
    budget = BudgetConstraint(model, "macs", 0.5, warmup=1.0)
    order, _, _, forced = _reference_order(model, la, "macs", budget)
    assert forced == 5 and order[-2:] == [1, 9] and 8 in order[:forced]
    assert budget.disconnected() == [4]
    cut = budget.deterministic()
    assert cut == _fraction(model, "macs", [2, 2, 2, 2, 0]) == _fraction(model, "macs", _counts(model, order[:-1]))
    low = _fraction(model, "macs", _counts(model, order[:-2]))
    assert low == _fraction(model, "macs", [1, 2, 2, 2, 1]) and cut - low > 0.4
    budget.target = target = low + 0.6 * (cut - low)
    assert cut - target > TOLERANCE and target - low > cut - target
    gates = budget.project(la)
    assert gates is not None and budget.disconnected(gates) == []
    assert torch.equal(gates > 0, torch.tensor([True, False] + [True] * 7 + [False]))
    assert budget.deterministic(gates) == low
    gates, reopened, closed, _ = _check_projection(model, budget, la, "macs", target)
    assert (reopened, closed) == (1, 1)  # layer 4's forced channel, and the jump
    assert torch.equal(budget.final_gates(), gates)


@pytest.mark.parametrize("kind", ["macs", "params"])
def test_fallback_keeps_channels_that_cost_nothing(kind):
    """A target within the tolerance below the cheapest network (one channel per
    gated layer): every prefix up to the first channel that costs something has
    that same cost (a closed layer is priced as one channel), so the projection
    should keep those channels, not close every gate it may."""
    model = _model("resnet56")
    n = sum(model.gates.widths)
    la = _set_hc(model, torch.empty(n).uniform_(-4.0, 4.0, generator=torch.Generator().manual_seed(0)))
    budget = BudgetConstraint(model, kind, 0.5, warmup=1.0)
    cheapest = float(budget.fraction(torch.ones_like(budget.cost.dense_widths)))
    budget.target = cheapest - TOLERANCE / 2
    gates = budget.project(la)
    assert gates is not None
    assert budget.deterministic(gates) == cheapest
    kept = (gates > 0).nonzero().flatten().tolist()
    order, _, _, forced = budget.channel_order(la)
    assert len(kept) > forced  # more than the stem's forced channel
    assert set(kept) == set(order[:len(kept)].tolist())
    # The same cost with the next channel of the order: the projection left it out for nothing.
    free = _fraction(model, kind, _counts(model, kept + [int(order[len(kept)])])) == cheapest
    assert not free, f"kept {len(kept)} channels; the next one of the order costs nothing"
    _check_projection(model, budget, la, kind, budget.target)


def test_the_expensive_layer_closes_first():
    """Equal logits everywhere: the keys differ only by the layers' marginal costs, and the
    channels of the most expensive layer (the 32x32 one) close first, though they come first by
    index (and by any order that ignored the cost)."""
    model = _hand_vgg(4)
    la = _set_hc(model, torch.full((20,), 2.0))
    per_layer = _marginals(model, "macs", _expected_open(model, la.tolist()))
    assert all(a > b for a, b in zip(per_layer[:-1], per_layer[1:]))  # 32x32 dearest, 2x2 cheapest
    budget = BudgetConstraint(model, "macs", 0.5, warmup=1.0)
    order, _, _, forced = budget.channel_order(la)
    # Each layer's first channel, cheapest layer first; then the rest, cheapest layer first.
    assert forced == 5 and order.tolist() == [16, 12, 8, 4, 0] + [c for layer in (4, 3, 2, 1, 0)
                                                                  for c in range(4 * layer + 1, 4 * layer + 4)]
    # Just above the network without the first layer's last three, or without both first
    # layers' last three: exactly those close.
    for counts in ([1, 4, 4, 4, 4], [1, 1, 4, 4, 4]):
        budget.target = _fraction(model, "macs", counts) + TOLERANCE / 4
        gates = budget.project(la)
        assert model.gates.per_layer_sum((gates > 0).float()).tolist() == counts
        _check_projection(model, budget, la, "macs", budget.target)


@pytest.mark.parametrize("kind", ["macs", "params"])
@pytest.mark.parametrize("name", NAMES)
def test_equal_logits_close_the_dearest_layers_first(name, kind):
    """The real networks, all logits equal: no kept channel (but the forced ones) lies in a
    layer that costs more per channel than a layer with a closed channel. (Some layers' marginals
    are equal in exact arithmetic and not in floating point, so this is checked against the
    reference's marginals with a little slack rather than channel by channel.)"""
    model = _model(name)
    n = sum(model.gates.widths)
    la = _set_hc(model, torch.full((n,), 1.0))
    budget = BudgetConstraint(model, kind, 0.5, warmup=1.0)
    _, _, marginal, _ = _reference_order(model, la, kind)
    order, _, _, forced = budget.channel_order(la)
    forced = set(order[:forced].tolist())
    checked = 0
    for target in (0.4, 0.7):
        budget.target = target
        gates = budget.project(la)
        if gates is None:
            continue
        checked += 1
        assert abs(budget.deterministic(gates) - target) <= TOLERANCE and budget.disconnected(gates) == []
        kept = (gates > 0).tolist()
        free = [c for c in range(n) if c not in forced]
        kept_cost = [marginal[c] for c in free if kept[c]]
        closed_cost = [marginal[c] for c in free if not kept[c]]
        assert kept_cost and closed_cost and float(max(kept_cost)) <= float(min(closed_cost)) * (1 + 1e-6), target
    assert checked


def _layer_slice(model, layer):
    start = sum(model.gates.widths[:layer])
    return slice(start, start + model.gates.widths[layer])


@pytest.mark.parametrize("kind", ["macs", "params"])
@pytest.mark.parametrize("name", NAMES)
def test_projection_keeps_the_network_connected(name, kind):
    """A target just above the cheapest network, with some layers' logits the lowest of all:
    every layer that may not close (every VGG layer, ResNet56's stem) keeps its largest logit,
    while ResNet56's residual-block inner layers may close fully (the block passes its
    shortcut on); the projected network is not disconnected."""
    model = _model(name)
    n = sum(model.gates.widths)
    closable = [record.closable for record in model.gated_layers]
    assert closable == ([False] + [True] * (model.gates.num_layers - 1) if name == "resnet56"
                        else [False] * model.gates.num_layers)
    la = torch.empty(n).uniform_(-4.0, 4.0, generator=torch.Generator().manual_seed(4))
    lowest = (0, 3, 20) if name == "resnet56" else (5, 9, 12)  # the stem / three VGG layers
    for layer in lowest:
        la[_layer_slice(model, layer)] = torch.linspace(-8.0, -9.0, model.gates.widths[layer])
    la = _set_hc(model, la)
    budget = BudgetConstraint(model, kind, 0.5, warmup=1.0)
    cheapest = _fraction(model, kind, [1] * model.gates.num_layers)
    for target in (cheapest + 0.001, cheapest + 0.01):
        budget.target = target
        gates, _, _, _ = _check_projection(model, budget, la, kind, target)
        kept = model.gates.per_layer_sum((gates > 0).float()).long().tolist()
        for layer in lowest:
            if not closable[layer]:  # kept only its forced channel: its largest logit
                assert kept[layer] == 1 and gates[_layer_slice(model, layer)][0] > 0, (target, layer)
        assert all(k > 0 for k, c in zip(kept, closable) if not c)
        if name == "resnet56":
            assert kept[3] == kept[20] == 0  # inner layers, fully closed
        assert budget.disconnected(gates) == []


def test_disconnected_names_the_layers_that_cut_the_network():
    vgg, resnet = _model("vgg16"), _model("resnet56")
    for model, cut, harmless in ((vgg, 4, None), (resnet, 0, 5)):
        budget = BudgetConstraint(model, "macs", 0.5, warmup=1.0)
        gates = torch.ones(sum(model.gates.widths))
        assert budget.disconnected(gates) == []
        gates[_layer_slice(model, cut)] = 0.0
        assert budget.disconnected(gates) == [cut]
        gates[_layer_slice(model, cut)][-1] = 1e-30  # one channel, however faint, connects
        assert budget.disconnected(gates) == []
        if harmless is not None:
            gates[_layer_slice(model, harmless)] = 0.0
            assert budget.disconnected(gates) == []
        # The model's own test gates by default.
        la = torch.full((sum(model.gates.widths),), 3.0)
        la[_layer_slice(model, cut)] = -5.0
        _set_hc(model, la)
        assert budget.disconnected() == [cut]


def test_final_gates_reconnects_a_network_within_the_tolerance():
    """final_gates() projects a network that meets the target but has a VGG layer fully
    closed; the same network with that layer open is left alone (None), and one off the
    target by more than the tolerance is projected."""
    model = _model("vgg16")
    n = sum(model.gates.widths)
    la = torch.full((n,), 3.0)
    la[_layer_slice(model, 5)] = torch.linspace(-5.0, -6.0, model.gates.widths[5])
    la = _set_hc(model, la)
    budget = BudgetConstraint(model, "macs", 0.5, warmup=1.0)
    budget.target = budget.deterministic()  # exactly on target
    assert budget.disconnected() == [5]
    gates = budget.final_gates()
    assert gates is not None
    assert budget.disconnected(gates) == []
    assert abs(budget.deterministic(gates) - budget.target) <= TOLERANCE
    assert gates[_layer_slice(model, 5)][0] > 0  # the layer's largest logit, reopened
    _check_projection(model, budget, la, "macs", budget.target)

    la[_layer_slice(model, 5).start] = 3.0  # one channel of the layer open on its own
    la = _set_hc(model, la)
    assert budget.disconnected() == [] and abs(budget.deterministic() - budget.target) <= TOLERANCE
    assert budget.final_gates() is None

    budget.target = budget.deterministic() - 3 * TOLERANCE  # connected but over the target
    gates = budget.final_gates()
    assert gates is not None and torch.equal(gates, budget.project(la))
    assert abs(budget.deterministic(gates) - budget.target) <= TOLERANCE


def test_a_reopened_layer_passes_its_input_on():
    """VGG16 with layer 5 fully closed, on target: final_gates() reopens that layer's largest
    logit (-8), its only channel, whose logit shifted by the boundary lies far below the
    threshold; it gets the floor (the test gate of a logit REOPEN_MARGIN above the threshold,
    about 0.14). Frozen there, the network's output varies with its input about that fraction as
    much as with the channel fully open, where at a gate of 1e-38 it would vary by about 1e-41:
    every later layer would see constants."""
    model = _model("vgg16")
    n, width = sum(model.gates.widths), model.gates.widths[5]
    layer = _layer_slice(model, 5)
    la = torch.full((n,), 3.0)
    la[layer] = torch.linspace(-8.0, -9.0, width)
    la = _set_hc(model, la)
    budget = BudgetConstraint(model, "macs", 0.5, warmup=1.0)
    budget.target = budget.deterministic()
    gates = budget.final_gates()
    assert gates is not None and budget.disconnected(gates) == []
    assert (gates[layer] > 0).tolist() == [True] + [False] * (width - 1)
    _, reopened, _, ref = _check_projection(model, budget, la, "macs", budget.target)
    c = layer.start
    assert reopened == 1 and Fraction(float(la[c])) - ref.boundary * ref.marginal[c] < THRESHOLD
    assert abs(float(gates[c]) - REOPEN_FLOOR) <= 1e-6 and REOPEN_FLOOR > 0.13

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def spread(z):
        """How much the frozen model's output differs between the two inputs."""
        frozen = _model("vgg16")
        frozen.gates.freeze(z)
        frozen.eval()
        with torch.no_grad():
            out = frozen(x)
        return float((out[0] - out[1]).abs().max())

    fully_open = gates.clone()
    fully_open[c] = 1.0
    assert spread(fully_open) > 0 and spread(gates) >= 0.05 * spread(fully_open), (spread(gates), spread(fully_open))


def test_old_frozen_checkpoint_without_the_buffer_loads():
    """A checkpoint written before frozen gates were stored (gates_frozen, no
    gates.frozen_gates) loads frozen at the test gates of its logits."""
    model = _model("resnet56")
    la = _set_hc(model, torch.empty(sum(model.gates.widths)).uniform_(-4, 4))
    old = {"model": model.state_dict(), "gates_frozen": True}
    assert "gates.frozen_gates" not in old["model"]
    fresh = _model("resnet56", seed=1)
    load_model_state(fresh, old)
    assert fresh.gates.frozen
    assert torch.equal(fresh.gates.test_gates(), hard_concrete.deterministic(la))


# ---------------------------------------------------------------- frozen gates


def _some_gates(model, seed=0):
    """A (total,) gate vector with zeros, fractions and ones, and one fully closed layer."""
    n = sum(model.gates.widths)
    generator = torch.Generator().manual_seed(seed)
    z = torch.rand(n, generator=generator)
    z[torch.rand(n, generator=generator) < 0.3] = 0.0
    z[torch.rand(n, generator=generator) < 0.2] = 1.0
    width0, width1 = model.gates.widths[:2]
    z[width0:width0 + width1] = 0.0  # layer 1 fully closed
    return z


@pytest.mark.parametrize("net,back_dep", NETS, ids=NET_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_freeze_at_given_gates(name, net, back_dep):
    model = _model(name, net, back_dep)
    z = _some_gates(model)
    given = z.clone()
    model.gates.freeze(z)
    z.fill_(0.5)  # the module holds its own copy
    gates = model.gates
    assert gates.frozen and torch.equal(gates.test_gates(), given)
    expected_kept = [int((part > 0).sum()) for part in given.split(gates.widths)]
    assert gates.kept().tolist() == expected_kept and expected_kept[1] == 0
    assert all(not p.requires_grad for p in gates.parameters()) and len(list(gates.parameters())) > 0

    model.train()
    for batch in (1, 5):
        out = gates(batch)
        assert len(out) == gates.num_layers
        for g, part in zip(out, given.split(gates.widths)):
            assert g.shape == (1, len(part), 1, 1) and torch.equal(g.flatten(), part)
    x = torch.randn(2, 3, 32, 32)
    model(x).square().sum().backward()
    assert all(p.grad is None for p in gates.parameters())
    assert all(p.grad is not None for p in model.weight_parameters())

    assert torch.equal(model.state_dict()["gates.frozen_gates"], given)
    budget = BudgetConstraint(model, "macs", 0.5, warmup=1.0)
    assert budget.deterministic() == budget.deterministic(given) == _fraction(model, "macs", expected_kept)


@pytest.mark.parametrize("net,back_dep", NETS, ids=NET_IDS)
def test_freeze_without_gates_keeps_the_current_test_gates(net, back_dep, set_logits):
    model = _model("resnet56", net, back_dep)
    n = sum(model.gates.widths)
    la = torch.empty(n).uniform_(-3.0, 3.0, generator=torch.Generator().manual_seed(0))
    if net == "hc":
        _set_hc(model, la)
    else:
        set_logits(model, la.double())
    before = hard_concrete.deterministic(model.gates.log_alpha().detach())
    assert (before == 0).any() and ((before > 0) & (before < 1)).any()
    model.gates.freeze()
    assert torch.equal(model.gates.test_gates(), before)
    assert torch.equal(model.state_dict()["gates.frozen_gates"], before)
    # Later changes to the logit parameters no longer move the gates.
    with torch.no_grad():
        for p in model.gates.parameters():
            p.add_(1.0)
    assert torch.equal(model.gates.test_gates(), before)


@pytest.mark.parametrize("net,back_dep", NETS, ids=NET_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_frozen_checkpoint_round_trip(name, net, back_dep, tmp_path):
    model = _model(name, net, back_dep, seed=0)
    z = _some_gates(model, seed=1)
    model.gates.freeze(z)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    with torch.no_grad():
        model(x)  # non-trivial BN statistics
    model.eval()
    path = tmp_path / "last.pt"
    torch.save({"model": model.state_dict(), "gates_frozen": True}, path)
    checkpoint = torch.load(path, weights_only=True)

    fresh = _model(name, net, back_dep, seed=1)
    assert not torch.equal(fresh.gates.test_gates(), z)
    with pytest.raises(RuntimeError, match="frozen_gates"):
        fresh.load_state_dict(checkpoint["model"])  # an unfrozen model has no such buffer

    fresh = _model(name, net, back_dep, seed=1)
    load_model_state(fresh, checkpoint)
    assert fresh.gates.frozen and torch.equal(fresh.gates.test_gates(), z)
    assert fresh.gates.kept().tolist() == model.gates.kept().tolist()
    assert all(not p.requires_grad for p in fresh.gates.parameters())
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    fresh.train()
    assert all(torch.equal(g.flatten(), part) for g, part in zip(fresh.gates(3), z.split(fresh.gates.widths)))

    # An unfrozen checkpoint loads unfrozen.
    plain = _model(name, net, back_dep, seed=2)
    other = _model(name, net, back_dep, seed=3)
    load_model_state(other, {"model": plain.state_dict(), "gates_frozen": False})
    assert not other.gates.frozen and torch.equal(other.gates.test_gates(), plain.gates.test_gates())


# ---------------------------------------------------------------- export


def _module_cost(model, x):
    """(MACs per example, params) of a plain network, from its Conv2d/Linear/BatchNorm modules."""
    macs = []

    def conv_hook(module, inputs, out):
        macs.append(out[0].numel() * (module.in_channels // module.groups) * module.kernel_size[0]
                    * module.kernel_size[1])

    def linear_hook(module, inputs, out):
        macs.append(module.in_features * module.out_features)

    handles, params = [], 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            params += sum(p.numel() for p in module.parameters(recurse=False))
    with torch.no_grad():
        model(x[:1])
    for handle in handles:
        handle.remove()
    assert params == sum(p.numel() for p in model.parameters())  # nothing else holds parameters
    return sum(macs), params


@pytest.mark.parametrize("kind,target", [("macs", 0.5), ("params", 0.4), ("macs", 0.9)])
@pytest.mark.parametrize("name", NAMES)
def test_export_of_a_projected_model(name, kind, target):
    model = _model(name)
    n = sum(model.gates.widths)
    la = torch.empty(n).uniform_(-6.0, 4.0, generator=torch.Generator().manual_seed(5))
    la = _set_hc(model, la)
    x = torch.randn(4, 3, 32, 32)
    model.train()
    with torch.no_grad():
        for _ in range(2):  # non-trivial BN statistics
            model(1.5 * torch.randn_like(x) + 0.3)
    budget = BudgetConstraint(model, kind, target, warmup=1.0)
    projected = budget.project(la)
    assert projected is not None
    own = hard_concrete.deterministic(la)
    assert ((projected > 0) != (own > 0)).any()  # the projection changed the network
    model.gates.freeze(projected)
    assert budget.deterministic() == budget.deterministic(projected)
    assert abs(budget.deterministic() - target) <= TOLERANCE

    model.eval()
    compact, payload = export_pruned(model)
    macs, params = model.cost.pruned(model.gates.kept())
    assert (payload["macs"], payload["params"]) == (macs, params)
    assert _module_cost(compact, x) == (macs, params)
    dense_macs, dense_params = model.cost.dense()
    assert (macs if kind == "macs" else params) / (dense_macs if kind == "macs" else dense_params) == \
        budget.deterministic()
    assert params < dense_params and macs < dense_macs
    assert list(compact.gates.widths) == model.gates.kept().clamp(min=1).tolist()
    with torch.no_grad():
        expected, got = model(x), compact(x)
    assert (got - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())
