"""Gated VGG16, ResNet56, ResNet50, WRN-d-k and LeNet-300-100 and the structure records they expose.

``build_model(arch)`` rebuilds any of them from the ``arch`` dict a model
carries (and a checkpoint stores).
"""
import inspect

from utils.errors import UsageError, brief

from .common import GatedNetwork
from .lenet import LeNet300100
from .googlenet import GoogLeNet
from .resnet_cifar import CifarResNet, resnet56
from .resnet_cifar_a import CifarResNetA, ResNet20A, ResNet32A, ResNet56A, ResNet110A
from .resnet_imagenet import ImageNetResNet, resnet50
from .structure import CostModel, GatedLayer, WeightLayer
from .vgg import VGG, VGG16_CFG, vgg16
from .wrn import WideResNet
from .vgg_apib import VGGApib

# The model registry: a family's name -> its class. A new network is one module (a GatedNetwork
# subclass declaring its structure, stages and export rule) and one line here.
MODEL_CLASSES: dict[str, type] = {}


def register_model(name: str, cls: type) -> type:
    if MODEL_CLASSES.get(name, cls) is not cls:
        raise ValueError(f"two models are called {name!r}")
    MODEL_CLASSES[name] = cls
    return cls


register_model("vgg16", VGG)
register_model("resnet56", CifarResNet)
register_model("resnet50", ImageNetResNet)
register_model("wrn", WideResNet)
register_model("lenet300_100", LeNet300100)
register_model("resnet20a", ResNet20A)
register_model("resnet32a", ResNet32A)
register_model("resnet56a", ResNet56A)
register_model("resnet110a", ResNet110A)
register_model("vgg16_apib", VGGApib)
register_model("googlenet", GoogLeNet)


def build_model(arch: dict) -> GatedNetwork:
    """Build a model from its ``arch`` dict (``model`` names the family; a class that takes no
    ``model`` argument has one family)."""
    arch = dict(arch)
    cls = MODEL_CLASSES[arch["model"]]
    if "model" not in inspect.signature(cls).parameters:
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
        raise UsageError(f"{source}: its weights do not fit its own arch ({brief(str(e))})") from e
    if frozen and not stored:
        model.gates.freeze()


def default_arch(model: str, num_classes: int, width_mult: float = 1.0, options: dict | None = None,
                 **gate_args) -> dict:
    """The ``arch`` of a registered family's paper network, every width times ``width_mult``.

    ``options`` are the network's own options (``cls.options_from(args)``, e.g. WRN's
    ``{'layers': 28, 'widen_factor': 2}``); an option the family does not declare is a ValueError."""
    def scale(widths):
        return tuple(w if w == "M" else max(1, round(w * width_mult)) for w in widths)

    if model not in MODEL_CLASSES:
        raise ValueError(f"unknown model {model!r}; expected one of {sorted(MODEL_CLASSES)}")
    cls = MODEL_CLASSES[model]
    options = dict(options or {})
    unknown = sorted(set(options) - set(cls.option_names()))
    if unknown:
        known = ", ".join(cls.option_names()) or "none"
        raise ValueError(f"{model} has no option {', '.join(map(repr, unknown))} (its options: {known})")
    # Without options the family's default_arch is called as before (a family may not take any).
    own = cls.default_arch(num_classes, scale, **options) if options else cls.default_arch(num_classes, scale)
    return dict(model=model, num_classes=num_classes, **own, **gate_args)


from .export import export_pruned, load_pruned, save_pruned  # noqa: E402  (export uses build_model)

__all__ = ["MODEL_CLASSES", "register_model", "GatedNetwork", "CifarResNet", "ImageNetResNet", "VGG", "CostModel", "GatedLayer", "WeightLayer",
           "build_model", "default_arch", "load_model_state", "resnet56", "resnet50", "vgg16", "WideResNet", "LeNet300100", "export_pruned", "load_pruned", "save_pruned"]
