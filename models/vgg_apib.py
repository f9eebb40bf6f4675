"""Gated VGG16 with HSIC-Lasso's head: 13 convs with BN, 4 max-pools, AvgPool(2), Linear-ReLU-Linear.

The network of songxmu/APIB (``models/vgg_cifar.py``, ``vgg16()``), the one HSIC-Lasso's
published VGG16 command prunes: thirteen 3x3 convs without bias, each followed by BN and ReLU,
a 2x2 max-pool after convs 2, 4, 7 and 10 (convs 11-13 run at 2x2), ``AvgPool2d(2)`` to 1x1,
then ``Linear(512, 512)``, ReLU, ``Linear(512, classes)`` (no BN in the head). Initialisation
as its code: PyTorch's defaults everywhere.

Gates sit on all 13 convs (after BN, before ReLU). A closed channel of conv k removes its filter,
its BN entry and conv k+1's input channel; conv13's channels are the first Linear's inputs. The
head's hidden 512 units are never gated (HSIC-Lasso's code stops its prunable layers at the first
Linear, whose input channels it prunes).

==============  ============  ==========  ===========
model           gated layers  MACs        params
==============  ============  ==========  ===========
vgg16_apib      13 (4224 ch)  313.46 M    14.99 M
==============  ============  ==========  ===========

(CIFAR-10 head; conv + linear MACs, 313,463,808; params 14,986,698 with BN's 8,448 affine
parameters, 14,978,250 without, the 14.98 M the papers' tables list for VGG16. Their 313.73 M
FLOPs is another counter's; ours is conv + linear MACs, ``docs/cost.md``. ``tests/test_networks.py``
checks this table.)
"""
import torch
from torch import nn

from l0_layers import DEFAULT_TEMPERATURE

from .common import GatedNetwork, LayerRecorder, compact_cfg_arch
from .structure import WeightLayer
from .vgg import ConvStage

APIB_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
HIDDEN = 512


class VGGApib(GatedNetwork):
    """VGG-BN from a config list (no max-pool after the last convs), AvgPool(2), a two-Linear head
    ``classifier`` = (Linear, ReLU, Linear), as APIB's ``VGG_CIFAR``."""

    stages_are_layers = True
    # APIB's names (models/published.py): feature.conv_<k> / feature.bn_<k>, k from 1; its classifier
    # Sequential is ours.
    FOREIGN_KEYS = (
        (r"^feature\.conv_(\d+)\.", lambda m: f"features.{int(m.group(1)) - 1}.conv."),
        (r"^feature\.bn_(\d+)\.", lambda m: f"features.{int(m.group(1)) - 1}.bn."),
    )

    def __init__(self, cfg=APIB_VGG16_CFG, num_classes: int = 10, net: str = "hc", back_dep: bool = False,
                 temperature: float = DEFAULT_TEMPERATURE, input_size: int = 32, hidden: int = HIDDEN,
                 model: str = "vgg16_apib"):
        super().__init__()
        cfg = tuple(cfg)
        widths = [v for v in cfg if v != "M"]
        self.dep_input_dim = widths[0]  # as our VGG16: the first layer's width feeds the dependency MLP
        recorder = LayerRecorder(input_size)
        stages, c_in, i = [], 3, 0
        for position, width in enumerate(cfg):
            if width == "M":
                continue
            pool = position + 1 < len(cfg) and cfg[position + 1] == "M"
            conv, size = recorder.conv(f"features.{i}.conv", c_in, width, 3, padding=1, in_gate=i - 1 if i else None,
                                       out_gate=i, bn=f"features.{i}.bn", role="body" if i else "stem")
            recorder.size = size // 2 if pool else size
            stages.append(ConvStage(conv, pool))
            c_in, i = width, i + 1
        if recorder.size != 2:
            raise ValueError(f"APIB's VGG needs 2x2 maps before its AvgPool(2), got {recorder.size}x{recorder.size} "
                             f"(cfg {cfg}, input {input_size})")
        self.features = nn.ModuleList(stages)
        # The hidden Linear is a body layer (sparse training masks it); the last one the classifier.
        recorder.records.append(WeightLayer("classifier.0", c_in, hidden, 1, 1, in_gate=len(widths) - 1, bias=True,
                                            role="body"))
        head = recorder.linear("classifier.2", hidden, num_classes)
        self.classifier = nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(inplace=True), head)
        # A module, as in the authors' network, so thop counts it (one op per output).
        self.avgpool = nn.AvgPool2d(2)
        recorder.pool("avgpool", c_in, 1, 1.0, gate=len(widths) - 1)
        self._finish(dict(model=model, cfg=cfg, num_classes=num_classes, net=net, back_dep=back_dep,
                          temperature=temperature, input_size=input_size, hidden=hidden),
                     recorder.records, widths, net, back_dep, temperature, ops=recorder.ops)

    @torch.no_grad()
    def init_weights(self) -> None:
        """APIB's VGG keeps PyTorch's default initialisation (Kaiming-uniform with a = √5, uniform biases)."""
        for record in self.weight_layers:
            self.get_submodule(record.name).reset_parameters()

    def forward(self, x, log_alpha=None):
        for stage, z in zip(self.features, self.gates(x.shape[0], log_alpha)):
            x = stage(x, z)
        return self.classifier(self.avgpool(x).flatten(1))

    @classmethod
    def default_arch(cls, num_classes: int, scale) -> dict:
        return dict(cfg=scale(APIB_VGG16_CFG), hidden=scale((HIDDEN,))[0])

    def compact_arch(self, keep: list[torch.Tensor]) -> dict:
        return compact_cfg_arch(self.arch, keep)

    def stage_of_layers(self) -> tuple[list[int], int, str]:
        # GReg's VGG indices count every conv and linear: convs 0-12, the hidden Linear 13 (not
        # prunable: 0), the classifier 14.
        n = len(self.gated_layers)
        return list(range(n)), n + 2, f"one per layer index, 0-{n - 1} convs, {n} the hidden Linear (0), " \
                                      f"{n + 1} the classifier"

    def hsic_layers(self) -> list[int]:
        return list(range(len(self.gated_layers)))  # every conv; conv13 judged at the first Linear
