"""Gated LeNet-300-100 for MNIST, as DSR's code (IntelAI/dynamic-reparameterization, ``model.py``:
``mnist_mlp``, the code's default model) defines it.

Three Linear layers 784 -> 300 -> 100 -> 10 on the flattened 1x28x28 image. With BatchNorm (the
default, ``batch_norm=True``) each of the three is followed by a BatchNorm1d, the output layer's
included (the logits are BN's output), and no Linear has a bias; without it (DSR's
``--no-batch-norm``) every Linear has a bias and there is no BN:

    fc1 -> [BN1] -> gate -> ReLU -> fc_int -> [BN2] -> gate -> ReLU -> fc2 -> [BN3]

================================  ===========  ===========  ========  =====================
model                             gated units  MACs         params    DSR sparse weights
================================  ===========  ===========  ========  =====================
lenet300_100, batch_norm=False    2 (400)      266,200      266,610   266,200 (all three)
lenet300_100, batch_norm=True     2 (400)      266,200      267,020   266,200 (all three)
================================  ===========  ===========  ========  =====================

(``tests/test_dsr_networks.py`` checks this table.)

**Gates** sit on the two hidden layers' units (after BN where there is one, before the ReLU): a
closed unit removes its row of the producing Linear (and its bias or BN entry) and its column of
the next Linear. Export folds a gate into BN or, without BN, into the unit's own row and bias.

**DSR's sparse rule**: all three layers are ``DynamicLinear`` (sparse), the output layer
included: ``sparse_classifier = True`` and the hidden layers have role ``body``. The code's IMP
keeps the output layer at 10% when the target sparsity is above 90% (:meth:`imp_densities`).

**Init** (``DynamicLinear``): every weight U(±1/sqrt(fan_in)), every bias 0, BN weight 1, bias 0.
"""
import torch
from torch import nn

from l0_layers import DEFAULT_TEMPERATURE
from utils.errors import UsageError

from .common import GatedNetwork, LayerRecorder

WIDTHS = (300, 100)
# DSR's IMP on mnist_mlp: above this sparsity the output layer stops at this density.
IMP_OUTPUT_DENSITY = 0.1


class LeNet300100(GatedNetwork):
    """An MLP ``in -> widths[0] -> widths[1] -> num_classes`` with gated hidden units."""

    stages_are_layers = True
    sparse_classifier = True

    def __init__(self, widths=WIDTHS, num_classes: int = 10, batch_norm: bool = True, net: str = "hc",
                 back_dep: bool = False, temperature: float = DEFAULT_TEMPERATURE, input_size: int = 28,
                 in_channels: int = 1, model: str = "lenet300_100"):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 2:
            raise ValueError(f"LeNet-300-100 has two hidden layers, got widths {widths}")
        batch_norm = bool(batch_norm)
        bias = not batch_norm
        features = in_channels * input_size * input_size
        recorder = LayerRecorder(1)
        bn_names = ("bn1", "bn2", "bn3") if batch_norm else (None, None, None)
        self.fc1 = recorder.linear("fc1", features, widths[0], out_gate=0, bias=bias, bn=bn_names[0], role="body")
        self.fc_int = recorder.linear("fc_int", widths[0], widths[1], in_gate=0, out_gate=1, bias=bias,
                                      bn=bn_names[1], role="body")
        self.fc2 = recorder.linear("fc2", widths[1], num_classes, in_gate=1, bias=bias, bn=bn_names[2])
        self.bn1, self.bn2, self.bn3 = ((nn.BatchNorm1d(widths[0]), nn.BatchNorm1d(widths[1]),
                                         nn.BatchNorm1d(num_classes)) if batch_norm else (None, None, None))
        self.features = features
        self._finish(dict(model=model, widths=widths, num_classes=num_classes, batch_norm=batch_norm, net=net,
                          back_dep=back_dep, temperature=temperature, input_size=input_size,
                          in_channels=in_channels),
                     recorder.records, widths, net, back_dep, temperature)

    @torch.no_grad()
    def init_weights(self) -> None:
        """DSR's ``DynamicLinear``: weights U(±1/sqrt(fan_in)), biases 0."""
        for record in self.weight_layers:
            layer = self.get_submodule(record.name)
            bound = 1.0 / record.in_channels ** 0.5
            layer.weight.uniform_(-bound, bound)
            if layer.bias is not None:
                layer.bias.zero_()

    @staticmethod
    def _hidden(bn, x, z):
        if bn is not None:
            x = bn(x)
        if z is not None:
            x = x * z.flatten(1).to(x.dtype)
        return torch.relu(x)

    def forward(self, x, log_alpha=None):
        z1, z2 = self.gates(x.shape[0], log_alpha)
        x = self._hidden(self.bn1, self.fc1(x.reshape(x.shape[0], self.features)), z1)
        x = self._hidden(self.bn2, self.fc_int(x), z2)
        x = self.fc2(x)
        return x if self.bn3 is None else self.bn3(x)

    # -- what the network declares -------------------------------------------------------------

    @classmethod
    def default_arch(cls, num_classes: int, scale, batch_norm: bool = True) -> dict:
        return dict(widths=scale(WIDTHS), batch_norm=bool(batch_norm))

    def compact_arch(self, keep: list[torch.Tensor]) -> dict:
        return dict(self.arch, net="dense", back_dep=False, widths=tuple(len(k) for k in keep))

    def stage_of_layers(self) -> tuple[list[int], int, str]:
        return [0, 1], 3, "one per layer index, 0 fc1, 1 fc_int, 2 the classifier"

    def hsic_layers(self) -> list[int]:
        return [0, 1]  # both hidden layers (there is no stem to spare)

    def imp_densities(self, density: float, layers) -> list[float]:
        """DSR's IMP on ``mnist_mlp``: above 90% sparsity the output layer stops at 10% density and
        the hidden layers share what is left of the budget (``main.py``: ``(1 - s) * all - 100``)."""
        if density >= IMP_OUTPUT_DENSITY:
            return [density] * len(layers)
        sizes = [r.in_channels * r.out_channels for r in layers]
        output = sum(n for n, r in zip(sizes, layers) if r.role == "classifier")
        hidden = sum(sizes) - output
        left = density * sum(sizes) - IMP_OUTPUT_DENSITY * output
        if left <= 0:
            raise UsageError(f"--density {density:g} leaves nothing for the hidden layers once the output layer "
                             f"keeps {IMP_OUTPUT_DENSITY:g}")
        return [IMP_OUTPUT_DENSITY if r.role == "classifier" else left / hidden for r in layers]
