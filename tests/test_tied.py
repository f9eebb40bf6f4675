"""Tied weights (``--sparse static --tied``, pruning/tied.py): DSR's code's ``TiedTensor`` (HashedNet).

* the index by hand: round((1-s)·n) values, position perm[j] reads j mod m, so every value is read
  floor(n/m) or ceil(n/m) times; the bank's initialisation (a linear layer's first value 0);
* one SGD step (Nesterov, weight decay) by hand on a 2 x 3 tensor of 3 values, and three steps against
  a re-statement of the code's bank parameter on a tiny LeNet: the model's weights are the bank's;
* ``--rescale-tied-gradient`` changes nothing (the code divides after the step); the L1 term counts
  each value once;
* cost, pruned.pt, resume and the one-line refusals, through train_resnet56.py.
"""
import json

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import train_resnet56
from models import build_model, default_arch
from models.export import read_pruned
from models.lenet import LeNet300100
from pruning.tied import TiedWeights, hash_index, tied_count

pytestmark = pytest.mark.usefixtures("one_thread")


def _lenet(seed=0):
    """784 -> 300 -> 100 -> 10 at a toy size: 3 inputs -> 3 -> 2 -> 2 classes, biases, no BN (19 weights)."""
    torch.manual_seed(seed)
    return LeNet300100(widths=(3, 2), num_classes=2, batch_norm=False, net="dense", input_size=1, in_channels=3)


def test_tied_count_is_the_codes_round():
    # round((1 - s) * n), Python's round: halves go to the even neighbour.
    assert [tied_count(10, 1 - s) for s in (0.55, 0.45, 0.75, 0.65)] == [4, 6, 2, 4]  # 4.5, 5.5, 2.5, 3.5
    assert tied_count(9, 0.5) == 4 and tied_count(6, 0.5) == 3 and tied_count(4, 0.5) == 2


def test_hash_index_by_hand():
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    assert perm.tolist() == [4, 1, 7, 5, 3, 9, 0, 8, 6, 2]
    alloc, first = hash_index(10, 4, torch.Generator().manual_seed(0))
    # Position perm[j] reads value j mod 4: 4->0 1->1 7->2 5->3 3->0 9->1 0->2 8->3 6->0 2->1.
    assert alloc.tolist() == [2, 1, 1, 0, 0, 3, 0, 2, 3, 1]
    assert first.tolist() == [4, 1, 7, 5] and alloc[first].tolist() == [0, 1, 2, 3]
    # Uniform coverage: every value read floor(n/m) or ceil(n/m) times.
    alloc, _ = hash_index(1000, 7, torch.Generator().manual_seed(1))
    counts = torch.bincount(alloc, minlength=7)
    assert sorted(counts.tolist()) == [142] + [143] * 6


def test_construction_ties_and_initialises_as_the_code():
    model = _lenet()
    method = TiedWeights(model, [0.5, 0.5, 0.5], seed=3)
    assert method.values == [4, 3, 2]  # round(4.5), round(3), round(2)
    for record, w, alloc, first in zip(method.layers, method.weights, method.alloc, method.first):
        flat = w.detach().reshape(-1)
        assert torch.equal(flat, flat[first][alloc])          # every position reads its value
        assert flat[first[0]] == 0 and torch.all(flat[alloc == 0] == 0)  # a linear bank's first value is 0
        bound = 1 / record.in_channels ** 0.5
        assert flat.abs().max() <= bound
    # A conv's bank: He-normal with fan-out, every value tied.
    torch.manual_seed(0)
    cifar = build_model(default_arch("resnet56", 10, 0.25, net="dense"))
    method = TiedWeights(cifar, [0.3] * 54, seed=0)
    scaled = []
    for record, w, alloc, first in zip(method.layers, method.weights, method.alloc, method.first):
        flat = w.detach().reshape(-1)
        assert torch.equal(flat, flat[first][alloc])
        assert method.values[len(scaled)] == round(0.3 * flat.numel())
        scaled.append(flat[first] / (2.0 / (record.kernel ** 2 * record.out_channels)) ** 0.5)
    scaled = torch.cat(scaled)
    assert abs(scaled.std().item() - 1) < 0.05 and abs(scaled.mean().item()) < 0.05


def test_one_step_by_hand():
    """fc_int (2 x 3) reads the values b = (1, -2, 0.5) as [[b0 b1 b2] [b0 b1 b2]]; the gradient
    G = [[1 2 3] [4 5 6]] sums to (5, 7, 9) per value. Nesterov SGD, lr 0.1, momentum 0.9, weight decay
    0.01, first step: d = g + 0.01 b; buf = d; step = d + 0.9 buf = 1.9 d:
    b0: 1 - 0.1 * 1.9 * 5.01 = 0.0481; b1: -2 - 0.1 * 1.9 * 6.98 = -3.3262; b2: 0.5 - 0.1 * 1.9 * 9.005 = -1.21095."""
    model = _lenet()
    method = TiedWeights(model, [0.5, 0.5, 0.5], seed=0)
    layer = 1
    w = method.weights[layer]
    method.alloc[layer] = torch.tensor([0, 1, 2, 0, 1, 2])
    method.first[layer] = torch.tensor([0, 1, 2])
    with torch.no_grad():
        w.copy_(torch.tensor([[1.0, -2.0, 0.5], [1.0, -2.0, 0.5]]))
    w.grad = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    method.after_backward()
    assert w.grad.tolist() == [[5.0, 7.0, 9.0], [5.0, 7.0, 9.0]]
    optimizer = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    optimizer.step()
    method.after_step(0)
    expected = torch.tensor([0.0481, -3.3262, -1.21095])
    assert torch.allclose(w.detach()[0], expected, atol=1e-6) and torch.equal(w.detach()[0], w.detach()[1])


def _reference_run(model, method, batches, lr=0.2, rescale=False):
    """The code's TiedTensor: a bank parameter per tied layer, the weight bank[alloc] in the forward,
    SGD (Nesterov, wd) on the banks and the untied parameters."""
    names = [r.name + ".weight" for r in method.layers]
    banks = [torch.nn.Parameter(w.detach().reshape(-1)[first].clone()) for w, first in zip(method.weights, method.first)]
    others = [p for n, p in model.named_parameters() if n not in names]
    optimizer = torch.optim.SGD(banks + others, lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    for images, targets in batches:
        weights = {n: b[a].view(w.shape) for n, b, a, w in zip(names, banks, method.alloc, method.weights)}
        loss = F.cross_entropy(functional_call(model, weights, (images,)), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rescale:  # main.py: after the step
            for b, a in zip(banks, method.alloc):
                b.grad.div_(a.numel() / b.numel())
    return banks, [p.detach().clone() for p in others]


def _run(model, method, batches, lr=0.2):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    for it, (images, targets) in enumerate(batches):
        loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        method.after_backward()
        optimizer.step()
        method.after_step(it)


def _batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 1, 1, generator=g), torch.randint(2, (8,), generator=g)) for _ in range(n)]


def test_training_is_the_codes_bank_sgd():
    reference_model = _lenet()
    reference = TiedWeights(reference_model, [0.5, 0.7, 0.5], seed=4)
    banks, others = _reference_run(reference_model, reference, _batches())
    model = _lenet()
    method = TiedWeights(model, [0.5, 0.7, 0.5], seed=4)
    _run(model, method, _batches())
    for w, alloc, first, bank in zip(method.weights, method.alloc, method.first, banks):
        flat = w.detach().reshape(-1)
        assert torch.equal(flat, flat[first][alloc])  # still exactly tied
        assert torch.allclose(flat, bank.detach()[alloc], atol=1e-6)
    names = [r.name + ".weight" for r in method.layers]
    for (name, p), expected in zip([(n, p) for n, p in model.named_parameters() if n not in names], others):
        assert torch.allclose(p.detach(), expected, atol=1e-6), name


def test_rescale_tied_gradient_changes_nothing_as_in_the_code():
    runs = []
    for rescale in (False, True):
        model = _lenet()
        method = TiedWeights(model, [0.5, 0.5, 0.5], seed=2, rescale_gradient=rescale)
        _run(model, method, _batches())
        runs.append((model, method))
    for a, b in zip(runs[0][1].weights, runs[1][1].weights):
        assert torch.equal(a, b)
    # What it does do: the gradient left after the step is divided by n/m.
    (_, plain), (_, rescaled) = runs
    for a, b, values in zip(plain.weights, rescaled.weights, rescaled.values):
        assert torch.allclose(b.grad, a.grad / (a.numel() / values))


def test_l1_counts_each_value_once():
    model = _lenet()
    method = TiedWeights(model, [0.5, 0.5, 0.5], seed=0, l1=0.01)
    banks = method.banks()
    assert torch.allclose(method.loss(0.0), 0.01 * sum(b.abs().sum() for b in banks))
    method.loss(0.0).backward()
    method.after_backward()
    for w, alloc, bank in zip(method.weights, method.alloc, banks):
        # The code's bank gradient of c * sum|bank|: c * sign(b), once per value (not per position).
        assert torch.allclose(w.grad.reshape(-1), 0.01 * torch.sign(bank)[alloc])


def test_cost_counts_the_free_values():
    model = _lenet()
    method = TiedWeights(model, [0.5, 0.5, 0.5], seed=0)
    # Dense: 9 + 6 + 4 weights, 3 + 2 + 2 biases; tied: 4 + 3 + 2 values and the biases.
    assert model.cost.dense() == (19, 26)
    assert method.cost(None) == (19, 16)
    assert method.tied_values() == {"fc1": 4, "fc_int": 3, "fc2": 2}


TINY = ["--dummy", "-j", "0", "--seed", "0", "--width-mult", "0.125", "--epoch", "1", "--limit-batches", "2",
        "-b", "16"]


def test_tied_run_end_to_end(tmp_path, monkeypatch):
    from engine.cli import main
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(train_resnet56.RECIPE, ["--sparse", "static", "--tied", "--density", "0.3", *TINY, "--out-dir", "run"])
    assert done.value.code == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["method"] == "tied" and results["tied"] is True and results["density"] == 0.3
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    model = build_model(state["arch"])
    model.load_state_dict(state["model"])
    method = TiedWeights(model, [0.3] * len(state["method"]["layers"]), seed=0, initialize=False)
    assert method.digests == state["method"]["digests"]
    for w, alloc, first in zip(method.weights, method.alloc, method.first):
        flat = w.detach().reshape(-1)
        assert torch.equal(flat, flat[first][alloc])  # tied after training
    assert (results["macs_pruned"], results["params_pruned"]) == method.cost(None)
    assert results["tied_values"] == sum(method.values)
    payload = read_pruned(tmp_path / "run" / "pruned.pt")
    assert (payload["macs"], payload["params"]) == method.cost(None)
    assert payload["arch"]["source"]["tied_layers"] == method.tied_values()


@pytest.mark.parametrize("argv, needle", [
    (["--sparse", "dsr", "--density", "0.2", "--tied"], "--tied is static training's"),
    (["--sparse", "deepr", "--density", "0.2", "--tied"], "--tied is static training's"),
    (["--sparse", "static", "--density", "0.2", "--rescale-tied-gradient"], "add --tied"),
    (["--net", "dep", "--tied"], "--tied belongs to unstructured sparse training"),
    (["--sparse", "static", "--density", "1e-5", "--tied"], "without a free value"),
])
def test_bad_tied_input_is_one_line(argv, needle, tmp_path, capsys, monkeypatch):
    from engine.cli import main
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(train_resnet56.RECIPE, [*argv, *TINY, "--out-dir", "run"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]


def test_tied_trains_on_the_ordinary_schedule():
    """The code's tied runs use wrnet_schedule.yaml / resnet_schedule.yaml, not static sparse's long one."""
    import train_resnet50
    from engine.cli import parse_args
    tied = parse_args(train_resnet56.RECIPE, ["--sparse", "static", "--tied", "--density", "0.1", "--dummy"])
    static = parse_args(train_resnet56.RECIPE, ["--sparse", "static", "--density", "0.1", "--dummy"])
    assert (tied.epochs, tied.milestones) == (200, (60, 120, 160))
    assert (static.epochs, static.milestones) == (400, (120, 220, 350))
    imagenet = parse_args(train_resnet50.RECIPE, ["--sparse", "static", "--tied", "--density", "0.1", "--dummy"])
    assert (imagenet.epochs, imagenet.milestones) == (100, (30, 60, 90))
    given = parse_args(train_resnet56.RECIPE, ["--sparse", "static", "--tied", "--density", "0.1", "--dummy",
                                               "--epoch", "3"])
    assert given.epochs == 3
