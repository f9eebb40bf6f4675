"""Pruning methods: one small class each behind :class:`PruningMethod`, the interface the engine calls.

Between the models (below) and the engine (above): a method reads the models'
gated-layer records and gates, and the engine reads only the interface.
"""
from .greg import GReg
from .l0 import L0Method
from .method import PruningMethod
from .sparse import SparseMethod, sparse_method

__all__ = ["GReg", "L0Method", "PruningMethod", "SparseMethod", "sparse_method"]
