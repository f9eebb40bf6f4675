"""The one description of a gated network that everything else reads.

Each model records, while it builds itself, a :class:`WeightLayer` for every
conv and linear layer (what feeds its input channels, what gates its output
channels, its kernel and output size) and derives from those a
:class:`GatedLayer` per gate. The penalty, MACs/params accounting, logging and
export use only these records, never module names found by searching.

Cost convention (the one papers quote): MACs count conv and linear
multiply-accumulates only (no BN, ReLU, pooling, bias adds); params count
every parameter of the deployable network (conv, linear, BN affine), never
gate parameters. A gated channel with a test gate of 0 is absent from the
layer that produces it and from every layer that reads it.
"""
from dataclasses import dataclass

import torch
from torch import nn

from . import CONVENTIONS


@dataclass(frozen=True)
class WeightLayer:
    """A conv or linear layer as cost accounting and export see it."""

    name: str                    # module path of the conv / linear
    in_channels: int             # dense widths
    out_channels: int
    kernel: int                  # square kernel side (1 for linear)
    out_hw: int                  # output positions H*W (1 for linear)
    in_gate: int | None = None   # gated layer whose open channels are this layer's inputs
    out_gate: int | None = None  # gated layer that gates this layer's outputs
    bias: bool = False
    bn: str | None = None        # module path of the BatchNorm on its output
    # Closing every output channel leaves the network connected: a residual block's
    # inner conv, whose block then passes its shortcut on (only meaningful when gated).
    closable: bool = False
    # What the layer is in the network: the first conv ("stem"), a 1x1 projection shortcut
    # ("shortcut"), the classifier ("classifier") or any other conv ("body"). Unstructured
    # sparse training (pruning/sparse.py) chooses its sparse tensors by it.
    role: str = "body"


@dataclass(frozen=True)
class GatedLayer:
    """One gated layer: the channels of ``conv``'s output, after ``bn``."""

    name: str                    # the producing conv's module path; used in logs
    width: int
    conv: str
    bn: str
    kernel: int                  # the producing conv's kernel side
    in_channels: int             # the producing conv's dense input width
    consumers: tuple[str, ...]   # layers that lose an input channel when a gate closes
    closable: bool = False       # may close fully (a residual block's inner layer); else closing it cuts the network


@dataclass(frozen=True)
class OpRecord:
    """An operation that multiplies no weight but that thop counts (``--cost-convention thop``): a
    pooling module, ``ops`` per output element, over ``channels`` channels (those of gated layer
    ``gate`` when it is gated) at ``out_hw`` output positions. BatchNorm needs no record: thop's
    2 per element is read off the weight layer that carries it (``WeightLayer.bn``)."""

    name: str
    channels: int
    out_hw: int
    ops: float
    gate: int | None = None


def gated_layers_of(weight_layers) -> tuple[GatedLayer, ...]:
    """Derive the gate records from the weight-layer records."""
    producers = sorted((w for w in weight_layers if w.out_gate is not None), key=lambda w: w.out_gate)
    assert [w.out_gate for w in producers] == list(range(len(producers))), "one producer per gate"
    return tuple(
        GatedLayer(name=w.name, width=w.out_channels, conv=w.name, bn=w.bn, kernel=w.kernel,
                   in_channels=w.in_channels,
                   consumers=tuple(c.name for c in weight_layers if c.in_gate == w.out_gate), closable=w.closable)
        for w in producers)


class CostModel(nn.Module):
    """MACs and parameter count of the network as a function of gated widths.

    ``widths`` is a ``(num_gates,)`` tensor, or a batch ``(..., num_gates)``:
    kept channel counts for the deterministic pruned cost, expected open
    counts S for the expected cost (the gates of different layers are
    independent, so E[in * out] = E[in] * E[out] and the result is the exact
    expectation). All layers are evaluated in one vectorised expression.
    """

    def __init__(self, weight_layers, num_gates: int, ops=()):
        super().__init__()
        # Which MACs dense() and pruned() report: "conv" (conv + linear multiply-accumulates, the
        # papers' count) or "thop" (what thop.profile counts: those, plus 4 per BatchNorm output element (thop 0.1.1: 2, doubled for an affine BN) and
        # the pooling modules' ops; HSIC-Lasso's --target). The budget always uses "conv".
        self.convention = "conv"
        # An ungated side reads index num_gates, a constant 1, times its dense width.
        def index(gate):
            return num_gates if gate is None else gate

        def constant(gate, channels):
            return channels if gate is None else 1

        as_tensor = lambda values, dtype=torch.float64: torch.tensor(values, dtype=dtype)  # noqa: E731
        self.register_buffer("in_index", as_tensor([index(w.in_gate) for w in weight_layers], torch.long), persistent=False)
        self.register_buffer("out_index", as_tensor([index(w.out_gate) for w in weight_layers], torch.long), persistent=False)
        self.register_buffer("in_const", as_tensor([constant(w.in_gate, w.in_channels) for w in weight_layers]), persistent=False)
        self.register_buffer("out_const", as_tensor([constant(w.out_gate, w.out_channels) for w in weight_layers]), persistent=False)
        self.register_buffer("kernel_area", as_tensor([w.kernel ** 2 for w in weight_layers]), persistent=False)
        self.register_buffer("out_hw", as_tensor([w.out_hw for w in weight_layers]), persistent=False)
        self.register_buffer("per_out", as_tensor([int(w.bias) + 2 * int(w.bn is not None) for w in weight_layers]), persistent=False)
        self.register_buffer("dense_widths", as_tensor([0.0] * num_gates), persistent=False)
        # thop's extra terms: per weight layer 4 per output element of its (affine) BN; per op record its ops.
        self.register_buffer("bn_ops", as_tensor([4.0 * (w.bn is not None) for w in weight_layers]), persistent=False)
        self.register_buffer("op_index", as_tensor([index(o.gate) for o in ops], torch.long), persistent=False)
        self.register_buffer("op_const", as_tensor([constant(o.gate, o.channels) for o in ops]), persistent=False)
        self.register_buffer("op_scale", as_tensor([o.ops * o.out_hw for o in ops]), persistent=False)
        for w in weight_layers:
            if w.out_gate is not None:
                self.dense_widths[w.out_gate] = w.out_channels

    def _in_out(self, widths: torch.Tensor):
        ext = torch.cat([widths, widths.new_ones(*widths.shape[:-1], 1)], dim=-1)
        dtype = widths.dtype
        return ext[..., self.in_index] * self.in_const.to(dtype), ext[..., self.out_index] * self.out_const.to(dtype)

    def macs(self, widths: torch.Tensor) -> torch.Tensor:
        """MACs with these widths; ``(..., num_gates) -> (...)``."""
        c_in, c_out = self._in_out(widths)
        return (self.kernel_area.to(widths.dtype) * self.out_hw.to(widths.dtype) * c_in * c_out).sum(-1)

    def thop_macs(self, widths: torch.Tensor) -> torch.Tensor:
        """What thop counts with these widths: the MACs, 4 per (affine) BN output element, the pooling
        modules' ops; ``(..., num_gates) -> (...)``."""
        _, c_out = self._in_out(widths)
        dtype = widths.dtype
        ext = torch.cat([widths, widths.new_ones(*widths.shape[:-1], 1)], dim=-1)
        extra = (self.bn_ops.to(dtype) * self.out_hw.to(dtype) * c_out).sum(-1)
        pools = (ext[..., self.op_index] * self.op_const.to(dtype) * self.op_scale.to(dtype)).sum(-1)
        return self.macs(widths) + extra + pools

    def _reported(self, widths: torch.Tensor, convention: str | None) -> int:
        convention = convention or self.convention
        if convention not in CONVENTIONS:
            raise ValueError(f"unknown cost convention {convention!r}")
        return int(round(float(self.macs(widths) if convention == "conv" else self.thop_macs(widths))))

    def params(self, widths: torch.Tensor) -> torch.Tensor:
        """Parameters with these widths; ``(..., num_gates) -> (...)``."""
        c_in, c_out = self._in_out(widths)
        return (self.kernel_area.to(widths.dtype) * c_in * c_out + self.per_out.to(widths.dtype) * c_out).sum(-1)

    def sparse(self, weights: torch.Tensor) -> tuple[int, int]:
        """(MACs, params) at full widths when layer l holds only ``weights[l]`` of its weights
        (``(num_weight_layers,)``, in the order of the weight-layer records): every weight present
        costs one MAC per output position and one parameter; biases and BN stay dense. With every
        layer's full count this is :meth:`dense`."""
        weights = weights.to(self.out_hw)
        _, c_out = self._in_out(self.dense_widths)
        return (int((weights * self.out_hw).sum()),
                int((weights + self.per_out * c_out).sum()))

    def weights_per_layer(self) -> torch.Tensor:
        """Each layer's number of weights at full widths, ``(num_weight_layers,)`` float64."""
        c_in, c_out = self._in_out(self.dense_widths)
        return self.kernel_area * c_in * c_out

    def dense(self, convention: str | None = None) -> tuple[int, int]:
        """(MACs, params) of the unpruned network, exact integers; MACs in ``convention`` (default:
        :attr:`convention`)."""
        return self._reported(self.dense_widths, convention), int(self.params(self.dense_widths))

    def pruned(self, kept: torch.Tensor, convention: str | None = None) -> tuple[int, int]:
        """(MACs, params) with ``kept`` channels per gated layer, exact integers; MACs in
        ``convention`` (default: :attr:`convention`).

        A layer whose gates are all closed still counts one channel: the
        exported network keeps one exactly-zero channel there so that it
        remains a valid chain of layers (see ``models/export.py``).
        """
        kept = kept.to(self.dense_widths).clamp(min=1)
        return self._reported(kept, convention), int(self.params(kept))
