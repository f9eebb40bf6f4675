"""Pieces shared by the gated models: the base class, gate application, conv records."""
import re

import torch
import torch.nn.functional as F
from torch import nn

from l0_layers.gates import ChannelGates

from .structure import CostModel, OpRecord, WeightLayer, gated_layers_of


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


class _BatchNormGateReLU(torch.autograd.Function):
    r"""Training-mode BN -> gate -> ReLU with a lean backward.

    Forward: :math:`b = \gamma\hat x + \beta` with
    :math:`\hat x = (x - \mu)\,\sigma^{-1}` from batch statistics (the same
    kernel and running-statistics update as ``nn.BatchNorm2d``), then
    :math:`y = \max(0, z\,b)` in place in ``b``'s buffer. Only :math:`x`
    (which BN's backward needs anyway) and :math:`y` (which the ReLU's would)
    are kept: the plain composition also keeps :math:`b`.

    Backward from :math:`g = \partial L/\partial y`. Let
    :math:`m = g\,[y > 0]`; then

    .. math::
        \frac{\partial L}{\partial z_{nc}} = \sum_{hw} m\,b,
        \qquad
        \frac{\partial L}{\partial b} = z\,m,

    and :math:`\partial L/\partial b` goes through BN's backward. Two ways to
    compute this, chosen by where the tensors are:

    - CPU, fp32/fp64, NCHW (:func:`_backward_from_sums`): every gradient
      follows from the per-(example, channel) sums :math:`S_{nc} = \sum_{hw} m` and
      :math:`T_{nc} = \sum_{hw} m\,\hat x`, formed in one pass by BN's own
      weight/bias-gradient kernel run over an ``(1, N*C, H, W)`` view:

      .. math::
          \frac{\partial L}{\partial z_{nc}} = \gamma_c T_{nc} + \beta_c S_{nc},\quad
          \frac{\partial L}{\partial \beta_c} = \sum_n z_{nc} S_{nc},\quad
          \frac{\partial L}{\partial \gamma_c} = \sum_n z_{nc} T_{nc},

      .. math::
          \frac{\partial L}{\partial x} = \gamma_c\sigma_c^{-1}\Big(z_{nc}\,m
              - \tfrac{1}{M}\frac{\partial L}{\partial \beta_c}
              - \hat x\,\tfrac{1}{M}\frac{\partial L}{\partial \gamma_c}\Big),
          \quad M = NHW,

      written in place into :math:`m`'s buffer. It moves about as many bytes
      as BN's backward on :math:`z\,m` plus the gate's product and sum, but
      in faster CPU kernels and with no new activation-sized buffer: measured
      on a 2-core CPU, ResNet56's gated step went from 1.07-1.08x to
      0.98-1.03x dense (``bench/RESULTS.md``).
    - Otherwise (CUDA, bf16/fp16, or a layout such as channels-last)
      :func:`_backward_through_bn`: BN's own backward on :math:`z\,m`, and the
      gate gradient from the output, since :math:`z \ge 0` gives
      :math:`b = y / z` wherever :math:`m \ne 0`:
      :math:`\sum_{hw} m\,b = \frac{1}{z_{nc}}\sum_{hw} m\,y` (0 where
      :math:`z_{nc} = 0`). On a GPU BN's backward is one fused cuDNN kernel,
      where the dozen small per-channel ops of the sums would add launches.
      In half precision the in-place affine of the first path would store
      :math:`m\,\gamma_c\sigma_c^{-1}z_{nc} + c_1 x` rounded before the
      constant :math:`c_0 \approx -c_1\mu_c` cancels most of it, losing
      accuracy when :math:`|\mu_c|/\sigma_c` is large.

    Both agree with the plain composition's gradients to rounding (tested).
    """

    @staticmethod
    def forward(ctx, x, z, weight, bias, running_mean, running_var, momentum, eps):
        b, save_mean, save_invstd, reserve = torch.ops.aten._batch_norm_with_update(
            x, weight, bias, running_mean, running_var, momentum, eps)
        gate = z.to(b.dtype)
        y = b.mul_(gate).relu_()
        ctx.save_for_backward(x, gate, y, weight, bias, save_mean, save_invstd, reserve)
        ctx.eps = eps
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, gate, y, weight, bias, save_mean, save_invstd, reserve = ctx.saved_tensors
        masked = torch.ops.aten.threshold_backward(grad_y, y, 0)
        if (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.is_contiguous()
                and masked.is_contiguous()):
            grads = _backward_from_sums(masked, x, gate, weight, bias, save_mean, save_invstd, ctx.needs_input_grad[1])
        else:
            grads = _backward_through_bn(masked, x, gate, y, weight, save_mean, save_invstd, reserve, ctx.eps,
                                         ctx.needs_input_grad)
        return (*grads, None, None, None, None)


def _backward_from_sums(masked, x, gate, weight, bias, mean, invstd, want_z):
    """``(grad_x, grad_z, grad_weight, grad_bias)`` from per-(n, c) sums; ``masked`` becomes ``grad_x``."""
    n, c, h, w = x.shape
    # BN's weight and bias gradients over an (1, N*C, H, W) view, with every
    # example's copy of the channel statistics, are exactly T and S, in one pass.
    per_example = (1, n * c, h, w)
    _, t, s = torch.ops.aten.native_batch_norm_backward(
        masked.view(per_example), x.view(per_example), None, None, None, mean.repeat(n), invstd.repeat(n), True,
        0.0, [False, True, True])
    t, s = t.view(n, c, 1, 1), s.view(n, c, 1, 1)
    z = gate.expand(n, c, 1, 1)
    gamma, beta, mean, invstd = (v.view(1, c, 1, 1) for v in (weight, bias, mean, invstd))
    grad_z = gamma * t + beta * s if want_z else None
    grad_bias = (z * s).sum(0, keepdim=True)
    grad_weight = (z * t).sum(0, keepdim=True)
    scale = gamma * invstd
    count = n * h * w
    x_coef = -scale * invstd * grad_weight / count
    constant = -scale * grad_bias / count - x_coef * mean
    grad_x = masked.mul_(scale * z).addcmul_(x, x_coef).add_(constant)
    return grad_x, grad_z, grad_weight.view(c), grad_bias.view(c)


def _backward_through_bn(masked, x, gate, y, weight, mean, invstd, reserve, eps, needs_input_grad):
    """``(grad_x, grad_z, grad_weight, grad_bias)`` through BN's own backward kernel; ``needs_input_grad``
    is the function's, whose inputs are ``(x, z, weight, bias, ...)``."""
    if reserve.numel():
        # cuDNN may overwrite its workspace; autograd's own BN backward clones it
        # when the graph is retained, and we cannot tell whether it is.
        reserve = reserve.clone()
    grad_z = None
    if needs_input_grad[1]:
        # Summed in at least fp32, which keeps it under autocast as accurate as the plain
        # composition's; autograd sums it over broadcast dimensions and casts it to z's dtype.
        dot = (masked * y).sum((2, 3), keepdim=True, dtype=torch.promote_types(masked.dtype, torch.float32))
        grad_z = torch.where(gate > 0, dot / gate, 0.0)
    grad_x, grad_weight, grad_bias = torch.ops.aten.batch_norm_backward(
        masked.mul_(gate), x, weight, None, None, mean, invstd, True, eps,
        [needs_input_grad[0], needs_input_grad[2], needs_input_grad[3]], reserve)
    return grad_x, grad_z, grad_weight, grad_bias


def max_pool_3x3(x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """``F.max_pool2d(x, 3, stride, 1)``, the same values bit for bit.

    Where no gradient is wanted (inference, ``no_grad``) of a contiguous NCHW tensor on the CPU it
    runs as two 1-D maxima, rows then columns, over a ``-inf`` padded copy (``torch.maximum``
    propagates NaN as the pool does): ATen's NCHW CPU max-pool is a scalar loop that also tracks
    the indices, about 10x slower than these four vectorised passes, and it took 40% of GoogLeNet's
    CPU forward (``bench/RESULTS.md``). Otherwise the pool itself, whose backward sends each
    window's gradient to one maximum where ``torch.maximum``'s would split ties.
    """
    if ((torch.is_grad_enabled() and x.requires_grad) or x.device.type != "cpu" or x.dim() != 4
            or not x.is_contiguous() or not x.is_floating_point() or torch.compiler.is_compiling()):
        return F.max_pool2d(x, 3, stride, 1)
    p = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    height, width = ((n - 1) // stride + 1 for n in x.shape[2:])  # floor((n + 2 - 3) / stride) + 1
    cols = [p[..., i:i + stride * (width - 1) + 1:stride] for i in range(3)]
    rows = torch.maximum(torch.maximum(cols[0], cols[1]), cols[2])
    rows = [rows[:, :, i:i + stride * (height - 1) + 1:stride] for i in range(3)]
    return torch.maximum(torch.maximum(rows[0], rows[1]), rows[2])


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def compact_cfg_arch(arch: dict, keep: list[torch.Tensor]) -> dict:
    """The compact arch of a network built from a VGG-style ``cfg`` list (widths and ``"M"``): each
    width replaced by its kept channels, ``net='dense'``."""
    widths = iter(len(k) for k in keep)
    return dict(arch, net="dense", back_dep=False, cfg=tuple(v if v == "M" else next(widths) for v in arch["cfg"]))


class LayerRecorder:
    """Creates conv/linear layers while tracking spatial size and recording
    each as a :class:`WeightLayer`, so the structure is written down once,
    where the module is made."""

    def __init__(self, input_size: int):
        self.size = input_size
        self.records: list[WeightLayer] = []
        self.ops: list[OpRecord] = []

    def pool(self, name, channels, out_hw, ops, *, gate=None):
        """Record a pooling module thop counts (``ops`` per output element; see OpRecord)."""
        self.ops.append(OpRecord(name, channels, out_hw, ops, gate))

    def conv(self, name, c_in, c_out, kernel, stride=1, padding=0, *, bias=False, in_gate=None, out_gate=None,
             bn=None, input_size=None, closable=False, role="body"):
        size = conv_out(self.size if input_size is None else input_size, kernel, stride, padding)
        self.records.append(WeightLayer(name, c_in, c_out, kernel, size * size, in_gate, out_gate, bias, bn,
                                        closable, role))
        return nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=bias), size

    def linear(self, name, c_in, c_out, *, in_gate=None, out_gate=None, bias=True, bn=None, closable=False,
               role="classifier"):
        """A Linear layer: one output position, kernel 1. By default the classifier (ungated outputs,
        bias, no BN); a hidden layer (an MLP's) may gate its output units like a conv's channels
        (``out_gate``, with ``bn`` its BatchNorm1d, if any) and takes ``role="body"``."""
        self.records.append(WeightLayer(name, c_in, c_out, 1, 1, in_gate, out_gate, bias, bn, closable, role))
        return nn.Linear(c_in, c_out, bias=bias)


# A residual block's conv or shortcut: ours (``layers.7.conv2``, ``layers.3.downsample.0``,
# ``layers.2.shortcut.0``) or akamaster's and GReg's (``layer2.4.conv1``).
_BLOCK_NAME = re.compile(r"^(?:layers\.(?P<k>\d+)|layer(?P<s>\d+)\.(?P<j>\d+))\."
                         r"(?:conv(?P<c>\d+)|shortcut|downsample)(?:\.|$)")


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
    # What a network declares besides its layers (so the methods need no per-network rules):
    # whether --stage_pr lists one ratio per gated layer (VGG) or per stage (ResNets), and whether
    # unstructured sparse training masks the classifier too (DSR's code: ResNet50 only).
    stages_are_layers = False
    sparse_classifier = False
    # The images it takes and its own command-line options are declared where it is registered
    # (models.Network), so that the command lines read them without importing torch.

    @classmethod
    def default_arch(cls, num_classes: int, scale, **options) -> dict:
        """The paper's network of this family as an ``arch`` dict (without gate options), every
        channel width passed through ``scale``; ``options`` are the network's own options
        (:meth:`models.Network.add_arguments`), each absent one at its default."""
        raise NotImplementedError

    def compact_arch(self, keep: list[torch.Tensor]) -> dict:
        """The arch of the compact network that keeps the channels ``keep`` (per gated layer) of this
        one: the same family, ``net='dense'`` (models/export.py)."""
        raise NotImplementedError(f"no export rule for {type(self).__name__}")

    def stage_of_layers(self) -> tuple[list[int], int, str]:
        """``(stage of each gated layer, entries of a --stage_pr list, what they are)``: GReg's
        stages, with the classifier the list's last entry."""
        raise NotImplementedError(f"no stage rule for {self.arch['model']}")

    def greg_ids(self) -> list[tuple]:
        """Per weight layer, what GReg's code calls it (``pruner/meta_pruner.py:21-45``): on a
        single-branch network (:attr:`stages_are_layers`) ``(layer index, None, None)``, the index
        counting convs and linear layers in order; on a ResNet ``(stage, block, conv)``: the stem
        ``(0, None, None)``, a block's k-th conv ``(stage, block in stage, k - 1)``, its projection
        shortcut ``(stage, block, -1)``, the classifier ``(last stage + 1, None, None)``. It decides
        the stage ratio of each layer under ``--wg weight`` and what ``--skip_layers`` matches."""
        if self.stages_are_layers:
            return [(i, None, None) for i in range(len(self.weight_layers))]
        ids, last = [], 0
        for record in self.weight_layers:
            if record.role == "stem":
                ids.append((0, None, None))
            elif record.role == "classifier":
                ids.append((last + 1, None, None))
            else:
                match = _BLOCK_NAME.match(record.name)
                if match is None:
                    raise NotImplementedError(f"GReg's code names no layer of {self.arch['model']} "
                                              f"like {record.name}")
                if match.group("k") is not None:
                    stage, block = self.greg_block(int(match.group("k")))
                else:
                    stage, block = int(match.group("s")), int(match.group("j"))
                conv = match.group("c")
                ids.append((stage, block, int(conv) - 1 if conv else -1))
                last = stage
        return ids

    def greg_block(self, k: int) -> tuple[int, int]:
        """``(stage from 1, block in the stage from 0)`` of the network's k-th residual block, for
        :meth:`greg_ids` (networks whose blocks are numbered ``layers.k``)."""
        raise NotImplementedError(f"GReg's code names no layer of {self.arch['model']}")

    def hsic_layers(self) -> list[int]:
        """The gated layers HSIC-Lasso prunes (its groups): every gated layer but the stem."""
        return list(range(1, len(self.gated_layers)))

    def pooled_target_layers(self) -> set[int]:
        """Gated layers whose HSIC target is the pooled classifier input in the authors' code."""
        return set()

    def imp_densities(self, density: float, layers) -> list[float]:
        """The final density of each sparse layer (``layers``: their records, pruning/sparse.py's
        ``sparse_layers``) when IMP prunes the network to ``density``: DSR's code uses one density for
        every tensor (LeNet-300-100 declares its exception)."""
        return [density] * len(layers)

    def _finish(self, arch: dict, records, widths, net, back_dep, temperature, ops=()):
        self.arch = dict(arch)
        self.weight_layers = tuple(records)
        self.gated_layers = gated_layers_of(self.weight_layers)
        assert tuple(g.width for g in self.gated_layers) == tuple(widths)
        self.init_weights()
        self.gates = ChannelGates(widths, net, back_dep, temperature, self.dep_input_dim)
        self.cost = CostModel(self.weight_layers, len(widths), ops)

    @torch.no_grad()
    def init_weights(self) -> None:
        r"""The reference's initialisation (spec 3b), for ``hc``, ``dep`` and ``dense`` alike.

        Every conv, shortcuts included, is Kaiming-normal with fan-in,
        :math:`\mathcal{N}(0, 2 / (C_{in} k^2))`, its bias (if any)
        :math:`\mathcal{N}(0, 0.01)`; the head is
        :math:`\mathcal{N}(0, 2 / C_{in})` with bias :math:`\mathcal{N}(0, 0.01)`
        (the reference stores it as (in, out) and uses fan-out there); BatchNorm
        keeps weight 1, bias 0. PyTorch's own default (std :math:`1/\sqrt{3 C_{in} k^2}`)
        would start the ResNets' activations at a third of the variance the
        published runs started from. The gate parameters are initialised by
        :class:`~l0_layers.ChannelGates`.
        """
        for record in self.weight_layers:
            layer = self.get_submodule(record.name)
            std = (2.0 / (record.in_channels * record.kernel ** 2)) ** 0.5
            layer.weight.normal_(0.0, std)
            if layer.bias is not None:
                layer.bias.normal_(0.0, 0.01)

    def disconnected_layers(self, kept: torch.Tensor | None = None) -> list[str]:
        """Gated layers with no open channel (``kept`` per layer, default the gates' own) whose
        closure cuts the network (the input of everything after them is zero); a residual
        block's inner layer may close."""
        kept = (self.gates.kept() if kept is None else kept).tolist()
        return [g.name for g, n in zip(self.gated_layers, kept) if n == 0 and not g.closable]

    def gate_parameters(self):
        return list(self.gates.parameters())

    def weight_parameters(self):
        gate_ids = {id(p) for p in self.gates.parameters()}
        return [p for p in self.parameters() if id(p) not in gate_ids]
