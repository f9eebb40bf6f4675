r"""The L0 penalty R added to the cross-entropy (``--reg``).

``paper`` (default) reproduces the reference's R, for which the published
lambdas were tuned; S_l is layer l's expected open count (sum of P(z != 0)),
k_l its conv's kernel side:

- chain form (CIFAR models): :math:`R = \lambda \sum_l k_l^2 S_{l-1} S_l`
  over gated layers in order, :math:`S_0 = 3`; gradient flows into both S.
  For VGG this is the expected conv parameter count; for ResNet56 a proxy.
- static-input form (ResNet50): :math:`R = \lambda \sum_l C_{in,l} k_l^4 S_l`
  with the producing conv's dense input width (k^2 counted twice, as in the
  reference, because lambda = 5e-9 was tuned with it).

``macs`` / ``params``: :math:`R = \lambda\,E[\text{MACs}]` or
:math:`\lambda\,E[\text{params}]` of the gated network, exact given the
structure (real input widths, true residual widths, spatial sizes); lambda
is then a price per MAC or per parameter.

No 1/N scaling and no L2 term: weight decay belongs to the optimiser.
"""
import torch
from torch import nn

from models.structure import CostModel

from .specs import REGS


class L0Penalty(nn.Module):
    """Computes R from a model's gates and structure records, in one pass."""

    def __init__(self, model, reg: str = "paper"):
        super().__init__()
        if reg not in REGS:
            raise ValueError(f"reg must be one of {REGS}, got {reg!r}")
        self.reg = reg
        self.form = model.paper_penalty
        layers = model.gated_layers
        kernel = torch.tensor([float(g.kernel) for g in layers])
        in_channels = torch.tensor([float(g.in_channels) for g in layers])
        coeff = kernel ** 2 if self.form == "chain" else in_channels * kernel ** 4
        self.register_buffer("coeff", coeff, persistent=False)
        # The penalty owns no parameters: it reads the gates through a bound
        # method (not a submodule) and prices widths with its own copy of the
        # cost records (buffers only).
        self.expected_open = model.gates.expected_open
        self.cost = CostModel(model.weight_layers, model.gates.num_layers)

    def forward(self, lamba: float, expected_open: torch.Tensor | None = None) -> torch.Tensor:
        s = self.expected_open() if expected_open is None else expected_open
        if self.reg == "macs":
            return lamba * self.cost.macs(s)
        if self.reg == "params":
            return lamba * self.cost.params(s)
        if self.form == "chain":
            previous = torch.cat([s.new_full((1,), 3.0), s[:-1]])
            return lamba * (self.coeff * previous * s).sum()
        return lamba * (self.coeff * s).sum()
