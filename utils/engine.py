"""The training engine behind train_vgg.py, train_resnet56.py and train_resnet50.py.

One loop for every model: ``--epoch`` epochs of cross-entropy + L0 penalty
(SGD with weight decay for the weights, Adam without weight decay for the
gate parameters, schedulers stepped once per epoch after it), then
``--fine_tune_epoch`` epochs with the gates frozen at their test values and no
penalty. After every epoch: evaluation with deterministic gates, TensorBoard
scalars and histograms, ``last.pt`` (and ``best.pt`` on a new best top-1),
and ``results.json``.

Reproducibility: every epoch reseeds the RNGs from ``(seed, epoch)``, so data
order, augmentation and gate noise of epoch k do not depend on whether the
run was interrupted before it; resuming from the checkpoint of epoch k gives
the same weights as never stopping.
"""
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR, MultiStepLR
from torch.utils.data import DataLoader

from l0_layers.penalty import L0Penalty
from models import build_model

from .checkpoint import FORMAT, load_checkpoint, save_checkpoint, write_json
from .cli import Recipe, parse_args, program_name
from .data import build_datasets
from .errors import UsageError
from .logger import RunLogger

# Arguments that define what a run is: a checkpoint only resumes a run that agrees on these.
IDENTITY = ("net", "back_dep", "dataset", "num_classes", "reg", "temp")


def main(recipe: Recipe, argv=None) -> None:
    """Entry point of the training scripts: user mistakes become one line and exit 2."""
    prog = program_name()
    try:
        train(recipe, parse_args(recipe, argv, prog))
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


def select_device(gpu: int | None) -> torch.device:
    if not torch.cuda.is_available():
        if gpu is not None:
            print(f"warning: --gpu {gpu} given but CUDA is not available; running on the CPU", file=sys.stderr)
        return torch.device("cpu")
    if gpu is None:
        return torch.device("cuda")
    if gpu >= torch.cuda.device_count():
        raise UsageError(f"--gpu {gpu}: only {torch.cuda.device_count()} CUDA device(s) present")
    torch.cuda.set_device(gpu)
    return torch.device("cuda", gpu)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2 ** 63)


def default_out_dir(recipe: Recipe, args) -> Path:
    name = f"{recipe.model}_{'dummy-' if args.dummy else ''}{args.dataset}_{args.net}"
    name += "_back" if args.back_dep else ""
    name += f"_lam{args.lamba:g}" if args.net != "dense" else ""
    path, n = Path("runs") / name, 1
    while path.exists():  # never write into another run's directory
        n += 1
        path = Path("runs") / f"{name}-{n}"
    return path


def prepare_out_dir(path: Path, resuming: bool) -> Path:
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out-dir {path} exists and is not a directory")
    if not resuming and (path / "last.pt").exists():
        raise UsageError(f"{path} already holds a run; continue it with --resume {path / 'last.pt'} "
                         f"or choose another --out-dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to the run directory {path} ({e.strerror or e})") from e
    return path


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def make_optimizers(model, args, recipe: Recipe):
    """SGD (weight decay) for weights; Adam (no decay) or SGD (no decay) for the gates."""
    weights = torch.optim.SGD(model.weight_parameters(), lr=args.lr, momentum=0.9,
                              weight_decay=args.weight_decay)
    weight_schedule = MultiStepLR(weights, list(args.milestones), args.lr_decay)
    gate_params = model.gate_parameters()
    if not gate_params:
        return weights, weight_schedule, None, None
    if args.gen_optim == "SGD":
        gates = torch.optim.SGD(gate_params, lr=args.lr, momentum=0.9, weight_decay=0.0)
        gate_schedule = MultiStepLR(gates, list(args.milestones), args.lr_decay)
    else:
        gates = torch.optim.Adam(gate_params, lr=args.lr_gate, weight_decay=0.0)
        if recipe.gate_decay is None:
            # Deliberately constant (the VGG recipe); the reference got this by
            # binding the gate scheduler to the weight optimiser by mistake.
            gate_schedule = LambdaLR(gates, lambda epoch: 1.0)
        else:
            gate_schedule = MultiStepLR(gates, list(args.milestones), recipe.gate_decay)
    return weights, weight_schedule, gates, gate_schedule


def train(recipe: Recipe, args) -> dict:
    started = time.time()
    device = select_device(args.gpu)
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    if checkpoint is not None:
        saved = checkpoint["args"]
        if checkpoint["arch"]["model"] != recipe.model:
            raise UsageError(f"{args.resume} is a {checkpoint['arch']['model']} checkpoint; this script trains "
                             f"{recipe.model}")
        for key in IDENTITY:
            if saved.get(key) != getattr(args, key) and not (key == "num_classes" and getattr(args, key) is None):
                raise UsageError(f"{args.resume} was trained with --{key} {saved.get(key)}, this command "
                                 f"asks for {getattr(args, key)}; resume it with matching flags")
        args.seed = saved["seed"]
        resume_dir = Path(args.resume) if Path(args.resume).is_dir() else Path(args.resume).parent
        out_dir = prepare_out_dir(Path(args.out_dir) if args.out_dir else resume_dir, resuming=True)
    else:
        if args.seed is None:
            args.seed = int(torch.randint(0, 2 ** 31 - 1, ()).item())
        out_dir = prepare_out_dir(Path(args.out_dir) if args.out_dir else default_out_dir(recipe, args), False)

    train_set, val_set, num_classes = build_datasets(args.dataset, args.data_dir, dummy=args.dummy,
                                                     num_classes=args.num_classes)
    args.num_classes = num_classes
    torch.manual_seed(args.seed)
    arch = dict(model=recipe.model, num_classes=num_classes, net=args.net, back_dep=args.back_dep,
                temperature=args.temp)
    model = build_model(checkpoint["arch"] if checkpoint else arch).to(device)
    penalty = L0Penalty(model, args.reg).to(device)
    weights, weight_schedule, gates, gate_schedule = make_optimizers(model, args, recipe)

    start_epoch, best_top1, wall_before = 0, 0.0, 0.0
    if checkpoint is not None:
        if checkpoint["gates_frozen"]:
            model.gates.freeze()
        model.load_state_dict(checkpoint["model"])
        weights.load_state_dict(checkpoint["weight_optimizer"])
        weight_schedule.load_state_dict(checkpoint["weight_scheduler"])
        if gates is not None:
            gates.load_state_dict(checkpoint["gate_optimizer"])
            gate_schedule.load_state_dict(checkpoint["gate_scheduler"])
        start_epoch, best_top1 = checkpoint["epoch"], checkpoint["best_top1"]
        wall_before = checkpoint["wall_time_s"]

    loader_args = dict(batch_size=args.batch_size, num_workers=args.workers,
                       pin_memory=device.type == "cuda", persistent_workers=False)
    shuffle = torch.Generator()
    train_loader = DataLoader(train_set, shuffle=True, drop_last=False, generator=shuffle, **loader_args)
    val_loader = DataLoader(val_set, shuffle=False, **loader_args)
    total_epochs = args.epochs + args.fine_tune_epoch
    log = RunLogger(out_dir, model, imagenet=recipe.imagenet)
    log.start(args, device, out_dir, len(train_set), len(val_set))

    results = {}
    for epoch in range(start_epoch, total_epochs):
        fine_tune = epoch >= args.epochs
        if fine_tune and not model.gates.frozen:
            model.gates.freeze()
        torch.manual_seed(epoch_seed(args.seed, epoch))
        shuffle.manual_seed(epoch_seed(args.seed, epoch))
        train_stats = train_one_epoch(model, penalty, train_loader, weights, None if fine_tune else gates,
                                      0.0 if fine_tune else args.lamba, device, epoch, args, log)
        weight_schedule.step()
        if gate_schedule is not None:
            gate_schedule.step()
        val_stats = evaluate(model, val_loader, device, args.limit_batches)
        best_top1 = max(best_top1, val_stats["top1"])
        results = build_results(recipe, args, model, epoch + 1, val_stats, best_top1,
                                wall_before + time.time() - started, device)
        log.epoch(epoch, train_stats, val_stats, results)
        state = dict(format=FORMAT, arch=model.arch, args=vars(args).copy(), epoch=epoch + 1,
                     model=model.state_dict(), weight_optimizer=weights.state_dict(),
                     weight_scheduler=weight_schedule.state_dict(),
                     gate_optimizer=gates.state_dict() if gates else None,
                     gate_scheduler=gate_schedule.state_dict() if gate_schedule else None,
                     gates_frozen=model.gates.frozen, best_top1=best_top1,
                     wall_time_s=results["wall_time_s"], results=results)
        save_checkpoint(state, out_dir / "last.pt")
        if val_stats["top1"] >= best_top1:
            save_checkpoint(state, out_dir / "best.pt")
        if args.save_epoch and (epoch + 1) % args.save_epoch == 0:
            save_checkpoint(state, out_dir / f"epoch_{epoch + 1}.pt")
        write_json(results, out_dir / "results.json")
    log.close()
    return results


def train_one_epoch(model, penalty, loader, weights, gates, lamba, device, epoch, args, log) -> dict:
    """One pass over the training set. Statistics stay on the device between print intervals."""
    model.train()
    steps = len(loader) if args.limit_batches is None else min(len(loader), args.limit_batches)
    totals = torch.zeros(4, device=device)  # loss, penalty, top-1 hits, top-5 hits (sums over examples)
    interval = torch.zeros(3, device=device)  # loss, penalty, examples since the last progress line
    seen, tick = 0, time.time()
    for step, (images, targets) in enumerate(loader):
        if step >= steps:
            break
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        output = model(images)
        ce = F.cross_entropy(output, targets)
        reg = penalty(lamba) if lamba > 0 else ce.new_zeros(())
        loss = ce + reg
        weights.zero_grad(set_to_none=True)
        if gates is not None:
            gates.zero_grad(set_to_none=True)
        loss.backward()
        weights.step()
        if gates is not None:
            gates.step()
        n = images.shape[0]
        with torch.no_grad():
            hits = topk_hits(output, targets)
            totals += torch.stack([loss.detach() * n, reg.detach() * n, hits[0], hits[1]])
            interval += torch.stack([loss.detach() * n, reg.detach() * n, loss.new_tensor(float(n))])
        seen += n
        if (step + 1) % args.print_freq == 0 or step + 1 == steps:
            loss_avg, reg_avg, count = (interval[:2] / interval[2]).tolist() + [interval[2].item()]
            now = time.time()
            log.progress(epoch, step + 1, steps, loss_avg, reg_avg, weights.param_groups[0]["lr"],
                         count / max(now - tick, 1e-9), (now - tick) / count * (steps - step - 1) * n)
            interval.zero_()
            tick = now
    loss_sum, reg_sum, top1, top5 = (totals / max(seen, 1)).tolist()
    return dict(loss=loss_sum, penalty=reg_sum, top1=100 * top1, top5=100 * top5)


def topk_hits(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Number of examples whose target is in the top-1 and in the top-5 predictions."""
    k = min(5, output.shape[1])
    top = output.topk(k, dim=1).indices == targets[:, None]
    return torch.stack([top[:, 0].sum(), top.any(dim=1).sum()]).float()


@torch.no_grad()
def evaluate(model, loader, device, limit_batches=None) -> dict:
    """Cross-entropy and top-1/top-5 with deterministic gates, averaged per example."""
    model.eval()
    totals = torch.zeros(3, device=device)  # summed loss, top-1 hits, top-5 hits
    seen = 0
    for step, (images, targets) in enumerate(loader):
        if limit_batches is not None and step >= limit_batches:
            break
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        output = model(images)
        totals += torch.cat([F.cross_entropy(output, targets, reduction="sum")[None], topk_hits(output, targets)])
        seen += images.shape[0]
    loss, top1, top5 = (totals / max(seen, 1)).tolist()
    return dict(loss=loss, top1=100 * top1, top5=100 * top5, examples=seen)


def build_results(recipe, args, model, epochs_done, val_stats, best_top1, wall_time, device) -> dict:
    kept = model.gates.kept()
    macs_dense, params_dense = model.cost.dense()
    macs, params = model.cost.pruned(kept)
    results = dict(
        model=recipe.model, dataset=args.dataset, net=args.net, back_dep=args.back_dep, lamba=args.lamba,
        reg=args.reg, seed=args.seed, epochs_done=epochs_done, epochs_total=args.epochs + args.fine_tune_epoch,
        top1=val_stats["top1"], best_top1=best_top1, val_loss=val_stats["loss"],
        macs_dense=macs_dense, macs_pruned=macs, macs_reduction=100 * (1 - macs / macs_dense),
        params_dense=params_dense, params_pruned=params, params_reduction=100 * (1 - params / params_dense),
        channels=[dict(name=g.name, kept=int(k), total=g.width) for g, k in zip(model.gated_layers, kept.tolist())],
        wall_time_s=round(wall_time, 3), device=str(device), torch_version=torch.__version__,
        git_commit=git_commit())
    if recipe.imagenet:
        results["top5"] = val_stats["top5"]
    return results


def _finite(x: float) -> bool:
    return math.isfinite(x)
