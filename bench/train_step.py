"""Training throughput of the same architecture dense and gated, side by side.

    python bench/train_step.py --model resnet56 --device cpu -b 128
    python bench/train_step.py --model resnet50 --device cuda -b 256 --amp --channels-last

Builds the model four times (``dense``: no gates; ``hc``; ``dep``; ``dep``
with ``--back_dep``; ``--variants`` also takes ``hc-composed``, L0-HC with
BN, gate and ReLU as separate autograd ops, to see what the one-function
training path of ``models/common.py`` saves), and times full training steps (forward, cross-entropy +
L0 penalty, backward, SGD step for weights and Adam step for gates) on
synthetic data. Variants are interleaved repetition by repetition after a
warm-up, so drifts of the machine hit all of them alike; each variant's
throughput is the median over repetitions, and its time ratio to dense the
median of the per-repetition ratios, with their interquartile range. On CUDA
it also reports each variant's peak memory, measured in isolation before the
timing: the variant alone is built, warmed up and freed again (its model,
gradients and optimiser states; the input batch, shared by all, is counted).
Each repetition prints a line as it ends, so a run cut short still reports.
A benchmark, not a test.
"""
import argparse
import gc
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pruning.penalty import L0Penalty  # noqa: E402
from models import NETWORKS, build_model, default_arch  # noqa: E402

VARIANTS = {"dense": dict(net="dense"), "hc": dict(net="hc"), "dep": dict(net="dep"),
            "dep-back": dict(net="dep", back_dep=True), "hc-composed": dict(net="hc")}
# (channels, side, classes) of each kind of images a registered network takes.
INPUT = {"cifar": (3, 32, 10), "mnist": (1, 28, 10), "imagenet": (3, 224, 1000)}


class ComposedBatchNorm(torch.nn.BatchNorm2d):
    """Not exactly ``nn.BatchNorm2d``, so ``bn_gate_relu`` takes the plain composition."""


def compose_bn(model):
    for module in model.modules():
        if type(module) is torch.nn.BatchNorm2d:
            module.__class__ = ComposedBatchNorm
    return model


def make_step(model, args, device):
    """One training step of the engine's shape, returned as a closure."""
    penalty = L0Penalty(model, "paper").to(device)
    weights = torch.optim.SGD(model.weight_parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    gates = torch.optim.Adam(model.gate_parameters(), lr=1e-3, fused=True) if model.gate_parameters() else None
    run = torch.compile(model) if args.compile else model
    dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    autocast = torch.autocast(device.type, dtype) if args.amp else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and dtype == torch.float16)
    gated = model.gates.logits is not None

    def step(images, targets):
        # As in engine/trainer.py: the gate logits are computed once and shared.
        log_alpha = model.gates.log_alpha() if gated else None
        with autocast:
            output = run(images, log_alpha)
        loss = F.cross_entropy(output.float(), targets)
        if gated:
            loss = loss + penalty(1e-7, model.gates.expected_open(log_alpha))
        weights.zero_grad(set_to_none=True)
        if gates:
            gates.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(weights)
        if gates:
            scaler.step(gates)
        scaler.update()
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(NETWORKS), default="resnet56", help="any registered network")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("-b", "--batch-size", type=int, default=128)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--width-mult", type=float, default=1.0)
    p.add_argument("--variants", default="dense,hc,dep,dep-back", help="comma-separated, from: " + ", ".join(VARIANTS))
    p.add_argument("--steps", type=int, default=5, help="training steps per repetition")
    p.add_argument("--reps", type=int, default=7, help="interleaved repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    device = torch.device(args.device)
    channels, size, classes = INPUT[NETWORKS[args.model].data_kind]
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    images = torch.randn(args.batch_size, channels, size, size, device=device).to(memory_format=fmt)
    targets = torch.randint(0, classes, (args.batch_size,), device=device)

    names = args.variants.split(",")
    if unknown := [n for n in names if n not in VARIANTS]:
        p.error(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(VARIANTS)})")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes, as the training engine sets it

    def build(name):
        torch.manual_seed(0)
        model = build_model(default_arch(args.model, classes, args.width_mult, **VARIANTS[name]))
        if name == "hc-composed":
            model = compose_bn(model)
        model = model.to(device, memory_format=fmt).train()
        return make_step(model, args, device)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    flags = " ".join(f for f, on in (("--amp", args.amp), ("--channels-last", args.channels_last),
                                     ("--compile", args.compile)) if on)
    cuda = f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}" if device.type == "cuda" else ""
    print(f"{args.model} x{args.width_mult:g}, batch {args.batch_size}, {where} {flags}, torch {torch.__version__}"
          f"{cuda}; {args.reps} reps x {args.steps} steps, median", flush=True)

    peak = {}
    if device.type == "cuda":
        for name in names:  # each variant alone on the device
            step = build(name)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            for _ in range(max(args.warmup, 2)):  # the second step holds the optimiser states too
                step(images, targets)
            torch.cuda.synchronize()
            peak[name] = torch.cuda.max_memory_allocated() / 2 ** 30
            del step
            gc.collect()
            torch.cuda.empty_cache()
            print(f"peak memory {name}: {peak[name]:.2f} GiB (alone, input batch included)", flush=True)

    steps = {name: build(name) for name in names}

    def timed(name):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            steps[name](images, targets)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return args.batch_size * args.steps / (time.perf_counter() - start)

    for name in names:
        for _ in range(args.warmup):
            steps[name](images, targets)
    rates = {name: [] for name in names}
    for rep in range(args.reps):
        # Rotate the order every repetition so that no variant always runs right after another.
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            rates[name].append(timed(name))
        print(f"rep {rep + 1}/{args.reps} img/s: " + ", ".join(f"{name} {rates[name][-1]:.1f}" for name in names),
              flush=True)

    # The time ratio is the median over repetitions of each repetition's own ratio (paired
    # measurements taken seconds apart), which a drifting machine disturbs less than a ratio of
    # medians; the interquartile range of those ratios shows how far one run can be trusted.
    dense = rates.get("dense")
    print(f"{'variant':10} {'img/s':>10} {'step ms':>9} {'time ratio':>11} {'IQR':>13}" +
          (f" {'peak GiB':>9}" if peak else ""))
    for name in names:
        rate = statistics.median(rates[name])
        if dense:
            paired = [d / r for d, r in zip(dense, rates[name])]
            q1, _, q3 = statistics.quantiles(paired, n=4) if len(paired) > 1 else (paired[0],) * 3
            ratio = f"{statistics.median(paired):11.3f} {q1:6.3f}-{q3:.3f}"
        else:
            ratio = f"{'':11} {'':13}"
        mem = f" {peak[name]:9.2f}" if peak else ""
        print(f"{name:10} {rate:10.1f} {1000 * args.batch_size / rate:9.1f} {ratio}{mem}", flush=True)


if __name__ == "__main__":
    main()
