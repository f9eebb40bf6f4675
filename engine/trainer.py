"""The training engine behind train_vgg.py, train_resnet56.py and train_resnet50.py.

One loop for every model and every number of processes: ``--epoch`` epochs of
cross-entropy + L0 penalty (SGD with weight decay for the weights, Adam
without weight decay for the gate parameters, schedulers stepped once per
epoch after it), then ``--fine_tune_epoch`` epochs with the gates frozen at
their test values and no penalty (with a budget, projected onto it first
when training ended outside the tolerance, see pruning/budget.py). After
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
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR, MultiStepLR
from torch.utils.data import DataLoader

from models import build_model, default_arch, load_model_state, save_pruned
from models.published import TORCHVISION_RESNET50, load_weights, torchvision_resnet50
from pruning import METHODS
from utils import distributed
from utils.checkpoint import FORMAT, link_or_copy, load_checkpoint, save_checkpoint, write_json
from utils.cli import human
from utils.data import DeviceNormalize, build_datasets, hold_out
from utils.errors import EXIT_PREEMPTED, TrainingDiverged, UsageError, brief
from utils.logger import RunLogger
from utils.run import (StopSignals, check_out_dir, create_out_dir, find_resumable, fresh_out_dir, git_commit,
                       kill_loader_workers, limit_threads, loader_options, new_run_note, select_device)
from utils.sampling import DeviceCifarLoader, ResumableSampler, SeededDataset, ShardSampler

from .config import RunConfig


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % (2 ** 63)


def weight_optimizer(parameters, config: RunConfig):
    r"""The weights' SGD (momentum, weight decay) and its per-epoch schedule: ``config.lr_schedule``
    (``{first epoch: lr}``, piecewise constant, as GReg's ``--lr_ft``) when given; with
    ``config.lr_cosine`` the cosine :math:`\tfrac12 lr (1 + \cos(\pi e / E))` of epoch e of E, no
    warm-up (HSIC-Lasso's fine-tuning); else ``--lr`` multiplied by ``--lr_decay`` at each of
    ``--milestones``."""
    args = config
    weights = torch.optim.SGD(parameters, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                              nesterov=args.nesterov)
    if args.lr_cosine:
        epochs = args.epochs
        return weights, LambdaLR(weights, lambda epoch: 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)))
    schedule = args.lr_schedule
    if schedule:
        starts = sorted(schedule)

        def factor(epoch):
            current = max((s for s in starts if s <= epoch), default=starts[0])
            return schedule[current] / args.lr

        return weights, LambdaLR(weights, factor)
    return weights, MultiStepLR(weights, list(args.milestones), args.lr_decay)


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



class Trainer:
    """A training run: built from a :class:`RunConfig`, run with :meth:`fit`.

    ``method`` builds the run's :class:`pruning.PruningMethod` from ``(model, config)`` (default:
    the registered method ``config.method``'s :meth:`build`). ``start`` (``{'arch', 'state_dict'}``) starts a fresh run from those
    weights instead of the recipe's initialisation (prune.py: a dense baseline, or a cut network to
    fine-tune); ``baseline`` (``{'macs', 'params', 'widths'}``) is the network that reductions and
    the channel totals are reported against (default: the model's own dense cost); ``extra_results`` are added to
    every results file, ``results_file`` (default ``results.json``, which summarize.py collects).
    """

    def __init__(self, config: RunConfig, method=None, start: dict | None = None, baseline: dict | None = None,
                 extra_results: dict | None = None, results_file: str = "results.json"):
        self.started = time.time()
        self.args = args = config
        self.results_file = results_file
        self.extra_results = dict(extra_results or {})
        self.commit = git_commit()
        self.owns_process_group = not torch.distributed.is_initialized()
        self.ctx = ctx = distributed.init()
        self.device = device = select_device(args.gpu, ctx)
        limit_threads()
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed-shape batches: cuDNN times its kernels once per shape
        if args.batch_size % ctx.world_size:
            raise UsageError(f"-b {args.batch_size} (the global batch) is not divisible by {ctx.world_size} processes")
        self.batch_size = args.batch_size // ctx.world_size
        checkpoint = self._resolve_resume()
        self.checkpoint = checkpoint

        train_set, val_set, num_classes = build_datasets(args.dataset, args.data_dir, dummy=args.dummy,
                                                         num_classes=args.num_classes,
                                                         augment=args.augment is not False)
        args.num_classes = num_classes
        held_set = None
        if args.validate_set:
            train_set, held_set = hold_out(args.dataset, train_set, val_set, dummy=args.dummy)
        self.normalize = DeviceNormalize(args.dataset, device)
        torch.manual_seed(args.seed)
        if checkpoint is not None:
            arch = checkpoint["arch"]
        elif start is not None:
            arch = start["arch"]
        else:
            arch = default_arch(args.model, num_classes, args.width_mult, options=args.get("network_options"),
                                **METHODS.get(args.method).arch_options(args.options))
        self.model = model = build_model(arch).to(device)
        model.cost.convention = args.cost_convention
        if checkpoint is None and start is not None:
            model.load_state_dict(start["state_dict"])
        self.init_weights = None
        if checkpoint is None and start is None and (args.get("init_weights") or args.get("init_pretrained")):
            # --init-weights / --pretrained: the file's weights over the seeded initialisation (the gates
            # keep theirs); a file that does not fit stops the run here, before its directory exists.
            path = args.get("init_weights") or str(torchvision_resnet50(ctx, "give the file with --init-weights"))
            self.init_weights = (path, load_weights(model, path))
        create_out_dir(self.out_dir)  # every rank: a rank that fails must not leave the others waiting
        self.method = (method or METHODS.get(args.method).build)(model, args)
        self.weights, self.weight_schedule = weight_optimizer(self.method.weight_parameters(), args)
        self.method.attach_optimizer(self.weights)
        macs, params = model.cost.dense()
        self.baseline = baseline or dict(macs=macs, params=params, widths=list(model.gates.widths))
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
        self.best_top5 = None  # the top-5 of the epoch that set best_top1
        # Summed over this rank's examples of the epoch: loss, method term, top-1 hits, top-5 hits, examples.
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
        # --validate-set: the held-out training images, evaluated after every epoch as well.
        self.held_loader = None if held_set is None else DataLoader(
            held_set, batch_size=self.batch_size, sampler=ShardSampler(len(held_set), ctx),
            **loader_options(self.args.workers, self.device))
        self.held_stats = None
        self.log = RunLogger(self.out_dir, imagenet=args.imagenet, enabled=ctx.is_main,
                             loss_name=self.method.loss_name)
        self.log.start(args.to_dict(), device, self.out_dir, len(train_set), len(val_set), ctx.world_size)
        if checkpoint is not None:
            self.log.message(f"resumed from {checkpoint['path']}: epoch {self.epoch + 1}, step {self.step}")
        if self.init_weights is not None and not args.get("evaluate"):
            self.log.message(f"weights from {self.init_weights[0]} ({self.init_weights[1]}); the gates start from "
                             f"their own initialisation")

    # -- setup ---------------------------------------------------------------------------------

    def _resolve_resume(self) -> dict | None:
        args, ctx = self.args, self.ctx
        checkpoint = None
        if args.resume == "auto" or (args.resume and Path(args.resume).is_dir()):
            if args.resume != "auto":
                directory = Path(args.resume)
            else:
                directory = Path(args.out_dir) if args.out_dir else Path("runs") / args.name
            checkpoint = find_resumable(directory, set_aside=ctx.is_main)
            if checkpoint is None and args.resume != "auto":
                raise UsageError(f"{directory} holds no readable checkpoint (last.pt or last.prev.pt)")
            out_dir = Path(args.out_dir) if args.out_dir else directory
        elif args.resume:
            checkpoint = load_checkpoint(args.resume)
            checkpoint["path"] = args.resume
            out_dir = Path(args.out_dir) if args.out_dir else Path(args.resume).parent
        else:
            out_dir = Path(args.out_dir) if args.out_dir else fresh_out_dir(Path("runs") / args.name)
            out_dir = Path(ctx.gather(str(out_dir))[0])  # rank 0's choice, for every rank
            note = None if args.out_dir else new_run_note(Path("runs") / args.name, out_dir)
            if note and ctx.is_main:
                print(note, file=sys.stderr)
        if (checkpoint is None and args.get("evaluate") and not args.get("init_weights")
                and not args.get("init_pretrained")):
            raise UsageError(f"-e/--evaluate --resume {args.resume}: {out_dir} holds no checkpoint to evaluate "
                             f"(give --init-weights FILE for a published network)")
        if checkpoint is not None:
            self._check_identity(checkpoint)
            args.seed = checkpoint["args"]["seed"]
        elif args.seed is None:
            args.seed = ctx.gather(int(torch.randint(0, 2 ** 31 - 1, ()).item()))[0]
        self.out_dir = check_out_dir(out_dir, resuming=checkpoint is not None or args.resume == "auto")
        return checkpoint

    def _check_identity(self, checkpoint: dict) -> None:
        args, path = self.args, checkpoint["path"]
        if checkpoint["arch"]["model"] != args.model:
            raise UsageError(f"{path} is a {checkpoint['arch']['model']} checkpoint; this script trains {args.model}")
        saved = checkpoint["args"]
        for key in args.identity:
            ours = args.get(key)
            if saved.get(key) != ours and not (key == "num_classes" and ours is None):
                raise UsageError(f"{path} was trained with --{key} {saved.get(key)}, this command asks for "
                                 f"{ours}; resume it with matching flags")
        if checkpoint.get("gates_frozen") and args.epochs > saved["epochs"] and not args.get("evaluate"):
            raise UsageError(f"{path} ended its penalty phase at epoch {saved['epochs']} (gates frozen); it cannot "
                             f"prune on to --epoch {args.epochs}: resume with --epoch {saved['epochs']} and "
                             f"--fine_tune_epoch to fine-tune it")

    def _load_state(self, state: dict) -> None:
        model = self.model
        load_model_state(model, state, state["path"])
        # Checkpoints from before the method interface kept L0's state at the top level.
        method_state = state.get("method", state)
        try:
            self.weights.load_state_dict(state["weight_optimizer"])
            warnings = self.method.load_state_dict(method_state) or []
        except (ValueError, KeyError, TypeError) as e:
            # An optimiser laid out differently: an earlier version's (e.g. --gen_optim SGD's second
            # optimiser, one learning rate for a budget run's generator), or another --gen_optim.
            raise UsageError(f"{state['path']}: its optimiser state does not fit this version's optimisers "
                             f"({brief(str(e), 100)}); start the run afresh") from e
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        self.weight_schedule.load_state_dict(state["weight_scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.best_top1, self.wall_before = state["best_top1"], state["wall_time_s"]
        self.best_since = state.get("best_since", 1)
        self.best_top5 = state.get("best_top5")
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
            return DeviceCifarLoader(train_set.data, train_set.targets, self.sampler, self.device,
                                     augment=self.args.augment is not False)
        return DataLoader(SeededDataset(train_set), batch_size=self.batch_size, sampler=self.sampler,
                          **loader_options(self.args.workers, self.device))

    def _trainable(self) -> tuple[bool, ...]:
        return tuple(p.requires_grad for p in self.model.parameters())

    def _wrap(self) -> None:
        """The module the training step calls: DDP across processes, compiled on request."""
        module = self.model
        if self.ctx.distributed:
            module = DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.train_module = torch.compile(module) if self.args.compile else module
        self.wrapped_trainable = self._trainable()

    # -- the loop --------------------------------------------------------------------------------

    def fit(self) -> int:
        total = self.args.epochs + self.args.fine_tune_epoch
        try:
            with StopSignals() as stop:
                while self.epoch < total and not self.method.finished():
                    message = self.method.start_epoch(self.epoch)
                    if message:
                        self.log.message(message)
                    if self.wrapped_trainable != self._trainable():
                        self._wrap()  # DDP must learn that some parameters (frozen gates) no longer get gradients
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
                    if self.ctx.any(stop.received is not None, self.device) and not self.method.finished():
                        self.log.message(f"stopped by signal after epoch {self.epoch}; saved {self.out_dir / 'last.pt'}")
                        return EXIT_PREEMPTED
                self.finish()
                self.ctx.barrier()  # rank 0's files (pruned.pt) exist for every rank once fit returns
                # A signal during the last epoch's evaluation or the export: the work is saved, but
                # whoever sent it (a scheduler) asked this job to stop, not to go on to a next phase.
                return EXIT_PREEMPTED if self.ctx.any(stop.received is not None, self.device) else 0
        finally:
            self.log.close()
            if self.owns_process_group:
                distributed.shutdown(self.ctx)

    def train_epoch(self, stop: StopSignals, stop_vote: distributed.LaggedAny) -> bool:
        """Train from ``self.step`` to the end of the epoch (or until the method is finished); True if
        stopped by a signal."""
        args, device, epoch, method = self.args, self.device, self.epoch, self.method
        resume_state, self.resume_rank_state = self.resume_rank_state, None
        if self.step == 0:
            torch.manual_seed(epoch_seed(args.seed, epoch, self.ctx.rank))
            self.train_totals.zero_()
        elif resume_state is not None:
            self._set_rng(resume_state)
            self.train_totals.copy_(resume_state["train_totals"].to(device))
        self.sampler.start_at(epoch, self.step)
        self.epoch_started = time.time()
        steps = self.sampler.steps() if args.limit_batches is None else min(self.sampler.steps(), args.limit_batches)
        active = method.steps_optimizers(epoch)
        own = [optimizer for optimizer, _ in method.optimizers().values()] if active else []
        model = self.train_module
        model.train()
        interval = torch.zeros(3, device=device)  # loss, method term, examples since the last progress line
        first_bad = torch.full((), -1, device=device, dtype=torch.long)
        tick = time.time()
        autocast = torch.autocast(device.type, self.amp_dtype) if self.amp_dtype else nullcontext()
        for images, targets in self.train_loader:
            if self.step >= steps:
                break
            images = self.normalize(images.to(device, non_blocking=True, memory_format=self.memory_format))
            targets = targets.to(device, non_blocking=True)
            iteration = epoch * steps + self.step
            method.before_step(iteration)
            forward_args = method.forward_args(epoch)
            with autocast:
                output = model(images, **forward_args)
            ce = F.cross_entropy(output.float(), targets)
            progress = epoch + self.step / steps
            term = method.loss(progress)
            reg = ce.new_zeros(()) if term is None else term
            loss = ce + reg
            for optimizer in (self.weights, *own):
                optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if args.max_grad_norm or method.changes_gradients():
                for optimizer in (self.weights, *own):
                    self.scaler.unscale_(optimizer)
            method.after_backward()
            if args.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                               args.max_grad_norm)
            self.scaler.step(self.weights)
            for optimizer in own:
                self.scaler.step(optimizer)
            self.scaler.update()
            method.after_step(iteration)
            n = images.shape[0]
            with torch.no_grad():
                sums = torch.stack([loss.detach() * n, reg.detach() * n, loss.new_full((), float(n))])
                self.train_totals += torch.cat([sums[:2], topk_hits(output, targets), sums[2:]])
                interval += sums
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), self.step, first_bad)
            self.step += 1
            done = method.finished()
            if self.step % args.print_freq == 0 or self.step == steps or done:
                self._check_finite(first_bad)
                loss_avg, reg_avg = (interval[:2] / interval[2]).tolist()
                now = time.time()
                count = interval[2].item()
                rate = count * self.ctx.world_size / max(now - tick, 1e-9)
                per_step = (now - tick) / count * n
                run_steps = steps - self.step + (args.epochs + args.fine_tune_epoch - epoch - 1) * steps
                self.log.progress(epoch, self.step, steps, loss_avg, reg_avg, self.weights.param_groups[0]["lr"],
                                  rate, per_step * (steps - self.step),
                                  None if done or method.ends_by_own_rule else per_step * run_steps,
                                  method.phase(epoch))
                self.log.scalars(epoch * steps + self.step, method.progress_scalars(epoch + self.step / steps))
                interval.zero_()
                tick = now
            if done:
                break
            if stop_vote(stop.received is not None) and self.step < steps:
                self._check_finite(first_bad)
                return True
        self._check_finite(first_bad)
        return False

    def _check_finite(self, first_bad: torch.Tensor) -> None:
        bad_step = int(first_bad.item())
        broken = self.method.non_finite_state()
        if self.ctx.any(bad_step >= 0 or broken is not None, self.device):
            where = f"step {bad_step + 1}" if bad_step >= 0 else f"by step {self.step}"
            what = "loss" if bad_step >= 0 else broken
            last = self.out_dir / "last.pt"
            good = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was saved yet"
            hint = "lower the learning rate or set --max-grad-norm"
            raise TrainingDiverged(f"non-finite {what} at epoch {self.epoch + 1} {where}; {good}; {hint}")

    def end_epoch(self) -> None:
        self.weight_schedule.step()
        for _, schedule in self.method.optimizers().values():
            if schedule is not None:
                schedule.step()
        loss, reg, top1, top5, seen = self.ctx.sum_(self.train_totals.clone()).tolist()
        loss, reg, top1, top5 = (value / max(seen, 1.0) for value in (loss, reg, top1, top5))
        train_stats = dict(loss=loss, penalty=reg, top1=100 * top1, top5=100 * top5)
        self.ctx.broadcast_buffers(self.model)
        self.method.end_epoch(self.epoch)
        val_stats = self.evaluate()
        if self.held_loader is not None:
            self.held_stats = evaluate_model(self.model, self.held_loader, self.normalize, self.args.limit_batches,
                                             self.ctx, self.amp_dtype, self.memory_format)
        finished_epoch = self.epoch
        self.epoch, self.step = self.epoch + 1, 0
        open_channels = self.method.network_key().cpu()
        if self.best_channels is None or not torch.equal(open_channels, self.best_channels):
            # Another network than the one best_top1 was measured on: the comparison starts afresh.
            self.best_top1, self.best_since, self.best_channels = float("-inf"), self.epoch, open_channels
        new_best = val_stats["top1"] >= self.best_top1
        self.best_top1 = max(self.best_top1, val_stats["top1"])
        if new_best:
            self.best_top5 = val_stats["top5"]
        results = self.results(val_stats)
        self.log.epoch(self.epoch - 1, train_stats, val_stats, results, self.method,
                       seconds=time.time() - self.epoch_started)
        if self.held_stats is not None:
            held = self.held_stats
            self.log.scalars(self.epoch, {"Validate/Accuracy": held["top1"], "Validate/Average loss": held["loss"]})
            self.log.message(f"held-out training images ({held['examples']}): top-1 {held['top1']:.2f}%"
                             + (f" top-5 {held['top5']:.2f}%" if self.args.imagenet else "")
                             + f"  loss {held['loss']:.4f}")
        message = self.method.epoch_message(finished_epoch, results)
        if message:
            self.log.message(message)
        self.save(results, new_best)

    def evaluate_only(self) -> int:
        """``-e``: the validation set once, on the weights the run was built with (the checkpoint of
        ``--resume``, else those of ``--init-weights`` / ``--pretrained``), and a finished run's
        ``results.json`` (``evaluated_only``, ``epochs_done`` = ``epochs_total`` = 0, ``best_top1`` =
        ``top1``); no training, no checkpoint. In a run directory whose results.json is a training
        run's (``-e --resume`` of its checkpoint), the numbers go to ``evaluation.json`` instead."""
        args = self.args
        try:
            if self.checkpoint is not None:
                source = dict(evaluated_weights=str(self.checkpoint["path"]), evaluated_kind="checkpoint",
                              evaluated_epoch=self.epoch)
            elif args.get("init_weights"):
                source = dict(evaluated_weights=args.init_weights, evaluated_kind=self.init_weights[1])
            else:
                source = dict(evaluated_weights=TORCHVISION_RESNET50, evaluated_kind="torchvision's pretrained weights")
            stats = self.evaluate()
            results = self.results(stats)
            results.update(source, evaluated_only=True, epochs_done=0, epochs_total=0,
                           best_top1=stats["top1"], best_top5=stats["top5"], best_top1_epochs=[0, 0],
                           best_top1_over="evaluated only: no training epoch", val_examples=stats["examples"],
                           macs=results["macs_pruned"], params=results["params_pruned"])
            name = self.results_file
            previous = self.out_dir / name
            if previous.exists():
                try:
                    training = not json.loads(previous.read_text()).get("evaluated_only")
                except (OSError, ValueError, AttributeError):
                    training = True
                if training:
                    name = "evaluation.json"  # a training run's results stay as they are
            if self.ctx.is_main:
                write_json(results, self.out_dir / name)
            top5 = f" top-5 {stats['top5']:.2f}%"
            self.log.message(f"evaluated {source['evaluated_weights']} ({source['evaluated_kind']}) on "
                             f"{stats['examples']} validation images: top-1 {stats['top1']:.2f}%{top5}  "
                             f"MACs {human(results['macs'])} ({args.cost_convention})  "
                             f"params {human(results['params'])}; wrote {self.out_dir / name}")
            self.ctx.barrier()
            return 0
        finally:
            self.log.close()
            if self.owns_process_group:
                distributed.shutdown(self.ctx)

    def evaluate(self) -> dict:
        """Validation statistics (deterministic gates), over all ranks."""
        return evaluate_model(self.model, self.val_loader, self.normalize, self.args.limit_batches, self.ctx,
                              self.amp_dtype, self.memory_format)

    def kept(self) -> torch.Tensor:
        """Channels per gated layer the method keeps, ``(num_layers,)`` long."""
        return self.model.gates.per_layer_sum((self.method.channel_gates() > 0).float()).long()

    def results(self, val_stats: dict) -> dict:
        args, model = self.args, self.model
        kept = self.kept()
        macs_dense, params_dense = self.baseline["macs"], self.baseline["params"]
        macs, params = self.method.cost(kept)
        results = dict(
            model=args.model, dataset=args.dataset, method=self.method.name, seed=args.seed, epochs_done=self.epoch,
            cost_convention=args.cost_convention,
            epochs_total=args.epochs + args.fine_tune_epoch, top1=val_stats["top1"], best_top1=self.best_top1,
            best_top1_epochs=[self.best_since, self.epoch],
            best_top1_over=(f"epochs {self.best_since}-{self.epoch}: those whose {self.method.network_name} are the "
                            f"last epoch's (they last changed in epoch {self.best_since})"
                            if self.best_since > 1 else f"epochs 1-{self.epoch}: the {self.method.network_name} "
                                                        f"never changed"),
            val_loss=val_stats["loss"],
            macs_dense=macs_dense, macs_pruned=macs, macs_reduction=100 * (1 - macs / macs_dense),
            params_dense=params_dense, params_pruned=params, params_reduction=100 * (1 - params / params_dense),
            channels=[dict(name=g.name, kept=int(k), total=int(total))
                      for g, k, total in zip(model.gated_layers, kept.tolist(), self.baseline["widths"])],
            disconnected=model.disconnected_layers(kept), wall_time_s=round(self.wall_time(), 3),
            device=str(self.device), world_size=self.ctx.world_size, torch_version=str(torch.__version__),
            git_commit=self.commit)
        # Top-5 is measured on every data set (the papers report it for ImageNet): the last epoch's, and
        # that of the epoch that set best_top1.
        results.update(top5=val_stats["top5"], best_top5=self.best_top5 if self.best_top5 is not None
                       else val_stats["top5"])
        if self.held_stats is not None:
            # --validate-set: the held-out training images (DSR's val_prec1 / val_loss); top1 stays the test set's.
            results.update(validate_top1=self.held_stats["top1"], validate_loss=self.held_stats["loss"],
                           validate_top5=self.held_stats["top5"])
        start_weights = args.get("init_weights") or (TORCHVISION_RESNET50 if args.get("init_pretrained") else None)
        if start_weights:
            results["init_weights"] = start_weights
        results.update(self.method.results())
        results.update(self.extra_results)
        return results

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
        state = dict(format=FORMAT, arch=self.model.arch, args=args.to_dict(), epoch=self.epoch, step=self.step,
                     model=self.model.state_dict(), weight_optimizer=self.weights.state_dict(),
                     weight_scheduler=self.weight_schedule.state_dict(), method=self.method.state_dict(),
                     scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
                     gates_frozen=self.model.gates.frozen, best_top1=self.best_top1, best_since=self.best_since,
                     best_top5=self.best_top5,
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
        write_json(results, self.out_dir / self.results_file)

    def finish(self) -> None:
        """After the last epoch: export the network the method's decision leaves to ``pruned.pt``
        (models/export.py)."""
        if self.ctx.is_main:
            path = self.out_dir / "pruned.pt"
            # The reductions are against the network this run started from (prune.py's fine-tuning
            # starts from an already cut one).
            info = dict(dataset=self.args.dataset, data_dir=self.args.data_dir, dummy=self.args.dummy, epoch=self.epoch,
                        seed=self.args.seed,
                        macs_dense=self.baseline["macs"], params_dense=self.baseline["params"])
            if "arch" in self.baseline:  # the network it was cut from (prune.py; HSIC-Lasso's --ckpt_path reads it)
                info["uncut_arch"] = dict(self.baseline["arch"])
            _, pruned = save_pruned(self.model, path, info, gates=self.method.channel_gates(),
                                    sparse_layers=self.method.sparse_layer_names(),
                                    tied=self.method.tied_values())
            self.log.message(f"pruned model: {path} (MACs {human(pruned['macs'])}, params {human(pruned['params'])})")
            cut = self.model.disconnected_layers(self.kept())
            if cut:
                self.log.message(f"warning: the pruned network is disconnected: {', '.join(cut)} "
                                 f"{'has' if len(cut) == 1 else 'have'} no open channel, so every layer after "
                                 f"{'it' if len(cut) == 1 else 'them'} sees zeros and the output is constant")
        self.log.message(f"done: {self.out_dir}")
