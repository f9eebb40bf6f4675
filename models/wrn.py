"""Gated Wide ResNet WRN-d-k for CIFAR, as DSR's code (IntelAI/dynamic-reparameterization,
``model.py``: ``cifar10_WideResNet``) defines it: every DSR CIFAR run uses WRN-28-2.

Pre-activation blocks (Zagoruyko & Komodakis): a stem conv 3x3 (16), three groups of
n = (d - 4) / 6 blocks of widths 16k, 32k, 64k (the first block of groups 2 and 3 at stride 2),
then BN, ReLU, global average pooling and a Linear head. A block is

    BN1 -> ReLU -> conv1 3x3 (stride s) -> BN2 -> gate -> ReLU -> [dropout] -> conv2 3x3, plus shortcut

where the shortcut is the raw input (identity) when the block keeps its width and a 1x1 conv of
``ReLU(BN1(x))`` (stride s, no BN) when it changes it; in that case BN1 + ReLU also replace the
block's input for conv1, as in the authors' code. No conv has a bias.

========  ==============  =============  ===========  ===========  =====================
model     blocks          gated layers   MACs         params       DSR sparse weights
========  ==============  =============  ===========  ===========  =====================
WRN-28-2  3 x 4           13 (912 ch)    214.35 M     1,467,610    1,451,520 (conv1/2)
========  ==============  =============  ===========  ===========  =====================

(CIFAR-10 head, 32x32 inputs; ``tests/test_dsr_networks.py`` checks this table.)

**Gates** sit on each block's inner channels (conv1's output, after BN2, before the ReLU), as on
the ResNets, and on the stem's output when the first block has a projection shortcut (k != 1,
WRN-28-2 included): there the stem's channels reach only that block's BN1 -> ReLU, conv1 and
shortcut, so a closed one removes the stem filter, BN1's entry and an input channel of conv1 and of
the shortcut. With k = 1 the stem feeds an identity shortcut and is not gated. A closed inner
channel removes conv1's filter, BN2's entry and conv2's input channel. The residual stream
(block outputs) is never gated.

**DSR's sparse rule** (its ``DynamicConv2d`` layers): every block's conv1 and conv2 are sparse;
the stem conv and the 1x1 shortcuts are plain ``nn.Conv2d`` and the head a plain ``nn.Linear``,
all dense: roles ``stem``, ``shortcut``, ``classifier`` here, ``sparse_classifier = False``.

**Init** (the code's ``reset_parameters``): every conv :math:`\\mathcal N(0, 2 / (k^2 C_{out}))`,
BN weight 1 and bias 0, the head PyTorch's default weight (U(±1/sqrt(fan_in))) and bias 0.

The stream BNs (each block's BN1 and the final BN) are recorded as the BN "on the output" of the
conv that last writes the stream (the stem or the previous block's conv2), so that cost
accounting counts their parameters and export carries them; they are never gated.

Compact (exported) networks are the same class with ``net='dense'``, ``inner_widths`` (each
block's conv1 output) and ``stem_width``.
"""
import torch
import torch.nn.functional as F
from torch import nn

from l0_layers import DEFAULT_TEMPERATURE

from .common import GatedNetwork, LayerRecorder, bn_gate_relu
from .options import WRN_DEPTH, WRN_WIDEN_FACTOR, blocks_per_group


def wrn_widths(widen_factor: int) -> tuple[int, int, int, int]:
    """Stem and group widths of WRN-d-k: 16, 16k, 32k, 64k."""
    return (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)


class WideBlock(nn.Module):
    """One pre-activation block; ``in_gate``: the gate on BN1 (the stem's, in the first block)."""

    def __init__(self, recorder: LayerRecorder, name: str, c_in: int, planes: int, stride: int, gate: int,
                 inner: int, out_bn: str, in_gate: int | None, drop_rate: float, projection: bool):
        super().__init__()
        size_in = recorder.size
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1, size = recorder.conv(f"{name}.conv1", c_in, inner, 3, stride, 1, in_gate=in_gate, out_gate=gate,
                                         bn=f"{name}.bn2", closable=True)
        self.bn2 = nn.BatchNorm2d(inner)
        recorder.size = size
        self.conv2, _ = recorder.conv(f"{name}.conv2", inner, planes, 3, 1, 1, in_gate=gate, bn=out_bn)
        self.convShortcut = None
        if projection:
            self.convShortcut, _ = recorder.conv(f"{name}.convShortcut", c_in, planes, 1, stride, in_gate=in_gate,
                                                 input_size=size_in, role="shortcut")
        self.drop_rate = drop_rate

    def forward(self, x, z_in, z):
        if self.convShortcut is None:
            residual, out = x, bn_gate_relu(self.bn1, x, None)
        else:
            out = bn_gate_relu(self.bn1, x, z_in)
            residual = self.convShortcut(out)
        out = bn_gate_relu(self.bn2, self.conv1(out), z)
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + residual


class WideResNet(GatedNetwork):
    """WRN-``layers``-``widen_factor`` for 32x32 inputs (DSR's ``cifar10_WideResNet``)."""

    def __init__(self, layers: int = WRN_DEPTH, widen_factor: int = WRN_WIDEN_FACTOR, widths=None, num_classes: int = 10,
                 net: str = "hc", back_dep: bool = False, temperature: float = DEFAULT_TEMPERATURE,
                 input_size: int = 32, drop_rate: float = 0.0, model: str = "wrn", inner_widths=None,
                 stem_width: int | None = None):
        super().__init__()
        n = blocks_per_group(layers)
        widths = tuple(int(w) for w in (wrn_widths(widen_factor) if widths is None else widths))
        if len(widths) != 4:
            raise ValueError(f"widths are the stem's and the three groups': 4 entries, got {len(widths)}")
        inner = tuple(int(w) for w in inner_widths) if inner_widths is not None else None
        if inner is not None and len(inner) != 3 * n:
            raise ValueError(f"inner_widths needs {3 * n} entries, got {len(inner)}")
        # The stem is gated where it feeds a projection shortcut only (see the module docstring).
        stem_gated = widths[0] != widths[1]
        if stem_width is not None and not stem_gated and stem_width != widths[0]:
            raise ValueError("a stem that feeds an identity shortcut keeps its width")
        stem = widths[0] if stem_width is None else int(stem_width)
        names = [f"block{g + 1}.layer.{b}" for g in range(3) for b in range(n)]
        recorder = LayerRecorder(input_size)
        self.conv1, recorder.size = recorder.conv("conv1", 3, stem, 3, 1, 1, out_gate=0 if stem_gated else None,
                                                  bn=f"{names[0]}.bn1", role="stem")
        gate_widths = [stem] if stem_gated else []
        c_in, groups = stem, []
        for g, planes in enumerate(widths[1:]):
            blocks = []
            for b in range(n):
                index = g * n + b
                width = planes if inner is None else inner[index]
                out_bn = names[index + 1] + ".bn1" if index + 1 < len(names) else "bn1"
                first = index == 0 and stem_gated
                blocks.append(WideBlock(recorder, names[index], c_in, planes, 2 if g > 0 and b == 0 else 1,
                                        len(gate_widths), width, out_bn, 0 if first else None, drop_rate,
                                        projection=c_in != planes or (index == 0 and stem_gated)))
                gate_widths.append(width)
                c_in = planes
            groups.append(nn.Module())
            groups[-1].layer = nn.Sequential(*blocks)
        self.block1, self.block2, self.block3 = groups
        self.bn1 = nn.BatchNorm2d(c_in)
        self.fc = recorder.linear("fc", c_in, num_classes)
        self.stem_gated = stem_gated
        arch = dict(model=model, layers=layers, widen_factor=widen_factor, widths=widths, num_classes=num_classes,
                    net=net, back_dep=back_dep, temperature=temperature, input_size=input_size, drop_rate=drop_rate)
        for key, value in (("inner_widths", inner), ("stem_width", stem_width)):
            if value is not None:
                arch[key] = value
        self._finish(arch, recorder.records, gate_widths, net, back_dep, temperature)

    def blocks(self):
        return [block for group in (self.block1, self.block2, self.block3) for block in group.layer]

    @torch.no_grad()
    def init_weights(self) -> None:
        r"""DSR's ``reset_parameters``: every conv :math:`\mathcal N(0, 2 / (k^2 C_{out}))` (fan-out),
        the head PyTorch's default weight with bias 0, BatchNorm weight 1 and bias 0 (as built)."""
        for record in self.weight_layers:
            layer = self.get_submodule(record.name)
            if isinstance(layer, nn.Conv2d):
                layer.weight.normal_(0.0, (2.0 / (record.kernel ** 2 * record.out_channels)) ** 0.5)
            else:
                layer.reset_parameters()
                layer.bias.zero_()

    def forward(self, x, log_alpha=None):
        z = list(self.gates(x.shape[0], log_alpha))
        z_stem = z.pop(0) if self.stem_gated else None
        x = self.conv1(x)
        for i, (block, z_block) in enumerate(zip(self.blocks(), z)):
            x = block(x, z_stem if i == 0 else None, z_block)
        x = bn_gate_relu(self.bn1, x, None)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    # -- what the network declares -------------------------------------------------------------

    @classmethod
    def default_arch(cls, num_classes: int, scale, layers: int = WRN_DEPTH,
                     widen_factor: int = WRN_WIDEN_FACTOR) -> dict:
        blocks_per_group(layers)
        return dict(layers=layers, widen_factor=widen_factor, widths=scale(wrn_widths(widen_factor)))

    def compact_arch(self, keep: list[torch.Tensor]) -> dict:
        widths = [len(k) for k in keep]
        arch = dict(self.arch, net="dense", back_dep=False)
        if self.stem_gated:
            arch["stem_width"], widths = widths[0], widths[1:]
        arch["inner_widths"] = tuple(widths)
        return arch

    def stage_of_layers(self) -> tuple[list[int], int, str]:
        n = blocks_per_group(self.arch["layers"])
        stages = ([0] if self.stem_gated else []) + [1 + b // n for b in range(3 * n)]
        return stages, 5, "stem, one per group, fc"

    def hsic_layers(self) -> list[int]:
        return list(range(1 if self.stem_gated else 0, len(self.gated_layers)))
