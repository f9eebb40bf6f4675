"""HSIC-Lasso (pruning/hsic.py, prune.py --method hsic).

* The Laplace kernels and their centring against the direct formulas.
* The Lasso keeps a channel that is an exact copy of the output and drops noise;
  the omega floor's bisection reaches omega.
* The global search follows the authors' control flow (double, then bisect
  from the midpoint) and lands within the tolerance on a tiny model.
* The groups of every model, ResNet50's classifier-input quirk and its option.
* prune.py end to end on --dummy: results.json's keys, the saved network's
  counted MACs equal the reported ones; an exact resume of the fine-tuning
  after SIGTERM; one-line errors.
"""
import json
import math
import os
import signal

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import prune
from conftest import assert_equal_states, read_tb_events, run_script
from models import build_model, default_arch, load_pruned
from pruning import hsic
from engine import prune_job
from engine.trainer import Trainer
from utils.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")


def _dense(name, width, **arch):
    torch.manual_seed(0)
    return build_model(default_arch(name, 10, width, net="dense", **arch))


def test_laplace_kernels_and_centring_equal_the_direct_formulas():
    x = torch.randn(3, 7, 5, dtype=torch.float64)  # (C, N, d)
    kernels = hsic.laplace_kernels(x)
    gamma = math.sqrt(0.5 / 5)
    direct = torch.tensor([[[math.exp(-gamma * torch.linalg.vector_norm(x[c, i] - x[c, j]).item())
                             for j in range(7)] for i in range(7)] for c in range(3)], dtype=torch.float64)
    torch.testing.assert_close(kernels, direct, rtol=1e-12, atol=1e-12)
    h = torch.eye(7, dtype=torch.float64) - torch.full((7, 7), 1 / 7, dtype=torch.float64)
    torch.testing.assert_close(hsic.centred(kernels), h @ kernels @ h, rtol=1e-12, atol=1e-12)
    # The design matrix's column c is vec of channel c's centred kernel; float32 features give float64 kernels.
    design = hsic.channel_design(x.transpose(0, 1).float())
    assert design.shape == (49, 3) and design.dtype == np.float64
    np.testing.assert_allclose(design[:, 1], (h @ direct[1] @ h).reshape(-1).numpy(), rtol=1e-5, atol=1e-6)


def _toy_group(copy_channel=2, n=24, channels=6, d=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, d, generator=generator)
    y = torch.randn(n, d, generator=generator)
    x[:, copy_channel] = y
    return hsic.Group(0, "toy", hsic.channel_design(x), hsic.output_target(y))


def test_the_lasso_keeps_the_channel_that_copies_the_output():
    group = _toy_group()
    kept, _ = hsic.select_channels(group, 1e-3, omega=1)
    assert kept.tolist() == [2]
    # Near alpha 0 the copy's coefficient is ~1 and the noise channels' ~0.
    from sklearn.linear_model import Lasso
    coef = Lasso(alpha=1e-6, selection="random", random_state=0).fit(group.design, group.target).coef_
    assert coef[2] > 0.99 and np.abs(np.delete(coef, 2)).max() < 1e-3


def test_the_omega_floor_bisects_alpha_down_to_omega_channels(monkeypatch):
    group = _toy_group()
    assert hsic.select_channels(group, 10.0, omega=1)[0].tolist() == [2]  # nothing survives 10; bisected to one
    assert hsic.select_channels(group, 10.0, omega=2)[0].tolist() == [2, 4]
    # Warm-started from two channels, no alpha gives exactly three: after the first fit and 51
    # bisection fits (the authors' `step > 50`) the last solution stands.
    from sklearn.linear_model import Lasso
    fits, original = [], Lasso.fit
    monkeypatch.setattr(Lasso, "fit", lambda self, *a, **k: (fits.append(self.alpha), original(self, *a, **k))[1])
    kept, _ = hsic.select_channels(group, 10.0, omega=3)
    assert kept.tolist() == [2, 4] and len(fits) == 1 + 51
    assert fits[1] == 5.0 and fits[2] == 2.5  # halving from [0, alpha]


class _Scripted(hsic.HsicSearch):
    """A search whose MACs are a given decreasing function of alpha."""

    def __init__(self, macs_of_alpha):
        super().__init__([], [], lambda counts: 0, omega=1)
        self.macs_of_alpha = macs_of_alpha

    def decide(self, alpha):
        self.history.append(dict(alpha=alpha))
        return hsic.Decision(alpha, [], self.macs_of_alpha(alpha), 0, 0.0)


def test_the_search_doubles_then_bisects_from_the_midpoint_as_the_authors_code():
    search = _Scripted(lambda a: round(1000 / (1 + 100 * a)))
    decision = search.run(target=300, alpha=0.001, tolerance=0.01, report=lambda *a: None)
    tried = [h["alpha"] for h in search.history]
    # Doubling 0.001 until MACs < 300 (0.032 gives 238), then bisection on [0, 0.032] from 0.016.
    assert tried[:6] == pytest.approx([0.001, 0.002, 0.004, 0.008, 0.016, 0.032])
    assert tried[6] == pytest.approx(0.016)
    assert abs(decision.macs - 300) <= 3 and decision.alpha == tried[-1]
    left, right = 0.016, 0.032  # 0.016 gives 385 > 303: the lower end moves up
    assert tried[7] == pytest.approx((left + right) / 2)


def test_a_band_the_macs_jump_over_ends_the_bisection_at_the_closest_alpha():
    """MACs that fall from 400 to 200 at alpha 0.01 never land within 300 +- 1%: the authors' loop
    bisects forever (the ends meet at 0.01, far above its 1e-15 floor); here it ends when no float lies
    between the ends, with the closest alpha tried."""
    search = _Scripted(lambda a: 400 if a < 0.01 else 200)
    decision = search.run(target=300, alpha=0.001, tolerance=0.01, report=lambda *a: None)
    assert len(search.history) < 100 and decision.macs in (200, 400)
    assert [h["alpha"] for h in search.history][-1] == pytest.approx(0.01)
    near = _Scripted(lambda a: 304 if a < 0.01 else 200)  # 304 is closer to 300 than 200
    decision = near.run(target=300, alpha=0.001, tolerance=0.01, report=lambda *a: None)
    assert decision.macs == 304 and decision.alpha < 0.01 and len(near.history) < 100


def test_an_unreachable_target_is_a_usage_error():
    search = _Scripted(lambda a: 500)
    with pytest.raises(UsageError, match="no alpha"):
        search.run(target=300, alpha=0.001, tolerance=0.01, report=lambda *a: None)


def test_the_search_lands_within_the_tolerance_on_a_tiny_model():
    model = _dense("resnet56", 0.25).eval()
    torch.manual_seed(1)
    groups = hsic.calibration_groups(_dense("resnet56", 0.25), torch.randn(24, 3, 32, 32), log=lambda *_: None)
    dense, _ = model.cost.dense()
    target = 0.5 * dense
    search = hsic.HsicSearch(groups, model.gates.widths, lambda c: model.cost.pruned(torch.tensor(c))[0], omega=1)
    decision = search.run(target, 1e-3, 0.01, report=lambda *a: None)
    assert abs(decision.macs - target) <= 0.01 * target
    counts = search.counts(decision.kept)
    assert counts[0] == model.gates.widths[0]  # the stem stays whole
    assert decision.macs == model.cost.pruned(torch.tensor(counts))[0]


@pytest.mark.parametrize("name,width,groups,size", [("vgg16", 0.125, 13, 32), ("resnet56", 0.125, 27, 32),
                                                     ("resnet50", 0.0625, 32, 64)])
def test_the_groups_of_every_model(name, width, groups, size):
    arch = dict(input_size=64) if name == "resnet50" else {}
    model = _dense(name, width, **arch)
    found = hsic.calibration_groups(model, torch.randn(6, 3, size, size), log=lambda *_: None)
    assert len(found) == groups
    assert [g.width for g in found] == [model.gated_layers[g.layer].width for g in found]
    assert all(g.design.shape == (36, g.width) and g.target.shape == (36,) for g in found)
    assert not model.training  # left in eval mode
    if name == "vgg16":  # the last conv's channels are judged at the classifier, one value each
        assert found[-1].layer == 12
    if name == "resnet50":
        conv2 = [g for g in found if g.layer % 2 == 0]
        assert all(np.array_equal(g.target, conv2[0].target) for g in conv2)  # the pooled fc input, shared
        own = hsic.calibration_groups(_dense(name, width, **arch), torch.randn(6, 3, size, size), y_source="conv3",
                                      log=lambda *_: None)
        assert not np.array_equal(own[1].target, own[3].target)


# --------------------------------------------------------------------------- prune.py

FAST = ("--dummy", "-j", "0", "--seed", "0", "--calib-batch-size", "16", "-b", "32", "--limit-batches", "2")


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    base = tmp_path_factory.mktemp("hsic")
    proc = run_script("train_resnet56.py", "--net", "dense", "--width-mult", "0.25", "--epoch", "1", "-b", "64",
                      "--limit-batches", "2", "--dummy", "-j", "0", "--seed", "0", "--out-dir", "dense", cwd=base)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return base


def _argv(*extra):
    return ["dense/best.pt", "--method", "hsic", "--target-macs", "0.5", "--alpha", "1e-3", *FAST, *extra]


def test_prune_hsic_end_to_end(dense, monkeypatch, capsys):
    monkeypatch.chdir(dense)
    assert prune.main([*_argv("--epochs", "2"), "--out-dir", "hs"]) == 0
    out = capsys.readouterr().out
    assert "alpha 1.0000e-03:" in out and "kernels 27/27" in out
    results = json.loads((dense / "hs" / "results.json").read_text())
    for key in ("method", "top1", "macs_pruned", "params_pruned", "channels", "hsic_alpha", "omega",
                "calib_batch_size", "calib_seed", "target"):
        assert key in results, key
    assert results["method"] == "hsic" and results["calib_batch_size"] == 16 and results["omega"] == 1
    assert abs(results["macs_pruned"] - results["target"]) <= 0.01 * results["target"]
    assert results["hsic"]["kept_widths"]["layers.0.conv1"] == results["channels"][1]["kept"]
    assert results["hsic_alpha"] == results["hsic"]["search"][-1]["alpha"]
    block = results["budget"]  # the alpha search says where it landed, as a gated run's budget block
    assert block["target"] == results["target"] and block["achieved"] == results["hsic"]["macs"]
    assert block["within_tolerance"] is block["converged"] is True and block["settled_by"] == "search"
    compact = load_pruned(dense / "hs" / "pruned.pt")
    with FlopCounterMode(display=False) as counter:
        compact(torch.randn(1, 3, 32, 32))
    assert counter.get_total_flops() // 2 == results["macs_pruned"]
    assert sum(p.numel() for p in compact.parameters()) == results["params_pruned"]
    # The fine-tuning's cosine: epoch e of E runs at lr/2 (1 + cos(pi e / E)), the lr 0.1.
    last = torch.load(dense / "hs" / "last.pt", weights_only=True)
    assert last["weight_optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.05 * (1 + math.cos(math.pi)))
    assert last["args"]["weight_decay"] == 2e-4 and last["args"]["epochs"] == 2
    tags = {tag for path in (dense / "hs" / "search").glob("events.out.tfevents*")
            for _, tag, _, _ in read_tb_events(path)}
    assert {"hsic/alpha", "hsic/macs", "hsic/macs_fraction"} <= tags, tags
    import summarize
    assert "| HSIC-Lasso |" in summarize.summarize([str(dense / "hs")])


def test_sigterm_mid_fine_tune_resumes_exactly(dense, tmp_path, monkeypatch, capsys):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(dense)
    argv = _argv("--epochs", "2")
    assert prune.main([*argv, "--out-dir", str(tmp_path / "ref")]) == 0
    original, steps = Trainer.train_epoch, []

    def train_epoch(self, stop, vote):
        if self.epoch == 1 and not steps:  # the second epoch: SIGTERM after its first step
            steps.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, stop, vote)

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    assert prune.main([*argv, "--out-dir", str(tmp_path / "cut")]) == 75
    monkeypatch.undo()
    monkeypatch.chdir(dense)
    stopped = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert stopped["epoch"] == 1 and stopped["step"] > 0
    assert prune.main([*argv, "--out-dir", str(tmp_path / "cut"), "--resume", "auto"]) == 0
    a = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    for key in ("model", "weight_optimizer"):
        assert_equal_states(a[key], b[key], key)
    # A continued run must ask for the cut it has.
    with pytest.raises(UsageError, match="--omega"):
        prune_job.run(prune.parse_args([*argv, "--omega", "2", "--out-dir", str(tmp_path / "cut"), "--resume", "auto"]))
    capsys.readouterr()


ERRORS = {
    "above dense": (["--target", "10000000000"], "must be below"),
    "below omega": (["--target-macs", "0.3", "--omega", "4"], "below what --omega 4 allows"),
    "omega too wide": (["--target-macs", "0.5", "--omega", "5"], "has only 4 channels"),
    "stage_pr": (["--stage_pr", "0,0.5,0.5,0.5,0"], "finds its own widths"),
    "non-dense": (["--target-macs", "0.5"], "prune.py prunes a dense baseline"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_is_one_line(case, dense, monkeypatch, capsys):
    monkeypatch.chdir(dense)
    argv, needle = ERRORS[case]
    source = "dense/pruned.pt" if case == "non-dense" else "dense/best.pt"
    status = prune.main([source, "--method", "hsic", *argv, *FAST, "--epochs", "1",
                         "--out-dir", f"err-{case.replace(' ', '-')}"])
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert not (dense / f"err-{case.replace(' ', '-')}" / "cut.pt").exists()


@pytest.mark.parametrize("target,omega,alpha", [("107000000", "40", "5e-5"), ("57000000", "5", "8e-4"),
                                                ("1550000000", "1", "7e-5")])
def test_the_published_commands_parse_as_they_are(target, omega, alpha):
    args = prune.parse_args(["best.pt", "--method", "hsic", "--target", target, "--omega", omega, "--alpha", alpha,
                             "--tolerance", "0.01"])
    assert (args.target, args.omega, args.alpha, args.tolerance) == (int(target), int(omega), float(alpha), 0.01)
