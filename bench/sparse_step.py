"""Training step time of a network under per-weight masks against the same network dense, side by side.

    python bench/sparse_step.py --model resnet56 --device cpu -b 100 --density 0.1
    python bench/sparse_step.py --model resnet50 --device cuda -b 256 --density 0.2

Times the engine's step (forward, cross-entropy, backward, Nesterov SGD step with weight decay) on
synthetic data for ``dense`` and for each method of pruning/sparse.py at ``--density``: ``static`` adds
only the masks' re-application after every step (weights and momentum buffers), ``dsr`` and ``set`` a
reallocation every ``--period`` steps (the code's CIFAR period is 100, ResNet50's 1000; shorter here to
show their cost), ``deepr`` its per-step L1 term, gradient noise and sign check. Masked weights are
stored dense (the method's code does the same), so no speed-up is expected: the point is the overhead.
Variants run interleaved repetition by repetition after a warm-up; each variant's time ratio to dense
is the median of the per-repetition ratios, with their interquartile range. A benchmark, not a test.
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.interleaved import ratio_to, time_interleaved  # noqa: E402
from models import build_model, default_arch  # noqa: E402
from pruning import sparse  # noqa: E402

INPUT = {"vgg16": (32, 10), "resnet56": (32, 10), "resnet50": (224, 1000)}
VARIANTS = ("dense", "static", "dsr", "set", "deepr")


def build_method(name, model, args):
    if name == "static":
        return sparse.StaticSparse(model, args.density, seed=0)
    periods, stop = {0: args.period}, 10 ** 9
    if name == "dsr":
        return sparse.DSR(model, args.density, 0, periods, stop, n_prune_params=args.n_prune_params)
    if name == "set":
        return sparse.SET(model, args.density, 0, periods, stop, fraction=0.07)
    return sparse.DeepR(model, args.density, 0, {0: 1e-5}, stop)


def make_step(name, args, device):
    size, classes = INPUT[args.model]
    model = build_model(default_arch(args.model, classes, args.width_mult, net="dense")).to(device)
    method = None if name == "dense" else build_method(name, model, args)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True)
    if method is not None:
        method.attach_optimizer(optimizer)
        method.start_epoch(0)
    images = torch.randn(args.batch_size, 3, size, size, device=device)
    targets = torch.randint(0, classes, (args.batch_size,), device=device)
    iteration = [0]

    def step():
        output = model(images)
        loss = F.cross_entropy(output, targets)
        term = method.loss(0.0) if method is not None else None
        if term is not None:
            loss = loss + term
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if method is not None:
            method.after_backward()
        optimizer.step()
        if method is not None:
            method.after_step(iteration[0])
        iteration[0] += 1

    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=sorted(INPUT), default="resnet56")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("-b", "--batch-size", type=int, default=100)
    p.add_argument("--width-mult", type=float, default=1.0)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--period", type=int, default=10, help="DSR/SET: steps between reallocations")
    p.add_argument("--n-prune-params", type=int, default=20000, help="DSR's N_p")
    p.add_argument("--steps", type=int, default=20, help="steps per repetition")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5, help="steps before timing")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = args.variants.split(",")
    where = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}" if device.type == "cuda" else device
    print(f"{args.model} x{args.width_mult:g}, batch {args.batch_size}, density {args.density:g}, {where}, "
          f"torch {torch.__version__}, {args.reps} reps of {args.steps} steps, DSR/SET period {args.period}",
          flush=True)
    steps = {name: make_step(name, args, device) for name in names}
    times = time_interleaved(steps, args.reps, args.steps, args.warmup, device)
    print("| variant | ms / step (median) | ratio to dense (median) | ratio IQR |")
    print("|---|---:|---:|---:|")
    for name in names:
        ms = statistics.median(times[name]) * 1000
        if "dense" in times:
            ratio, q1, q3 = ratio_to(times[name], times["dense"])
            print(f"| {name} | {ms:.1f} | {ratio:.3f} | {q1:.3f}-{q3:.3f} |", flush=True)
        else:
            print(f"| {name} | {ms:.1f} | – | – |", flush=True)

if __name__ == "__main__":
    main()
