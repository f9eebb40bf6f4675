"""The budget projection and what follows it: frozen gates and the export.

* :meth:`BudgetConstraint.project` (l0_layers/budget.py) against an
  independent reference written here with Python loops: channels ranked by
  logit, equal logits kept or closed together, per-layer counts priced with
  ``model.cost.pruned`` (never the batched ``CostModel`` path the projection
  uses); the largest k at most the target, or the smallest k above it when
  that one is within the tolerance and the one below is not; the values of
  kept and reopened channels; unreachable targets.
* :meth:`ChannelGates.freeze` with given gates or the current test gates, and
  a checkpoint of frozen gates restored by :func:`models.load_model_state`.
* A model frozen at a projection exports (models/export.py) to a network whose
  MACs/params, counted here by walking its modules, are the projected cost,
  and whose output is the gated model's.
"""
import pytest
import torch
from torch import nn

from l0_layers import hard_concrete
from l0_layers.budget import TOLERANCE, BudgetConstraint
from models import VGG, build_model, default_arch, export_pruned, load_model_state

NAMES = ("resnet56", "vgg16")
NETS = (("hc", False), ("dep", False), ("dep", True))
NET_IDS = ("hc", "dep", "dep-back")


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name="resnet56", net="hc", back_dep=False, seed=0):
    torch.manual_seed(seed)
    return build_model(default_arch(name, 10, 0.125, net=net, back_dep=back_dep))


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


def _python_fraction(model, kind, counts):
    """The same cost from the structure records with plain integers (fast enough to price every prefix)."""
    def cost(widths):
        macs = params = 0
        for w in model.weight_layers:
            c_in = w.in_channels if w.in_gate is None else max(1, widths[w.in_gate])
            c_out = w.out_channels if w.out_gate is None else max(1, widths[w.out_gate])
            macs += w.kernel * w.kernel * w.out_hw * c_in * c_out
            params += w.kernel * w.kernel * c_in * c_out + (int(w.bias) + 2 * int(w.bn is not None)) * c_out
        return macs if kind == "macs" else params

    return cost(counts) / cost(model.gates.widths)


def _counts(model, channels):
    counts = [0] * model.gates.num_layers
    layers = _layers(model)
    for c in channels:
        counts[layers[c]] += 1
    return counts


def _reference(model, log_alpha, kind, target):
    """The projection's kept set, computed with loops: ``None`` or ``(kept channel set, cost)``.

    Candidates are the prefixes of the channels sorted by logit (descending)
    that end between two different logits. Take the longest one whose cost is
    at most the target; if there is none, or it is more than TOLERANCE below,
    the shortest one above the target when that is within TOLERANCE above;
    ``None`` if that is outside the tolerance and further from the target than
    the logits' own network (channels with log_alpha > PRUNE_THRESHOLD).
    """
    values = log_alpha.tolist()
    order = sorted(range(len(values)), key=lambda c: -values[c])
    layers = _layers(model)
    counts = [0] * model.gates.num_layers
    prefixes, costs = [0], [_python_fraction(model, kind, counts)]
    i = 0
    while i < len(order):
        j = i
        while j < len(order) and values[order[j]] == values[order[i]]:
            counts[layers[order[j]]] += 1
            j += 1
        prefixes.append(j)
        costs.append(_python_fraction(model, kind, counts))
        i = j
    below = [g for g, cost in enumerate(costs) if cost <= target]
    above = [g for g, cost in enumerate(costs) if cost > target]
    choice = below[-1] if below else None
    if (choice is None or target - costs[choice] > TOLERANCE) and above and costs[above[0]] - target <= TOLERANCE:
        choice = above[0]
    if choice is None:
        return None
    trained_counts = [0] * model.gates.num_layers
    for c, value in enumerate(values):
        trained_counts[layers[c]] += value > hard_concrete.PRUNE_THRESHOLD
    trained = _python_fraction(model, kind, trained_counts)
    gap = abs(costs[choice] - target)
    if gap > TOLERANCE and gap > abs(trained - target):
        return None  # no better than the network the logits give on their own
    return set(order[:prefixes[choice]]), costs[choice]


def _check_projection(model, budget, log_alpha, kind, target):
    """Every property of one projection; returns (gates, number reopened, number closed) or None."""
    n = log_alpha.numel()
    gates = budget.project(log_alpha)
    expected = _reference(model, log_alpha, kind, target)
    if expected is None:
        assert gates is None, (kind, target)
        return None
    assert gates is not None, (kind, target)
    assert gates.shape == (n,) and gates.dtype == log_alpha.dtype
    assert bool(((gates >= 0) & (gates <= 1)).all())
    kept = gates > 0
    kept_set = set(kept.nonzero().flatten().tolist())
    assert kept_set == expected[0], (kind, target, len(kept_set), len(expected[0]))

    # The kept channels are the top-k by logit.
    if 0 < len(kept_set) < n:
        assert log_alpha[kept].min() > log_alpha[~kept].max()
    # Its cost, as the budget prices it and as model.cost.pruned does.
    cost = budget.deterministic(gates)
    counts = _counts(model, kept_set)
    assert cost == _fraction(model, kind, counts) == expected[1]
    # At most the target and maximal, or the tolerance fallback. Equal logits
    # go together: the next step adds every channel of the next logit value.
    k = len(kept_set)
    if cost <= target:
        if k < n:  # the next channel(s) by logit would not fit
            nxt = log_alpha[~kept].max()
            more = _counts(model, kept_set | set((log_alpha == nxt).nonzero().flatten().tolist()))
            assert _fraction(model, kind, more) > target, (kind, target, k)
    else:
        assert cost - target <= TOLERANCE
        if k == 0:  # the fallback from below the cheapest network
            return gates, 0, int((hard_concrete.deterministic(log_alpha) > 0).sum())
        last = log_alpha[kept].min()
        fewer = _counts(model, kept_set - set((log_alpha == last).nonzero().flatten().tolist()))
        assert target - _fraction(model, kind, fewer) > TOLERANCE, (kind, target, k)

    # Values: a channel open on its own keeps its test gate; a reopened one
    # takes the test gate of its logit shifted to put the threshold midway
    # between the k-th and (k+1)-th logits.
    own = hard_concrete.deterministic(log_alpha)
    assert torch.equal(gates[kept & (own > 0)], own[kept & (own > 0)])
    reopened = kept & (own == 0)
    if reopened.any() and k < n:
        sorted_logits = log_alpha.double().sort(descending=True).values
        shift = hard_concrete.PRUNE_THRESHOLD - (sorted_logits[k - 1] + sorted_logits[k]) / 2
        assert shift > 0
        want = hard_concrete.deterministic(log_alpha.double() + shift)[reopened]
        torch.testing.assert_close(gates[reopened].double(), want, rtol=1e-5, atol=1e-6)
    assert bool((gates[reopened] > 0).all())
    return gates, int(reopened.sum()), int((~kept & (own > 0)).sum())


# ---------------------------------------------------------------- projection


TARGETS = (0.2, 0.35, 0.5, 0.65, 0.8, 0.95)


@pytest.mark.parametrize("name", NAMES)
def test_reference_prices_as_the_cost_model(name):
    """The loops' cost of the reference equals model.cost.pruned, closed layers included."""
    model = _model(name)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        counts = [int(torch.randint(0, w + 1, (), generator=generator)) for w in model.gates.widths]
        counts[1] = 0
        for kind in ("macs", "params"):
            assert _python_fraction(model, kind, counts) == _fraction(model, kind, counts)
    assert _python_fraction(model, "macs", model.gates.widths) == 1.0


@pytest.mark.parametrize("kind", ["macs", "params"])
@pytest.mark.parametrize("name", NAMES)
def test_projection_keeps_the_top_k_logits_that_fit(name, kind):
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
    for kind in ("macs", "params"):
        budget = BudgetConstraint(model, kind, 1.0, warmup=1.0)
        gates = budget.project(la)
        assert gates is not None and bool((gates > 0).all())
        assert budget.deterministic(gates) == 1.0
        assert torch.equal(gates[own > 0], own[own > 0])
        # The closed ones reopen in the order of their logits.
        closed = (own == 0).nonzero().flatten()
        values = gates[closed][la[closed].argsort()]
        assert bool((values[1:] > values[:-1]).all())


def test_reopened_channel_next_to_its_neighbour_logit_is_open():
    """A reopened k-th logit one float step above the (k+1)-th: the shifted gate
    rounds to about 0 in float32, yet the channel must be kept (gate > 0)."""
    model = _model("vgg16")
    n = sum(model.gates.widths)
    k = 40  # the k-th channel is in layer 3, the (k+1)-th too
    la = torch.full((n,), -8.0)  # every channel closed on its own
    la[:k - 1] = torch.linspace(-3.0, -4.9, k - 1)
    la[k - 1] = -5.0
    la[k] = torch.nextafter(torch.tensor(-5.0), torch.tensor(-100.0))
    la[k + 1:n // 2] = torch.linspace(-5.5, -7.0, n // 2 - k - 1)
    # In float32 the midpoint rounds to -5.0, and the shifted test gate to 0.
    shift = hard_concrete.PRUNE_THRESHOLD - (la[k - 1] + la[k]) / 2
    assert hard_concrete.deterministic(la[k - 1] + shift) == 0
    la = _set_hc(model, la)
    ranked = la.sort(descending=True).values
    # A target between cost(k) and cost(k+1) (both with the first k channels of the ranking).
    counts = _counts(model, range(k))
    lo = _fraction(model, "macs", counts)
    counts[_layers(model)[k]] += 1
    hi = _fraction(model, "macs", counts)
    assert lo < hi and ranked[k - 1] > ranked[k]
    budget = BudgetConstraint(model, "macs", (lo + hi) / 2, warmup=1.0)
    gates, reopened, _ = _check_projection(model, budget, la, "macs", budget.target)
    assert reopened == k and int((gates > 0).sum()) == k
    assert gates[k - 1] > 0 and gates[k] == 0


@pytest.mark.parametrize("kind", ["macs", "params"])
def test_equal_logits_are_kept_or_closed_together(kind):
    model = _model("resnet56")
    n = sum(model.gates.widths)
    levels = torch.tensor([3.0, 1.0, -0.5, -2.0, -4.0, -7.0])
    budget = BudgetConstraint(model, kind, 0.5, warmup=1.0)
    straddled = 0
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        la = _set_hc(model, levels[torch.randint(len(levels), (n,), generator=generator)])
        for target in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
            budget.target = target
            result = _check_projection(model, budget, la, kind, target)
            if result is None:
                continue
            kept = result[0] > 0
            for level in levels:
                group = kept[la == level]
                assert bool(group.all()) or not bool(group.any()), (seed, target, float(level))
            # The channel after the kept ones (by any order of ties) would fit the target
            # on its own, so the tie really is what stopped it.
            rest = la[~kept]
            if len(rest):
                first = int((la == rest.max()).nonzero()[0])
                counts = _counts(model, kept.nonzero().flatten().tolist() + [first])
                straddled += _fraction(model, kind, counts) <= target
    assert straddled > 0


def test_saturated_dep_logits_tie():
    """Dep-L0's tanh saturates: many logits are exactly log(100) or -log(100)."""
    model = _model("resnet56", net="dep")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.gates.logits.layers:
            layer.weight.zero_()
            choice = torch.randint(3, layer.bias.shape, generator=generator)
            layer.bias.copy_(torch.tensor([20.0, -20.0, 0.3])[choice])
    la = model.gates.log_alpha().detach()
    assert (la == la.max()).sum() > 20 and (la == la.min()).sum() > 20
    for target in (0.35, 0.5, 0.75):
        budget = BudgetConstraint(model, "macs", target, warmup=1.0)
        result = _check_projection(model, budget, la, "macs", target)
        assert result is not None
        kept = result[0] > 0
        for level in la.unique():
            group = kept[la == level]
            assert bool(group.all()) or not bool(group.any())


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
    budget.target = cheapest + 0.001
    gates, _, _ = _check_projection(model, budget, la, kind, budget.target)
    assert budget.deterministic(gates) <= budget.target


def test_tolerance_fallback_takes_one_channel_too_many():
    """ResNet56 at 1/8 width: the stem's second channel (3-input conv at 32x32,
    plus the first block's conv1 input) costs more than 2% of the MACs. Put it at
    the boundary with a target more than TOLERANCE above the network without it:
    the projection keeps it, ending above the target but within the tolerance."""
    model = _model("resnet56")
    n = sum(model.gates.widths)
    la = torch.empty(n).uniform_(-3.0, 3.0, generator=torch.Generator().manual_seed(1))
    la[0], la[2], la[3] = 4.0, 3.9, 3.8  # one stem channel, the first block's conv1 full
    middle = la.sort().values[n // 2 - 1:n // 2 + 1]
    la[1] = middle.mean()  # the second stem channel sits in the middle of the ranking, tied with none
    la = _set_hc(model, la)
    without = [c for c in range(n) if la[c] > la[1]]
    with_it = without + [1]
    low, high = _fraction(model, "macs", _counts(model, without)), _fraction(model, "macs", _counts(model, with_it))
    jump = high - low
    assert jump > TOLERANCE, jump

    target = low + TOLERANCE + (jump - TOLERANCE) / 2
    budget = BudgetConstraint(model, "macs", target, warmup=1.0)
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


def test_no_network_within_tolerance_gives_the_one_below():
    """A hand-made VGG whose second layer's channel costs over 4% of the MACs: with
    the target in the middle of that jump neither side is within the tolerance,
    and the projection stays below the target (the closest from below)."""
    torch.manual_seed(0)
    model = VGG(cfg=(2, "M", 2, "M", 2, "M", 2, "M", 2, "M"), num_classes=10, net="hc")
    la = _set_hc(model, torch.tensor([3.0, 2.5, 2.0, 0.5, 1.5, 1.4, 1.3, 1.2, 1.1, 1.0]))
    # Ranking: 0, 1, 2, 4, 5, 6, 7, 8, 9, then 3 (layer 1's second channel).
    low = _fraction(model, "macs", [2, 1, 2, 2, 2])
    high = _fraction(model, "macs", [2, 2, 2, 2, 2])
    assert high == 1.0 and high - low > 2 * TOLERANCE + 0.01
    target = (low + high) / 2
    budget = BudgetConstraint(model, "macs", target, warmup=1.0)
    gates = budget.project(la)
    assert gates is not None and torch.equal(gates > 0, torch.arange(10) != 3)
    assert budget.deterministic(gates) == low
    _check_projection(model, budget, la, "macs", target)


def test_projection_never_moves_further_from_the_target():
    """The same hand-made VGG with the target just above the middle of the jump: the network
    of the logits' own test gates (everything open) is closer than the one below, so the
    projection declines (None) rather than ending further from the target."""
    torch.manual_seed(0)
    model = VGG(cfg=(2, "M", 2, "M", 2, "M", 2, "M", 2, "M"), num_classes=10, net="hc")
    la = _set_hc(model, torch.tensor([3.0, 2.5, 2.0, 0.5, 1.5, 1.4, 1.3, 1.2, 1.1, 1.0]))
    low = _fraction(model, "macs", [2, 1, 2, 2, 2])
    target = (low + 1.0) / 2 + 0.005
    budget = BudgetConstraint(model, "macs", target, warmup=1.0)
    assert budget.deterministic(hard_concrete.deterministic(la)) == 1.0
    assert 1.0 - target > TOLERANCE
    assert budget.project(la) is None
    # Just below the middle, the network below is the closer one and is taken.
    budget.target = (low + 1.0) / 2 - 0.005
    gates = budget.project(la)
    assert gates is not None and budget.deterministic(gates) == low


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


@pytest.mark.parametrize("kind", ["macs", "params"])
def test_fallback_keeps_channels_that_cost_nothing(kind):
    """A target within the tolerance below the cheapest network (one channel per
    gated layer): every prefix up to the first channel that costs something has
    that same cost (a closed layer is priced as one channel), so the projection
    should keep those channels, not close every gate of the network."""
    model = _model("resnet56")
    n = sum(model.gates.widths)
    la = _set_hc(model, torch.empty(n).uniform_(-4.0, 4.0, generator=torch.Generator().manual_seed(0)))
    budget = BudgetConstraint(model, kind, 0.5, warmup=1.0)
    cheapest = float(budget.fraction(torch.ones_like(budget.cost.dense_widths)))
    budget.target = cheapest - TOLERANCE / 2
    gates = budget.project(la)
    assert gates is not None
    assert budget.deterministic(gates) == cheapest
    # The same cost with the next channel by logit: the projection left it out for nothing.
    kept = (gates > 0).nonzero().flatten().tolist()
    ranked = la.argsort(descending=True).tolist()
    free = _fraction(model, kind, _counts(model, kept + [ranked[len(kept)]])) == cheapest
    assert not free, f"kept {len(kept)} channels; the next one by logit costs nothing"


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
