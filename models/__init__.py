"""Gated VGG16, ResNet56 and ResNet50 and the structure records they expose.

``build_model(arch)`` rebuilds any of them from the ``arch`` dict a model
carries (and a checkpoint stores).
"""
from .common import GatedNetwork
from .resnet_cifar import CifarResNet, resnet56
from .resnet_imagenet import ImageNetResNet, resnet50
from .structure import CostModel, GatedLayer, WeightLayer
from .vgg import VGG, vgg16

MODEL_CLASSES = {"vgg16": VGG, "resnet56": CifarResNet, "resnet50": ImageNetResNet}


def build_model(arch: dict) -> GatedNetwork:
    """Build a model from its ``arch`` dict (``model`` names the family)."""
    arch = dict(arch)
    name = arch["model"]
    cls = MODEL_CLASSES[name]
    if cls is VGG:
        arch.pop("model")
    return cls(**arch)


from .export import export_pruned, load_pruned, save_pruned  # noqa: E402  (export uses build_model)

__all__ = ["GatedNetwork", "CifarResNet", "ImageNetResNet", "VGG", "CostModel", "GatedLayer", "WeightLayer",
           "build_model", "resnet56", "resnet50", "vgg16", "export_pruned", "load_pruned", "save_pruned"]
