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

Compact (exported) networks are the same class with ``net='dense'`` and
explicit widths: ``inner_widths`` gives each block's conv1 output width, and
``stem_width`` + ``stem_index`` a narrow stem whose ``k`` channels the first
block's identity shortcut adds into their positions ``stem_index`` of the
full-width residual stream (``index_add``, no MACs). See ``models/export.py``.
"""
import torch
import torch.nn.functional as F
from torch import nn

from l0_layers import DEFAULT_TEMPERATURE

from .common import GatedNetwork, LayerRecorder, bn_gate_relu


class BasicBlock(nn.Module):
    """conv1 -> BN -> gate -> ReLU -> conv2 -> BN, plus shortcut, then ReLU."""

    def __init__(self, recorder: LayerRecorder, name: str, c_in: int, planes: int, stride: int,
                 gate: int, stream_gate: int | None, inner: int | None = None, in_index=None):
        # inner: conv1's output width (default planes). in_index: the input holds
        # only these channels of the c_in-wide stream (a compact stem); an identity
        # shortcut adds them back into their positions.
        super().__init__()
        size_in = recorder.size
        inner = planes if inner is None else inner
        c_read = c_in if in_index is None else len(in_index)
        self.conv1, size = recorder.conv(f"{name}.conv1", c_read, inner, 3, stride, 1, in_gate=stream_gate,
                                         out_gate=gate, bn=f"{name}.bn1", closable=True)
        self.bn1 = nn.BatchNorm2d(inner)
        recorder.size = size
        self.conv2, _ = recorder.conv(f"{name}.conv2", inner, planes, 3, 1, 1, in_gate=gate, bn=f"{name}.bn2")
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = None
        if stride != 1 or c_in != planes:
            conv, _ = recorder.conv(f"{name}.shortcut.0", c_read, planes, 1, stride, in_gate=stream_gate,
                                    bn=f"{name}.shortcut.1", input_size=size_in, role="shortcut")
            self.shortcut = nn.Sequential(conv, nn.BatchNorm2d(planes))
            in_index = None
        index = None if in_index is None else torch.tensor(list(in_index), dtype=torch.long)
        self.register_buffer("in_index", index, persistent=False)

    def forward(self, x, z):
        out = bn_gate_relu(self.bn1, self.conv1(x), z)
        out = self.bn2(self.conv2(out))
        if self.in_index is not None:
            return torch.relu_(out.index_add(1, self.in_index, x.to(out.dtype)))
        return torch.relu_(out + (x if self.shortcut is None else self.shortcut(x)))


class CifarResNet(GatedNetwork):
    """ResNet-(6n+2) for 32x32 inputs: stem, three stages of n BasicBlocks, avg-pool, Linear."""

    def __init__(self, blocks_per_stage: int = 9, widths=(16, 32, 64), num_classes: int = 10, net: str = "hc",
                 back_dep: bool = False, temperature: float = DEFAULT_TEMPERATURE, input_size: int = 32,
                 model: str = "resnet56", inner_widths=None, stem_width: int | None = None, stem_index=None):
        super().__init__()
        widths = tuple(widths)
        n_blocks = len(widths) * blocks_per_stage
        inner = tuple(int(w) for w in inner_widths) if inner_widths is not None else None
        if inner is not None and len(inner) != n_blocks:
            raise ValueError(f"inner_widths needs {n_blocks} entries, got {len(inner)}")
        if stem_index is not None:
            stem_index = tuple(int(i) for i in stem_index)
            stem_width = len(stem_index) if stem_width is None else stem_width
            if (len(stem_index) != stem_width or len(set(stem_index)) != stem_width
                    or not all(0 <= i < widths[0] for i in stem_index)):
                raise ValueError(f"stem_index must be {stem_width} distinct positions in 0..{widths[0] - 1}")
        stem = widths[0] if stem_width is None else stem_width
        recorder = LayerRecorder(input_size)
        self.conv1, recorder.size = recorder.conv("conv1", 3, stem, 3, 1, 1, out_gate=0, bn="bn1", role="stem")
        self.bn1 = nn.BatchNorm2d(stem)
        # With stem_index the residual stream stays widths[0] wide and the stem fills part of it.
        c_in = widths[0] if stem_index is not None else stem
        gate_widths, blocks, stream_gate, in_index = [stem], [], 0, stem_index
        for stage, planes in enumerate(widths):
            for b in range(blocks_per_stage):
                stride = 2 if stage > 0 and b == 0 else 1
                width = planes if inner is None else inner[len(blocks)]
                blocks.append(BasicBlock(recorder, f"layers.{len(blocks)}", c_in, planes, stride,
                                         len(gate_widths), stream_gate, width, in_index))
                gate_widths.append(width)
                c_in, stream_gate, in_index = planes, None, None
        self.layers = nn.ModuleList(blocks)
        self.linear = recorder.linear("linear", c_in, num_classes)
        arch = dict(model=model, blocks_per_stage=blocks_per_stage, widths=widths, num_classes=num_classes,
                    net=net, back_dep=back_dep, temperature=temperature, input_size=input_size)
        # Compact-model keys only when given, so a standard model's arch is unchanged.
        for key, value in (("inner_widths", inner), ("stem_width", stem_width), ("stem_index", stem_index)):
            if value is not None:
                arch[key] = value
        self._finish(arch, recorder.records, gate_widths, net, back_dep, temperature)

    def forward(self, x, log_alpha=None):
        z_stem, *z_blocks = self.gates(x.shape[0], log_alpha)
        x = bn_gate_relu(self.bn1, self.conv1(x), z_stem)
        for block, z in zip(self.layers, z_blocks):
            x = block(x, z)
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


    @classmethod
    def default_arch(cls, num_classes: int, scale) -> dict:
        return dict(blocks_per_stage=9, widths=scale((16, 32, 64)))

    def compact_arch(self, keep: list[torch.Tensor]) -> dict:
        widths = [len(k) for k in keep]
        arch = dict(self.arch, net="dense", back_dep=False, stem_width=widths[0], inner_widths=tuple(widths[1:]))
        # The stem feeds the stream through the first block's identity shortcut:
        # the stream keeps its width and the kept stem channels go to their positions.
        identity = len(self.layers) > 0 and self.layers[0].shortcut is None
        positions = self.arch.get("stem_index")  # set when the model is compact already
        if identity and (positions is not None or widths[0] < self.gated_layers[0].width):
            kept = keep[0].tolist()
            arch["stem_index"] = tuple(kept if positions is None else [positions[i] for i in kept])
        else:
            arch.pop("stem_index", None)
        return arch

    def stage_of_layers(self) -> tuple[list[int], int, str]:
        per_stage = self.arch["blocks_per_stage"]
        stages = [0] + [1 + b // per_stage for b in range(len(self.gated_layers) - 1)]
        return stages, len(self.arch["widths"]) + 2, "stem, one per stage, fc"

    def greg_block(self, k: int) -> tuple[int, int]:
        stage, block = divmod(k, self.arch["blocks_per_stage"])
        return 1 + stage, block


def resnet56(num_classes: int = 10, **kwargs) -> CifarResNet:
    return CifarResNet(9, (16, 32, 64), num_classes, **kwargs)
