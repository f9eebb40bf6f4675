"""Seconds per CIFAR epoch of the real training script, end to end.

    python bench/epoch_time.py --model resnet56 --net dep --amp --channels-last
    python bench/epoch_time.py --model vgg16 --net hc --epochs 4 --compile
    python bench/epoch_time.py --model resnet56 --images 1024 --test-images 256   # a quick look on a CPU

Writes random CIFAR-10-sized data (50,000 training and 10,000 test images
unless told otherwise) in the real python-batch format once, then runs the script's own
recipe through ``engine.cli.main`` for ``--epochs`` epochs: the loader the
run would use (on CUDA the training set held on the GPU, ``--loader auto``),
training, evaluation and the checkpoints, everything a real epoch does. The
random files are not the official release, so torchvision's md5 check is
replaced by an existence check here. An epoch's time is the interval between
the ends of two consecutive epochs, so the first epoch (start-up, cuDNN
autotuning, compilation) is not counted; the median over the rest is printed.
A benchmark, not a test.
"""
import argparse
import os
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.datasets.cifar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_resnet56  # noqa: E402
import train_vgg  # noqa: E402
from engine import cli, trainer as engine  # noqa: E402

RECIPES = {"vgg16": train_vgg.RECIPE, "resnet56": train_resnet56.RECIPE}


def write_cifar10(root: Path, train_images: int, test_images: int) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, part in enumerate(np.array_split(np.arange(train_images), 5), start=1):
        batch = {"data": rng.integers(0, 256, (len(part), 3072), dtype=np.uint8), "labels": (part % 10).tolist()}
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, (test_images, 3072), dtype=np.uint8),
                     "labels": [j % 10 for j in range(test_images)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{c}" for c in range(10)]}, f)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", choices=sorted(RECIPES), default="resnet56")
    p.add_argument("--net", choices=["dense", "hc", "dep"], default="dep")
    p.add_argument("--back_dep", action="store_true")
    p.add_argument("--epochs", type=int, default=3, help="epochs to run; the first is not timed (default: 3)")
    p.add_argument("--images", type=int, default=50_000, help="training images (default: 50000)")
    p.add_argument("--test-images", type=int, default=10_000, help="test images (default: 10000)")
    p.add_argument("-b", "--batch-size", type=int, default=128)
    p.add_argument("-j", "--workers", type=int, default=4, help="loader processes where the DataLoader is used")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--width-mult", type=float, default=1.0, help="channel width multiplier (a quick look: 0.125)")
    p.add_argument("--project", type=int, default=300, metavar="N",
                   help="also print the time of N such epochs (the recipe's 300; default: 300)")
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs must be at least 2: the first epoch is not timed")
    where = (f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}" if torch.cuda.is_available()
             else "CPU")
    print(f"{where}, torch {torch.__version__}", flush=True)

    ends = []
    end_epoch = engine.Trainer.end_epoch

    def timed_end_epoch(trainer):
        end_epoch(trainer)
        ends.append(time.perf_counter())
        if len(ends) > 1:  # as it happens, so that a run cut short still reports
            print(f"epoch {len(ends)}: {ends[-1] - ends[-2]:.1f} s", flush=True)

    engine.Trainer.end_epoch = timed_end_epoch
    torchvision.datasets.cifar.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)
    with tempfile.TemporaryDirectory() as tmp:
        write_cifar10(Path(tmp), args.images, args.test_images)
        argv = ["--data-dir", tmp, "--net", args.net, "--epoch", str(args.epochs), "-b", str(args.batch_size),
                "-j", str(args.workers), "-p", "1000000", "--seed", "0", "--width-mult", str(args.width_mult),
                "--out-dir", str(Path(tmp) / "run")]
        argv += [flag for flag, on in (("--back_dep", args.back_dep), ("--amp", args.amp),
                                       ("--channels-last", args.channels_last), ("--compile", args.compile)) if on]
        try:
            cli.main(RECIPES[args.model], argv)
        except SystemExit as e:
            if e.code:
                raise
    epochs = [b - a for a, b in zip(ends, ends[1:])]
    median = statistics.median(epochs)
    flags = "".join(f" {flag}" for flag in argv[argv.index("--out-dir") + 2:])
    print(f"{args.model} x{args.width_mult:g} --net {args.net}{flags} -b {args.batch_size}, {args.images} training and "
          f"{args.test_images} test images; epochs 2..{args.epochs}: " + ", ".join(f"{s:.1f}" for s in epochs) + " s")
    print(f"seconds per epoch (median): {median:.1f}", flush=True)
    print(f"projected {args.project} epochs: {args.project * median / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
