"""Pruning methods: one small class each behind :class:`~pruning.method.PruningMethod`, the interface
the engine calls.

Between the models (below) and the engine (above): a method reads the models'
gated-layer records and gates, and the engine reads only the interface.

The package itself imports only the registry and the methods' declarations (``specs.py``, which
registers every method), none of which imports torch: the command lines build their parsers from
them. A method's own module is imported when a run builds or runs it.
"""
from . import specs  # noqa: F401  (registers every method)
from .registry import METHODS, MethodSpec, register

__all__ = ["METHODS", "MethodSpec", "register"]
