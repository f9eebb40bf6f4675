"""Gated VGG16, ResNet56, ResNet50, WRN-d-k, LeNet-300-100 and the authors' networks, and the
structure records they expose.

``build_model(arch)`` rebuilds any of them from the ``arch`` dict a model
carries (and a checkpoint stores).

The model registry (:data:`NETWORKS`) holds each network's declaration, a :class:`Network`: its
name, its class (imported when a model of it is first built), the images it takes and its own
command-line options. The command lines read only the declarations, so that ``--help`` and a
mistaken flag never import torch; nor does this package: its classes and functions
(``from models import VGG, load_pruned``) are imported from their modules on first use.
"""
import argparse
import importlib
import inspect
from dataclasses import dataclass
from typing import Callable

from utils.errors import UsageError, brief

from .options import lenet_options, wrn_options

# How MACs are counted (--cost-convention): conv + linear multiply-accumulates (the papers'), or
# what thop counts (BN and pooling modules too; models/structure.py's CostModel).
CONVENTIONS = ("conv", "thop")


def no_options(group) -> None:
    """A network without command-line options of its own."""


@dataclass(frozen=True)
class Network:
    """A registered network as the command lines see it, declared without importing torch."""

    name: str
    # Its GatedNetwork subclass: "module:Class" in models/, imported when first built (or the class).
    implementation: str | type
    # The images it takes: "cifar" (3x32x32), "mnist" (1x28x28) or "imagenet" (3x224x224).
    data_kind: str = "cifar"
    # Adds its own flags to an argparse parser or group (models/options.py), each with its default;
    # their dest names are the keyword options of its class's default_arch.
    add_arguments: Callable = no_options

    def model_class(self) -> type:
        if isinstance(self.implementation, type):
            return self.implementation
        module, _, name = self.implementation.partition(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)

    def option_names(self) -> tuple[str, ...]:
        """The ``dest`` names of the flags :attr:`add_arguments` adds."""
        parser = argparse.ArgumentParser(add_help=False)
        self.add_arguments(parser.add_argument_group())
        return tuple(action.dest for action in parser._actions)

    def options_from(self, args) -> dict:
        """The network's options read from parsed arguments (a namespace with the flags of
        :attr:`add_arguments`): ``{dest: value}`` for the ``default_arch`` call."""
        return {name: getattr(args, name) for name in self.option_names() if hasattr(args, name)}


# The model registry: a network's name -> its declaration. A new network is one module (a
# GatedNetwork subclass declaring its structure, stages and export rule) and one line here.
NETWORKS: dict[str, Network] = {}


def register_model(name: str, implementation: str | type, data_kind: str = "cifar",
                   add_arguments: Callable = no_options) -> Network:
    network = Network(name, implementation, data_kind, add_arguments)
    if NETWORKS.get(name, network) != network:
        raise ValueError(f"two models are called {name!r}")
    NETWORKS[name] = network
    return network


register_model("vgg16", "vgg:VGG")
register_model("resnet56", "resnet_cifar:CifarResNet")
register_model("resnet50", "resnet_imagenet:ImageNetResNet", data_kind="imagenet")
register_model("wrn", "wrn:WideResNet", add_arguments=wrn_options)
register_model("lenet300_100", "lenet:LeNet300100", data_kind="mnist", add_arguments=lenet_options)
register_model("resnet20a", "resnet_cifar_a:ResNet20A")
register_model("resnet32a", "resnet_cifar_a:ResNet32A")
register_model("resnet56a", "resnet_cifar_a:ResNet56A")
register_model("resnet110a", "resnet_cifar_a:ResNet110A")
register_model("vgg16_apib", "vgg_apib:VGGApib")
register_model("googlenet", "googlenet:GoogLeNet")


def build_model(arch: dict):
    """Build a model (a :class:`~models.common.GatedNetwork`) from its ``arch`` dict (``model`` names
    the family; a class that takes no ``model`` argument has one family)."""
    arch = dict(arch)
    cls = NETWORKS[arch["model"]].model_class()
    if "model" not in inspect.signature(cls).parameters:
        arch.pop("model")
    return cls(**arch)


def load_model_state(model, checkpoint: dict, source="the checkpoint") -> None:
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

    ``options`` are the network's own options (``NETWORKS[model].options_from(args)``, e.g. WRN's
    ``{'layers': 28, 'widen_factor': 2}``); an option the family does not declare is a ValueError."""
    def scale(widths):
        return tuple(w if w == "M" else max(1, round(w * width_mult)) for w in widths)

    if model not in NETWORKS:
        raise ValueError(f"unknown model {model!r}; expected one of {sorted(NETWORKS)}")
    network = NETWORKS[model]
    options = dict(options or {})
    unknown = sorted(set(options) - set(network.option_names()))
    if unknown:
        known = ", ".join(network.option_names()) or "none"
        raise ValueError(f"{model} has no option {', '.join(map(repr, unknown))} (its options: {known})")
    cls = network.model_class()
    # Without options the family's default_arch is called as before (a family may not take any).
    own = cls.default_arch(num_classes, scale, **options) if options else cls.default_arch(num_classes, scale)
    return dict(model=model, num_classes=num_classes, **own, **gate_args)


# The package's names that live in its modules, imported on first use (PEP 562's module __getattr__).
_FROM_MODULES = {
    "GatedNetwork": "common", "CostModel": "structure", "GatedLayer": "structure", "WeightLayer": "structure",
    "VGG": "vgg", "vgg16": "vgg", "CifarResNet": "resnet_cifar", "resnet56": "resnet_cifar",
    "ImageNetResNet": "resnet_imagenet", "resnet50": "resnet_imagenet", "WideResNet": "wrn",
    "LeNet300100": "lenet", "export_pruned": "export", "load_pruned": "export", "save_pruned": "export",
}


def __getattr__(name: str):
    if name not in _FROM_MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_FROM_MODULES[name]}"), name)


__all__ = ["NETWORKS", "CONVENTIONS", "Network", "register_model", "build_model", "default_arch", "load_model_state",
           *_FROM_MODULES]
