"""Gated CIFAR GoogLeNet (Inception v1 for 32x32 inputs) as HRank and HSIC-Lasso define it.

The network of songxmu/APIB ``models/googlenet.py`` (``googlenet()``, taken from lmbxmu/HRank):
a 3x3 stem conv (192 channels) with BN and ReLU, nine Inception blocks (a3, b3, a4-e4, a5, b5) with
a 3x3/2 max-pool after b3 and after e4 (32 -> 16 -> 8), global average pooling and one Linear.
Each block concatenates four branches:

- ``b1``: 1x1 conv (n1x1);
- ``b3_reduce`` -> ``b3``: 1x1 conv (n3x3red), then 3x3 conv (n3x3);
- ``b5_reduce`` -> ``b5_mid`` -> ``b5``: 1x1 conv (n5x5red), 3x3 conv (n5x5red2), 3x3 conv (n5x5): the
  "5x5" branch is two 3x3 convs;
- ``pool_proj``: 3x3/1 max-pool, then 1x1 conv (pool planes).

Every conv has a bias and is followed by BN and ReLU. Initialisation as the authors' code:
PyTorch's defaults.

Gates sit on the three inner widths of every block (after BN, before ReLU): ``b3_reduce``,
``b5_reduce`` and ``b5_mid``, each read by one conv of its own branch. These are the channels
HSIC-Lasso prunes (its ``googlenet_auto_prune_layer`` judges the input channels of ``branch3x3.3``,
``branch5x5.3`` and ``branch5x5.6``, and rebuilds the network from the nine blocks' three kept
widths, ``googlenet_X(cfg)``). The stem and the branch outputs, which the concatenation feeds to
all four branches of the next block, are never gated. A branch whose inner channels all close
outputs a constant; the other branches carry on (``closable``).

==========  ============  ==========  ==========
model       gated layers  MACs        params
==========  ============  ==========  ==========
googlenet   27 (2224 ch)  1521.76 M    6.17 M
==========  ============  ==========  ==========

(CIFAR-10 head; conv + linear MACs, 1,521,756,160: the 1.52 B FLOPs HRank's and HSIC-Lasso's
tables list; params 6,166,250 with BN's 15,808 affine parameters, 6,150,442 without BN: their
6.15 M. ``tests/test_networks.py`` checks this table.)

Compact (exported) networks are the same class with ``net='dense'`` and the blocks' kept widths
in ``blocks``.
"""
import re

import torch
from torch import nn

from l0_layers import DEFAULT_TEMPERATURE

from .common import GatedNetwork, LayerRecorder, bn_gate_relu, conv_out, max_pool_3x3

BLOCK_NAMES = ("a3", "b3", "a4", "b4", "c4", "d4", "e4", "a5", "b5")
# Per block: n1x1, n3x3red, n3x3, n5x5red, n5x5red2, n5x5, pool planes (HRank's / APIB's filters and
# mid_filters).
GOOGLENET_BLOCKS = (
    (64, 96, 128, 16, 32, 32, 32),
    (128, 128, 192, 32, 96, 96, 64),
    (192, 96, 208, 16, 48, 48, 64),
    (160, 112, 224, 24, 64, 64, 64),
    (128, 128, 256, 24, 64, 64, 64),
    (112, 144, 288, 32, 64, 64, 64),
    (256, 160, 320, 32, 128, 128, 128),
    (256, 160, 320, 32, 128, 128, 128),
    (384, 192, 384, 48, 128, 128, 128),
)
STEM = 192
POOL_AFTER = (1, 6)  # a 3x3/2 max-pool after b3 and after e4
INNER = (1, 3, 4)    # the gated entries of a block's widths: n3x3red, n5x5red, n5x5red2
# HRank's and APIB's names of a block's layers (Sequential indices) -> ours.
FOREIGN_PARTS = {"branch1x1.0": "b1.conv", "branch1x1.1": "b1.bn",
                 "branch3x3.0": "b3_reduce.conv", "branch3x3.1": "b3_reduce.bn",
                 "branch3x3.3": "b3.conv", "branch3x3.4": "b3.bn",
                 "branch5x5.0": "b5_reduce.conv", "branch5x5.1": "b5_reduce.bn",
                 "branch5x5.3": "b5_mid.conv", "branch5x5.4": "b5_mid.bn",
                 "branch5x5.6": "b5.conv", "branch5x5.7": "b5.bn",
                 "branch_pool.1": "pool_proj.conv", "branch_pool.2": "pool_proj.bn"}


class ConvBN(nn.Module):
    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(conv.out_channels)

    def forward(self, x, z=None):
        return bn_gate_relu(self.bn, self.conv(x), z)


class Inception(nn.Module):
    """Four branches, concatenated; gates ``gate``, ``gate + 1``, ``gate + 2`` on the inner widths."""

    def __init__(self, recorder: LayerRecorder, name: str, c_in: int, widths, gate: int):
        super().__init__()
        n1, r3, n3, r5, m5, n5, pool = widths

        def conv(part, c_from, c_to, kernel, **gates):
            layer, _ = recorder.conv(f"{name}.{part}.conv", c_from, c_to, kernel, padding=kernel // 2, bias=True,
                                     bn=f"{name}.{part}.bn", **gates)
            return ConvBN(layer)

        self.b1 = conv("b1", c_in, n1, 1)
        self.b3_reduce = conv("b3_reduce", c_in, r3, 1, out_gate=gate, closable=True)
        self.b3 = conv("b3", r3, n3, 3, in_gate=gate)
        self.b5_reduce = conv("b5_reduce", c_in, r5, 1, out_gate=gate + 1, closable=True)
        self.b5_mid = conv("b5_mid", r5, m5, 3, in_gate=gate + 1, out_gate=gate + 2, closable=True)
        self.b5 = conv("b5", m5, n5, 3, in_gate=gate + 2)
        self.pool_proj = conv("pool_proj", c_in, pool, 1)
        self.out_channels = n1 + n3 + n5 + pool

    def forward(self, x, z3, z5, z5_mid):
        return torch.cat([self.b1(x),
                          self.b3(self.b3_reduce(x, z3)),
                          self.b5(self.b5_mid(self.b5_reduce(x, z5), z5_mid)),
                          self.pool_proj(max_pool_3x3(x))], 1)


class GoogLeNet(GatedNetwork):
    """Stem, nine Inception blocks ``inception_a3`` .. ``inception_b5``, average pool, ``linear``."""

    # Other code bases' names (models/published.py): HRank's and APIB's.
    FOREIGN_KEYS = ((r"^pre_layers\.0\.", "stem.conv."), (r"^pre_layers\.1\.", "stem.bn."),
                    *((rf"^(inception_\w\d)\.{re.escape(theirs)}\.", rf"\1.{ours}.")
                      for theirs, ours in FOREIGN_PARTS.items()))

    def __init__(self, blocks=GOOGLENET_BLOCKS, stem: int = STEM, num_classes: int = 10, net: str = "hc",
                 back_dep: bool = False, temperature: float = DEFAULT_TEMPERATURE, input_size: int = 32,
                 model: str = "googlenet"):
        super().__init__()
        blocks = tuple(tuple(int(w) for w in b) for b in blocks)
        if len(blocks) != len(BLOCK_NAMES) or any(len(b) != 7 for b in blocks):
            raise ValueError(f"GoogLeNet takes {len(BLOCK_NAMES)} blocks of 7 widths, got {blocks}")
        recorder = LayerRecorder(input_size)
        conv, recorder.size = recorder.conv("stem.conv", 3, stem, 3, padding=1, bias=True, bn="stem.bn", role="stem")
        self.stem = ConvBN(conv)
        c_in, gate_widths = stem, []
        for i, (name, widths) in enumerate(zip(BLOCK_NAMES, blocks)):
            block = Inception(recorder, f"inception_{name}", c_in, widths, len(gate_widths))
            setattr(self, f"inception_{name}", block)
            gate_widths += [widths[j] for j in INNER]
            c_in = block.out_channels
            if i in POOL_AFTER:
                recorder.size = conv_out(recorder.size, 3, 2, 1)
        # HRank's AvgPool2d(8, stride=1) over the last 8x8 maps: a module, so thop counts it.
        self.avgpool = nn.AvgPool2d(recorder.size, stride=1)
        recorder.pool("avgpool", c_in, 1, 1.0)
        self.linear = recorder.linear("linear", c_in, num_classes)
        self._finish(dict(model=model, blocks=blocks, stem=stem, num_classes=num_classes, net=net, back_dep=back_dep,
                          temperature=temperature, input_size=input_size),
                     recorder.records, gate_widths, net, back_dep, temperature, ops=recorder.ops)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The authors' code keeps PyTorch's default initialisation."""
        for record in self.weight_layers:
            self.get_submodule(record.name).reset_parameters()

    def forward(self, x, log_alpha=None):
        z = self.gates(x.shape[0], log_alpha)
        x = self.stem(x)
        for i, name in enumerate(BLOCK_NAMES):
            x = getattr(self, f"inception_{name}")(x, *z[3 * i:3 * i + 3])
            if i in POOL_AFTER:
                x = max_pool_3x3(x, 2)
        return self.linear(self.avgpool(x).flatten(1))

    @classmethod
    def default_arch(cls, num_classes: int, scale) -> dict:
        return dict(blocks=tuple(scale(b) for b in GOOGLENET_BLOCKS), stem=scale((STEM,))[0])

    def compact_arch(self, keep: list[torch.Tensor]) -> dict:
        kept = iter(len(k) for k in keep)
        blocks = tuple(tuple(next(kept) if j in INNER else w for j, w in enumerate(b)) for b in self.arch["blocks"])
        return dict(self.arch, net="dense", back_dep=False, blocks=blocks)

    def stage_of_layers(self) -> tuple[list[int], int, str]:
        # No GoogLeNet command in GReg's code: one ratio per Inception block (its three inner widths),
        # after a stem entry (not prunable: 0) and before the classifier's.
        return [1 + i // 3 for i in range(len(self.gated_layers))], len(BLOCK_NAMES) + 2, \
            "stem (not prunable, 0), one per Inception block a3-b5, fc"

    def hsic_layers(self) -> list[int]:
        return list(range(len(self.gated_layers)))
