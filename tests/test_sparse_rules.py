"""The unstructured sparse-training rules of pruning/sparse.py (DSR, SET, DeepR, static, IMP's schedule).

* The per-tensor rules on hand-made tensors: the initial mask's size int(d*n + 0.1) and uniformity,
  DSR's threshold drop (keep the first if all would go), SET/IMP's int(f*M) + 1 smallest, DeepR's
  sign flips, random growth outside the just-dropped positions, DSR's proportional regrowth with its
  rounding difference to a random tensor, IMP's exponential and cubic fractions.
* The methods on a tiny ResNet56 with a real Nesterov SGD: masked weights and momentum exactly 0
  after every step, regrown weights start at 0, the budget constant, DSR's adaptive threshold, SET's
  per-tensor replacement, DeepR's sign bookkeeping and noise, static masks fixed, which layers are
  sparse, and an exact resume from a state_dict.
* check_density's errors and the code's settings (N_p, SET's fractions, ResNet50's 22,724,608).
"""
import io
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_equal_states
from models import build_model, default_arch
from pruning.sparse import (DSR, SET, DeepR, StaticSparse, check_density, default_n_prune_params,
                            default_rewire_fraction, drop_below, drop_sign_flipped, drop_smallest, grow_random,
                            imp_fraction, initial_masks, regrow_proportional, sparse_layers)
from utils.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")


def _long(values):
    return torch.tensor(values, dtype=torch.long)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------- initial masks


@pytest.mark.parametrize("n, density, expected", [
    (10, 0.29, 3),      # 2.9 + 0.1
    (7, 0.5, 3),        # 3.5 + 0.1 truncated (round would give 4)
    (144, 0.2, 28),     # 28.8 + 0.1 truncated (round would give 29)
    (19, 0.1, 2),       # 1.9 + 0.1 reaches 2 (plain int(d*n) would give 1)
    (1000, 0.1, 100),
    (1, 0.5, 0),
    (1, 0.9, 1),
    (50, 1.0, 50),
])
def test_initial_masks_have_int_dn_plus_point_one_active(n, density, expected):
    masks = initial_masks([n, n + 3, n], density, _gen(0))
    assert len(masks) == 3
    for mask, size in zip(masks, [n, n + 3, n]):
        assert mask.dtype == torch.bool and mask.shape == (size,) and mask.device.type == "cpu"
    assert int(masks[0].sum()) == expected and int(masks[2].sum()) == expected
    assert int(masks[1].sum()) == int(density * (n + 3) + 0.1)


def test_initial_masks_depend_on_the_generator():
    a = initial_masks([200, 300], 0.2, _gen(1))
    b = initial_masks([200, 300], 0.2, _gen(2))
    c = initial_masks([200, 300], 0.2, _gen(1))
    assert not torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    assert all(torch.equal(x, y) for x, y in zip(a, c))
    # Consecutive tensors get different draws from the one generator.
    d = initial_masks([200, 200], 0.2, _gen(3))
    assert not torch.equal(d[0], d[1])


def test_initial_masks_are_uniform():
    g = _gen(4)
    draws = 2000
    counts = torch.zeros(10)
    for _ in range(draws):
        counts += initial_masks([10], 0.3, g)[0].float()
    freq = counts / draws
    # sd of each frequency ~0.0102; 0.05 is ~5 sd.
    assert (freq - 0.3).abs().max() < 0.05, freq


# ----------------------------------------------------------------------- drop rules


def test_drop_below_drops_only_active_weights_under_the_threshold():
    w = torch.tensor([0.5, -0.01, 0.02, -0.3, 0.001, 0.0, 0.25, -0.25, -0.2499])
    mask = torch.tensor([True, True, False, True, False, True, True, True, True])
    before = w.clone()
    dropped = drop_below(w, mask, 0.25)
    # |w| < 0.25 strictly: 1, 5, 8 (0.25 and -0.25 stay); 2 and 4 are small but already inactive.
    assert dropped.tolist() == [1, 5, 8]
    assert mask.tolist() == [True, False, False, True, False, False, True, True, False]
    assert torch.equal(w, before)  # the rule edits the mask only


def test_drop_below_keeps_the_first_active_weight_when_all_would_go():
    w = torch.tensor([0.001, 0.1, 0.2, 0.3, 5.0])
    mask = torch.tensor([False, True, True, True, False])
    dropped = drop_below(w, mask, 1.0)
    assert dropped.tolist() == [2, 3]
    assert mask.tolist() == [False, True, False, False, False]
    # Nothing under the threshold: nothing dropped.
    mask = torch.tensor([True, False, True, False, True])
    assert drop_below(torch.tensor([2.0, 0.0, -3.0, 0.0, 4.0]), mask, 1.0).numel() == 0
    assert mask.tolist() == [True, False, True, False, True]


def test_drop_below_edits_a_view_in_place():
    """DSR hands it flat views of the layers' masks: the layer's mask must change."""
    w2d = torch.tensor([[0.5, 0.01], [0.02, 0.7]])
    m2d = torch.ones(2, 2, dtype=torch.bool)
    drop_below(w2d.view(-1), m2d.view(-1), 0.1)
    assert m2d.tolist() == [[True, False], [False, True]]


@pytest.mark.parametrize("fraction, expected", [(0.0, [1]), (0.3, [1, 7]), (0.5, [1, 7, 4, 2]),
                                                (0.99, [1, 7, 4, 2, 6, 0])])
def test_drop_smallest_drops_int_fm_plus_one_smallest_active(fraction, expected):
    w = torch.tensor([0.9, -0.1, 0.5, -0.05, 0.3, 0.01, -0.7, 0.2])
    mask = torch.tensor([True, True, True, False, True, False, True, True])  # M = 6; 3 and 5 smaller, inactive
    dropped = drop_smallest(w, mask, fraction)
    assert dropped.tolist() == expected  # int(f*6) + 1 of them, smallest |w| first
    remaining = [i for i in (0, 1, 2, 4, 6, 7) if i not in expected]
    assert mask.nonzero().flatten().tolist() == remaining


def test_drop_sign_flipped_drops_active_opposite_signs_only():
    w = torch.tensor([0.5, -0.2, 0.3, -0.4, 0.0, 0.1, -0.6, -0.1])
    signs = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0, 0.0, 1.0, 0.0])
    mask = torch.tensor([True, True, True, True, True, True, False, True])
    dropped = drop_sign_flipped(w, mask, signs)
    # 1 and 2 flipped; 3 kept its sign; 4 is now 0 (no sign); 5 and 7 were recorded 0; 6 is inactive.
    assert dropped.tolist() == [1, 2]
    assert mask.tolist() == [True, False, False, True, True, True, False, True]


# ----------------------------------------------------------------------- growth


def test_grow_random_avoids_active_and_excluded_positions():
    for seed in range(20):
        mask = torch.zeros(30, dtype=torch.bool)
        mask[::3] = True
        before = mask.clone()
        excluded = _long([1, 2, 4, 5])
        grown = grow_random(mask, excluded, 7, _gen(seed))
        assert grown.numel() == 7 and len(set(grown.tolist())) == 7
        assert not before[grown].any()
        assert not set(grown.tolist()) & {1, 2, 4, 5}
        assert torch.equal(mask, before | torch.isin(torch.arange(30), grown))


def test_grow_random_grows_at_most_the_free_positions():
    mask = torch.tensor([True, False, False, True, False, False])
    grown = grow_random(mask, _long([1, 4]), 10, _gen(0))
    assert sorted(grown.tolist()) == [2, 5]
    assert mask.tolist() == [True, False, True, True, False, True]
    assert grow_random(mask, _long([1, 4]), 3, _gen(0)).numel() == 0  # no room left
    assert mask.tolist() == [True, False, True, True, False, True]
    assert grow_random(mask, _long([]), 0, _gen(0)).numel() == 0


def test_grow_random_is_uniform_over_free_positions():
    g = _gen(5)
    draws = 3000
    counts = torch.zeros(10)
    for _ in range(draws):
        mask = torch.tensor([True, True] + [False] * 8)
        grown = grow_random(mask, _long([2]), 3, g)
        counts[grown] += 1
    freq = counts / draws
    assert counts[:3].sum() == 0
    # 3 of the 7 free positions each time: 3/7 each, sd ~0.009.
    assert (freq[3:] - 3 / 7).abs().max() < 0.04, freq


def _dsr_case(survivors, dropped, size=60):
    """Masks of ``size`` with ``survivors[l]`` active weights and ``dropped[l]`` just-dropped positions."""
    masks, excluded = [], []
    for r, k in zip(survivors, dropped):
        mask = torch.zeros(size, dtype=torch.bool)
        mask[:r] = True
        masks.append(mask)
        excluded.append(torch.arange(r, r + k))
    return masks, excluded


def _check_growth(masks, before, excluded, grown):
    for mask, old, ex, n in zip(masks, before, excluded, grown):
        assert int(mask.sum()) == int(old.sum()) + n
        assert torch.equal(mask & old, old)  # nothing dropped
        assert not mask[ex].any()            # nothing just dropped regrown


def test_regrow_proportional_places_everything_in_proportion_to_survivors():
    # R = (2, 3, 5), K = 10: exactly 2, 3, 5, no rounding difference.
    masks, excluded = _dsr_case([2, 3, 5], [4, 4, 2])
    before = [m.clone() for m in masks]
    grown = regrow_proportional(masks, excluded, _gen(0))
    assert grown == [2, 3, 5]
    _check_growth(masks, before, excluded, grown)
    # Shares follow the survivors, not what each tensor dropped: R = (1, 1, 8), K = 10 dropped all by one.
    masks, excluded = _dsr_case([1, 1, 8], [9, 1, 0])
    assert regrow_proportional(masks, excluded, _gen(0)) == [1, 1, 8]


@pytest.mark.parametrize("survivors, dropped, base, difference", [
    # R = (1, 1, 2), K = 5: 1.25, 1.25, 2.5 round (half to even) to 1, 1, 2; one left over.
    ([1, 1, 2], [2, 2, 1], [1, 1, 2], 1),
    # R = (1, 1, 1), K = 4: 1.33 each rounds to 1; one left over.
    ([1, 1, 1], [2, 1, 1], [1, 1, 1], 1),
    # R = (1, 1, 1), K = 2: 0.67 each rounds to 1; one too many, taken from one tensor.
    ([1, 1, 1], [1, 1, 0], [1, 1, 1], -1),
])
def test_regrow_proportional_gives_the_rounding_difference_to_one_random_tensor(survivors, dropped, base,
                                                                                difference):
    total = sum(dropped)
    outcomes = set()
    for seed in range(30):
        masks, excluded = _dsr_case(survivors, dropped)
        before = [m.clone() for m in masks]
        grown = regrow_proportional(masks, excluded, _gen(seed))
        assert sum(grown) == total
        _check_growth(masks, before, excluded, grown)
        delta = [g - b for g, b in zip(grown, base)]
        assert sorted(delta) == sorted([difference] + [0] * (len(base) - 1)), (grown, base)
        outcomes.add(tuple(grown))
    # Every tensor is drawn for the difference by some seed (half-up rounding of 2.5 would instead
    # always give (1, 1, 3) in the first case).
    assert len(outcomes) == len(base), outcomes


def test_regrow_proportional_stops_when_no_tensor_has_room():
    # Every free position of both tensors is a just-dropped one: nothing can grow, and it returns.
    masks, excluded = _dsr_case([3, 3], [1, 1], size=4)
    assert regrow_proportional(masks, excluded, _gen(0)) == [0, 0]
    assert [int(m.sum()) for m in masks] == [3, 3]
    # Room for one each of the four: two grow, then it stops.
    masks, excluded = _dsr_case([3, 3], [2, 2], size=6)
    assert regrow_proportional(masks, excluded, _gen(0)) == [1, 1]
    assert all(bool(m.all()) is False and int(m.sum()) == 4 for m in masks)


def test_regrow_proportional_retries_when_the_drawn_tensor_is_full():
    """Tensor A has no room (3 survivors + 1 just dropped fill its 4 positions), tensor B has 97 free
    positions; K = 1. Shares (0.5, 0.5) round to (0, 0) and the difference 1 goes to a random tensor;
    when that is A the pass places nothing, and the next pass (shares over the tensors with room)
    places it in B, as the authors' loop eventually does by drawing again (main.py:652-666)."""
    lost = []
    for seed in range(20):
        a = torch.tensor([True, True, True, False])
        b = torch.zeros(100, dtype=torch.bool)
        b[:3] = True
        grown = regrow_proportional([a, b], [_long([3]), _long([])], _gen(seed))
        if grown != [0, 1]:
            lost.append((seed, grown))
    assert not lost, f"dropped weight never regrown although B has room (seed, grown per tensor): {lost}"


def test_regrow_proportional_never_grows_more_than_it_dropped():
    """5 tensors with equal survivors, K = 3: each share rounds 0.6 up to 1 (sum 5), the difference
    -2 clamped at 0 on the drawn tensor leaves 4; the authors' code grows those 4, one more than it
    dropped. Ours takes the excess back from tensors drawn at random: exactly 3 grow, the budget holds
    (README, deviations)."""
    for seed in range(20):
        masks = [torch.zeros(50, dtype=torch.bool) for _ in range(5)]
        for m in masks:
            m[:10] = True
        dropped = [_long([10]), _long([11]), _long([12]), _long([]), _long([])]
        grown = regrow_proportional(masks, dropped, _gen(seed))
        assert sum(grown) == 3 and all(g <= 1 for g in grown), (seed, grown)
        assert sum(int(m.sum()) for m in masks) == 53


# ----------------------------------------------------------------------- IMP's fractions


@pytest.mark.parametrize("density, iterations", [(0.2, 20), (0.1, 20), (0.5, 7), (0.2, 1)])
def test_imp_exponential_fraction_reaches_the_density(density, iterations):
    fractions = [imp_fraction(i, iterations, density, cubic=False) for i in range(iterations)]
    assert all(f == fractions[0] for f in fractions)
    assert math.isclose(math.prod(1 - f for f in fractions), density, rel_tol=1e-9)


@pytest.mark.parametrize("density, iterations", [(0.2, 20), (0.1, 20), (0.5, 7), (0.3, 2)])
def test_imp_cubic_fraction_follows_the_cubic_densities(density, iterations):
    kept = 1.0
    for i in range(iterations):
        assert math.isclose(kept, density + (1 - density) * (1 - i / iterations) ** 3, rel_tol=1e-9), i
        kept *= 1 - imp_fraction(i, iterations, density, cubic=True)
    assert math.isclose(kept, density, rel_tol=1e-9)


def test_imp_cubic_fraction_by_hand():
    # d = 0.2, K = 2: densities 1, 0.2 + 0.8/8 = 0.3, 0.2, so fractions 0.7 and 1/3.
    assert math.isclose(imp_fraction(0, 2, 0.2, cubic=True), 0.7, rel_tol=1e-12)
    assert math.isclose(imp_fraction(1, 2, 0.2, cubic=True), 1 / 3, rel_tol=1e-12)
    assert math.isclose(imp_fraction(0, 2, 0.25, cubic=False), 0.5, rel_tol=1e-12)


# ----------------------------------------------------------------------- the methods on a tiny model


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model(default_arch("resnet56", 10, 0.25, net="dense"))


def _optimizer(model, lr=0.05):
    return torch.optim.SGD(model.weight_parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)


def _batches(n, seed=1):
    g = _gen(seed)
    return [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(10, (4,), generator=g)) for _ in range(n)]


def _forward_backward(model, method, optimizer, batch):
    images, targets = batch
    loss = F.cross_entropy(model(images), targets)
    term = method.loss(0.0)
    if term is not None:
        loss = loss + term
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    method.after_backward()


def _step(model, method, optimizer, batch, iteration):
    _forward_backward(model, method, optimizer, batch)
    optimizer.step()
    method.after_step(iteration)


def _masks(method):
    return [m.clone() for m in method.masks]


def _assert_exact(method, optimizer, before=None):
    """Inactive weights and their momentum exactly 0; positions that became active (vs ``before``)
    start at 0 with a zero momentum."""
    for w, m in zip(method.weights, method.masks):
        assert m.dtype == torch.bool and m.shape == w.shape
        buffer = optimizer.state[w]["momentum_buffer"]
        assert torch.all(w.detach()[~m] == 0)
        assert torch.all(buffer[~m] == 0)
    if before is not None:
        for w, m, old in zip(method.weights, method.masks, before):
            new = m & ~old
            assert torch.all(w.detach()[new] == 0)
            assert torch.all(optimizer.state[w]["momentum_buffer"][new] == 0)


def _setup(cls, *args, lr=0.05, density=0.2, seed=7, model_seed=0, **kwargs):
    model = _model(model_seed)
    method = cls(model, density, seed, *args, **kwargs)
    optimizer = _optimizer(model, lr)
    method.attach_optimizer(optimizer)
    method.start_epoch(0)
    return model, method, optimizer


def test_construction_masks_and_initialises():
    model = _model()
    method = StaticSparse(model, 0.2, 3)
    assert [r.name for r in method.layers] == [r.name for r in sparse_layers(model)]
    for record, w, m in zip(method.layers, method.weights, method.masks):
        assert w is model.get_submodule(record.name).weight
        assert int(m.sum()) == int(0.2 * w.numel() + 0.1)
        assert torch.all(w.detach()[~m] == 0) and torch.all(w.detach()[m] != 0)
    # He-normal with fan-out, at density 1 (every weight active): pooled over the convs whose fan-in
    # differs from their fan-out (stem, stage transitions, shortcuts), scaled by the expected std.
    full = StaticSparse(_model(), 1.0, 3)
    scaled = []
    for record in full.model.weight_layers:
        layer = full.model.get_submodule(record.name)
        if record.role == "classifier":
            assert torch.all(layer.bias == 0)
        elif record.in_channels != record.out_channels:
            scaled.append(layer.weight.detach().flatten() / (2.0 / (record.kernel ** 2 * record.out_channels)) ** 0.5)
    scaled = torch.cat(scaled)
    assert scaled.numel() > 1500
    assert abs(scaled.std().item() - 1) < 0.1 and abs(scaled.mean().item()) < 0.1


def test_static_sparse_masks_never_change():
    model, method, opt = _setup(StaticSparse, lr=0.1)
    start = _masks(method)
    for it, batch in enumerate(_batches(6)):
        _step(model, method, opt, batch, it)
        _assert_exact(method, opt)
        assert all(torch.equal(a, b) for a, b in zip(start, method.masks))
    # The weights did train.
    assert any(w.detach()[m].abs().sum() > 0 for w, m in zip(method.weights, method.masks))


def _removed_added(before, after):
    return [(b & ~a) for b, a in zip(before, after)], [(a & ~b) for b, a in zip(before, after)]


def test_dsr_keeps_the_budget_and_the_masks_exact():
    model, method, opt = _setup(DSR, {0: 2}, 100, 50)
    total = sum(int(m.sum()) for m in method.masks)
    reallocations = 0
    for it, batch in enumerate(_batches(9)):
        method.threshold = 0.05  # drops a fraction of every tensor, so each reallocation is large
        before = _masks(method)
        _step(model, method, opt, batch, it)
        _assert_exact(method, opt, before)
        assert sum(int(m.sum()) for m in method.masks) == total, it
        changed = any(not torch.equal(a, b) for a, b in zip(before, method.masks))
        assert changed == (it in (2, 4, 6, 8)), it  # t != 0, t mod P == 0
        reallocations += changed
    assert reallocations == 4
    assert [e[0] for e in method.events] == [2, 4, 6, 8] and all(e[1] > 0 for e in method.events)
    assert method.reallocated_epoch == sum(e[1] for e in method.events)


def _expected_threshold_drops(method, threshold):
    """K: the active weights with |w| < H per tensor, all but one where that is all of them."""
    total = 0
    for w, m in zip(method.weights, method.masks):
        active = int(m.sum())
        below = int((m & (w.detach().abs() < threshold)).sum())
        total += below - (1 if below == active and active else 0)
    return total


def test_dsr_reallocates_and_adapts_its_threshold():
    model, method, opt = _setup(DSR, {0: 2}, 100, 10)
    assert method.threshold == 1e-3
    batches = _batches(7)
    for it, batch in enumerate(batches):
        if it == 2:
            method.threshold = 1.0                  # nearly every active weight goes
        if it == 4:
            method.n_prune_params = 10 ** 9          # K < 0.9 N_p
        _forward_backward(model, method, opt, batch)
        opt.step()
        if it in (2, 4, 6):
            method.apply_masks()
            k = _expected_threshold_drops(method, method.threshold)
            if it == 6:
                method.n_prune_params = k           # 0.9 N_p <= K <= 1.1 N_p: H stays
            threshold = method.threshold
        before = _masks(method)
        method.after_step(it)
        if it == 2:
            assert k > 100
            removed, _ = _removed_added(before, method.masks)
            assert sum(int(r.sum()) for r in removed) == k
            assert method.events[-1] == (2, k, 1.0)
            assert method.threshold == 0.5          # K > 1.1 N_p: halved
        if it == 4:
            assert method.events[-1] == (4, k, 0.5)
            assert method.threshold == 1.0          # doubled
        if it == 6:
            assert method.events[-1] == (6, k, threshold) and k > 0
            assert method.threshold == threshold    # unchanged
        _assert_exact(method, opt, before)
    assert threshold == 1.0


@pytest.mark.parametrize("cls, args", [(DSR, (50,)), (SET, (0.1,))])
def test_periodic_rewiring_stops_at_the_stop_epoch(cls, args):
    model, method, opt = _setup(cls, {0: 2, 1: 3}, 2, *args)
    batches = _batches(4)
    method.threshold = 0.5
    method.start_epoch(1)
    before = _masks(method)
    _step(model, method, opt, batches[0], 4)  # not a multiple of epoch 1's period 3
    assert all(torch.equal(a, b) for a, b in zip(before, method.masks))
    _step(model, method, opt, batches[1], 6)  # epoch 1's period: rewires
    assert any(not torch.equal(a, b) for a, b in zip(before, method.masks))
    method.start_epoch(2)                     # the stop epoch
    before = _masks(method)
    _step(model, method, opt, batches[2], 12)
    assert all(torch.equal(a, b) for a, b in zip(before, method.masks))
    _assert_exact(method, opt)


def test_set_replaces_int_fm_plus_one_smallest_per_tensor():
    fraction = 0.1
    model, method, opt = _setup(SET, {0: 2}, 100, fraction)
    per_tensor = [int(m.sum()) for m in method.masks]
    for it, batch in enumerate(_batches(7)):
        _forward_backward(model, method, opt, batch)
        opt.step()
        method.apply_masks()
        weights = [w.detach().clone() for w in method.weights]
        before = _masks(method)
        method.after_step(it)
        _assert_exact(method, opt, before)
        assert [int(m.sum()) for m in method.masks] == per_tensor, it
        removed, added = _removed_added(before, method.masks)
        if it not in (2, 4, 6):
            assert not any(r.any() for r in removed) and not any(a.any() for a in added)
            continue
        for w, old, r, a, count in zip(weights, before, removed, added, per_tensor):
            assert int(r.sum()) == int(fraction * count) + 1
            assert int(a.sum()) == int(r.sum())
            kept = old & ~r
            assert w[r].abs().max() <= w[kept].abs().min()  # the smallest |w| of the active ones
    assert [e[:2] for e in method.events] == [(t, sum(int(fraction * c) + 1 for c in per_tensor)) for t in (2, 4, 6)]


def _deepr(lr=0.0, temperatures=None, stop=100, **kwargs):
    return _setup(DeepR, temperatures or {0: 1e-5}, stop, lr=lr, **kwargs)


def test_deepr_records_signs_of_the_initialised_weights():
    model, method, opt = _deepr(lr=0.0)
    for w, s in zip(method.weights, method.signs):
        assert torch.equal(s, torch.sign(w.detach()).view(-1))
    before = _masks(method)
    _step(model, method, opt, _batches(1)[0], 0)  # lr 0: no weight moves, so no sign flips
    assert all(torch.equal(a, b) for a, b in zip(before, method.masks))
    assert method.reallocated_epoch == 0


def test_deepr_drops_exactly_the_flipped_weights_and_regrows_as_many():
    model, method, opt = _deepr(lr=0.0)
    batches = _batches(5)
    _step(model, method, opt, batches[0], 0)
    per_tensor = [int(m.sum()) for m in method.masks]
    flipped = []
    with torch.no_grad():
        for layer, (w, m) in enumerate(zip(method.weights, method.masks)):
            active = m.view(-1).nonzero().flatten()
            chosen = active[torch.tensor([0, 3])] if layer % 2 == 0 else active[:0]
            w.view(-1)[chosen] *= -1
            flipped.append(chosen)
    before = _masks(method)
    _step(model, method, opt, batches[1], 1)
    _assert_exact(method, opt, before)
    removed, added = _removed_added(before, method.masks)
    for layer, (r, a, chosen) in enumerate(zip(removed, added, flipped)):
        assert sorted(r.view(-1).nonzero().flatten().tolist()) == sorted(chosen.tolist()), layer
        assert int(a.sum()) == chosen.numel()
    assert [int(m.sum()) for m in method.masks] == per_tensor
    assert method.reallocated_epoch == 2 * len(range(0, len(per_tensor), 2))
    # A regrown weight was recorded with sign 0: any sign it takes next is no flip ...
    layer = 0
    grown = added[layer].view(-1).nonzero().flatten()
    with torch.no_grad():
        method.weights[layer].view(-1)[grown] = -0.3
    before = _masks(method)
    _step(model, method, opt, batches[2], 2)
    assert all(torch.equal(a, b) for a, b in zip(before, method.masks))
    # ... but after this step its sign (-) is recorded, and turning it + is a flip.
    with torch.no_grad():
        method.weights[layer].view(-1)[grown[0]] = 0.3
    _step(model, method, opt, batches[3], 3)
    removed, added = _removed_added(before, method.masks)
    assert removed[layer].view(-1).nonzero().flatten().tolist() == [int(grown[0])]
    assert sum(int(r.sum()) for r in removed) == 1 and sum(int(a.sum()) for a in added) == 1
    assert int(added[layer].sum()) == 1
    # From the stop epoch on nothing is dropped, flipped or not.
    method.start_epoch(100)
    with torch.no_grad():
        method.weights[1].view(-1)[method.masks[1].view(-1).nonzero()[0]] *= -1
    before = _masks(method)
    _step(model, method, opt, batches[4], 4)
    assert all(torch.equal(a, b) for a, b in zip(before, method.masks))


def test_deepr_noise_and_l1_touch_only_active_weights():
    eta, temperature, l1 = 0.01, 1.0, 1e-5
    model, method, opt = _deepr(lr=0.0, temperatures={0: temperature}, eta=eta, l1=l1)
    term = method.loss(0.0)
    expected = l1 * sum(w.detach().abs().sum() for w in method.weights)
    assert torch.allclose(term.detach(), expected, rtol=1e-6)
    images, targets = _batches(1)[0]
    loss = F.cross_entropy(model(images), targets) + method.loss(0.0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grads = [w.grad.clone() for w in method.weights]
    method.after_backward()
    noise = torch.cat([(w.grad - g)[m] for w, g, m in zip(method.weights, grads, method.masks)])
    for w, g, m in zip(method.weights, grads, method.masks):
        assert torch.all(w.grad[~m] == 0)  # inactive weights: the code's masked forward gives them 0
        assert torch.all(w.grad[m] != g[m])
    std = (2 * eta * temperature) ** 0.5
    assert noise.numel() > 5000
    assert abs(noise.std().item() / std - 1) < 0.05 and abs(noise.mean().item()) < 0.01
    # No noise from the stop epoch on (only the masking, which leaves masked gradients as they are).
    method.start_epoch(100)
    grads = [w.grad.clone() for w in method.weights]
    method.after_backward()
    assert all(torch.equal(w.grad, g) for w, g in zip(method.weights, grads))


def test_inactive_weights_get_zero_gradients_as_in_the_codes_masked_forward():
    """Every method zeroes the gradients of inactive weights after backward (gradient clipping and the
    noise then see the code's gradients, where the forward multiplies by the mask)."""
    from conftest import _build_tiny
    model, x = _build_tiny("resnet56", net="dense")
    method = StaticSparse(model, 0.3, seed=0)
    assert method.changes_gradients()
    model(x).sum().backward()
    assert any(bool((w.grad[~m] != 0).any()) for w, m in zip(method.weights, method.masks))
    method.after_backward()
    assert all(bool((w.grad[~m] == 0).all()) for w, m in zip(method.weights, method.masks))


def test_deepr_training_keeps_the_budget_and_the_masks_exact():
    model, method, opt = _deepr(lr=0.5, temperatures={0: 1.0})
    per_tensor = [int(m.sum()) for m in method.masks]
    for it, batch in enumerate(_batches(6)):
        before = _masks(method)
        _step(model, method, opt, batch, it)
        _assert_exact(method, opt, before)
        assert [int(m.sum()) for m in method.masks] == per_tensor, it
    assert method.reallocated_epoch > 0


def test_sparse_layers_roles():
    cifar = _model()
    names = [r.name for r in sparse_layers(cifar)]
    roles = {r.name: r.role for r in cifar.weight_layers}
    assert {roles[n] for n in names} == {"body"}
    assert names == [r.name for r in cifar.weight_layers if r.role == "body"]
    assert {"stem", "shortcut", "classifier"} <= set(roles.values())
    assert len(names) == 54
    vgg = build_model(default_arch("vgg16", 10, 1 / 8, net="dense"))
    vgg_names = [r.name for r in sparse_layers(vgg)]
    assert len(vgg_names) == 12 and all(r.role == "body" for r in sparse_layers(vgg))
    assert {r.role for r in vgg.weight_layers if r.name not in vgg_names} == {"stem", "classifier"}
    r50 = build_model(default_arch("resnet50", 10, 0.125, net="dense"))
    r50_sparse = sparse_layers(r50)
    assert {r.role for r in r50_sparse} == {"body", "classifier"}
    assert sum(r.role == "classifier" for r in r50_sparse) == 1 and r50_sparse[-1].role == "classifier"
    left_out = [r for r in r50.weight_layers if r not in r50_sparse]
    assert {r.role for r in left_out} == {"stem", "shortcut"} and len(left_out) == 5
    assert len(r50_sparse) == 16 * 3 + 1


# ----------------------------------------------------------------------- resume


def _run(model, method, opt, batches, iterations):
    for it in iterations:
        _step(model, method, opt, batches[it], it)


@pytest.mark.parametrize("kind", ["dsr", "set", "deepr"])
def test_state_dict_round_trip_resumes_exactly(kind):
    def build():
        if kind == "dsr":
            model, method, opt = _setup(DSR, {0: 2}, 100, 20)
        elif kind == "set":
            model, method, opt = _setup(SET, {0: 2}, 100, 0.1)
        else:
            model, method, opt = _setup(DeepR, {0: 1e-2}, 100, lr=0.2)
        return model, method, opt

    batches = _batches(11)
    model, method, opt = build()
    if kind == "dsr":
        method.threshold = 0.05
    _run(model, method, opt, batches, range(5))
    buffer = io.BytesIO()
    torch.save(dict(model=model.state_dict(), opt=opt.state_dict(), method=method.state_dict()), buffer)
    if kind == "dsr":
        assert method.threshold != 0.05  # it adapted before the snapshot
    _run(model, method, opt, batches, range(5, 11))

    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    model2, method2, opt2 = build()
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    method2.load_state_dict(state["method"])
    method2.start_epoch(0)
    _run(model2, method2, opt2, batches, range(5, 11))

    assert all(torch.equal(a, b) for a, b in zip(method.masks, method2.masks))
    assert_equal_states(model.state_dict(), model2.state_dict(), "model")
    assert_equal_states(method.state_dict(), method2.state_dict(), "method")
    assert_equal_states(opt.state_dict()["state"], opt2.state_dict()["state"], "optimizer")
    if kind in ("dsr", "set"):
        assert [e[0] for e in method.events] == [2, 4, 6, 8, 10]
    else:
        assert method.reallocated_epoch > 0


# ----------------------------------------------------------------------- densities and settings


def test_check_density_refuses_empty_layers_and_out_of_range():
    model = _model()  # smallest sparse tensor: 4 x 4 x 3 x 3 = 144 weights
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(UsageError, match="must be in"):
            check_density(model, bad)
    with pytest.raises(UsageError, match="no active weight"):
        check_density(model, 0.006)  # int(0.864 + 0.1) = 0
    for ok in (0.007, 0.2, 1.0):     # int(1.008 + 0.1) = 1
        check_density(model, ok)


def test_code_settings():
    assert default_n_prune_params("cifar", 1_451_520) == 20_000
    assert default_n_prune_params("cifar", 725_760) == 10_000
    assert default_n_prune_params("imagenet", 22_724_608) == 400_000
    assert default_n_prune_params("cifar", 10) == 1
    assert default_rewire_fraction("cifar", 0.2) == 0.07
    assert default_rewire_fraction("cifar", 0.1) == 0.138
    assert default_rewire_fraction("cifar", 0.5) == 0.028
    assert default_rewire_fraction("imagenet", 0.2) == 0.089
    assert default_rewire_fraction("imagenet", 0.1) == 0.14
    assert default_rewire_fraction("cifar", 0.25) is None
    assert default_rewire_fraction("imagenet", 0.3) is None


def test_resnet50_has_the_codes_sparse_weight_count():
    # The meta device cannot build it (the gates' repeat_interleave), so build it for real (~0.3 s).
    model = build_model(default_arch("resnet50", 1000, net="dense"))
    assert sum(model.get_submodule(r.name).weight.numel() for r in sparse_layers(model)) == 22_724_608


@pytest.mark.parametrize("n, k", [(10, 3), (1000, 5), (50, 40)])
def test_sample_without_replacement_is_a_uniform_subset(n, k):
    """Distinct indices, k of them, each index equally often over many draws (both the permutation and
    the rejection path)."""
    from pruning.sparse import sample_without_replacement
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(n)
    draws = 4000
    for _ in range(draws):
        chosen = sample_without_replacement(n, k, generator)
        assert chosen.numel() == k and chosen.unique().numel() == k and int(chosen.min()) >= 0 and int(chosen.max()) < n
        counts[chosen] += 1
    expected = draws * k / n
    assert float((counts - expected).abs().max()) < 6 * expected ** 0.5 + 1, (counts.min(), counts.max(), expected)
