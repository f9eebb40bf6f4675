"""This project's MACs next to the counter HSIC-Lasso's code reports its targets in (thop).

HSIC-Lasso's `--target` is what `thop.profile` counts on the authors' rebuilt
network (conv and linear multiply-accumulates plus small BN, pooling and
bias terms). `prune.py --target` is this project's convention (conv + linear
multiply-accumulates only, models/structure.py). This prints both for the dense
models, side by side, and what the published targets are as a fraction of each:

    pip install thop      # a measuring tool only, not a dependency of the project
    git clone https://github.com/songxmu/APIB /tmp/APIB
    python bench/macs_convention.py --apib /tmp/APIB

thop counts the authors' VGG16 (4 max-pools, AvgPool, FC 512-512-10) and
ResNet56 (option-A shortcuts) from their repository, and torchvision's
ResNet50 for theirs (the same network; their file shares one ReLU module per
block, which thop's hooks cannot count).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import build_model, default_arch  # noqa: E402
from utils.cli import OneLineParser  # noqa: E402

PUBLISHED_TARGETS = {"vgg16": 107_000_000, "resnet56": 57_000_000, "resnet50": 1_550_000_000}


def authors_models(apib: Path):
    """The authors' dense networks, imported from their checkout (their package has no __init__ needs)."""
    import importlib.util
    import torchvision

    def load(name):
        spec = importlib.util.spec_from_file_location(name, apib / "models" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return {"vgg16": (load("vgg_cifar").vgg16(), 32), "resnet56": (load("resnet_cifar").resnet56(), 32),
            "resnet50": (torchvision.models.resnet50(), 224)}


def main(argv=None) -> int:
    p = OneLineParser(prog="bench/macs_convention.py", description=__doc__.splitlines()[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--apib", type=Path, required=True, help="a checkout of github.com/songxmu/APIB")
    args = p.parse_args(argv)
    try:
        from thop import profile
    except ImportError:
        p.error("thop is not installed (pip install thop)")
    if not (args.apib / "models" / "vgg_cifar.py").is_file():
        p.error(f"{args.apib} is not a checkout of songxmu/APIB (no models/vgg_cifar.py)")
    print(f"{'model':<10} {'ours':>14} {'thop (authors)':>16} {'thop/ours':>10} {'target/ours':>12} {'target/thop':>12}")
    for name, (theirs, size) in authors_models(args.apib).items():
        ours, _ = build_model(default_arch(name, 1000 if name == "resnet50" else 10, net="dense")).cost.dense()
        counted, _ = profile(theirs.eval(), (torch.rand(1, 3, size, size),), verbose=False)
        target = PUBLISHED_TARGETS[name]
        print(f"{name:<10} {ours:>14,} {int(counted):>16,} {counted / ours:>10.4f} {target / ours:>12.4f} "
              f"{target / counted:>12.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
