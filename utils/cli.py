"""Command-line helpers every script shares: a parser whose mistakes are one line, a help
formatter that shows defaults, checked number types, and how counts are printed (:func:`human`).

Nothing here imports torch: every script builds its parser, and answers ``--help`` or a bad flag,
before it imports anything heavy."""
import argparse
import os
import re
import sys


# The datasets the command lines offer (utils/data.py reads them; it imports torchvision).
DATASETS = ("cifar10", "cifar100", "folder", "imagenet", "mnist")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default in --help where there is one to show."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a user mistake is one line on stderr (and exit status 2), and no
    abbreviation of a long flag is accepted: a prefix such as ``-w`` for ``-wd`` or
    ``--mom`` for ``--momentum`` must never land on another flag."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        # A negative number in exponent form (``--lamba -1e-6``) is a value, so its type check can say
        # what is wrong with it; argparse alone takes it for a flag ("expected one argument").
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind, low=None, strict=False):
    """An argparse type: a ``kind`` number not below ``low`` (or above it, if strict)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and (value <= low if strict else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


positive_int = _number(int, 0, strict=True)
nonneg_int = _number(int, 0)
positive_float = _number(float, 0.0, strict=True)
nonneg_float = _number(float, 0.0)


def fraction_type(text):
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a fraction of the dense cost in (0, 1], got {text}")
    return value


def density_type(text):
    value = _number(float)(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (the fraction of each sparse tensor's weights kept), "
                                         f"got {text}")
    return value


def sparsity_type(text):
    value = _number(float)(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (the fraction of each tensor's weights removed), "
                                         f"got {text}")
    return value


def milestone_list(text):
    try:
        return tuple(int(m) for m in text.split(",") if m)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs, got {text!r}") from None


def lr_schedule(text: str) -> dict[int, float]:
    """GReg's ``--lr_ft``: ``{0:0.01,60:0.001,90:0.0001}`` (braces optional): lr from each epoch on."""
    body = text.strip().removeprefix("{").removesuffix("}")
    try:
        schedule = {int(k): float(v) for k, v in (item.split(":") for item in body.split(",") if item.strip())}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected EPOCH:LR,EPOCH:LR,..., got {text!r}") from None
    if 0 not in schedule or any(v <= 0 for v in schedule.values()) or any(k < 0 for k in schedule):
        raise argparse.ArgumentTypeError(f"needs a positive lr from epoch 0 on, got {text!r}")
    return schedule


def human(n: float) -> str:
    """A count (MACs, parameters) as the scripts print it: ``1.23 G``, ``45.60 M``, ``7.00 K``, ``12``."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity (taskset, a container's or SLURM's cpuset), which
    may be fewer than the machine's cores; the machine's count where there is no affinity to read."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def program_name() -> str:
    return sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "train"
