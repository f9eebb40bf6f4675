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
    """Stretch to (GAMMA, ZETA) and clamp to [0, 1]; the shift runs in place on the product, which
    autograd keeps nothing of."""
    return (s * (ZETA - GAMMA)).add_(GAMMA).clamp(0.0, 1.0)


def sample(log_alpha: torch.Tensor, batch_size: int, temperature: float) -> torch.Tensor:
    """Training gates of shape ``(batch_size, *log_alpha.shape)``.

    The noise is drawn in one call for all examples and channels, so a network
    with many gated layers still costs one random-number kernel per step. The
    formula's operations run in place wherever autograd keeps nothing of their
    input (the logit of the noise, the division, the shift), so three of the
    seven noise-sized buffers are never allocated; the same operations in the
    same order give the same values and gradients, bit for bit.
    """
    u = torch.empty((batch_size, *log_alpha.shape), device=log_alpha.device,
                    dtype=log_alpha.dtype).uniform_(EPS, 1.0 - EPS)
    s = torch.sigmoid(u.logit_().add(log_alpha).div_(temperature))  # logit(u) = log u - log(1 - u)
    return _stretch_and_clamp(s)


def deterministic(log_alpha: torch.Tensor) -> torch.Tensor:
    """Test-time gates, same shape as ``log_alpha``; exactly 0 for pruned channels."""
    return _stretch_and_clamp(torch.sigmoid(log_alpha))


def prob_nonzero(log_alpha: torch.Tensor, temperature: float) -> torch.Tensor:
    """P(z != 0) per channel; summed over a layer it is the expected open count S."""
    return torch.sigmoid(log_alpha - temperature * math.log(-GAMMA / ZETA))
