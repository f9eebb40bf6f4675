r"""Where the gate logits come from, and the module that turns them into gates.

Two sources of logits (``--net``):

``hc`` — :class:`FreeLogits` (L0-HC, Louizos et al.)
    One free parameter :math:`\log\alpha_c` per channel, initialised
    :math:`\mathcal{N}(3, 0.01)`, neither clamped nor squashed.

``dep`` — :class:`DependencyMLP` (Dep-L0, Li & Ji)
    An MLP, independent of the input image, generates every layer's logits:

    .. math::
        a_0 = \mathbf{1}_{d_0}, \qquad
        a_i = \log(100)\,\tanh(W_i a_{i-1} + b_i), \qquad
        \log\alpha^{(i)} = a_i,

    so logits lie in :math:`(-\log 100, \log 100)`. One ``nn.Linear`` per gated
    layer maps the previous gated layer's width to this one's; weights keep
    PyTorch's default init, biases are :math:`\mathcal{N}(3, 0.01)`. The
    forward chain runs first layer to last with :math:`d_0` = the first
    layer's width; the backward chain (``--back_dep``) runs last to first with
    :math:`d_0` = the last layer's width and its outputs are reversed before
    they are assigned to the layers.

``dense`` — no gates at all (the unpruned network, for baselines and benchmarks).

:class:`ChannelGates` owns the logits of *all* gated layers of a network as
one flat vector, so a training step computes them once, draws all gate noise
in one call and sums per-layer statistics with one ``index_add``.
"""
import math

import torch
from torch import nn

from . import DEFAULT_TEMPERATURE, NETS, hard_concrete

LOGIT_INIT_MEAN = 3.0
LOGIT_INIT_STD = 0.01
DEP_SCALE = math.log(100.0)
# Budget runs keep Dep-L0's pre-activations within this: tanh's gradient there is 2.5e-5, not 0.
PRE_ACTIVATION_LIMIT = 6.0


class FreeLogits(nn.Module):
    """One free logit per channel, returned as a flat vector over all layers."""

    def __init__(self, widths):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.empty(sum(widths)).normal_(LOGIT_INIT_MEAN, LOGIT_INIT_STD))

    def forward(self) -> torch.Tensor:
        return self.log_alpha


class DependencyMLP(nn.Module):
    """The Dep-L0 generator: a chain of Linear+tanh layers, one per gated layer.

    ``input_dim`` overrides :math:`d_0` (the reference's VGG uses 64 in both
    directions, where the backward rule would give 512).
    """

    def __init__(self, widths, backward: bool = False, input_dim: int | None = None):
        super().__init__()
        self.backward = backward
        chain = list(reversed(widths)) if backward else list(widths)
        dims = [input_dim or chain[0], *chain]
        self.layers = nn.ModuleList(nn.Linear(d_in, d_out) for d_in, d_out in zip(dims[:-1], dims[1:]))
        for layer in self.layers:
            nn.init.normal_(layer.bias, LOGIT_INIT_MEAN, LOGIT_INIT_STD)
        self.register_buffer("a0", torch.ones(dims[0]), persistent=False)

    def forward(self) -> torch.Tensor:
        return self._chain()[0]

    @torch.no_grad()
    def bound_pre_activations_(self, limit: float) -> None:
        """Rescale every row ``(W_i[j], b_i[j])`` whose pre-activation exceeds ``limit`` in size
        so that it equals ``limit``, layer after layer along the chain: beyond about 9 the tanh
        is exactly 1 in float32 and passes no gradient, so a gate pushed there could never move
        again. Within the limit the logit lies within ``log(100) tanh(limit)`` of its bound."""
        a = self.a0
        for layer in self.layers:
            pre = layer(a)
            scale = (limit / pre.abs()).clamp(max=1.0)
            layer.weight.mul_(scale[:, None])
            layer.bias.mul_(scale)
            a = DEP_SCALE * torch.tanh(pre * scale)

    def param_groups(self, lr: float) -> list[dict]:
        """Optimiser groups in which each weight matrix has the learning rate ``lr / d_in`` and
        each bias ``lr``: a pre-activation then moves by at most about ``lr * (1 + log 100)``
        per Adam step, whatever its fan-in (see pruning/budget.py)."""
        groups = []
        for layer in self.layers:
            groups.append(dict(params=[layer.weight], lr=lr / layer.in_features))
            groups.append(dict(params=[layer.bias], lr=lr))
        return groups

    @torch.no_grad()
    def pre_activations(self) -> torch.Tensor:
        r"""The chain's :math:`W_i a_{i-1} + b_i`, flat in the layers' order: unlike the logits,
        they still tell channels apart where the tanh has saturated to exactly
        :math:`\pm\log 100` in floating point."""
        return self._chain()[1]

    def _chain(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.a0
        logits, pre = [], []
        for layer in self.layers:
            h = layer(a)
            a = DEP_SCALE * torch.tanh(h)
            logits.append(a)
            pre.append(h)
        if self.backward:
            logits.reverse()
            pre.reverse()
        return torch.cat(logits), torch.cat(pre)


class ChannelGates(nn.Module):
    """The hard-concrete gates of every gated layer of one network.

    ``forward(batch_size)`` returns one gate tensor per gated layer, shaped to
    multiply an NCHW feature map: ``(N, C, 1, 1)`` sampled in training mode,
    ``(1, C, 1, 1)`` deterministic in eval mode or when frozen, ``None`` for
    ``net='dense'``.

    ``forward`` and :meth:`expected_open` accept the logits computed by
    :meth:`log_alpha`, so a training step runs the dependency MLP once and
    shares its output between the gates and the penalty.
    """

    def __init__(self, widths, net: str = "hc", back_dep: bool = False,
                 temperature: float = DEFAULT_TEMPERATURE, dep_input_dim: int | None = None):
        super().__init__()
        if net not in NETS:
            raise ValueError(f"net must be one of {NETS}, got {net!r}")
        self.widths = tuple(int(w) for w in widths)
        self.net = net
        self.back_dep = back_dep
        self.temperature = temperature
        self.frozen = False
        if net == "hc":
            self.logits = FreeLogits(self.widths)
        elif net == "dep":
            self.logits = DependencyMLP(self.widths, back_dep, dep_input_dim)
        else:
            self.logits = None
        layer_of_channel = torch.repeat_interleave(torch.arange(len(self.widths)), torch.tensor(self.widths))
        self.register_buffer("layer_of_channel", layer_of_channel, persistent=False)

    @property
    def num_layers(self) -> int:
        return len(self.widths)

    def log_alpha(self) -> torch.Tensor:
        """All logits as one flat vector, layer after layer, in float32 whatever the autocast: under
        ``--amp`` Dep-L0's generator would otherwise run its matmuls in bf16/fp16 during evaluation,
        and gates near the closing threshold would open or close unlike the float32 ones that the
        kept channels, the cost and the export use."""
        if self.logits is None:
            raise RuntimeError("a dense network has no gate logits")
        device_type = self.layer_of_channel.device.type
        if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return self.logits()
        return self.logits()

    def param_groups(self, lr: float, fan_in_scaled: bool = False) -> list[dict]:
        """Optimiser groups of the gate parameters, all at ``lr``; with ``fan_in_scaled`` (budget
        runs) Dep-L0's generator weights at ``lr / fan_in`` (:meth:`DependencyMLP.param_groups`)."""
        if fan_in_scaled and isinstance(self.logits, DependencyMLP):
            return self.logits.param_groups(lr)

        return [dict(params=list(self.parameters()), lr=lr)]

    def bound_pre_activations_(self) -> None:
        """Budget runs, after each gate step: Dep-L0's pre-activations back within
        ``PRE_ACTIVATION_LIMIT`` (:meth:`DependencyMLP.bound_pre_activations_`); nothing for L0-HC,
        whose free logits never stop receiving gradient."""
        if isinstance(self.logits, DependencyMLP):
            self.logits.bound_pre_activations_(PRE_ACTIVATION_LIMIT)

    @torch.no_grad()
    def tie_key(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """A per-channel key that orders channels as their logits ``log_alpha`` do and separates
        equal logits: for Dep-L0 the generator's current pre-activations (monotone in the logit,
        distinct where the tanh has saturated; ``log_alpha`` must be the generator's own), for
        L0-HC the logits themselves."""
        if isinstance(self.logits, DependencyMLP):
            return self.logits.pre_activations()
        return log_alpha

    def freeze(self, gates: torch.Tensor | None = None) -> None:
        """Fix the gates for fine-tuning and stop their gradients.

        The gates are held in the buffer ``frozen_gates``: the test gates of
        the current logits, or ``gates`` (``(total,)``, e.g. a budget
        projection). A checkpoint of frozen gates carries that buffer, so
        freeze the model before loading one (:func:`models.load_model_state`).
        """
        if self.logits is not None:
            fixed = self.test_gates() if gates is None else gates.detach().clone()
            self.register_buffer("frozen_gates", fixed.to(self.layer_of_channel.device))
        self.frozen = True
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, batch_size: int, log_alpha: torch.Tensor | None = None):
        if self.logits is None:
            return (None,) * self.num_layers
        if self.frozen:
            z = self.frozen_gates.unsqueeze(0)
        else:
            log_alpha = self.log_alpha() if log_alpha is None else log_alpha
            if self.training:
                z = hard_concrete.sample(log_alpha, batch_size, self.temperature)
            else:
                z = hard_concrete.deterministic(log_alpha).unsqueeze(0)
        return tuple(g[..., None, None] for g in z.split(self.widths, dim=1))

    def per_layer_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a per-channel vector within each layer: ``(total,) -> (num_layers,)``, on the gates'
        device (values from elsewhere, e.g. a method's gates kept on the CPU, are moved there)."""
        index = self.layer_of_channel
        values = values.to(index.device)
        return values.new_zeros(self.num_layers).index_add(0, index, values)

    def expected_open(self, log_alpha: torch.Tensor | None = None) -> torch.Tensor:
        """S_l = sum_c P(z_c != 0) per layer (differentiable); full widths when dense."""
        if self.logits is None:
            return self.layer_of_channel.new_tensor(self.widths, dtype=torch.float32)
        log_alpha = self.log_alpha() if log_alpha is None else log_alpha
        return self.per_layer_sum(hard_concrete.prob_nonzero(log_alpha, self.temperature))

    @torch.no_grad()
    def test_gates(self) -> torch.Tensor:
        """Deterministic gates of all channels, ``(total,)``: the frozen ones once frozen; ones when dense."""
        if self.logits is None:
            return torch.ones(sum(self.widths), device=self.layer_of_channel.device)
        if self.frozen:
            return self.frozen_gates
        return hard_concrete.deterministic(self.log_alpha())

    @torch.no_grad()
    def kept(self) -> torch.Tensor:
        """Channels per layer whose test gate is non-zero, ``(num_layers,)`` long."""
        return self.per_layer_sum((self.test_gates() > 0).float()).long()
