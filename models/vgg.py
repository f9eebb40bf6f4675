"""Gated VGG16-BN for CIFAR: conv(bias) -> BN -> gate -> ReLU on all 13 convs.

=====================  ===========  ==========  ===========
model                  gated layers  MACs        params
=====================  ===========  ==========  ===========
vgg16, CIFAR-10        13 (4224 ch)  313.20 M    14.73 M
vgg16, CIFAR-100       13 (4224 ch)  313.25 M    14.77 M
=====================  ===========  ==========  ===========

(params include BN's affine parameters, 8,448 of them; conv + linear alone
are 14.72 M for CIFAR-10. ``tests/test_models.py`` checks this table.)

A closed channel removes the conv filter, its BN entry and the next conv's
input channel (or the classifier's input column).
"""
import torch
from torch import nn

from l0_layers import DEFAULT_TEMPERATURE

from .common import GatedNetwork, LayerRecorder, bn_gate_relu, compact_cfg_arch

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class ConvStage(nn.Module):
    """conv -> BN -> gate -> ReLU, then max-pool where the config says ``M``."""

    def __init__(self, conv: nn.Conv2d, pool: bool):
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(conv.out_channels)
        self.pooled = pool
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x, z):
        if self.pooled and z is not None:
            # z >= 0 is constant over space, so max-pool commutes with it (exactly,
            # also in floating point): gating after the pool touches 4x fewer values.
            return self.pool(bn_gate_relu(self.bn, self.conv(x), None)) * z.to(x.dtype)
        return self.pool(bn_gate_relu(self.bn, self.conv(x), z))


class VGG(GatedNetwork):
    """VGG-BN for 32x32 inputs with a single Linear head, built from a config list."""

    stages_are_layers = True

    def __init__(self, cfg=VGG16_CFG, num_classes: int = 10, net: str = "hc", back_dep: bool = False,
                 temperature: float = DEFAULT_TEMPERATURE, input_size: int = 32):
        super().__init__()
        cfg = tuple(cfg)
        widths = [v for v in cfg if v != "M"]
        # The reference feeds the dependency MLP a vector of the first layer's
        # width in both directions (64 for VGG16).
        self.dep_input_dim = widths[0]
        recorder = LayerRecorder(input_size)
        stages, c_in = [], 3
        for i, width in enumerate(widths):
            position = [j for j, v in enumerate(cfg) if v != "M"][i]
            pool = position + 1 < len(cfg) and cfg[position + 1] == "M"
            name = f"features.{i}"
            conv, size = recorder.conv(f"{name}.conv", c_in, width, 3, padding=1, bias=True,
                                       in_gate=i - 1 if i else None, out_gate=i, bn=f"{name}.bn",
                                       role="body" if i else "stem")
            recorder.size = size // 2 if pool else size
            stages.append(ConvStage(conv, pool))
            c_in = width
        if recorder.size != 1:
            raise ValueError(f"VGG with {cfg.count('M')} poolings needs 32x32 inputs, got {input_size}")
        self.features = nn.ModuleList(stages)
        self.classifier = recorder.linear("classifier", c_in, num_classes, in_gate=len(widths) - 1)
        self._finish(dict(model="vgg16", cfg=cfg, num_classes=num_classes, net=net, back_dep=back_dep,
                          temperature=temperature, input_size=input_size),
                     recorder.records, widths, net, back_dep, temperature)

    @torch.no_grad()
    def init_weights(self) -> None:
        r"""The reference's VGG re-initialisation, over its generic one (spec 3b): every conv
        :math:`\mathcal{N}(0, 2 / (k^2 C_{out}))` with bias 0, the head :math:`\mathcal{N}(0, 0.01^2)`
        with bias 0, BatchNorm weight 1 and bias 0."""
        for record in self.weight_layers:
            layer = self.get_submodule(record.name)
            std = (2.0 / (record.kernel ** 2 * record.out_channels)) ** 0.5 if isinstance(layer, nn.Conv2d) else 0.01
            layer.weight.normal_(0.0, std)
            layer.bias.zero_()

    def forward(self, x, log_alpha=None):
        for stage, z in zip(self.features, self.gates(x.shape[0], log_alpha)):
            x = stage(x, z)
        return self.classifier(x.flatten(1))

    @classmethod
    def default_arch(cls, num_classes: int, scale) -> dict:
        return dict(cfg=scale(VGG16_CFG))

    def compact_arch(self, keep: list[torch.Tensor]) -> dict:
        return compact_cfg_arch(self.arch, keep)

    def stage_of_layers(self) -> tuple[list[int], int, str]:
        n = len(self.gated_layers)
        return list(range(n)), n + 1, f"one per layer index, 0-{n - 1} convs, {n} the classifier"

    def hsic_layers(self) -> list[int]:
        return list(range(len(self.gated_layers)))  # every conv, the first included


def vgg16(num_classes: int = 10, **kwargs) -> VGG:
    return VGG(VGG16_CFG, num_classes, **kwargs)
