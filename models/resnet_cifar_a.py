"""Gated CIFAR ResNet-(6n+2) with option-A shortcuts (identity; zero padding where the shape changes).

The network of He et al.'s CIFAR experiments as akamaster/pytorch_resnet_cifar10 (``resnet.py``)
defines it, which GReg (MingSun-Tse/Regularization-Pruning, ``model/resnet_cifar10.py``) and
HSIC-Lasso (songxmu/APIB, ``models/resnet_cifar.py``) prune: a 3x3 stem (16 channels, no bias),
three stages of n BasicBlocks (16, 32, 64 channels; the first block of stages 2 and 3 has
stride 2), global average pooling and a Linear head. Where a block changes the shape its
shortcut takes every second row and column, ``x[:, :, ::2, ::2]``, and pads the channels with
zeros, half before and half after (akamaster: ``planes // 4`` each side; APIB:
``(planes - in) // 2`` before and the rest after: the same for the standard widths).

Gates sit on conv1's output in every block (after BN, before ReLU): the channels GReg's filter
pruning and HSIC-Lasso remove. The stem, conv2 and the residual stream are never gated: with
zero-padded identity shortcuts every block adds into the stream at its full width, so no stream
channel can go. A closed inner channel removes conv1's filter, BN1's entry and conv2's input
channel; a block whose inner channels all close passes its shortcut on (``closable``).

=========  ======  ============  ==========  ==========
model      blocks  gated layers  MACs        params
=========  ======  ============  ==========  ==========
resnet20a  3 x 3    9 (336 ch)    40.55 M     0.27 M
resnet32a  3 x 5   15 (560 ch)    68.86 M     0.46 M
resnet56a  3 x 9   27 (1008 ch)  125.49 M     0.85 M
resnet110a 3 x 18  54 (2016 ch)  252.89 M     1.73 M
=========  ======  ============  ==========  ==========

(CIFAR-10 head; conv + linear MACs: 40,551,040 / 68,862,592 / 125,485,696 / 252,887,680.
Params count every parameter, BN's affine included, as akamaster's table, which lists 0.27 M,
0.46 M, 0.85 M and 1.7 M: 269,722 / 464,154 / 853,018 / 1,727,962; conv and linear alone are
268,346 / 461,882 / 848,954 / 1,719,866. ``tests/test_networks.py`` checks this table.) GReg's
``--stage_pr [0,0.75,0.75,0.32,0]`` on ResNet56 leaves 49.12 M MACs (49,121,920), the number
its paper reports.

Initialisation as akamaster's ``_weights_init``: every conv and the Linear Kaiming-normal with
fan-in, the Linear's bias PyTorch's default, BatchNorm 1 and 0.

Compact (exported) networks are the same class with ``net='dense'`` and ``inner_widths``, each
block's conv1 output width.
"""
import torch
import torch.nn.functional as F
from torch import nn

from l0_layers import DEFAULT_TEMPERATURE

from .common import GatedNetwork, LayerRecorder, bn_gate_relu


class BasicBlockA(nn.Module):
    """conv1 -> BN -> gate -> ReLU -> conv2 -> BN, plus the option-A shortcut, then ReLU."""

    def __init__(self, recorder: LayerRecorder, name: str, c_in: int, planes: int, stride: int, gate: int,
                 inner: int):
        super().__init__()
        self.conv1, size = recorder.conv(f"{name}.conv1", c_in, inner, 3, stride, 1, out_gate=gate,
                                         bn=f"{name}.bn1", closable=True)
        self.bn1 = nn.BatchNorm2d(inner)
        recorder.size = size
        self.conv2, _ = recorder.conv(f"{name}.conv2", inner, planes, 3, 1, 1, in_gate=gate, bn=f"{name}.bn2")
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        # Zero channels before and after the input's: half of the difference before, the rest after.
        self.pad = (planes - c_in) // 2, planes - c_in - (planes - c_in) // 2
        if min(self.pad) < 0:
            raise ValueError(f"{name}: an option-A shortcut cannot narrow {c_in} channels to {planes}")

    def shortcut(self, x):
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if any(self.pad):
            x = F.pad(x, (0, 0, 0, 0, *self.pad))
        return x

    def forward(self, x, z):
        out = bn_gate_relu(self.bn1, self.conv1(x), z)
        out = self.bn2(self.conv2(out))
        if out.dtype != x.dtype or self.bn2._forward_hooks or self.bn2._forward_pre_hooks:
            return torch.relu_(out + self.shortcut(x))  # a type promotion, or a hook that may keep BN's output
        # The shortcut added in place into BN's fresh output (BN's backward needs its input, not its output):
        # where the shape changes only the input's channels of ``out``, from the subsampled input, with no
        # zero-padded copy of it; the zero channels would add exactly 0.
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        out.narrow(1, self.pad[0], x.shape[1]).add_(x)
        return torch.relu_(out)


class CifarResNetA(GatedNetwork):
    """ResNet-(6n+2), option A: stem, three stages ``layer1..3`` of n blocks, average pool, ``linear``.

    The module names are akamaster's and GReg's (``conv1``, ``bn1``, ``layer2.4.conv1``, ``linear``), so
    their checkpoints load by name (``models/published.py``)."""

    blocks = 9  # blocks per stage of the registered depth (a subclass per depth)
    # Other code bases' names (models/published.py): akamaster's and GReg's are ours; APIB's ResNet_CIFAR
    # wraps each conv and its BN in a conv_bn Sequential and names blocks block_<b>.
    FOREIGN_KEYS = (
        (r"^conv_bn\.conv\.", "conv1."),
        (r"^conv_bn\.bn\.", "bn1."),
        (r"^(layer\d)\.block_(\d+)\.conv_bn(\d)\.conv\.", r"\1.\2.conv\3."),
        (r"^(layer\d)\.block_(\d+)\.conv_bn(\d)\.bn\.", r"\1.\2.bn\3."),
    )

    def __init__(self, blocks_per_stage: int | None = None, widths=(16, 32, 64), num_classes: int = 10,
                 net: str = "hc", back_dep: bool = False, temperature: float = DEFAULT_TEMPERATURE,
                 input_size: int = 32, model: str | None = None, inner_widths=None):
        super().__init__()
        n = self.blocks if blocks_per_stage is None else int(blocks_per_stage)
        widths = tuple(int(w) for w in widths)
        if len(widths) != 3:
            raise ValueError(f"a CIFAR ResNet has three stages, got widths {widths}")
        inner = tuple(int(w) for w in inner_widths) if inner_widths is not None else None
        if inner is not None and len(inner) != 3 * n:
            raise ValueError(f"inner_widths needs {3 * n} entries, got {len(inner)}")
        recorder = LayerRecorder(input_size)
        self.conv1, recorder.size = recorder.conv("conv1", 3, widths[0], 3, 1, 1, bn="bn1", role="stem")
        self.bn1 = nn.BatchNorm2d(widths[0])
        c_in, gate_widths = widths[0], []
        for stage, planes in enumerate(widths):
            blocks = []
            for b in range(n):
                stride = 2 if stage > 0 and b == 0 else 1
                width = planes if inner is None else inner[len(gate_widths)]
                blocks.append(BasicBlockA(recorder, f"layer{stage + 1}.{b}", c_in, planes, stride,
                                          len(gate_widths), width))
                gate_widths.append(width)
                c_in = planes
            setattr(self, f"layer{stage + 1}", nn.ModuleList(blocks))
        # A module, as APIB's ResNet_CIFAR (self.pool = nn.AdaptiveAvgPool2d(1)), so that thop counts it
        # as it counts theirs: k² + 1 ops per output (thop 0.1.1's adaptive average).
        self.pool = nn.AdaptiveAvgPool2d(1)
        recorder.pool("pool", c_in, 1, recorder.size ** 2 + 1.0)
        self.linear = recorder.linear("linear", c_in, num_classes)
        model = model or f"resnet{6 * n + 2}a"
        arch = dict(model=model, blocks_per_stage=n, widths=widths, num_classes=num_classes, net=net,
                    back_dep=back_dep, temperature=temperature, input_size=input_size)
        if inner is not None:
            arch["inner_widths"] = inner
        self._finish(arch, recorder.records, gate_widths, net, back_dep, temperature, ops=recorder.ops)

    @property
    def stage_blocks(self):
        return [self.layer1, self.layer2, self.layer3]

    @torch.no_grad()
    def init_weights(self) -> None:
        """akamaster's ``_weights_init``: ``kaiming_normal_`` (fan-in, gain √2) on every conv and on the
        Linear's weight; the Linear's bias keeps PyTorch's default, BatchNorm weight 1 and bias 0."""
        for record in self.weight_layers:
            nn.init.kaiming_normal_(self.get_submodule(record.name).weight)

    def forward(self, x, log_alpha=None):
        z = iter(self.gates(x.shape[0], log_alpha))
        x = torch.relu_(self.bn1(self.conv1(x)))
        for stage in self.stage_blocks:
            for block in stage:
                x = block(x, next(z))
        return self.linear(self.pool(x).flatten(1))

    @classmethod
    def default_arch(cls, num_classes: int, scale) -> dict:
        return dict(blocks_per_stage=cls.blocks, widths=scale((16, 32, 64)))

    def compact_arch(self, keep: list[torch.Tensor]) -> dict:
        return dict(self.arch, net="dense", back_dep=False, inner_widths=tuple(len(k) for k in keep))

    def stage_of_layers(self) -> tuple[list[int], int, str]:
        n = self.arch["blocks_per_stage"]
        # GReg's stages: 0 the stem (never pruned here: its outputs are the residual stream), 1-3 the
        # stages, whose blocks' conv1 take the stage's ratio, 4 the classifier.
        return [1 + b // n for b in range(len(self.gated_layers))], 5, \
            "stem (not prunable, 0), one per stage, fc"

    def hsic_layers(self) -> list[int]:
        return list(range(len(self.gated_layers)))  # every block's conv1 (there is no gated stem)


class ResNet20A(CifarResNetA):
    blocks = 3


class ResNet32A(CifarResNetA):
    blocks = 5


class ResNet56A(CifarResNetA):
    blocks = 9


class ResNet110A(CifarResNetA):
    blocks = 18
