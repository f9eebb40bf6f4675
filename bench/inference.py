"""Dense vs pruned inference: measured latency and throughput next to the MACs ratio.

    python bench/inference.py --model resnet56 --keep 0.5                 # random gates, half the channels
    python bench/inference.py --checkpoint runs/<run>/pruned.pt           # a real exported model
    python bench/inference.py --model resnet50 --batches 1,8 --reps 5     # CPU-friendly sizes

The dense model is the unpruned architecture (``net='dense'``, no gates); the
pruned one is the compact model of ``models/export.py`` -- either a real
``pruned.pt`` or one exported from a gated model whose gates are set at
random so that each gated layer keeps a ``--keep`` fraction of its channels.
Both get the same input. Timing: ``--warmup`` untimed forwards each, then
``--reps`` rounds that time dense and pruned alternately (interleaved, so
drifting clocks or a busy machine hit both alike); the median of each is
reported. A round times enough back-to-back forwards to last at least
``--min-time`` seconds (many for batch 1 on a GPU, one for big CPU batches).
On CUDA each batch runs in fp32 and, unless disabled, with channels-last
memory format, with fp16 autocast (AMP), and with both; on the CPU in fp32,
and with ``--cpu-modes fp32,channels_last`` also with both models and the
input in channels-last memory format.

The printed table is Markdown: per device, mode and batch, the median time of
one forward pass, images per second, the measured speed-up (dense time /
pruned time) and the MACs ratio (dense MACs / pruned MACs) it can be compared
with. A speed-up below the MACs ratio is normal: pruning shrinks layers that
were already cheap to run, and batch 1 is dominated by per-layer overheads.
"""
import argparse
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import NETWORKS, build_model, default_arch, export_pruned  # noqa: E402
from models.export import build_pruned, read_pruned  # noqa: E402
from utils.errors import UsageError  # noqa: E402
from utils.cli import human  # noqa: E402

# (channels, classes) of each kind of images a registered network takes.
KINDS = {"cifar": (3, 10), "mnist": (1, 10), "imagenet": (3, 1000)}
CUDA_MODES = ("fp32", "channels_last", "amp", "channels_last+amp")
CPU_MODES = ("fp32", "channels_last")


def random_pruned(name: str, keep: float, seed: int):
    """(dense, compact): a gated model whose gates keep ``keep`` of each layer, exported."""
    torch.manual_seed(seed)
    gated = build_model(default_arch(name, KINDS[NETWORKS[name].data_kind][1], net="hc")).eval()
    logits = []
    for width in gated.gates.widths:
        n = max(1, round(keep * width))
        la = torch.full((width,), -5.0)  # test gate exactly 0
        la[torch.randperm(width)[:n]] = 3.0  # test gate 1
        logits.append(la)
    with torch.no_grad():
        gated.gates.logits.log_alpha.copy_(torch.cat(logits))
    compact, payload = export_pruned(gated)
    dense = build_model(dict(gated.arch, net="dense")).eval()
    return dense, compact, payload


def from_checkpoint(path):
    payload = read_pruned(path)
    source = payload["arch"]["source"]
    dense = build_model(dict(source["arch"], net="dense", back_dep=False)).eval()
    return dense, build_pruned(payload), payload


def time_forward(model, x, sync, min_time: float) -> float:
    """Seconds per forward pass, timing back-to-back passes for at least ``min_time``."""
    n, start = 0, time.perf_counter()
    while True:
        model(x)
        n += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / n


def bench(models: dict, device, mode: str, batch: int, input_size: int, args) -> dict:
    channels_last = "channels_last" in mode
    amp = "amp" in mode
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    channels = KINDS[NETWORKS[next(iter(models.values())).arch["model"]].data_kind][0]
    x = torch.randn(batch, channels, input_size, input_size, device=device).contiguous(memory_format=fmt)
    placed = {k: m.to(device, memory_format=fmt) for k, m in models.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = torch.autocast("cuda", torch.float16) if amp else nullcontext()
    times = {k: [] for k in placed}
    with torch.inference_mode(), autocast:
        for model in placed.values():
            for _ in range(args.warmup):
                model(x)
            sync()
        for _ in range(args.reps):
            for k, model in placed.items():
                times[k].append(time_forward(model, x, sync, args.min_time))
    return {k: statistics.median(v) for k, v in times.items()}


def machine(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", choices=sorted(NETWORKS), default="resnet56", help="any registered network")
    p.add_argument("--checkpoint", metavar="PRUNED_PT", help="a pruned.pt (else: random gates at --keep)")
    p.add_argument("--keep", type=float, default=0.5, help="fraction of each gated layer kept (random gates)")
    p.add_argument("--batches", default="1,64,256", help="comma-separated batch sizes")
    p.add_argument("--reps", type=int, default=10, help="timed rounds per model (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed forwards per model first")
    p.add_argument("--min-time", type=float, default=0.05, help="seconds of back-to-back forwards per round")
    p.add_argument("--device", choices=("all", "cpu", "cuda"), default="all", help="all: CPU, and CUDA if present")
    p.add_argument("--cuda-modes", default=",".join(CUDA_MODES), help=f"subset of {','.join(CUDA_MODES)}")
    p.add_argument("--cpu-modes", default="fp32", help=f"subset of {','.join(CPU_MODES)} (both models in the same layout)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b]
        args.cuda_modes = [m for m in args.cuda_modes.split(",") if m]
        args.cpu_modes = [m for m in args.cpu_modes.split(",") if m]
    except ValueError:
        p.error(f"--batches: expected comma-separated integers, got {args.batches!r}")
    if not args.batches or min(args.batches) < 1 or args.reps < 1 or args.warmup < 0:
        p.error("--batches must be positive, --reps >= 1, --warmup >= 0")
    if bad := set(args.cuda_modes) - set(CUDA_MODES):
        p.error(f"--cuda-modes: unknown {', '.join(sorted(bad))}")
    if (bad := set(args.cpu_modes) - set(CPU_MODES)) or not args.cpu_modes:
        p.error(f"--cpu-modes: unknown {', '.join(sorted(bad))}" if bad else "--cpu-modes: none given")
    if not 0.0 < args.keep <= 1.0:
        p.error("--keep must be in (0, 1]")
    return p, args


def main(argv=None) -> int:
    parser, args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        dense, compact, payload = (from_checkpoint(args.checkpoint) if args.checkpoint
                                   else random_pruned(args.model, args.keep, args.seed))
    except UsageError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    source = payload["arch"]["source"]
    macs_ratio = source["macs_dense"] / payload["macs"]
    input_size = compact.arch["input_size"]
    what = args.checkpoint or f"random gates, keep {args.keep:g} of each gated layer (seed {args.seed})"
    print(f"# {source['model']}: dense vs pruned ({what})\n")
    print(f"MACs {human(source['macs_dense'])} -> {human(payload['macs'])} (ratio {macs_ratio:.2f}x); "
          f"params {human(source['params_dense'])} -> {human(payload['params'])}; input {input_size}x{input_size}; "
          f"torch {torch.__version__}; {args.reps} interleaved rounds of >= {args.min_time:g} s, "
          f"{args.warmup} warm-up, median\n")
    devices = []
    if args.device in ("all", "cpu"):
        devices.append((torch.device("cpu"), args.cpu_modes))
    if args.device in ("all", "cuda"):
        if torch.cuda.is_available():
            torch.backends.cudnn.benchmark = True
            devices.append((torch.device("cuda"), args.cuda_modes))
        elif args.device == "cuda":
            parser.exit(2, f"{parser.prog}: error: --device cuda but CUDA is not available\n")
    models = {"dense": dense, "pruned": compact}
    for device, modes in devices:
        print(f"{device.type.upper()}: {machine(device)}\n")
        print("| mode | batch | dense ms | pruned ms | dense img/s | pruned img/s | speed-up | MACs ratio |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for mode in modes:
            for batch in args.batches:
                t = bench(models, device, mode, batch, input_size, args)
                print(f"| {mode} | {batch} | {1e3 * t['dense']:.2f} | {1e3 * t['pruned']:.2f} | "
                      f"{batch / t['dense']:.0f} | {batch / t['pruned']:.0f} | {t['dense'] / t['pruned']:.2f}x | "
                      f"{macs_ratio:.2f}x |", flush=True)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
