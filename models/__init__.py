"""Gated VGG16, ResNet56 and ResNet50 and the structure records they expose.

``build_model(arch)`` rebuilds any of them from the ``arch`` dict a model
carries (and a checkpoint stores).
"""
from utils.errors import UsageError

from .common import GatedNetwork
from .resnet_cifar import CifarResNet, resnet56
from .resnet_imagenet import ImageNetResNet, resnet50
from .structure import CostModel, GatedLayer, WeightLayer
from .vgg import VGG, VGG16_CFG, vgg16

MODEL_CLASSES = {"vgg16": VGG, "resnet56": CifarResNet, "resnet50": ImageNetResNet}


def build_model(arch: dict) -> GatedNetwork:
    """Build a model from its ``arch`` dict (``model`` names the family)."""
    arch = dict(arch)
    name = arch["model"]
    cls = MODEL_CLASSES[name]
    if cls is VGG:
        arch.pop("model")
    return cls(**arch)


def load_model_state(model: GatedNetwork, checkpoint: dict, source="the checkpoint") -> None:
    """Load a training checkpoint's ``model`` state; frozen gates (fine-tuning) are frozen first.

    Checkpoints written before the frozen gates were stored (no ``gates.frozen_gates``) froze
    them at the test gates of their logits, which freezing after loading reproduces. Weights
    that do not fit the model are a one-line ``UsageError`` naming ``source``.
    """
    frozen = checkpoint.get("gates_frozen")
    stored = "gates.frozen_gates" in checkpoint["model"]
    if frozen and stored:
        model.gates.freeze()
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise UsageError(f"{source}: its weights do not fit its own arch ({str(e).splitlines()[0][:120]})") from e
    if frozen and not stored:
        model.gates.freeze()


def default_arch(model: str, num_classes: int, width_mult: float = 1.0, **gate_args) -> dict:
    """The ``arch`` of the paper's VGG16 / ResNet56 / ResNet50, every width times ``width_mult``."""
    def scale(widths):
        return tuple(w if w == "M" else max(1, round(w * width_mult)) for w in widths)

    if model == "vgg16":
        structure = dict(cfg=scale(VGG16_CFG))
    elif model == "resnet56":
        structure = dict(blocks_per_stage=9, widths=scale((16, 32, 64)))
    elif model == "resnet50":
        widths = scale((64, 128, 256, 512))
        structure = dict(blocks=(3, 4, 6, 3), widths=widths, stem_width=widths[0])
    else:
        raise ValueError(f"unknown model {model!r}; expected one of {sorted(MODEL_CLASSES)}")
    return dict(model=model, num_classes=num_classes, **structure, **gate_args)


from .export import export_pruned, load_pruned, save_pruned  # noqa: E402  (export uses build_model)

__all__ = ["GatedNetwork", "CifarResNet", "ImageNetResNet", "VGG", "CostModel", "GatedLayer", "WeightLayer",
           "build_model", "default_arch", "load_model_state", "resnet56", "resnet50", "vgg16", "export_pruned", "load_pruned", "save_pruned"]
