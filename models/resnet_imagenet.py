"""Gated ResNet50 for ImageNet in torchvision's layout (stride on the 3x3 conv).

Gates sit on the stem's output and on the outputs of conv1 and conv2 of every
Bottleneck (after BN, before ReLU); conv3 and projection shortcuts are never
gated.

========  ============  ===========  ========  =========
model     blocks        gated layers  MACs      params
========  ============  ===========  ========  =========
resnet50  3, 4, 6, 3    33 (7616 ch)  4.09 G    25.56 M
========  ============  ===========  ========  =========

(224x224 input, 1000 classes; ``tests/test_models.py`` checks this table.)

A closed stem channel removes the stem filter, its BN entry and the input
channel of the first block's conv1 and projection shortcut (they both read
the max-pooled stem). A closed conv1/conv2 channel removes that filter, its BN
entry and the next conv's input channel.

Compact (exported) networks are the same class with ``net='dense'``,
``stem_width`` and ``inner_widths`` (one ``(conv1, conv2)`` output-width pair
per block); see ``models/export.py``.
"""
import torch
from torch import nn

from l0_layers import DEFAULT_TEMPERATURE

from .common import GatedNetwork, LayerRecorder, bn_gate_relu, conv_out


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, recorder: LayerRecorder, name: str, c_in: int, width: int, stride: int,
                 gate: int, stream_gate: int | None, inner: tuple[int, int] | None = None):
        # inner: the (conv1, conv2) output widths, default (width, width).
        super().__init__()
        size_in = recorder.size
        c_out = width * self.expansion
        w1, w2 = (width, width) if inner is None else inner
        self.conv1, size = recorder.conv(f"{name}.conv1", c_in, w1, 1, in_gate=stream_gate, out_gate=gate,
                                         bn=f"{name}.bn1", closable=True)
        self.bn1 = nn.BatchNorm2d(w1)
        recorder.size = size
        self.conv2, size = recorder.conv(f"{name}.conv2", w1, w2, 3, stride, 1, in_gate=gate,
                                         out_gate=gate + 1, bn=f"{name}.bn2", closable=True)
        self.bn2 = nn.BatchNorm2d(w2)
        recorder.size = size
        self.conv3, _ = recorder.conv(f"{name}.conv3", w2, c_out, 1, in_gate=gate + 1, bn=f"{name}.bn3")
        self.bn3 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            conv, _ = recorder.conv(f"{name}.downsample.0", c_in, c_out, 1, stride, in_gate=stream_gate,
                                    bn=f"{name}.downsample.1", input_size=size_in, role="shortcut")
            self.downsample = nn.Sequential(conv, nn.BatchNorm2d(c_out))

    def forward(self, x, z1, z2):
        out = bn_gate_relu(self.bn1, self.conv1(x), z1)
        out = bn_gate_relu(self.bn2, self.conv2(out), z2)
        out = self.bn3(self.conv3(out))
        return torch.relu_(out + (x if self.downsample is None else self.downsample(x)))


# Block k's number in ResNet50's four stages (3, 4, 6, 3 blocks): layer{s}.{j} is layers.{offset[s] + j}.
_RESNET50_OFFSET = {1: 0, 2: 3, 3: 7, 4: 13}


def _block(match) -> str:
    return f"layers.{_RESNET50_OFFSET[int(match.group(1))] + int(match.group(2))}."


class ImageNetResNet(GatedNetwork):
    """Bottleneck ResNet: 7x7/2 stem, 3x3/2 max-pool, four stages, avg-pool, Linear."""

    paper_penalty = "static_input"
    sparse_classifier = True  # DSR's code masks ResNet50's fc too
    # Other code bases' ResNet50 names (models/published.py): torchvision's (GReg's checkpoints, with
    # DataParallel's module.) number blocks layer{s}.{j}; HSIC-Lasso's (APIB models/resnet_imagenet.py)
    # also wrap each conv and its BN in a Sequential (conv1.conv, layer1.0.conv2.bn,
    # layer1.0.downsample.conv).
    FOREIGN_KEYS = (
        (r"^conv1\.conv\.", "conv1."),
        (r"^conv1\.bn\.", "bn1."),
        (r"^layer(\d)\.(\d+)\.conv(\d)\.conv\.", lambda m: f"{_block(m)}conv{m.group(3)}."),
        (r"^layer(\d)\.(\d+)\.conv(\d)\.bn\.", lambda m: f"{_block(m)}bn{m.group(3)}."),
        (r"^layer(\d)\.(\d+)\.downsample\.conv\.", lambda m: f"{_block(m)}downsample.0."),
        (r"^layer(\d)\.(\d+)\.downsample\.bn\.", lambda m: f"{_block(m)}downsample.1."),
        (r"^layer(\d)\.(\d+)\.", _block),
    )

    def __init__(self, blocks=(3, 4, 6, 3), widths=(64, 128, 256, 512), num_classes: int = 1000,
                 net: str = "hc", back_dep: bool = False, temperature: float = DEFAULT_TEMPERATURE,
                 input_size: int = 224, stem_width: int | None = None, model: str = "resnet50",
                 inner_widths=None):
        super().__init__()
        blocks, widths = tuple(blocks), tuple(widths)
        inner = None
        if inner_widths is not None:
            inner = tuple((int(a), int(b)) for a, b in inner_widths)
            if len(inner) != sum(blocks):
                raise ValueError(f"inner_widths needs {sum(blocks)} (conv1, conv2) pairs, got {len(inner)}")
        stem_width = stem_width or widths[0]
        recorder = LayerRecorder(input_size)
        self.conv1, size = recorder.conv("conv1", 3, stem_width, 7, 2, 3, out_gate=0, bn="bn1", role="stem")
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        recorder.size = conv_out(size, 3, 2, 1)
        gate_widths, layers, c_in, stream_gate = [stem_width], [], stem_width, 0
        for stage, (n, width) in enumerate(zip(blocks, widths)):
            for b in range(n):
                stride = 2 if stage > 0 and b == 0 else 1
                pair = None if inner is None else inner[len(layers)]
                layers.append(Bottleneck(recorder, f"layers.{len(layers)}", c_in, width, stride,
                                         len(gate_widths), stream_gate, pair))
                gate_widths += [width, width] if pair is None else list(pair)
                c_in, stream_gate = width * Bottleneck.expansion, None
        self.layers = nn.ModuleList(layers)
        # A module, as torchvision's and APIB's ResNet50 (avgpool = nn.AdaptiveAvgPool2d((1, 1))), so that
        # thop counts it as it counts theirs: k² + 1 ops per output (thop 0.1.1's adaptive average).
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        recorder.pool("avgpool", c_in, 1, recorder.size ** 2 + 1.0)
        self.fc = recorder.linear("fc", c_in, num_classes)
        arch = dict(model=model, blocks=blocks, widths=widths, num_classes=num_classes, net=net,
                    back_dep=back_dep, temperature=temperature, input_size=input_size, stem_width=stem_width)
        if inner is not None:  # a compact model's key only, so a standard model's arch is unchanged
            arch["inner_widths"] = inner
        self._finish(arch, recorder.records, gate_widths, net, back_dep, temperature, ops=recorder.ops)

    def forward(self, x, log_alpha=None):
        z_stem, *z_blocks = self.gates(x.shape[0], log_alpha)
        x = self.maxpool(bn_gate_relu(self.bn1, self.conv1(x), z_stem))
        for i, block in enumerate(self.layers):
            x = block(x, z_blocks[2 * i], z_blocks[2 * i + 1])
        return self.fc(self.avgpool(x).flatten(1))


    @classmethod
    def default_arch(cls, num_classes: int, scale) -> dict:
        widths = scale((64, 128, 256, 512))
        return dict(blocks=(3, 4, 6, 3), widths=widths, stem_width=widths[0])

    def compact_arch(self, keep: list[torch.Tensor]) -> dict:
        widths = [len(k) for k in keep]
        return dict(self.arch, net="dense", back_dep=False, stem_width=widths[0],
                    inner_widths=tuple(zip(widths[1::2], widths[2::2])))

    def stage_of_layers(self) -> tuple[list[int], int, str]:
        stages = [0]
        for stage, n_blocks in enumerate(self.arch["blocks"]):
            stages += [1 + stage] * (2 * n_blocks)
        return stages, len(self.arch["blocks"]) + 2, "stem, one per stage, fc"

    def greg_block(self, k: int) -> tuple[int, int]:
        for stage, n_blocks in enumerate(self.arch["blocks"], start=1):
            if k < n_blocks:
                return stage, k
            k -= n_blocks
        raise IndexError("no such block")

    def pooled_target_layers(self) -> set[int]:
        # Every block's conv2 (the even gated layers after the stem): the authors judge them against
        # the pooled input of the classifier.
        return {i for i in self.hsic_layers() if i % 2 == 0}


def resnet50(num_classes: int = 1000, **kwargs) -> ImageNetResNet:
    return ImageNetResNet((3, 4, 6, 3), (64, 128, 256, 512), num_classes, **kwargs)
