r"""The hard-concrete distribution of Louizos, Welling & Kingma (ICLR 2018).

Every gated channel c has a gate :math:`z_c \in [0, 1]` whose distribution is
set by one real number, its logit :math:`\log\alpha_c`. With the stretch
interval :math:`(\gamma, \zeta) = (-0.1, 1.1)` and temperature :math:`\beta`:

Training sample (one uniform draw per example and channel)
    .. math::
        u \sim U(\epsilon, 1-\epsilon), \quad
        s = \sigma\big((\log u - \log(1-u) + \log\alpha_c) / \beta\big), \quad
        z = \min(1, \max(0, s(\zeta-\gamma) + \gamma))

Test (deterministic) gate, no temperature
    .. math:: z_c = \min(1, \max(0, \sigma(\log\alpha_c)(\zeta-\gamma) + \gamma))

    Values strictly inside (0, 1) scale the channel; a channel is *pruned* iff
    its test gate is exactly 0, i.e. :math:`\log\alpha_c \le \log(1/11)`.

Probability that a gate is non-zero (the L0 norm's expectation)
    .. math:: P_c = 1 - Q_c(0) = \sigma\big(\log\alpha_c - \beta \log(-\gamma/\zeta)\big)

The functions are elementwise, so one call handles every channel of every
gated layer at once; callers keep the logits of a whole network in one tensor.
"""
import math

import torch

GAMMA = -0.1
ZETA = 1.1
EPS = 1e-6
# log_alpha at or below this gives a test gate of exactly 0 (sigmoid = 1/12).
PRUNE_THRESHOLD = math.log(1.0 / 11.0)


def _stretch_and_clamp(s: torch.Tensor) -> torch.Tensor:
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def sample(log_alpha: torch.Tensor, batch_size: int, temperature: float) -> torch.Tensor:
    """Training gates of shape ``(batch_size, *log_alpha.shape)``.

    The noise is drawn in one call for all examples and channels, so a network
    with many gated layers still costs one random-number kernel per step. The
    arithmetic runs as one autograd function (:class:`_Sample`) whose passes
    work in place, with the same operations in the same order as the plain
    composition (so the same values and gradients, bit for bit).
    """
    u = torch.empty((batch_size, *log_alpha.shape), device=log_alpha.device,
                    dtype=log_alpha.dtype).uniform_(EPS, 1.0 - EPS)
    if torch.is_grad_enabled() and log_alpha.requires_grad:
        return _Sample.apply(log_alpha, u, temperature)
    return _sample_from_noise(log_alpha, u, temperature)[1]


def _sample_from_noise(log_alpha, u, temperature):
    """``(s, z)`` from uniform noise ``u``, overwriting ``u`` with ``s``: logit(u) = log u - log(1 - u)."""
    s = u.logit_().add_(log_alpha).div_(temperature).sigmoid_()
    return s, _stretch_and_clamp(s)


class _Sample(torch.autograd.Function):
    r"""The training sample as one function: forward as :func:`sample`'s formula, keeping only the
    sigmoid's output :math:`s`; backward the plain composition's chain rule, op for op:
    the clamp passes the gradient where :math:`0 \le s(\zeta-\gamma)+\gamma \le 1`, then
    :math:`\times(\zeta-\gamma)`, the sigmoid's derivative, :math:`/\beta`, and the sum over
    the examples that broadcasting the logits implies. Not twice differentiable."""

    @staticmethod
    def forward(ctx, log_alpha, u, temperature):
        s, z = _sample_from_noise(log_alpha, u, temperature)
        ctx.save_for_backward(s)
        ctx.temperature = temperature
        ctx.shape = log_alpha.shape
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_z):
        s, = ctx.saved_tensors
        stretched = s * (ZETA - GAMMA) + GAMMA
        inside = (stretched >= 0.0).logical_and_(stretched <= 1.0)
        grad = torch.where(inside, grad_z, 0.0).mul_(ZETA - GAMMA)
        grad = torch.ops.aten.sigmoid_backward.grad_input(grad, s, grad_input=grad)
        grad = grad.div_(ctx.temperature).sum_to_size(ctx.shape)
        return grad, None, None


def deterministic(log_alpha: torch.Tensor) -> torch.Tensor:
    """Test-time gates, same shape as ``log_alpha``; exactly 0 for pruned channels."""
    return _stretch_and_clamp(torch.sigmoid(log_alpha))


def prob_nonzero(log_alpha: torch.Tensor, temperature: float) -> torch.Tensor:
    """P(z != 0) per channel; summed over a layer it is the expected open count S."""
    return torch.sigmoid(log_alpha - temperature * math.log(-GAMMA / ZETA))
