"""The training engine behind train_vgg.py, train_resnet56.py and train_resnet50.py.

One loop for every model and every number of processes: ``--epoch`` epochs of
cross-entropy + L0 penalty (SGD with weight decay for the weights, Adam
without weight decay for the gate parameters, schedulers stepped once per
epoch after it), then ``--fine_tune_epoch`` epochs with the gates frozen at
their test values and no penalty (with a budget, projected onto it first
when training ended outside the tolerance, see l0_layers/budget.py). After
every epoch: evaluation with deterministic gates, TensorBoard scalars and
histograms, ``last.pt`` (and ``best.pt`` on a new best top-1) and
``results.json``, all written by rank 0.

Reproducibility and resume: each epoch reseeds the RNGs from ``(seed, epoch)``
and draws data order and augmentation per dataset index (utils/sampling.py),
so a run resumed from any checkpoint, mid-epoch included, continues exactly
as if it had never stopped.

Faults: SIGTERM/SIGINT/SIGUSR1 finish the current step, save ``last.pt`` with
the position inside the epoch and exit with status 75 (``--resume auto``
continues); a non-finite loss or gate logit stops the run (status 3) naming
the step and the last good checkpoint; user mistakes stop it with one line
(status 2).
"""
import atexit
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR, MultiStepLR
from torch.utils.data import DataLoader

from l0_layers.budget import BudgetConstraint, load_multiplier_state, multiplier_optimizer
from l0_layers.penalty import L0Penalty
from models import build_model, default_arch, load_model_state, save_pruned

from . import distributed
from .checkpoint import FORMAT, link_or_copy, load_checkpoint, previous_of, save_checkpoint, write_json
from .cli import Recipe, parse_args, program_name
from .data import DeviceNormalize, build_datasets
from .errors import TrainingDiverged, UsageError, run_reporting_errors
from .logger import RunLogger, human
from .sampling import DeviceCifarLoader, ResumableSampler, SeededDataset, ShardSampler

EXIT_PREEMPTED = 75   # stopped by a signal after saving; resubmit with --resume auto
# Arguments that define what a run is: a checkpoint only resumes a run that agrees on these.
IDENTITY = ("net", "back_dep", "dataset", "num_classes", "reg", "temp", "lamba", "width_mult", "target_macs",
            "target_params")


def main(recipe: Recipe, argv=None) -> None:
    """Entry point of the training scripts."""
    prog = program_name()
    sys.exit(run_reporting_errors(prog, lambda: Trainer(recipe, parse_args(recipe, argv, prog)).fit()))


def select_device(gpu: int | None, ctx: distributed.Context) -> torch.device:
    if not torch.cuda.is_available():
        if gpu is not None:
            print(f"warning: --gpu {gpu} given but CUDA is not available; running on the CPU", file=sys.stderr)
        return torch.device("cpu")
    if ctx.distributed:
        return torch.device("cuda", ctx.local_rank)  # torchrun decides the device of each rank
    if gpu is None:
        return torch.device("cuda")
    if gpu >= torch.cuda.device_count():
        raise UsageError(f"--gpu {gpu}: only {torch.cuda.device_count()} CUDA device(s) present")
    torch.cuda.set_device(gpu)
    return torch.device("cuda", gpu)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % (2 ** 63)


def run_name(recipe: Recipe, args) -> str:
    name = f"{recipe.model}_{'dummy-' if args.dummy else ''}{args.dataset}_{args.net}"
    name += "_back" if args.back_dep else ""
    if args.net == "dense":
        return name
    if args.target_macs or args.target_params:
        return name + (f"_macs{args.target_macs:g}" if args.target_macs else f"_params{args.target_params:g}")
    return name + f"_lam{args.lamba:g}"


def fresh_out_dir(base: Path) -> Path:
    path, n = base, 1
    while path.exists():  # never write into another run's directory
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def check_out_dir(path: Path, resuming: bool) -> Path:
    """Refuse a run directory that cannot be used, before anything is created."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out-dir {path} exists and is not a directory")
    if not resuming and (path / "last.pt").exists():
        raise UsageError(f"{path} already holds a run; continue it with --resume {path} or choose another --out-dir")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        raise UsageError(f"cannot create the run directory {path}: {ancestor} is not a writable directory")
    return path


def create_out_dir(path: Path) -> None:
    """Create the run directory and prove it writable (called once the data has loaded,
    so a refused start leaves no empty directory behind)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to the run directory {path} ({e.strerror or e})") from e


def find_resumable(directory: Path, set_aside: bool = True) -> dict | None:
    """The newest readable checkpoint of a run directory (last.pt, else last.prev.pt).

    With ``set_aside`` (rank 0 only, so ranks do not race) a damaged file is
    renamed, so the next save does not rotate it over the good one."""
    for path in (directory / "last.pt", previous_of(directory / "last.pt")):
        if path.exists():
            try:
                state = load_checkpoint(path)
                state["path"] = str(path)
                return state
            except UsageError as e:
                if not set_aside:
                    continue
                damaged = path.with_name(f"{path.stem}.damaged{path.suffix}")
                os.replace(path, damaged)
                print(f"warning: {e}; moved it to {damaged.name} and trying an older checkpoint", file=sys.stderr)
    return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def make_optimizers(model, args, recipe: Recipe):
    """SGD (weight decay) for the weights; Adam (no decay) for the gates, or with ``--gen_optim SGD``
    one SGD over every parameter, gates included, as the reference's ResNet50 script builds it."""
    budget = bool(args.target_macs or args.target_params)
    gate_params = model.gate_parameters()
    if args.gen_optim == "SGD" or not gate_params:
        # --gen_optim SGD exists only for fidelity: the reference's single SGD gives the gate
        # parameters the weights' lr, momentum, schedule and weight decay.
        weights = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                  weight_decay=args.weight_decay)
        return weights, MultiStepLR(weights, list(args.milestones), args.lr_decay), None, None
    weights = torch.optim.SGD(model.weight_parameters(), lr=args.lr, momentum=args.momentum,
                              weight_decay=args.weight_decay)
    weight_schedule = MultiStepLR(weights, list(args.milestones), args.lr_decay)
    gates = torch.optim.Adam(model.gates.param_groups(args.lr_gate, fan_in_scaled=budget), lr=args.lr_gate,
                             weight_decay=0.0, fused=True)
    gate_decay = args.lr_decay if recipe.gate_decay_is_lr_decay else recipe.gate_decay
    if gate_decay is None:
        # Deliberately constant (the VGG recipe); the reference got this by
        # binding the gate scheduler to the weight optimiser by mistake.
        gate_schedule = LambdaLR(gates, lambda epoch: 1.0)
    else:
        gate_schedule = MultiStepLR(gates, list(args.milestones), gate_decay)
    return weights, weight_schedule, gates, gate_schedule


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers ignore SIGTERM/SIGINT/SIGUSR1: a scheduler signals the whole
    process group, and the main process must finish its step and save while
    the workers it needs are still alive (see :func:`kill_loader_workers`)."""
    for s in StopSignals.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def kill_loader_workers() -> None:
    """At exit, end loader workers with SIGKILL: multiprocessing's own exit
    handler would send them SIGTERM, which they ignore, and wait forever.
    SIGCHLD goes back to its default first, so PyTorch's handler does not
    report the killed workers as a failure."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        child.kill()


def loader_options(workers: int, device: torch.device) -> dict:
    """DataLoader settings that keep GPUs fed: worker processes that live across
    epochs, 4 batches prefetched per worker, pinned memory for non-blocking
    copies; the loader's own generator leaves the global RNG (gate noise) alone."""
    return dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                prefetch_factor=4 if workers > 0 else None, generator=torch.Generator(),
                worker_init_fn=ignore_stop_signals if workers > 0 else None)


def topk_hits(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Number of examples whose target is in the top-1 and in the top-5 predictions."""
    top = output.topk(min(5, output.shape[1]), dim=1).indices == targets[:, None]
    return torch.stack([top[:, 0].sum(), top.any(dim=1).sum()]).float()


@torch.no_grad()
def evaluate_model(model, loader, normalize: DeviceNormalize, limit_batches=None, ctx=distributed.Context(),
                   amp_dtype=None, memory_format=torch.contiguous_format) -> dict:
    """Cross-entropy and top-1/top-5 in eval mode (deterministic gates), averaged per example,
    summed over the ranks of ``ctx``; batches go to ``normalize``'s device."""
    model.eval()
    device = normalize.device
    totals = torch.zeros(4, device=device)  # summed loss, top-1 hits, top-5 hits, examples
    autocast = torch.autocast(device.type, amp_dtype) if amp_dtype else nullcontext()
    for step, (images, targets) in enumerate(loader):
        if limit_batches is not None and step >= limit_batches:
            break
        images = normalize(images.to(device, non_blocking=True, memory_format=memory_format))
        targets = targets.to(device, non_blocking=True)
        with autocast:
            output = model(images).float()
        totals += torch.cat([F.cross_entropy(output, targets, reduction="sum")[None], topk_hits(output, targets),
                             output.new_full((1,), float(images.shape[0]))])
    loss, top1, top5, seen = ctx.sum_(totals).tolist()
    seen = max(seen, 1.0)
    return dict(loss=loss / seen, top1=100 * top1 / seen, top5=100 * top5 / seen, examples=int(seen))


class StopSignals:
    """SIGTERM, SIGINT and SIGUSR1 (SLURM's preemption signals) ask the loop to stop
    after the current step; a second SIGINT interrupts at once."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))

    def __init__(self):
        self.received = None
        self.previous = {}

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self):
        for s in self.SIGNALS:
            self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Trainer:
    """A training run: built from a recipe and parsed arguments, run with :meth:`fit`."""

    def __init__(self, recipe: Recipe, args):
        self.started = time.time()
        self.recipe, self.args = recipe, args
        self.commit = git_commit()
        self.ctx = ctx = distributed.init()
        self.device = device = select_device(args.gpu, ctx)
        if args.batch_size % ctx.world_size:
            raise UsageError(f"-b {args.batch_size} (the global batch) is not divisible by {ctx.world_size} processes")
        self.batch_size = args.batch_size // ctx.world_size
        checkpoint = self._resolve_resume()
        self.checkpoint = checkpoint

        train_set, val_set, num_classes = build_datasets(args.dataset, args.data_dir, dummy=args.dummy,
                                                         num_classes=args.num_classes)
        args.num_classes = num_classes
        self.normalize = DeviceNormalize(args.dataset, device)
        create_out_dir(self.out_dir)  # every rank: a rank that fails must not leave the others waiting
        torch.manual_seed(args.seed)
        arch = default_arch(recipe.model, num_classes, args.width_mult, net=args.net, back_dep=args.back_dep,
                            temperature=args.temp)
        self.model = model = build_model(checkpoint["arch"] if checkpoint else arch).to(device)
        self.penalty = L0Penalty(model, args.reg).to(device)
        self.weights, self.weight_schedule, self.gates, self.gate_schedule = make_optimizers(model, args, recipe)
        self.budget = self.lagrangian = None
        if args.target_macs or args.target_params:
            kind, target = ("macs", args.target_macs) if args.target_macs else ("params", args.target_params)
            self.budget = BudgetConstraint(model, kind, target, args.target_warmup).to(device)
            self.lagrangian = multiplier_optimizer(self.budget, args.lr_lagrangian)
        self.amp_dtype = None
        if args.amp:
            bf16 = device.type == "cpu" or torch.cuda.is_bf16_supported()
            self.amp_dtype = torch.bfloat16 if bf16 else torch.float16
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

        self.epoch, self.step, self.best_top1, self.wall_before = 0, 0, 0.0, 0.0
        # best_top1 / best.pt range over the epochs since the open channels last changed (from
        # best_since on): only networks of the architecture and cost the run ends with compete.
        self.best_since, self.best_channels = 1, None
        # Summed over this rank's examples of the epoch: loss, penalty, top-1 hits, top-5 hits, examples.
        self.train_totals = torch.zeros(5, device=device)
        self.resume_rank_state = None
        if checkpoint is not None:
            self._load_state(checkpoint)
        model.to(memory_format=self.memory_format)
        if args.sync_bn and ctx.distributed:
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces the BN modules in place
        self._wrap()

        if args.workers > 0:
            atexit.register(kill_loader_workers)  # runs before multiprocessing's handler (registered earlier)
        self.sampler = ResumableSampler(train_set, ctx, args.seed, self.batch_size)
        self.train_loader = self._train_loader(train_set)
        self.val_loader = DataLoader(val_set, batch_size=self.batch_size, sampler=ShardSampler(len(val_set), ctx),
                                     **loader_options(self.args.workers, self.device))
        self.log = RunLogger(self.out_dir, model, imagenet=recipe.imagenet, enabled=ctx.is_main)
        self.log.start(args, device, self.out_dir, len(train_set), len(val_set), ctx.world_size)

    # -- setup ---------------------------------------------------------------------------------

    def _resolve_resume(self) -> dict | None:
        args, ctx = self.args, self.ctx
        checkpoint = None
        if args.resume == "auto" or (args.resume and Path(args.resume).is_dir()):
            if args.resume != "auto":
                directory = Path(args.resume)
            else:
                directory = Path(args.out_dir) if args.out_dir else Path("runs") / run_name(self.recipe, args)
            checkpoint = find_resumable(directory, set_aside=ctx.is_main)
            if checkpoint is None and args.resume != "auto":
                raise UsageError(f"{directory} holds no readable checkpoint (last.pt or last.prev.pt)")
            out_dir = Path(args.out_dir) if args.out_dir else directory
        elif args.resume:
            checkpoint = load_checkpoint(args.resume)
            checkpoint["path"] = args.resume
            out_dir = Path(args.out_dir) if args.out_dir else Path(args.resume).parent
        else:
            out_dir = Path(args.out_dir) if args.out_dir else fresh_out_dir(Path("runs") / run_name(self.recipe, args))
            out_dir = Path(ctx.gather(str(out_dir))[0])  # rank 0's choice, for every rank
        if checkpoint is not None:
            self._check_identity(checkpoint)
            args.seed = checkpoint["args"]["seed"]
        elif args.seed is None:
            args.seed = ctx.gather(int(torch.randint(0, 2 ** 31 - 1, ()).item()))[0]
        self.out_dir = check_out_dir(out_dir, resuming=checkpoint is not None or args.resume == "auto")
        return checkpoint

    def _check_identity(self, checkpoint: dict) -> None:
        args, path = self.args, checkpoint["path"]
        if checkpoint["arch"]["model"] != self.recipe.model:
            raise UsageError(f"{path} is a {checkpoint['arch']['model']} checkpoint; this script trains {self.recipe.model}")
        saved = checkpoint["args"]
        for key in IDENTITY:
            ours = getattr(args, key)
            if saved.get(key) != ours and not (key == "num_classes" and ours is None):
                raise UsageError(f"{path} was trained with --{key} {saved.get(key)}, this command asks for "
                                 f"{ours}; resume it with matching flags")
        if checkpoint.get("gates_frozen") and args.epochs > saved["epochs"]:
            raise UsageError(f"{path} ended its penalty phase at epoch {saved['epochs']} (gates frozen); it cannot "
                             f"prune on to --epoch {args.epochs}: resume with --epoch {saved['epochs']} and "
                             f"--fine_tune_epoch to fine-tune it")

    def _load_state(self, state: dict) -> None:
        model = self.model
        load_model_state(model, state, state["path"])
        try:
            self.weights.load_state_dict(state["weight_optimizer"])
            if self.gates is not None:
                self.gates.load_state_dict(state["gate_optimizer"])
        except (ValueError, KeyError, TypeError) as e:
            # An optimiser laid out differently: an earlier version's (e.g. --gen_optim SGD's second
            # optimiser, one learning rate for a budget run's generator), or another --gen_optim.
            raise UsageError(f"{state['path']}: its optimiser state does not fit this version's optimisers "
                             f"({str(e).splitlines()[0][:100]}); start the run afresh") from e
        self.weight_schedule.load_state_dict(state["weight_scheduler"])
        if self.gates is not None:
            self.gate_schedule.load_state_dict(state["gate_scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.budget is not None:
            self.budget.load_state_dict(state["budget"])
            if not load_multiplier_state(self.lagrangian, state["lagrangian"]):
                print("warning: the checkpoint's multipliers ascended with SGD (an earlier version); they continue "
                      "from their saved values with a fresh Adam", file=sys.stderr)
        self.epoch, self.step = state["epoch"], state["step"]
        self.best_top1, self.wall_before = state["best_top1"], state["wall_time_s"]
        self.best_since = state.get("best_since", 1)
        self.best_channels = state.get("best_channels")  # None in older checkpoints: the next epoch starts afresh
        if self.step:
            mine = state["rank_states"][self.ctx.rank] if len(state["rank_states"]) == self.ctx.world_size else None
            if mine is None:
                print("warning: resuming mid-epoch with a different number of processes; "
                      "the rest of this epoch will not match the interrupted run exactly", file=sys.stderr)
            self.resume_rank_state = mine

    def _train_loader(self, train_set):
        # CIFAR on a GPU: the whole training set lives on the device and is
        # augmented there, so no loader process can become the bottleneck.
        loader = self.args.loader
        on_device = (self.args.dataset in ("cifar10", "cifar100") and not self.args.dummy
                     and (loader == "device" or (loader == "auto" and self.device.type == "cuda")))
        if on_device:
            return DeviceCifarLoader(train_set.data, train_set.targets, self.sampler, self.device)
        return DataLoader(SeededDataset(train_set), batch_size=self.batch_size, sampler=self.sampler,
                          **loader_options(self.args.workers, self.device))

    def _wrap(self) -> None:
        """The module the training step calls: DDP across processes, compiled on request."""
        module = self.model
        if self.ctx.distributed:
            module = DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.train_module = torch.compile(module) if self.args.compile else module
        self.wrapped_frozen = self.model.gates.frozen

    # -- the loop --------------------------------------------------------------------------------

    def fit(self) -> int:
        args = self.args
        total = args.epochs + args.fine_tune_epoch
        try:
            with StopSignals() as stop:
                while self.epoch < total:
                    if self.epoch >= args.epochs and not self.model.gates.frozen:
                        self.end_pruning()  # --epoch 0, or a checkpoint of the last penalty epoch
                        if self.budget is not None:
                            self.log.message(f"budget: {self.budget_report()['message']}")
                    if self.wrapped_frozen != self.model.gates.frozen:
                        self._wrap()  # DDP must learn that the gate parameters no longer get gradients
                    # Whether any rank got a stop signal, read one step late so that no step waits for the vote.
                    with distributed.LaggedAny(self.ctx, self.device) as stop_vote:
                        stopped = self.train_epoch(stop, stop_vote)
                    if stopped:
                        self.save(results=None)
                        self.log.message(f"stopped by signal {stop.received} at epoch {self.epoch + 1} step "
                                         f"{self.step}; saved {self.out_dir / 'last.pt'}; continue with --resume auto "
                                         f"--out-dir {self.out_dir}")
                        return EXIT_PREEMPTED
                    self.end_epoch()
                    if self.ctx.any(stop.received is not None, self.device):
                        self.log.message(f"stopped by signal after epoch {self.epoch}; saved {self.out_dir / 'last.pt'}")
                        return EXIT_PREEMPTED
            self.finish()
            return 0
        finally:
            self.log.close()
            distributed.shutdown(self.ctx)

    def train_epoch(self, stop: StopSignals, stop_vote: distributed.LaggedAny) -> bool:
        """Train from ``self.step`` to the end of the epoch; True if stopped by a signal."""
        args, device, epoch = self.args, self.device, self.epoch
        fine_tune = epoch >= args.epochs
        lamba = 0.0 if fine_tune else args.lamba
        gates = None if fine_tune else self.gates
        resume_state, self.resume_rank_state = self.resume_rank_state, None
        if self.step == 0:
            torch.manual_seed(epoch_seed(args.seed, epoch, self.ctx.rank))
            self.train_totals.zero_()
        elif resume_state is not None:
            self._set_rng(resume_state)
            self.train_totals.copy_(resume_state["train_totals"].to(device))
        self.sampler.start_at(epoch, self.step)
        steps = self.sampler.steps() if args.limit_batches is None else min(self.sampler.steps(), args.limit_batches)
        model = self.train_module
        model.train()
        interval = torch.zeros(3, device=device)  # loss, penalty, examples since the last progress line
        first_bad = torch.full((), -1, device=device, dtype=torch.long)
        tick = time.time()
        autocast = torch.autocast(device.type, self.amp_dtype) if self.amp_dtype else nullcontext()
        gated = self.model.gates.logits is not None
        for images, targets in self.train_loader:
            if self.step >= steps:
                break
            images = self.normalize(images.to(device, non_blocking=True, memory_format=self.memory_format))
            targets = targets.to(device, non_blocking=True)
            # The gate logits (for Dep-L0 a chain of small matmuls) are computed
            # once and shared by the gates and the penalty.
            log_alpha = self.model.gates.log_alpha() if gated and not fine_tune else None
            with autocast:
                output = model(images, log_alpha)
            ce = F.cross_entropy(output.float(), targets)
            budget = self.budget if not fine_tune else None
            if budget is not None:
                reg, expected = budget(epoch + self.step / steps, self.model.gates.expected_open(log_alpha))
            elif lamba > 0 and gated:
                reg = self.penalty(lamba, self.model.gates.expected_open(log_alpha))
            else:
                reg = ce.new_zeros(())
            loss = ce + reg
            for optimizer in (self.weights, gates, budget and self.lagrangian):
                if optimizer is not None:
                    optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if args.max_grad_norm:
                for optimizer in (self.weights, gates):
                    if optimizer is not None:
                        self.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                               args.max_grad_norm)
            self.scaler.step(self.weights)
            if gates is not None:
                self.scaler.step(gates)
            if budget is not None:
                self.scaler.step(self.lagrangian)
                if gates is not None:
                    self.model.gates.bound_pre_activations_()
            self.scaler.update()
            n = images.shape[0]
            with torch.no_grad():
                sums = torch.stack([loss.detach() * n, reg.detach() * n, loss.new_full((), float(n))])
                self.train_totals += torch.cat([sums[:2], topk_hits(output, targets), sums[2:]])
                interval += sums
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), self.step, first_bad)
            self.step += 1
            if self.step % args.print_freq == 0 or self.step == steps:
                self._check_finite(first_bad)
                loss_avg, reg_avg = (interval[:2] / interval[2]).tolist()
                now = time.time()
                count = interval[2].item()
                rate = count * self.ctx.world_size / max(now - tick, 1e-9)
                self.log.progress(epoch, self.step, steps, loss_avg, reg_avg, self.weights.param_groups[0]["lr"],
                                  rate, (now - tick) / count * n * (steps - self.step))
                if budget is not None:
                    self.log.budget(epoch * steps + self.step, budget.target_at(epoch + self.step / steps),
                                    expected.item(), budget.deterministic(), budget.lambda1.item(),
                                    budget.lambda2.item())
                interval.zero_()
                tick = now
            if stop_vote(stop.received is not None) and self.step < steps:
                self._check_finite(first_bad)
                return True
        self._check_finite(first_bad)
        return False

    def _check_finite(self, first_bad: torch.Tensor) -> None:
        bad_step = int(first_bad.item())
        logits_ok = self.model.gates.logits is None or bool(torch.isfinite(self.model.gates.log_alpha()).all())
        if self.ctx.any(bad_step >= 0 or not logits_ok, self.device):
            where = f"step {bad_step + 1}" if bad_step >= 0 else f"by step {self.step}"
            what = "loss" if bad_step >= 0 else "gate logit"
            last = self.out_dir / "last.pt"
            good = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was saved yet"
            hint = "lower the learning rate or set --max-grad-norm"
            raise TrainingDiverged(f"non-finite {what} at epoch {self.epoch + 1} {where}; {good}; {hint}")

    def end_epoch(self) -> None:
        args = self.args
        self.weight_schedule.step()
        if self.gate_schedule is not None:
            self.gate_schedule.step()
        loss, reg, top1, top5, seen = self.ctx.sum_(self.train_totals.clone()).tolist()
        loss, reg, top1, top5 = (value / max(seen, 1.0) for value in (loss, reg, top1, top5))
        train_stats = dict(loss=loss, penalty=reg, top1=100 * top1, top5=100 * top5)
        self.ctx.broadcast_buffers(self.model)
        if self.epoch + 1 == args.epochs:
            self.end_pruning()
        val_stats = self.evaluate()
        self.epoch, self.step = self.epoch + 1, 0
        open_channels = self.model.gates.test_gates().cpu() > 0
        if self.best_channels is None or not torch.equal(open_channels, self.best_channels):
            # Another network than the one best_top1 was measured on: the comparison starts afresh.
            self.best_top1, self.best_since, self.best_channels = float("-inf"), self.epoch, open_channels
        new_best = val_stats["top1"] >= self.best_top1
        self.best_top1 = max(self.best_top1, val_stats["top1"])
        results = self.results(val_stats)
        self.log.epoch(self.epoch - 1, train_stats, val_stats, results)
        if self.budget is not None and self.epoch == args.epochs:
            self.log.message(f"budget: {results['budget']['message']}")
        self.save(results, new_best)

    def end_pruning(self) -> None:
        """Freeze the gates after the last penalty epoch; with a budget missed by more than the
        tolerance, at the projection of the logits onto it (every rank computes the same one)."""
        self.model.gates.freeze(self.budget.final_gates() if self.budget is not None else None)

    def evaluate(self) -> dict:
        """Validation statistics with deterministic gates, over all ranks."""
        return evaluate_model(self.model, self.val_loader, self.normalize, self.args.limit_batches, self.ctx,
                              self.amp_dtype, self.memory_format)

    def results(self, val_stats: dict) -> dict:
        recipe, args, model = self.recipe, self.args, self.model
        kept = model.gates.kept()
        macs_dense, params_dense = model.cost.dense()
        macs, params = model.cost.pruned(kept)
        results = dict(
            model=recipe.model, dataset=args.dataset, net=args.net, back_dep=args.back_dep, lamba=args.lamba,
            reg=args.reg, seed=args.seed, epochs_done=self.epoch, epochs_total=args.epochs + args.fine_tune_epoch,
            top1=val_stats["top1"], best_top1=self.best_top1, best_top1_epochs=[self.best_since, self.epoch],
            best_top1_over=(f"epochs {self.best_since}-{self.epoch}: those whose open channels are the last "
                            f"epoch's (the channels last changed in epoch {self.best_since})"
                            if self.best_since > 1 else f"epochs 1-{self.epoch}: the open channels never changed"),
            val_loss=val_stats["loss"],
            macs_dense=macs_dense, macs_pruned=macs, macs_reduction=100 * (1 - macs / macs_dense),
            params_dense=params_dense, params_pruned=params, params_reduction=100 * (1 - params / params_dense),
            channels=[dict(name=g.name, kept=int(k), total=g.width) for g, k in zip(model.gated_layers, kept.tolist())],
            disconnected=model.disconnected_layers(), wall_time_s=round(self.wall_time(), 3), device=str(self.device), world_size=self.ctx.world_size,
            torch_version=str(torch.__version__), git_commit=self.commit)
        if recipe.imagenet:
            results["top5"] = val_stats["top5"]
        if self.budget is not None:
            results["budget"] = self.budget_report()
        return results

    def budget_report(self) -> dict:
        args = self.args
        return self.budget.report(self.epoch >= args.epochs, args.epochs, args.fine_tune_epoch)

    def wall_time(self) -> float:
        return self.wall_before + time.time() - self.started

    # -- state -----------------------------------------------------------------------------------

    def _rank_state(self) -> dict:
        state = dict(cpu_rng=torch.get_rng_state(), train_totals=self.train_totals.cpu())
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_rng(self, state: dict) -> None:
        torch.set_rng_state(state["cpu_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)

    def save(self, results: dict | None, new_best: bool = False) -> None:
        """Checkpoint the run (a collective call; rank 0 writes)."""
        rank_states = self.ctx.gather(self._rank_state()) if self.step else []
        if not self.ctx.is_main:
            return
        args = self.args
        state = dict(format=FORMAT, arch=self.model.arch, args=vars(args).copy(), epoch=self.epoch, step=self.step,
                     model=self.model.state_dict(), weight_optimizer=self.weights.state_dict(),
                     weight_scheduler=self.weight_schedule.state_dict(),
                     gate_optimizer=self.gates.state_dict() if self.gates else None,
                     gate_scheduler=self.gate_schedule.state_dict() if self.gate_schedule else None,
                     scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
                     budget=self.budget.state_dict() if self.budget else None,
                     lagrangian=self.lagrangian.state_dict() if self.lagrangian else None,
                     gates_frozen=self.model.gates.frozen, best_top1=self.best_top1, best_since=self.best_since,
                     best_channels=self.best_channels,
                     wall_time_s=self.wall_time(), rank_states=rank_states, results=results)
        last = self.out_dir / "last.pt"
        save_checkpoint(state, last, keep_previous=True)
        if results is None:
            return
        if new_best:
            link_or_copy(last, self.out_dir / "best.pt")
        if args.save_epoch and self.epoch % args.save_epoch == 0:
            link_or_copy(last, self.out_dir / f"epoch_{self.epoch}.pt")
        write_json(results, self.out_dir / "results.json")

    def finish(self) -> None:
        """After the last epoch: export the compact model to ``pruned.pt`` (models/export.py)."""
        if self.ctx.is_main:
            path = self.out_dir / "pruned.pt"
            _, pruned = save_pruned(self.model, path, dict(dataset=self.args.dataset, data_dir=self.args.data_dir,
                                                           epoch=self.epoch))
            self.log.message(f"pruned model: {path} (MACs {human(pruned['macs'])}, params {human(pruned['params'])})")
            cut = self.model.disconnected_layers()
            if cut:
                self.log.message(f"warning: the pruned network is disconnected: {', '.join(cut)} "
                                 f"{'has' if len(cut) == 1 else 'have'} no open channel, so every layer after "
                                 f"{'it' if len(cut) == 1 else 'them'} sees zeros and the output is constant")
        self.log.message(f"done: {self.out_dir}")
