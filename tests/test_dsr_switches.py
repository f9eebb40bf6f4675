"""The switches of DSR's code around its methods (pruning/sparse.py, pruning/imp.py), one small test each:
--sub-kernel-granularity 2 (kernel masks), --initial-sparsity-conv/-fc, --threshold-prune and
--rewire-scaling one at a time, --L1-loss-coeff and --conv-group-lasso on any method,
--big-new-weights, --sparse-resnet-downsample, IMP's --start-pruning-after-epoch /
--prune-epoch-frequency / --post-prune-epochs / --prune-target-sparsity-*, --copy-mask-from and
--schedule-file; each refusal is one line with exit status 2."""
import json
from types import SimpleNamespace

import pytest
import torch

import prune
import train_resnet56
from engine.cli import parse_args
from models import build_model, default_arch
from models.resnet_imagenet import ImageNetResNet
from pruning.sparse import DSR, IMP, SET, DeepR, StaticSparse, sparse_layers, sparse_method
from pruning.specs import read_schedule_file
from utils.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")


def _cifar(seed=0, width=0.25):
    torch.manual_seed(seed)
    return build_model(default_arch("resnet56", 10, width, net="dense"))


def _resnet50(seed=0):
    torch.manual_seed(seed)
    return ImageNetResNet(blocks=(1, 1, 1, 1), widths=(4, 4, 8, 8), num_classes=10, input_size=64, net="dense")


def _optimizer(method, lr=0.05):
    optimizer = torch.optim.SGD(method.model.weight_parameters(), lr=lr, momentum=0.9, nesterov=True)
    method.attach_optimizer(optimizer)
    method.start_epoch(0)
    return optimizer


def _args(**kwargs):
    base = dict(sparse="static", density=None, seed=0, stop_rewire_epoch=None, n_prune_params=None,
                rewire_fraction=None, DeepR_eta=0.01)
    return SimpleNamespace(**dict(base, **kwargs))


# ----------------------------------------------------------------------- --sub-kernel-granularity 2


def test_kernel_granularity_masks_whole_kernels():
    model = _cifar()
    method = StaticSparse(model, 0.2, 0, granularity=2)
    for w, m in zip(method.weights, method.masks):
        assert m.shape == w.shape[:2]
        assert int(m.sum()) == int(0.2 * m.numel() + 0.1)     # the code's count, of kernels
        present = w.detach().abs().sum((2, 3)) != 0
        assert torch.equal(present, m)                          # whole kernels on, whole kernels off
    results = method.results()
    assert results["sparse_weights_active"] == sum(int(m.sum()) * 9 for m in method.masks)
    assert results["sub_kernel_granularity"] == 2


def test_kernel_granularity_drops_by_mean_magnitude():
    """A kernel's magnitude is its mean |w| (the code's abs().sum over k x k / k^2): with every active
    weight at 1 except two kernels of the first tensor (mean 0.05 and exactly 0.1), H = 0.1 drops only
    the first, and the kernel count stays."""
    model = _cifar()
    method = DSR(model, 0.3, 0, {0: 1}, 100, 1, granularity=2)
    optimizer = _optimizer(method)
    with torch.no_grad():
        for w in method.weights:
            w.fill_(1.0)
        active = method.masks[0].nonzero()
        (a0, a1), (b0, b1) = active[0].tolist(), active[1].tolist()
        low = method.weights[0][a0, a1]
        low.zero_()
        low[0, 0] = 0.45                                     # mean 0.05
        method.weights[0][b0, b1].fill_(0.1)                 # mean 0.1: not below H
    method.apply_masks()
    scores, _ = method._flat()
    assert abs(float(scores[0].view(method.masks[0].shape)[a0, a1]) - 0.05) < 1e-7
    counts = [int(m.sum()) for m in method.masks]
    method.threshold = 0.1
    method.after_step(1)
    assert not method.masks[0][a0, a1] and method.masks[0][b0, b1]
    assert sum(int(m.sum()) for m in method.masks) == sum(counts)
    assert method.events[-1][1] == 1
    assert optimizer is not None


def test_kernel_granularity_imp_prunes_kernels():
    model = _cifar()
    method = IMP(model, 0.5, 0, iterations=1, granularity=2)
    method.end_epoch(0)
    for w, m in zip(method.weights, method.masks):
        assert int((~m).sum()) == int(0.5 * m.numel()) + 1   # the code's int(f M) + 1, of kernels
        assert torch.equal(w.detach().abs().sum((2, 3)) != 0, m)


def test_deepr_takes_single_weights_only():
    with pytest.raises(ValueError, match="single weights"):
        DeepR(_cifar(), 0.2, 0, {0: 1e-5}, 10, granularity=2)


# ----------------------------------------------------------------------- conv / fc sparsities


def test_conv_and_fc_sparsities_are_the_codes():
    model = _resnet50()
    method = sparse_method(model, _args(initial_sparsity_conv=0.8, initial_sparsity_fc=0.5), "imagenet")
    for record, w, m in zip(method.layers, method.weights, method.masks):
        s = 0.5 if isinstance(model.get_submodule(record.name), torch.nn.Linear) else 0.8
        assert int(m.sum()) == int((1 - s) * w.numel() + 0.1)  # parameterized_tensors.py's expression
    results = method.results()
    assert results["density"] is None and results["density_conv"] == 1 - 0.8 and results["density_fc"] == 0.5
    with pytest.raises(UsageError, match="initial-sparsity-fc"):
        sparse_method(_resnet50(), _args(initial_sparsity_conv=0.8), "imagenet")
    # --density covers the kind without a flag.
    method = sparse_method(_resnet50(), _args(density=0.3, initial_sparsity_fc=0.0), "imagenet")
    assert int(method.masks[-1].sum()) == method.masks[-1].numel()


# ----------------------------------------------------------------------- --threshold-prune / --rewire-scaling alone


def test_set_with_threshold_prune_regrows_in_each_tensor():
    model = _cifar()
    method = SET(model, 0.3, 0, {0: 1}, 100, None, threshold_prune=True, n_prune_params=10 ** 6)
    _optimizer(method)
    per_tensor = [int(m.sum()) for m in method.masks]
    method.threshold = 0.05
    expected = sum(int(((w.detach().abs() < 0.05) & m).sum()) for w, m in zip(method.weights, method.masks))
    method.after_step(1)
    assert [int(m.sum()) for m in method.masks] == per_tensor        # each tensor regrows what it dropped
    assert method.events[-1][1] == expected and method.events[-1][2] == 0.05
    assert method.threshold == 0.1                                   # far below N_p: H doubles
    assert method.settings()["--threshold-prune"] is True and "--rewire-fraction" not in method.settings()


def test_set_with_rewire_scaling_moves_weights_between_tensors():
    model = _cifar()
    method = SET(model, 0.3, 0, {0: 1}, 100, 0.2, rewire_scaling=True)
    _optimizer(method)
    total = sum(int(m.sum()) for m in method.masks)
    dropped = sum(int(0.2 * int(m.sum())) + 1 for m in method.masks)
    with torch.no_grad():
        method.weights[0].mul_(100.0)   # the first tensor's survivors dominate: it gets more back
    method.after_step(1)
    assert sum(int(m.sum()) for m in method.masks) == total
    assert method.events[-1][1] == dropped


# ----------------------------------------------------------------------- --L1-loss-coeff, --conv-group-lasso


def test_l1_on_static_and_group_lasso_by_hand():
    model = _cifar()
    method = StaticSparse(model, 0.3, 0, l1=0.01)
    assert torch.allclose(method.loss(0.0), 0.01 * sum(w.abs().sum() for w in method.weights))
    method = StaticSparse(_cifar(), 1.0, 0, l1=0.5, group_lasso=True)
    with torch.no_grad():
        for w in method.weights:
            w.zero_()
        method.weights[0][0, 0, 0, 0] = 3.0
        method.weights[0][0, 0, 2, 1] = -4.0
    kernels = sum(w.shape[0] * w.shape[1] for w in method.weights)
    # sqrt(9 + 16 + 1e-12) = 5 for that kernel, sqrt(1e-12) = 1e-6 for each other one.
    assert abs(method.loss(0.0).item() - 0.5 * (5.0 + (kernels - 1) * 1e-6)) < 1e-6


# ----------------------------------------------------------------------- --big-new-weights


def test_big_new_weights_start_from_the_initial_distribution():
    model = _cifar()
    method = SET(model, 0.5, 0, {0: 1}, 100, 0.5, big_new_weights=True)
    optimizer = _optimizer(method)
    for w in method.model.weight_parameters():
        w.grad = torch.randn_like(w)
    method.after_backward()
    optimizer.step()                      # momentum buffers exist
    before = [m.clone() for m in method.masks]
    method.after_step(1)
    scaled = []
    for record, w, m, old in zip(method.layers, method.weights, method.masks, before):
        new = m & ~old
        values = w.detach()[new]
        assert torch.all(values != 0)
        assert torch.all(optimizer.state[w]["momentum_buffer"][new] == 0)  # a new weight, a fresh momentum
        scaled.append(values / (2.0 / (9 * record.out_channels)) ** 0.5)
    scaled = torch.cat(scaled)
    assert scaled.numel() > 2000 and abs(scaled.std().item() - 1) < 0.1 and abs(scaled.mean().item()) < 0.1


# ----------------------------------------------------------------------- --sparse-resnet-downsample


def test_sparse_resnet_downsample_adds_the_shortcuts():
    model = _resnet50()
    plain, with_shortcuts = sparse_layers(model), sparse_layers(model, shortcuts=True)
    added = [r for r in with_shortcuts if r not in plain]
    assert added and {r.role for r in added} == {"shortcut"} and len(with_shortcuts) == len(plain) + len(added)
    method = StaticSparse(model, 0.2, 0, shortcuts=True)
    assert [r.name for r in method.layers] == [r.name for r in with_shortcuts]


# ----------------------------------------------------------------------- IMP's schedule flags and targets


def test_imp_prunes_from_its_start_every_n_epochs():
    method = IMP(_cifar(), 0.5, 0, iterations=2, start=1, every=3)
    done = []
    for epoch in range(9):
        method.end_epoch(epoch)
        done.append(method.prunes_done)
    assert done == [0, 1, 1, 1, 2, 2, 2, 2, 2]  # ends of epochs 1 and 4 (0-based)


def test_imp_conv_and_fc_targets():
    model = _resnet50()
    method = IMP(model, 0.2, 0, iterations=1, fc=0.5)
    linear = [isinstance(model.get_submodule(r.name), torch.nn.Linear) for r in method.layers]
    assert method.targets == [0.5 if lin else 0.2 for lin in linear]


# ----------------------------------------------------------------------- the schedule file

CODE_SCHEDULE = """
lr_schedule:
  - 0 : 0.1
  - 60 : 0.02
  - 120 : 0.004
  - 160 : 0.0008

rewire_period_schedule:
  - 0 : 100
  - 25 : 200
  - 80 : 400
  - 140 : 800

DeepR_temperature_schedule:
  - 0 : 1.0e-5
  - 25 : 1.0e-8
  - 80 : 1.0e-12
  - 140 : 1.0e-15
"""


def test_schedule_file_in_the_codes_format(tmp_path):
    path = tmp_path / "wrnet_schedule.yaml"
    path.write_text(CODE_SCHEDULE)
    schedule = read_schedule_file(str(path))
    assert schedule == dict(lr={0: 0.1, 60: 0.02, 120: 0.004, 160: 0.0008},
                            rewire_periods={0: 100, 25: 200, 80: 400, 140: 800},
                            deepr_temperatures={0: 1e-5, 25: 1e-8, 80: 1e-12, 140: 1e-15})
    config = parse_args(train_resnet56.RECIPE, ["--sparse", "dsr", "--density", "0.1", "--dummy",
                                                "--schedule-file", str(path)])
    assert config.lr_schedule == schedule["lr"] and config.lr == 0.1
    assert config.rewire_periods == schedule["rewire_periods"]


BAD_SCHEDULES = {
    "not yaml": ("lr_schedule: [0: 0.1\n", "not valid YAML (line"),
    "missing key": ("lr_schedule:\n  - 0 : 0.1\nrewire_period_schedule:\n  - 0 : 100\n", "no DeepR_temperature"),
    "decreasing": (CODE_SCHEDULE.replace("- 120 : 0.004", "- 50 : 0.004"), "epoch 50 comes after epoch 60"),
    "not from 0": (CODE_SCHEDULE.replace("- 0 : 100", "- 5 : 100"), "starts at epoch 5"),
    "period": (CODE_SCHEDULE.replace("- 25 : 200", "- 25 : 0.5"), "whole number of iterations"),
    "unknown key": (CODE_SCHEDULE + "lr_schedul:\n  - 0 : 1\n", "unknown key 'lr_schedul'"),
}


def _one_line_error(capsys, call):
    with pytest.raises(SystemExit) as stop:
        raise SystemExit(call())
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and "Traceback" not in err, (stop.value.code, err)
    return lines[0]


TINY = ["--dummy", "-j", "0", "--seed", "0", "--width-mult", "0.125", "--epoch", "1", "--limit-batches", "1",
        "-b", "16"]


@pytest.mark.parametrize("case", list(BAD_SCHEDULES))
def test_bad_schedule_file_is_one_line(case, tmp_path, capsys, monkeypatch):
    from engine.cli import main
    monkeypatch.chdir(tmp_path)
    text, needle = BAD_SCHEDULES[case]
    (tmp_path / "s.yaml").write_text(text)
    line = _one_line_error(capsys, lambda: main(train_resnet56.RECIPE, [
        "--sparse", "dsr", "--density", "0.2", "--schedule-file", "s.yaml", *TINY, "--out-dir", "run"]))
    assert needle in line, line


# ----------------------------------------------------------------------- refusals


SWITCH_ERRORS = {
    "fraction with threshold": (["--sparse", "set", "--density", "0.2", "--threshold-prune", "--rewire-fraction",
                                 "0.1"], "without --threshold-prune"),
    "threshold on static": (["--sparse", "static", "--density", "0.2", "--threshold-prune"], "--sparse dsr or"),
    "big weights on static": (["--sparse", "static", "--density", "0.2", "--big-new-weights"], "not of --sparse static"),
    "group lasso without L1": (["--sparse", "dsr", "--density", "0.2", "--conv-group-lasso"], "give --L1-loss-coeff"),
    "DeepR kernels": (["--sparse", "deepr", "--density", "0.2", "--sub-kernel-granularity", "2"], "DeepR masks"),
    "downsample on resnet56": (["--sparse", "dsr", "--density", "0.2", "--sparse-resnet-downsample"], "ResNet50's"),
    "schedule and lr": (["--sparse", "dsr", "--density", "0.2", "--schedule-file", "x.yaml", "--lr", "0.1"],
                        "leave --lr out"),
    "copy from nothing": (["--sparse", "static", "--copy-mask-from", "nothing.pt"], "no such file"),
}


@pytest.mark.parametrize("case", list(SWITCH_ERRORS))
def test_bad_switch_is_one_line(case, tmp_path, capsys, monkeypatch):
    from engine.cli import main
    monkeypatch.chdir(tmp_path)
    argv, needle = SWITCH_ERRORS[case]
    line = _one_line_error(capsys, lambda: main(train_resnet56.RECIPE, [*argv, *TINY, "--out-dir", "run"]))
    assert needle in line, line


# ----------------------------------------------------------------------- --copy-mask-from and IMP's epochs, end to end


def test_copy_mask_from_and_imp_epochs(tmp_path, capsys, monkeypatch):
    from engine.cli import main
    monkeypatch.chdir(tmp_path)
    for out, extra in (("dsr", ["--sparse", "dsr", "--density", "0.2"]), ("dense", ["--net", "dense"])):
        with pytest.raises(SystemExit) as done:
            main(train_resnet56.RECIPE, [*extra, *TINY, "--out-dir", out])
        assert done.value.code == 0
    source = torch.load(tmp_path / "dsr" / "last.pt", weights_only=True)["method"]["masks"]
    # The same network: its masks, the density read from them (no --density needed).
    torch.manual_seed(0)  # the engine's order: seed, build, the method (which initialises)
    model = build_model(default_arch("resnet56", 10, 0.125, net="dense"))
    method = sparse_method(model, _args(copy_mask_from="dsr"), "cifar")
    assert all(torch.equal(a, b.view(a.shape)) for a, b in zip(source, method.masks))
    assert all(torch.all(w.detach()[~m] == 0) for w, m in zip(method.weights, method.masks))
    # With the source run's --seed, the weights start from the source run's own initial draw (the code's
    # job that resumes the dynamic run's _initial checkpoint): equal wherever both masks are active.
    torch.manual_seed(0)
    first = sparse_method(build_model(default_arch("resnet56", 10, 0.125, net="dense")),
                          _args(sparse="dsr", density=0.2), "cifar")
    for w, m, w0, m0 in zip(method.weights, method.masks, first.weights, first.masks):
        both = m & m0
        assert both.any() and torch.equal(w.detach()[both], w0.detach()[both])
    # Another width: refused in one line.
    line = _one_line_error(capsys, lambda: main(train_resnet56.RECIPE, [
        "--sparse", "static", "--copy-mask-from", "dsr", *TINY[:-6], "--width-mult", "0.25", "--epoch", "1",
        "--limit-batches", "1", "-b", "16", "--out-dir", "copy"]))
    assert "is not this run's" in line, line
    # IMP: prunes at the ends of epochs 2 and 3 (1-based); the code's nEpochs_to_prune = start + every (K-1) +
    # post = 1 + 1 + 1 = 3, so its last prune's epoch counts as the first post-prune epoch (as 38 + 10 = 48).
    status = prune.main(["dense/last.pt", "--method", "imp", "--density", "0.5", "--prune-iterations", "2",
                         "--start-pruning-after-epoch", "1", "--prune-epoch-frequency", "1", "--post-prune-epochs",
                         "1", "--dummy", "-j", "0", "--seed", "0", "--limit-batches", "1", "-b", "16",
                         "--out-dir", "imp"])
    assert status == 0
    results = json.loads((tmp_path / "imp" / "results.json").read_text())
    assert results["epochs_total"] == 3 and results["prunes_done"] == 2
    assert results["start_pruning_after_epoch"] == 1 and results["prune_epoch_frequency"] == 1
    assert abs(results["density_active"] - 0.5) < 0.02


# ----------------------------------------------------------------------- --no-augment


def test_no_augment_trains_cifar_on_the_plain_images(tmp_path, monkeypatch, capsys):
    from PIL import Image

    import engine.trainer
    import train_resnet50
    from utils import data
    from utils.distributed import Context
    from utils.sampling import DeviceCifarLoader, ResumableSampler
    image = Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy())
    plain, test = data._cifar_transforms(augment=False)
    assert torch.equal(plain(image), test(image))
    # The on-device loader: the sampler's images as they are.
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    sampler = ResumableSampler(list(range(6)), Context(), seed=0, batch_size=3)
    sampler.start_at(0, 0)
    loader = DeviceCifarLoader(images.numpy(), list(range(6)), sampler, torch.device("cpu"), augment=False)
    for batch, labels in loader:
        assert torch.equal(batch, images[labels].permute(0, 3, 1, 2))
    # The engine hands the switch to the data.
    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs.get("augment"))
        return data.build_datasets(*args, **kwargs)

    monkeypatch.setattr(engine.trainer, "build_datasets", recording)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        engine.cli.main(train_resnet56.RECIPE, ["--net", "dense", "--no-augment", *TINY, "--out-dir", "run"])
    assert done.value.code == 0 and seen == [False]
    # Only CIFAR is augmented in the code: elsewhere the flag is refused.
    line = _one_line_error(capsys, lambda: engine.cli.main(train_resnet50.RECIPE, [
        "--net", "dense", "--no-augment", *TINY, "--out-dir", "run50"]))
    assert "only CIFAR is augmented" in line, line


# ----------------------------------------------------------------------- --validate-set


def test_validate_set_holds_out_the_last_training_images(tmp_path, monkeypatch, capsys):
    import numpy as np

    import engine.trainer
    from utils.data import hold_out

    class Cifar:  # what the split reads of torchvision's CIFAR10: data, targets, transform
        def __init__(self, n):
            self.data, self.targets, self.transform = np.arange(n * 2).reshape(n, 2), list(range(n)), "augment"

        def __len__(self):
            return len(self.data)

    train, held = hold_out("cifar10", Cifar(50_000), SimpleNamespace(transform="test"))
    assert len(train) == 45_000 and len(held) == 5_000                      # main.py: split at 45000
    assert held.targets[0] == 45_000 and train.targets[-1] == 44_999 and held.data[0].tolist() == [90_000, 90_001]
    assert train.transform == "augment" and held.transform == "test"
    with pytest.raises(UsageError, match="holds out 10000 images"):
        hold_out("mnist", Cifar(10_000), SimpleNamespace(transform=None))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        engine.cli.main(train_resnet56.RECIPE, ["--net", "dense", "--validate-set", *TINY, "--out-dir", "run"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "461 training / 256 validation images" in out and "held-out training images (16)" in out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {"validate_top1", "validate_loss"} <= set(results)
