"""Training step time of GReg's unstructured mode and of tied weights against their own structured / untied
step, side by side in one run.

    python bench/mode_step.py                                  # both pairs, CPU, the authors' networks
    python bench/mode_step.py --pair greg --model resnet56a -b 128
    python bench/mode_step.py --pair tied --model wrn -b 100 --density 0.1 --device cuda

Each pair times one loop step (the engine's order: the method's ``before_step``, forward, cross-entropy,
backward, ``after_backward``, SGD step, ``after_step``) on synthetic data:

- ``greg``: GReg-1's regularisation phase with ``--wg filter`` (one coefficient per filter, pruning/greg.py
  ``GReg``) against ``--wg weight`` (one per weight, ``GRegUnstructured``), the same uniform ratio on every
  layer each mode prunes, a coefficient update every ``--update-interval`` steps (the code's CIFAR K_u is
  10), so the timed steps include the updates in their proportion;
- ``tied``: static sparse training (``StaticSparse``: the fixed mask re-applied after each step) against
  tied weights at the same density (``TiedWeights``: each tensor's gradient summed into its bank of free
  values and spread back after each backward).

The structured / untied step is the reference of its pair (ratio 1.0). Variants run interleaved repetition
by repetition after a warm-up; a ratio is the median of the per-repetition ratios, with its interquartile
range. A benchmark, not a test (bench/RESULTS.md has the figures measured here).
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.interleaved import ratio_to, time_interleaved  # noqa: E402
from models import NETWORKS, build_model, default_arch  # noqa: E402
from pruning import sparse  # noqa: E402
from pruning.greg import GReg, GRegUnstructured  # noqa: E402
from pruning.tied import TiedWeights  # noqa: E402

PAIRS = {"greg": ("greg-filter", "greg-weight"), "tied": ("untied", "tied")}
# The network each pair's authors run it on, its input side and classes.
DEFAULT_MODEL = {"greg": "resnet56a", "tied": "wrn"}
INPUT = {"cifar": (3, 32, 10), "imagenet": (3, 224, 1000), "mnist": (1, 28, 10)}


def build_method(variant, model, args):
    if variant == "greg-filter":
        return GReg(model, [args.ratio] * len(model.gated_layers), 1, args.update_interval, 10 ** 9)
    if variant == "greg-weight":
        return GRegUnstructured(model, [args.ratio] * len(model.weight_layers), 1, args.update_interval, 10 ** 9)
    layers = sparse.sparse_layers(model)
    if variant == "untied":
        return sparse.StaticSparse(model, args.density, seed=0)
    return TiedWeights(model, [args.density] * len(layers), seed=0)


def make_step(variant, model_name, args, device):
    channels, side, classes = INPUT[NETWORKS[model_name].data_kind]
    torch.manual_seed(0)
    model = build_model(default_arch(model_name, classes, args.width_mult, net="dense")).to(device)
    method = build_method(variant, model, args)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    if hasattr(method, "attach_optimizer"):
        method.attach_optimizer(optimizer)
        method.start_epoch(0)
    images = torch.randn(args.batch_size, channels, side, side, device=device)
    if channels == 1:
        images = images.flatten(1)
    targets = torch.randint(0, classes, (args.batch_size,), device=device)
    iteration = [0]

    def step():
        method.before_step(iteration[0])
        loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        method.after_backward()
        optimizer.step()
        method.after_step(iteration[0])
        iteration[0] += 1

    return step


def time_pair(pair, args, device):
    model_name = args.model or DEFAULT_MODEL[pair]
    names = PAIRS[pair]
    print(f"{pair}: {model_name} x{args.width_mult:g}, batch {args.batch_size}, "
          + (f"ratio {args.ratio:g}, update every {args.update_interval} steps" if pair == "greg"
             else f"density {args.density:g}"), flush=True)
    steps = {name: make_step(name, model_name, args, device) for name in names}
    times = time_interleaved(steps, args.reps, args.steps, args.warmup, device)
    reference, mode = names
    ratio, q1, q3 = ratio_to(times[mode], times[reference])
    return [(pair, model_name, reference, statistics.median(times[reference]) * 1000, 1.0, None),
            (pair, model_name, mode, statistics.median(times[mode]) * 1000, ratio, (q1, q3))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pair", choices=sorted(PAIRS), action="append",
                   help="which pair to time (repeatable; default: both)")
    p.add_argument("--model", choices=sorted(NETWORKS), help="the network (default: greg resnet56a, tied wrn)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("-b", "--batch-size", type=int, default=64)
    p.add_argument("--width-mult", type=float, default=1.0)
    p.add_argument("--ratio", type=float, default=0.5, help="GReg: the pruning ratio of every pruned layer")
    p.add_argument("--update-interval", type=int, default=10, help="GReg: steps between coefficient updates (K_u)")
    p.add_argument("--density", type=float, default=0.1, help="tied / static: the fraction of values kept")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=20, help="steps per repetition")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5, help="steps before timing")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}" if device.type == "cuda" else device
    print(f"{where}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.reps} reps of {args.steps} steps", flush=True)
    rows = [row for pair in (args.pair or sorted(PAIRS)) for row in time_pair(pair, args, device)]
    print("| pair | network | variant | ms / step (median) | ratio to its reference (median) | ratio IQR |")
    print("|---|---|---|---:|---:|---:|")
    for pair, model_name, name, ms, ratio, iqr in rows:
        spread = "–" if iqr is None else f"{iqr[0]:.3f}-{iqr[1]:.3f}"
        print(f"| {pair} | {model_name} | {name} | {ms:.1f} | {ratio:.3f} | {spread} |", flush=True)


if __name__ == "__main__":
    main()
