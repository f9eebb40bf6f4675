"""Hard-concrete channel gates and the two sources of their logits (L0-HC and Dep-L0)."""
from . import hard_concrete
from .gates import NETS, ChannelGates, DependencyMLP, FreeLogits

__all__ = ["hard_concrete", "NETS", "ChannelGates", "DependencyMLP", "FreeLogits"]
