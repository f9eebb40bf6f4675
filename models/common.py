"""Pieces shared by the gated models: the base class, gate application, conv records."""
import torch
from torch import nn

from l0_layers import ChannelGates

from .structure import CostModel, WeightLayer, gated_layers_of


def gated_relu(x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    """BN output -> gate -> ReLU (``z=None``: a dense network, plain ReLU).

    The gates are cast to the feature map's dtype so that under autocast a
    bf16/fp16 activation stays in its dtype instead of being promoted. The
    ReLU runs in place on the product (the multiply's backward needs only its
    inputs), saving one activation-sized allocation per gated layer. (A fused
    autograd function keeping only the output was measured slower on CPU.)
    """
    return torch.relu(x) if z is None else torch.relu_(x * z.to(x.dtype))


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class LayerRecorder:
    """Creates conv/linear layers while tracking spatial size and recording
    each as a :class:`WeightLayer`, so the structure is written down once,
    where the module is made."""

    def __init__(self, input_size: int):
        self.size = input_size
        self.records: list[WeightLayer] = []

    def conv(self, name, c_in, c_out, kernel, stride=1, padding=0, *, bias=False, in_gate=None, out_gate=None,
             bn=None, input_size=None):
        size = conv_out(self.size if input_size is None else input_size, kernel, stride, padding)
        self.records.append(WeightLayer(name, c_in, c_out, kernel, size * size, in_gate, out_gate, bias, bn))
        return nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=bias), size

    def linear(self, name, c_in, c_out, *, in_gate=None):
        self.records.append(WeightLayer(name, c_in, c_out, 1, 1, in_gate, None, True, None))
        return nn.Linear(c_in, c_out)


class GatedNetwork(nn.Module):
    """Base class of the gated models: one interface to gates and structure.

    Subclasses build their layers with a :class:`LayerRecorder` and then call
    :meth:`_finish`. After that the model exposes

    - ``gates``: the :class:`~l0_layers.ChannelGates` of all gated layers;
    - ``weight_layers`` / ``gated_layers``: the structure records;
    - ``cost``: the :class:`~models.structure.CostModel`;
    - ``arch``: the keyword arguments that rebuild it (:func:`models.build_model`);
    - ``paper_penalty``: which form of the reference's penalty applies
      (``"chain"`` for the CIFAR models, ``"static_input"`` for ResNet50).

    ``forward(x, log_alpha=None)`` takes optional precomputed gate logits
    (``gates.log_alpha()``), so that a training step that also needs them for
    the penalty computes them once.
    """

    paper_penalty = "chain"
    dep_input_dim: int | None = None

    def _finish(self, arch: dict, records, widths, net, back_dep, temperature):
        self.arch = dict(arch)
        self.weight_layers = tuple(records)
        self.gated_layers = gated_layers_of(self.weight_layers)
        assert tuple(g.width for g in self.gated_layers) == tuple(widths)
        self.gates = ChannelGates(widths, net, back_dep, temperature, self.dep_input_dim)
        self.cost = CostModel(self.weight_layers, len(widths))

    def gate_parameters(self):
        return list(self.gates.parameters())

    def weight_parameters(self):
        gate_ids = {id(p) for p in self.gates.parameters()}
        return [p for p in self.parameters() if id(p) not in gate_ids]
