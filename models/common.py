"""Pieces shared by the gated models: the base class, gate application, conv records."""
import torch
from torch import nn

from l0_layers import ChannelGates

from .structure import CostModel, WeightLayer, gated_layers_of


def bn_gate_relu(bn: nn.BatchNorm2d, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    """``relu(z * bn(x))``: batch norm, then the gates, then ReLU.

    In training mode with a plain ``nn.BatchNorm2d`` this runs as one autograd
    function (:class:`_BatchNormGateReLU`) whose backward needs no copy of the
    BN output (it supports no double backward). Eval mode, ``SyncBatchNorm``,
    ``torch.compile`` (whose inductor fuses the plain ops itself), a BN module
    with forward hooks (they see BN's output) and batches too small for batch
    statistics (BN raises its own error) take the plain composition.
    """
    # ReLU in place: BN's backward needs its input, not its output; a hook on
    # BN may keep the output, though. The gates are cast to the feature map's
    # dtype so that under autocast a bf16/fp16 activation stays in its dtype.
    hooked = bool(bn._forward_hooks or bn._forward_pre_hooks)
    if z is None:
        return torch.relu(bn(x)) if hooked else torch.relu_(bn(x))
    if (bn.training and type(bn) is nn.BatchNorm2d and bn.affine and bn.track_running_stats
            and bn.momentum is not None and not hooked and x.dim() == 4 and x.numel() > x.shape[1]
            and not torch.compiler.is_compiling()):
        bn.num_batches_tracked.add_(1)
        return _BatchNormGateReLU.apply(x, z, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                        bn.momentum, bn.eps)
    return torch.relu_(bn(x) * z.to(x.dtype))


def _spatial_dot(a: torch.Tensor, b: torch.Tensor, chunk_elements: int = 1 << 16) -> torch.Tensor:
    """``(a * b).sum((2, 3), keepdim=True)`` of two NCHW tensors, accumulated in at least fp32.

    fp32 keeps the gate gradient under autocast as accurate as the plain
    composition's. On the CPU the product is formed a few examples at a time
    in one small buffer: a fresh activation-sized temporary costs a page
    fault per 4 KiB there, which measured more than the multiply itself.
    """
    dtype = torch.promote_types(a.dtype, torch.float32)
    if a.device.type != "cpu":
        return (a * b).sum((2, 3), keepdim=True, dtype=dtype)
    per_chunk = max(1, chunk_elements // a[0].numel())
    dot = a.new_empty((a.shape[0], a.shape[1], 1, 1), dtype=dtype)
    buffer = torch.empty_like(a[:per_chunk])
    for a_part, b_part, dot_part in zip(a.split(per_chunk), b.split(per_chunk), dot.split(per_chunk)):
        product = torch.mul(a_part, b_part, out=buffer[:len(a_part)])
        torch.sum(product, (2, 3), keepdim=True, dtype=dtype, out=dot_part)
    return dot


class _BatchNormGateReLU(torch.autograd.Function):
    r"""Training-mode BN -> gate -> ReLU with a lean backward.

    Forward: :math:`b = \mathrm{BN}(x)` with batch statistics (the same kernel
    and running-statistics update as ``nn.BatchNorm2d``), then
    :math:`y = \max(0, z\,b)` in place in ``b``'s buffer.

    Backward from :math:`g = \partial L/\partial y`. Let
    :math:`m = g\,[y > 0]`. Because :math:`z \ge 0`, :math:`y = z\max(0, b)`,
    so wherever :math:`m \ne 0` we have :math:`b = y / z`, and

    .. math::
        \frac{\partial L}{\partial z_{nc}} = \sum_{hw} m\,b
            = \frac{1}{z_{nc}} \sum_{hw} m\,y \quad (0 \text{ where } z_{nc} = 0),
        \qquad
        \frac{\partial L}{\partial b} = z\,m,

    and :math:`\partial L/\partial b` goes through BN's own backward. Only
    :math:`x` (which BN's backward needs anyway) and :math:`y` (which the ReLU's
    would) are kept: the plain composition also keeps :math:`b`, and its
    multiply's backward writes the product :math:`g\,b` before summing it.
    The gradients of :math:`x`, BN's weight and bias are bit-identical to the
    plain composition's on the CPU (tested); the gate gradient agrees to
    rounding.
    """

    @staticmethod
    def forward(ctx, x, z, weight, bias, running_mean, running_var, momentum, eps):
        b, save_mean, save_invstd, reserve = torch.ops.aten._batch_norm_with_update(
            x, weight, bias, running_mean, running_var, momentum, eps)
        gate = z.to(b.dtype)
        y = b.mul_(gate).relu_()
        ctx.save_for_backward(x, gate, y, weight, save_mean, save_invstd, reserve)
        ctx.eps = eps
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, gate, y, weight, save_mean, save_invstd, reserve = ctx.saved_tensors
        if reserve.numel():
            # cuDNN may overwrite its workspace; autograd's own BN backward clones it
            # when the graph is retained, and we cannot tell whether it is.
            reserve = reserve.clone()
        masked = torch.ops.aten.threshold_backward(grad_y, y, 0)
        grad_z = None
        if ctx.needs_input_grad[1]:
            dot = _spatial_dot(masked, y)
            # autograd sums this over broadcast dimensions and casts it to z's dtype
            grad_z = torch.where(gate > 0, dot / gate, 0.0)
        grad_x, grad_weight, grad_bias = torch.ops.aten.batch_norm_backward(
            masked.mul_(gate), x, weight, None, None, save_mean, save_invstd, True, ctx.eps,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]], reserve)
        return grad_x, grad_z, grad_weight, grad_bias, None, None, None, None


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
