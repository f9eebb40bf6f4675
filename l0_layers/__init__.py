"""Hard-concrete channel gates (hard_concrete.py) and the two sources of their logits, L0-HC and
Dep-L0 (gates.py).

The package itself holds only what the command lines offer, so that they import no torch: the
sources of gate logits (``--net``) and the default temperature (``--temp``).
"""

# The sources of the gate logits (--net): free per channel (L0-HC), the dependency MLP (Dep-L0), none.
NETS = ("hc", "dep", "dense")
# The hard-concrete temperature beta (Louizos et al.'s 2/3).
DEFAULT_TEMPERATURE = 2.0 / 3.0
