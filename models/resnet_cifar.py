"""Gated ResNet for CIFAR with option-B (1x1 conv + BN) projection shortcuts.

Gates sit on the stem's output and on conv1's output in every BasicBlock
(after BN, before ReLU); block outputs, conv2 and shortcuts are never gated.

========  ======  ===========  ==========  ========
model     blocks  gated layers  MACs        params
========  ======  ===========  ==========  ========
resnet56  3 x 9   28 (1024 ch)  125.75 M    0.86 M
========  ======  ===========  ==========  ========

(CIFAR-10 head; ``tests/test_models.py`` checks this table.)

A closed inner channel removes conv1's filter, BN1's entry and conv2's input
channel. The stem feeds the first stage through an identity shortcut: a
closed stem channel removes the stem filter, its BN entry and the first
block's conv1 input channel, but the residual stream keeps its full width
(the channel enters it as zeros).
"""
import torch.nn.functional as F
from torch import nn

from l0_layers.hard_concrete import DEFAULT_TEMPERATURE

from .common import GatedNetwork, LayerRecorder, gated


class BasicBlock(nn.Module):
    """conv1 -> BN -> gate -> ReLU -> conv2 -> BN, plus shortcut, then ReLU."""

    def __init__(self, recorder: LayerRecorder, name: str, c_in: int, planes: int, stride: int,
                 gate: int, stream_gate: int | None):
        super().__init__()
        size_in = recorder.size
        self.conv1, size = recorder.conv(f"{name}.conv1", c_in, planes, 3, stride, 1, in_gate=stream_gate,
                                         out_gate=gate, bn=f"{name}.bn1")
        self.bn1 = nn.BatchNorm2d(planes)
        recorder.size = size
        self.conv2, _ = recorder.conv(f"{name}.conv2", planes, planes, 3, 1, 1, in_gate=gate, bn=f"{name}.bn2")
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = None
        if stride != 1 or c_in != planes:
            conv, _ = recorder.conv(f"{name}.shortcut.0", c_in, planes, 1, stride, in_gate=stream_gate,
                                    bn=f"{name}.shortcut.1", input_size=size_in)
            self.shortcut = nn.Sequential(conv, nn.BatchNorm2d(planes))

    def forward(self, x, z):
        out = F.relu(gated(self.bn1(self.conv1(x)), z))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class CifarResNet(GatedNetwork):
    """ResNet-(6n+2) for 32x32 inputs: stem, three stages of n BasicBlocks, avg-pool, Linear."""

    def __init__(self, blocks_per_stage: int = 9, widths=(16, 32, 64), num_classes: int = 10, net: str = "hc",
                 back_dep: bool = False, temperature: float = DEFAULT_TEMPERATURE, input_size: int = 32,
                 model: str = "resnet56"):
        super().__init__()
        widths = tuple(widths)
        recorder = LayerRecorder(input_size)
        self.conv1, recorder.size = recorder.conv("conv1", 3, widths[0], 3, 1, 1, out_gate=0, bn="bn1")
        self.bn1 = nn.BatchNorm2d(widths[0])
        gate_widths, blocks, c_in, stream_gate = [widths[0]], [], widths[0], 0
        for stage, planes in enumerate(widths):
            for b in range(blocks_per_stage):
                stride = 2 if stage > 0 and b == 0 else 1
                blocks.append(BasicBlock(recorder, f"layers.{len(blocks)}", c_in, planes, stride,
                                         len(gate_widths), stream_gate))
                gate_widths.append(planes)
                c_in, stream_gate = planes, None
        self.layers = nn.ModuleList(blocks)
        self.linear = recorder.linear("linear", c_in, num_classes)
        self._finish(dict(model=model, blocks_per_stage=blocks_per_stage, widths=widths,
                          num_classes=num_classes, net=net, back_dep=back_dep, temperature=temperature,
                          input_size=input_size),
                     recorder.records, gate_widths, net, back_dep, temperature)

    def forward(self, x):
        z_stem, *z_blocks = self.gates(x.shape[0])
        x = F.relu(gated(self.bn1(self.conv1(x)), z_stem))
        for block, z in zip(self.layers, z_blocks):
            x = block(x, z)
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet56(num_classes: int = 10, **kwargs) -> CifarResNet:
    return CifarResNet(9, (16, 32, 64), num_classes, **kwargs)
