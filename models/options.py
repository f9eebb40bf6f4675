"""The networks' own command-line options, declared without torch.

A network with options of its own registers the function here that adds its flags
(``models/__init__.py``); the flags' ``dest`` names are the keyword options of its class's
``default_arch``. The training scripts add every network's flags to ``--help`` and refuse another
network's, all before anything imports torch.
"""
import argparse

# WRN-d-k (models/wrn.py): DSR's WRN-28-2 unless --layers / --widen-factor say otherwise.
WRN_DEPTH = 28
WRN_WIDEN_FACTOR = 2


def blocks_per_group(layers: int) -> int:
    """A WRN's blocks per group, n = (d - 4) / 6; a ValueError for a depth that is not 6n + 4."""
    if layers < 10 or (layers - 4) % 6:
        raise ValueError(f"a WRN's depth is 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {layers}")
    return (layers - 4) // 6


def _depth_type(text):
    try:
        value = int(text)
        blocks_per_group(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err) if "6n" in str(err) else f"expected an int, got {text!r}") from None
    return value


def _factor_type(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def wrn_options(group) -> None:
    group.add_argument("--layers", type=_depth_type, default=WRN_DEPTH, metavar="D",
                       help="WRN depth d = 6n + 4 (DSR's --layers)")
    group.add_argument("--widen-factor", dest="widen_factor", type=_factor_type, default=WRN_WIDEN_FACTOR,
                       metavar="K", help="WRN widen factor k (DSR's --widen-factor; its runs use 2)")


def lenet_options(group) -> None:
    group.add_argument("--no-batch-norm", dest="batch_norm", action="store_false",
                       help="LeNet-300-100 without BatchNorm, with biases (DSR's --no-batch-norm)")
