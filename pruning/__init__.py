"""Pruning methods: one small class each behind :class:`PruningMethod`, the interface the engine calls.

Between the models (below) and the engine (above): a method reads the models'
gated-layer records and gates, and the engine reads only the interface.
"""
from .registry import METHODS, MethodSpec, register

# The method modules: each registers its methods when imported (adding a method: one line here).
from . import method, l0, sparse, l1, greg, hsic, imp  # noqa: E402,F401
from .greg import GReg  # noqa: E402
from .l0 import L0Method  # noqa: E402
from .method import PruningMethod  # noqa: E402
from .sparse import SparseMethod, sparse_method  # noqa: E402

__all__ = ["GReg", "L0Method", "METHODS", "MethodSpec", "PruningMethod", "SparseMethod", "register", "sparse_method"]
