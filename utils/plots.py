"""The kept-vs-original channels figure, for TensorBoard and for ``summarize.py``.

One bar pair per gated layer, in network order: the layer's original width
(light) and the channels whose test gate is non-zero (dark), the figure
pruning papers show to say *where* a method removes channels. It is drawn
from the ``channels`` list of ``results.json`` (``[{name, kept, total}]``) so
a finished run can be plotted without its checkpoint.

Matplotlib is used through its object API with the Agg canvas only (no
``pyplot``): nothing global changes for a program that imports this module,
no GUI backend is ever touched, and a figure is freed as soon as it goes out
of scope, which keeps the per-epoch TensorBoard image cheap. Matplotlib and numpy are imported where
a figure is drawn: the titles and labels here are read by every script's results, with or without a
figure, and by ``summarize.py --help``.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

ORIGINAL_COLOUR = "#c8d3e0"
KEPT_COLOUR = "#1f5fa8"


def channels_figure(channels, title: str = "") -> Figure:
    """A matplotlib Figure of kept vs original channels per gated layer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    import numpy as np
    from matplotlib.figure import Figure
    names = [c["name"] for c in channels]
    total = np.array([c["total"] for c in channels], dtype=float)
    kept = np.array([c["kept"] for c in channels], dtype=float)
    n = len(names)
    fig = Figure(figsize=(max(6.0, 0.28 * n + 2.0), 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(n)
    ax.bar(x, total, width=0.8, color=ORIGINAL_COLOUR, label="original")
    ax.bar(x, kept, width=0.55, color=KEPT_COLOUR, label="kept")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylabel("channels")
    ax.set_xlabel("gated layer")
    share = 100.0 * kept.sum() / max(total.sum(), 1.0)
    ax.set_title(f"{title}  ({int(kept.sum())}/{int(total.sum())} channels kept, {share:.1f}%)".strip(),
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a figure to an ``(H, W, 3)`` uint8 RGB array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    import numpy as np
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def channels_image(channels, title: str = "") -> np.ndarray:
    """The channels figure as an ``(H, W, 3)`` uint8 array (TensorBoard's ``add_image``, HWC)."""
    return figure_to_array(channels_figure(channels, title))


def save_channels_png(channels, path, title: str = "") -> Path:
    """Write the channels figure as a PNG; returns the path."""
    path = Path(path)
    channels_figure(channels, title).savefig(path, format="png")
    return path


DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "imagenet": "ImageNet", "folder": "folder"}


def synthetic_run(run_dir, results: dict) -> bool:
    """Whether a run trained on synthetic data (``--dummy``): results.json's ``dummy`` where it has
    one, else the scripts' run name (``vgg16_dummy-cifar10_...``), else the arguments its checkpoint
    (``last.pt``) was saved with; False where none of them says so."""
    if "dummy" in results:
        return bool(results["dummy"])
    name = Path(run_dir).name
    if name.startswith("dummy-") or "_dummy-" in name:
        return True
    checkpoint = Path(run_dir) / "last.pt"
    if not checkpoint.is_file():
        return False
    try:
        import torch  # only here: the tables and plots need no torch otherwise
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        return bool(state.get("args", {}).get("dummy", False))
    except Exception:  # an unreadable checkpoint says nothing about the data  # noqa: BLE001
        return False


def dataset_label(results: dict, synthetic: bool | None = None) -> str:
    """The dataset as a table or a figure names it: ``CIFAR-10``, or ``synthetic (CIFAR-10 shape)`` for
    a ``--dummy`` run (``synthetic``, default results' ``dummy``), whose accuracy measures nothing."""
    name = DATASET_NAMES.get(results.get("dataset"), str(results.get("dataset", "?")))
    synthetic = results.get("dummy", False) if synthetic is None else synthetic
    return f"synthetic ({name} shape)" if synthetic else name


# results.json's "method" as papers name it (every run since the pruning-method interface; older
# runs have only "net").
METHOD_NAMES = {"l0-hc": "L0-HC", "dep-l0": "Dep-L0", "dense": "dense", "l1": "L1", "greg1": "GReg-1",
                "greg2": "GReg-2", "hsic": "HSIC-Lasso", "dsr": "DSR", "set": "SET", "deepr": "DeepR",
                "static": "static sparse", "tied": "tied (HashedNet)", "imp": "IMP"}


def run_title(results: dict) -> str:
    """A short figure title from a results dict: model, dataset (``synthetic (...)`` where
    ``results['dummy']``), method, and what set the pruning level: lambda, or the budget target
    that replaced it (``macs≤0.5``)."""
    net = results.get("net", "")
    method = {"hc": "L0-HC", "dep": "Dep-L0", "dense": "dense"}.get(net, net)
    key = results.get("method")
    peer = None if key in ("l0-hc", "dep-l0", "dense") else METHOD_NAMES.get(key)
    if net == "dep":
        method += " (backward)" if results.get("back_dep") else " (forward)"
    level = ""
    if peer:
        method = peer
        if results.get("density") is not None:
            level = f", density {results['density']:g}"
        elif results.get("stage_pr"):
            level = f", pr {results['stage_pr']}"
        elif results.get("target_macs"):
            level = f", macs≈{results['target_macs']:g}"
    elif results.get("budget"):
        level = f", {results['budget']['kind']}≤{results['budget']['target']:g}"
    elif net != "dense" and "lamba" in results:
        level = f", lambda {results['lamba']:g}"
    return f"{results.get('model', '')} {dataset_label(results)} {method}{level}"
