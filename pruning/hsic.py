r"""HSIC-Lasso automatic channel pruning to a MACs target (Guo et al., ICCV 2023, "APIB").

As the authors' code (songxmu/APIB) prunes a pretrained network; the cut and the
fine-tuning that follow are ``prune.py``'s, through the shared engine.

**Groups.** A group is the output channels of one gated layer of
``models/structure.py``, judged at the layer that consumes them: its input
:math:`X` (``N x C x d``, d = h·w per channel) and its output :math:`Y`
(``N x D``, flattened). VGG16: all 13 convs (conv k at conv k+1, the last at the
classifier); ResNet56: every block's conv1 at its conv2; ResNet50: every block's
conv1 at conv2 and conv2 at conv3. The stems, the blocks' last convs, the
shortcuts and the classifier are never pruned. The authors' code judges
ResNet50's conv2 channels against the pooled 2048-d classifier input instead of
conv3's output (its name test only matches ``fc``): ``y_source="fc"``.

**Kernels.** Laplace kernels, one per input channel and one of the output,

.. math:: K_c[i,j] = e^{-\gamma_X \|x_{i,c} - x_{j,c}\|_2}, \quad \gamma_X = \sqrt{0.5/d}, \qquad
          L[i,j] = e^{-\gamma_Y \|y_i - y_j\|_2}, \quad \gamma_Y = \sqrt{0.5/D},

centred, :math:`\bar K = H K H` with :math:`H = I - \tfrac{1}{N} 1 1^\top`, not normalised.

**Lasso.** Per group, the vectorised :math:`\bar L` regressed on the vectorised
:math:`\bar K_c` (``N²`` rows, ``C`` columns),

.. math:: \min_\beta \frac{1}{2N^2} \|\mathrm{vec}\,\bar L - \textstyle\sum_c \beta_c\, \mathrm{vec}\,\bar K_c\|^2
          + \alpha \|\beta\|_1,

by scikit-learn's ``Lasso`` as the authors' code calls it (random coordinate
selection, ``random_state=0``, warm start, with intercept, signed
coefficients, 1000 iterations, tol 1e-4); channel c is kept when
:math:`\beta_c \ne 0`. **ω floor**: when fewer than ω are kept, α is bisected on
``[0, α]`` (warm-started, at most 51 fits or until α < 1e-20) for exactly ω; the
last solution stands otherwise.

**Search.** One global α for all groups: from the command line's α₀, doubled
until the network's MACs fall below the target T, then bisected on ``[0, α]``:
MACs above T(1 + tol) raise the lower end, below T(1 − tol) lower the upper
end, until within (or α < 1e-15). The bisection starts from the midpoint even
when the last doubling already landed, as in the authors' code. Where the MACs
jump over the band (no α lands within it), the bisection ends once no float
lies between its ends, with the α tried whose MACs came closest to T; the
authors' loop would run forever there.
"""
import math
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from models import build_model
from utils import distributed
from utils.data import DeviceNormalize, build_datasets
from utils.errors import EXIT_PREEMPTED, UsageError
from utils.logger import EventFile
from utils.run import StopSignals, limit_threads, select_device
from utils.sampling import ResumableSampler, SeededDataset

from .specs import HSIC_SETTINGS

# The authors' limits: the omega bisection stops after its 51st fit (`step > 50`) or below 1e-20,
# the global bisection below 1e-15.
OMEGA_FITS = 51
OMEGA_ALPHA_FLOOR = 1e-20
SEARCH_ALPHA_FLOOR = 1e-15
# Their doubling loop has no bound; 2^200 times any alpha removes every coefficient.
MAX_DOUBLINGS = 200


def laplace_kernels(x: torch.Tensor) -> torch.Tensor:
    r"""``(..., N, d) -> (..., N, N)``: :math:`e^{-\gamma \|x_i - x_j\|_2}`, :math:`\gamma = \sqrt{0.5/d}`,
    in float64 (distances by the Gram expansion, as the authors' code, with the diagonal exactly 0)."""
    x = x.double()
    gamma = math.sqrt(0.5 / x.shape[-1])
    squared = (x * x).sum(-1)
    distance2 = squared[..., :, None] + squared[..., None, :] - 2.0 * (x @ x.transpose(-1, -2))
    distance2.diagonal(dim1=-2, dim2=-1).zero_()
    return torch.exp(-gamma * distance2.clamp_min_(0.0).sqrt_())


def centred(kernels: torch.Tensor) -> torch.Tensor:
    r""":math:`H K H` with :math:`H = I - \tfrac1N 1 1^\top`, for ``(..., N, N)``: the kernel less its row
    and column means plus its grand mean."""
    return (kernels - kernels.mean(-1, keepdim=True) - kernels.mean(-2, keepdim=True)
            + kernels.mean((-2, -1), keepdim=True))


def channel_design(x: torch.Tensor) -> np.ndarray:
    """``(N, C, d)`` features -> the ``(N², C)`` design matrix: column c is vec of channel c's centred kernel.

    (C, N²) row-major is (N², C) column-major, the layout scikit-learn's solver reads without a copy."""
    kernels = centred(laplace_kernels(x.transpose(0, 1)))
    return kernels.reshape(kernels.shape[0], -1).cpu().numpy().T


def output_target(y: torch.Tensor) -> np.ndarray:
    """``(N, ...)`` outputs -> ``(N²,)``: vec of the centred kernel of the flattened outputs."""
    return centred(laplace_kernels(y.reshape(y.shape[0], -1))).reshape(-1).cpu().numpy()


@dataclass
class Group:
    """One group's regression: ``design`` (N², C) holds vec of each centred channel kernel, ``target``
    (N²,) vec of the centred output kernel."""

    layer: int          # index of the gated layer whose channels these are
    name: str
    design: np.ndarray
    target: np.ndarray

    @property
    def width(self) -> int:
        return self.design.shape[1]


def group_layers(model) -> list[int]:
    """The gated layers HSIC-Lasso prunes, as the network declares them (VGG16: every conv; the
    ResNets: every gated layer but the stem)."""
    return model.hsic_layers()


def kernel_memory(model, n: int) -> int:
    """Bytes the groups' float64 regressions hold for a calibration batch of ``n``: 8·n²·(ΣC + groups)."""
    channels = sum(model.gated_layers[i].width for i in group_layers(model))
    return 8 * n * n * (channels + len(group_layers(model)))


@torch.no_grad()
def calibration_groups(model, images: torch.Tensor, y_source: str = "fc", log=print) -> list[Group]:
    """Each group's kernels from one forward of ``images`` through ``model`` in training mode (BN on
    the batch's statistics, as the authors' code extracts them). The features are turned into kernels
    as the consuming layer runs, so only the N x N kernels are kept. ``model`` is left in eval mode;
    give it a copy, as training mode moves BN's running statistics."""
    layers = group_layers(model)
    resnet50_conv2 = model.pooled_target_layers()
    classifier = model.weight_layers[-1].name
    found: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
    shared_target: list[np.ndarray] = []
    started = time.time()

    def record(index):
        def hook(module, inputs, output):
            x = inputs[0]
            x = x.reshape(x.shape[0], x.shape[1], -1)
            target = None if index in resnet50_conv2 and y_source == "fc" else output_target(output)
            found[index] = (channel_design(x), target)
            log(f"  kernels {len(found)}/{len(layers)} {model.gated_layers[index].name}: {x.shape[1]} channels x "
                f"{x.shape[2]} values ({time.time() - started:.1f}s)")
        return hook

    def record_classifier_input(module, inputs, output):
        shared_target.append(output_target(inputs[0]))

    handles = [model.get_submodule(model.gated_layers[i].consumers[0]).register_forward_hook(record(i))
               for i in layers]
    if resnet50_conv2 and y_source == "fc":
        handles.append(model.get_submodule(classifier).register_forward_hook(record_classifier_input))
    try:
        model.train()
        model(images)
    finally:
        for handle in handles:
            handle.remove()
        model.eval()
    return [Group(index, model.gated_layers[index].name, found[index][0],
                  shared_target[0] if found[index][1] is None else found[index][1]) for index in layers]


def select_channels(group: Group, alpha: float, omega: int) -> tuple[np.ndarray, int]:
    """``(kept channel indices, fits that stopped at the iteration limit)`` of ``group`` at ``alpha``,
    with the ω floor's bisection when fewer than ``omega`` survive."""
    # scikit-learn is imported here, not with the module: every script's --help imports the
    # method registry, and scikit-learn alone would add more than a second to it.
    from sklearn.linear_model import Lasso
    solver = Lasso(alpha=alpha, warm_start=True, selection="random", random_state=0)
    unconverged = 0

    def solve(value):
        nonlocal unconverged
        solver.alpha = value
        solver.fit(group.design, group.target)
        unconverged += int(solver.n_iter_ >= solver.max_iter)
        return np.flatnonzero(solver.coef_ != 0.0)

    kept = solve(alpha)
    if len(kept) < omega:
        left, right = 0.0, alpha
        for _ in range(OMEGA_FITS):
            value = (left + right) / 2
            kept = solve(value)
            if len(kept) > omega:
                left = value
            elif len(kept) < omega:
                right = value
            else:
                break
            if value < OMEGA_ALPHA_FLOOR:
                break
    return kept, unconverged


@dataclass
class Decision:
    """The channels one alpha keeps: per group, and as the network's MACs."""

    alpha: float
    kept: list[np.ndarray]
    macs: int
    unconverged: int
    seconds: float


class HsicSearch:
    """The global alpha search over the groups of one calibration.

    ``macs_of(counts)`` prices per-gated-layer kept counts (the project's cost model); ``widths`` are
    the dense widths of every gated layer (the layers outside the groups stay whole)."""

    def __init__(self, groups: list[Group], widths: list[int], macs_of, omega: int, workers: int = 1,
                 log=print, should_stop=lambda: False):
        narrow = [g for g in groups if g.width < omega]
        if narrow:
            raise UsageError(f"--omega {omega}: layer {narrow[0].name} has only {narrow[0].width} channels")
        self.groups, self.widths, self.macs_of, self.omega = groups, list(widths), macs_of, omega
        self.workers, self.log, self.should_stop = workers, log, should_stop
        self.history: list[dict] = []

    def gates(self, decision: Decision) -> torch.Tensor:
        """The decision as one gate per channel of every gated layer (1 kept, 0 removed; the layers
        outside the groups whole), the export's input."""
        per_layer = [torch.ones(width) for width in self.widths]
        for group, kept in zip(self.groups, decision.kept):
            per_layer[group.layer] = torch.zeros(group.width).index_fill_(0, torch.from_numpy(kept), 1.0)
        return torch.cat(per_layer)

    def counts(self, kept: list[np.ndarray]) -> list[int]:
        counts = list(self.widths)
        for group, channels in zip(self.groups, kept):
            counts[group.layer] = len(channels)
        return counts

    def decide(self, alpha: float) -> Decision:
        from sklearn.exceptions import ConvergenceWarning  # imported on use, as in select_channels
        started = time.time()
        with warnings.catch_warnings():
            # Counted instead (Decision.unconverged): one warning per fit would flood the console.
            warnings.simplefilter("ignore", ConvergenceWarning)
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                answers = list(pool.map(lambda g: select_channels(g, alpha, self.omega), self.groups))
        kept = [channels for channels, _ in answers]
        decision = Decision(alpha, kept, int(self.macs_of(self.counts(kept))), sum(n for _, n in answers),
                            time.time() - started)
        self.history.append(dict(alpha=alpha, macs=decision.macs, kept=[len(k) for k in kept],
                                 unconverged=decision.unconverged))
        return decision

    def run(self, target: float, alpha: float, tolerance: float, report) -> Decision:
        """The authors' search; ``report(step, decision)`` after each alpha. Raises ``UsageError`` when
        no alpha brings the MACs under ``target``, or when ``target`` is below what ω channels in
        every group cost (the floor the method guarantees)."""
        floor = self.macs_of(self.counts([np.arange(self.omega)] * len(self.groups)))
        if target < floor * (1 - tolerance):
            raise UsageError(f"the target {target:.0f} MACs is below what --omega {self.omega} allows: "
                             f"{self.omega} channels in every group cost {floor} MACs")
        right = alpha
        for _ in range(MAX_DOUBLINGS):
            decision = self._step(right, report)
            if decision.macs < target:
                break
            right *= 2
        else:
            raise UsageError(f"no alpha up to {right:g} brings the MACs under {target:.0f} with --omega "
                             f"{self.omega} (the least is {decision.macs}); lower --omega or raise the target")
        left, low, high = 0.0, target * (1 - tolerance), target * (1 + tolerance)
        closest = decision
        while True:
            middle = (left + right) / 2
            if not left < middle < right:
                # No float lies between the ends: the MACs jump over the band at this alpha (one more
                # channel kept or removed crosses it), where the authors' loop would never end.
                return closest
            decision = self._step(middle, report)
            if abs(decision.macs - target) < abs(closest.macs - target):
                closest = decision
            if decision.macs > high:
                left = middle
            elif decision.macs < low:
                right = middle
            else:
                return decision
            if middle < SEARCH_ALPHA_FLOOR:
                return decision

    def _step(self, alpha: float, report) -> Decision:
        if self.should_stop():
            raise SearchStopped
        decision = self.decide(alpha)
        report(len(self.history), decision)
        return decision


class SearchStopped(Exception):
    """A stop signal arrived during the search (nothing is saved; the search is deterministic and
    starts again on resume)."""


# -- prune.py --method hsic -------------------------------------------------------------------------

def calibration_batch(args, device: torch.device) -> torch.Tensor:
    """The calibration images: the first ``--calib-batch-size`` of the training set's epoch 0 under
    the run's seed, with the training augmentation, normalised, on ``device``."""
    train_set, _, _ = build_datasets(args.dataset, args.data_dir, dummy=args.dummy, num_classes=args.num_classes)
    n = args.calib_batch_size
    if len(train_set) < n:
        raise UsageError(f"--calib-batch-size {n}: the training set has only {len(train_set)} images")
    sampler = ResumableSampler(train_set, distributed.Context(), args.seed, n)
    sampler.start_at(0, 0)
    dataset = SeededDataset(train_set)
    images = torch.stack([dataset[key][0] for key, _ in zip(sampler, range(n))])
    return DeviceNormalize(args.dataset, device)(images.to(device))


def run(spec, job) -> int:
    """Every phase of ``prune.py --method hsic`` (``spec``: its declaration, pruning/specs.py): calibrate,
    search the Lasso penalty for the MACs target, slice the kept channels into ``<run>/cut.pt``, fine-tune
    with a cosine lr; with ``--ckpt_path``, :func:`fine_tune_only`."""
    args = job.args
    if getattr(args, "batch_note", None):
        job.log(args.batch_note)
    if job.pruned is not None:
        return fine_tune_only(job)
    target = job.absolute_target()
    args.layer_ratios = None
    job.start(spec.run_label(args), f"target {target} MACs ({target / job.dense_macs:.4f} of dense "
                                    f"{job.dense_macs}), --omega {args.omega}, --alpha {args.alpha:g}, "
                                    f"--tolerance {args.tolerance:g}")
    cut = job.run_dir / "cut.pt"
    if not cut.exists():
        status = search_and_cut(job, cut, target)
        if status != 0:
            return status
    record = job.read_cut(cut).get("hsic")
    if record is None:
        raise UsageError(f"{cut} is the start of a --ckpt_path fine-tuning, not a search's cut; give another "
                         f"--out-dir")
    for key in HSIC_SETTINGS:
        if record[key] != getattr(args, key):
            raise UsageError(f"{cut} was cut with --{key.replace('_', '-')} {record[key]}, this command asks "
                             f"for {getattr(args, key)}; continue it with matching flags")
    args.seed = record["calib_seed"]  # the run's, when continued
    extra = dict(method=args.method, stage_pr=None, target_macs=args.target_macs, target=target,
                 layer_ratios=None, pick_pruned=args.pick_pruned, source=str(args.checkpoint),
                 hsic_alpha=record["alpha_found"], omega=args.omega, calib_batch_size=args.calib_batch_size,
                 calib_seed=record["calib_seed"], hsic=record, lr=args.lr, lr_schedule="cosine",
                 budget=search_budget(target, record["macs"], record["within_tolerance"], args.tolerance,
                                      record["alpha_found"]))
    return job.fine_tune(cut, dict(lr=args.lr, lr_cosine=True), spec.settings, extra)


def fine_tune_only(job) -> int:
    """HSIC-Lasso's ``train.py --ckpt_path``: fine-tune an already pruned network with the method's
    recipe (no calibration, no search). The network is saved as ``<run>/cut.pt`` first: the run
    directory holds where it started, and a continued run must name the same ``--ckpt_path``."""
    args, network = job.args, job.pruned
    macs, params = network.cost.dense(args.cost_convention)
    job.start("finetune", f"fine-tuning the pruned network in {args.ckpt_path} ({macs} MACs, "
                          f"{macs / job.dense_macs:.4f} of the uncut {job.dense_macs}; {params} parameters) "
                          f"with HSIC-Lasso's recipe")
    cut = job.run_dir / "cut.pt"
    if job.ctx.is_main and not cut.exists():
        job.run_dir.mkdir(parents=True, exist_ok=True)
        # Its record names the uncut network, as a search's cut.pt does (a later --ckpt_path of it, or
        # of this run's pruned.pt, reports its reductions against the same network).
        uncut = build_model(job.source["arch"])
        macs_dense, params_dense = uncut.cost.dense("conv")
        job.save_cut(network, cut, None, finetune=dict(ckpt_path=str(args.ckpt_path)), arch=dict(uncut.arch),
                     dense_widths=list(uncut.gates.widths), macs_dense=macs_dense, params_dense=params_dense)
    job.ctx.barrier()
    record = job.read_cut(cut).get("finetune")
    if record is None or record["ckpt_path"] != str(args.ckpt_path):
        raise UsageError(f"{cut} was not started from --ckpt_path {args.ckpt_path}; continue it with the "
                         f"command that started it, or give another --out-dir")
    extra = dict(method=args.method, stage_pr=None, target_macs=None, target=None, layer_ratios=None,
                 source=str(args.ckpt_path), hsic_finetune=dict(ckpt_path=str(args.ckpt_path),
                                                                source=job.source["kind"],
                                                                widths=list(network.gates.widths),
                                                                batch_from=args.batch_from),
                 lr=args.lr, lr_schedule="cosine")
    return job.fine_tune(cut, dict(lr=args.lr, lr_cosine=True), ("ckpt_path",), extra)


def search_and_cut(job, cut, target: int) -> int:
    """Calibrate, search alpha and save the kept channels (rank 0; the other ranks wait for the
    file). Returns an exit status."""
    args, ctx = job.args, job.ctx
    with StopSignals() as stop:
        if not ctx.is_main:
            # A file, not a collective: the search may outlast the process group's timeout, and
            # torchrun ends every rank when rank 0 fails.
            while not cut.exists():
                if stop.received is not None:
                    return EXIT_PREEMPTED
                time.sleep(1.0)
            return 0
        device = select_device(args.gpu, ctx)
        limit_threads()
        model = job.dense_model().to(device)
        n = args.calib_batch_size
        images = calibration_batch(args, device)
        print(f"HSIC-Lasso: {n} calibration images (seed {args.seed}); the groups' kernels take "
              f"{kernel_memory(model, n) / 2 ** 20:.0f} MiB")
        groups = calibration_groups(job.dense_model().to(device), images, args.resnet50_y)
        dense_macs = job.dense_macs
        search = HsicSearch(groups, model.gates.widths, lambda counts: model.cost.pruned(torch.tensor(counts))[0],
                            args.omega, args.lasso_threads, should_stop=lambda: stop.received is not None)
        (job.run_dir / "search").mkdir(parents=True, exist_ok=True)
        events = EventFile(job.run_dir / "search")

        def report(step, decision):
            print(f"  alpha {decision.alpha:.4e}: {decision.macs} MACs ({decision.macs / dense_macs:.4f} of "
                  f"dense; target {target}), kept {sum(len(k) for k in decision.kept)} of "
                  f"{sum(g.width for g in groups)} channels, {decision.seconds:.1f}s"
                  + (f", {decision.unconverged} fits at the iteration limit" if decision.unconverged else ""))
            for tag, value in (("alpha", decision.alpha), ("macs", decision.macs),
                               ("macs_fraction", decision.macs / dense_macs)):
                events.add_scalar(f"hsic/{tag}", value, step)
            events.flush()

        try:
            decision = search.run(target, args.alpha, args.tolerance, report)
        except SearchStopped:
            print("stopped during the HSIC search (nothing to save: it is deterministic and runs again on "
                  "--resume auto)")
            return EXIT_PREEMPTED
        finally:
            events.close()
        within = abs(decision.macs - target) <= args.tolerance * target
        if not within:
            print(f"warning: the search ended at alpha {decision.alpha:.3e} with {decision.macs} MACs, outside "
                  f"{target} ± {args.tolerance:g} (its alpha floor, as in the authors' code)", file=sys.stderr)
        settings = {key: getattr(args, key) for key in HSIC_SETTINGS}
        record = dict(settings, alpha_found=decision.alpha, macs=decision.macs, within_tolerance=within,
                      calib_seed=args.seed, kept_widths={g.name: len(k) for g, k in zip(groups, decision.kept)},
                      search=search.history)
        job.save_cut(model.cpu(), cut, search.gates(decision), hsic=record)
        print(f"HSIC-Lasso: alpha {decision.alpha:.4e} keeps {decision.macs} MACs; cut network in {cut}")
        return 0

def search_budget(target: int, macs: int, within: bool, tolerance: float, alpha: float) -> dict:
    """results.json's ``budget`` block of the alpha search (the keys a gated run's has where they
    apply): absolute MACs, counted as ``--target`` is (thop's way for the published targets), and
    whether the search ended within ``target * (1 +- tolerance)``."""
    return dict(kind="macs", target=target, achieved=macs, within_tolerance=within, tolerance=tolerance,
                settled_by="search" if within else "missed", converged=within,
                message=(f"{macs} MACs, target {target} ({'within' if within else 'outside'} {tolerance:g} of it): "
                         f"alpha {alpha:.4e} found by the search"))

