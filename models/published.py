"""The authors' published CIFAR baselines, loaded into this project's networks.

Three checkpoint formats, each a ``torch.save`` of a dict (or of the state dict itself):

- **akamaster** (pytorch_resnet_cifar10's ``pretrained_models/resnet*.th``, ``trainer.py``):
  ``{'state_dict', 'best_prec1'}`` (``'epoch'`` too in its ``checkpoint.th``), the model wrapped in
  ``DataParallel`` (``module.`` prefixes), an old-format torch file without BN's
  ``num_batches_tracked``; names ``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``linear``.
- **GReg** (MingSun-Tse/Regularization-Pruning ``main.py``): ``{'arch', 'model', 'state_dict', 'acc1',
  'acc5', 'optimizer', 'ExpID', 'prune_state', 'epoch'}`` where ``model`` is the pickled
  ``DataParallel`` module itself (read as inert data, :func:`utils.checkpoint.load_foreign`, and not
  used); the state dict has ``module.`` prefixes (or ``features.module.`` on its VGGs) and akamaster's
  ResNet names (its option-A shortcut, ``downsample``, has no parameters).
- **HSIC-Lasso** (songxmu/APIB ``train.py``; its pretrained files are loaded by its ``prune.py``):
  ``{'state_dict', ...}`` or a bare state dict, ``module.`` prefixes stripped, thop's
  ``total_ops`` / ``total_params`` buffers dropped (as its ``_load_checkpoint`` does); names of its
  own models: ``conv_bn.conv`` / ``layer1.block_0.conv_bn1.bn`` (ResNets), ``feature.conv_3`` /
  ``feature.bn_3`` / ``classifier.0`` (VGG16), ``pre_layers.0`` / ``inception_a3.branch5x5.3`` (GoogLeNet).

Each network declares how other code bases name its tensors: ``FOREIGN_KEYS``, regular
expressions over a prefix-free name and their replacement (this project's names; a name no rule
matches is taken as it is). :func:`import_state` maps a state dict onto a network and checks that
every tensor of the network is found, with its shape, and nothing else is left: a checkpoint of
another network (another depth, another head, a pruned one) is one ``UsageError`` line.

:func:`load_published_pruned` reads a *pruned* network in the same formats (HSIC-Lasso's ``prune.py``
saves ``{'state_dict', 'pruning_info'}`` with the kept channels sliced out of the original module
names; its ``train.py`` then saves ``{'state_dict', 'epoch', 'acc', ...}``): the kept widths are read
off the tensors' shapes.
"""
import re
from pathlib import Path

import torch

from utils.checkpoint import FORMAT as CHECKPOINT_FORMAT
from utils.checkpoint import load_foreign
from utils.errors import UsageError, brief

from . import NETWORKS, build_model, default_arch
from .common import GatedNetwork

# torchvision's ResNet50 ImageNet weights (IMAGENET1K_V1): what ``resnet50(pretrained=True)`` loads.
TORCHVISION_RESNET50 = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
# thop's counters, which it registers as buffers on every module it profiles.
THOP_BUFFERS = ("total_ops", "total_params")


def checkpoint_state(checkpoint, source="the checkpoint") -> dict:
    """The state dict inside a loaded checkpoint: its ``state_dict`` entry, or the dict itself when it
    holds tensors only."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not checkpoint or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint.items()):
        raise UsageError(f"{source} holds no state dict (a 'state_dict' entry or a dict of tensors)")
    return checkpoint


def plain_name(key: str) -> str:
    """A key without ``DataParallel``'s ``module.`` segments (wherever they sit)."""
    return ".".join(part for part in key.split(".") if part != "module")


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(s) for s in t.shape) or "a scalar"


def translate(cls: type, state: dict, origin: dict | None = None) -> dict:
    """``state``'s tensors under this project's names for network class ``cls`` (no checks); ``origin``, if
    given, receives each new name's key in ``state``."""
    rules = [(re.compile(pattern), replacement) for pattern, replacement in getattr(cls, "FOREIGN_KEYS", ())]
    origin = {} if origin is None else origin
    out = {}
    for key, value in state.items():
        name = plain_name(key)
        if name.rsplit(".", 1)[-1] in THOP_BUFFERS:
            continue
        for pattern, replacement in rules:
            name, hits = pattern.subn(replacement, name, count=1)
            if hits:
                break
        if name in out:
            raise UsageError(f"the checkpoint has two tensors for {name!r}: {origin[name]!r} and {key!r}")
        out[name] = value
        origin[name] = key
    return out


def import_state(model: GatedNetwork, state: dict, source="the checkpoint") -> dict:
    """Map a foreign state dict (a checkpoint's, :func:`checkpoint_state`) onto ``model``'s names and check
    it: every weight, bias and BN tensor of ``model`` present with its shape, nothing else. BN's
    ``num_batches_tracked`` may be absent (old files); the gates are ``model``'s own. Returns the
    mapped state dict, for ``model.load_state_dict(..., strict=False)``."""
    name = model.arch["model"]
    origin = {}
    mapped = translate(type(model), state, origin)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("gates.")}
    unexpected = [k for k in mapped if k not in own]
    if unexpected:
        raise UsageError(f"{source} is not a {name} checkpoint: it has {origin[unexpected[0]]!r}, which {name} "
                         f"lacks ({len(unexpected)} such tensors)")
    missing = [k for k in own if k not in mapped and not k.endswith("num_batches_tracked")]
    if missing:
        raise UsageError(f"{source} is not a {name} checkpoint: it lacks {missing[0]!r} "
                         f"({len(missing)} tensors missing)")
    for key, value in mapped.items():
        if value.shape != own[key].shape:
            theirs = "" if plain_name(origin[key]) == key else f" (its {origin[key]!r})"
            raise UsageError(f"{source} is not a {name} checkpoint of these widths: {key!r}{theirs} is "
                             f"{_shape(value)}, {name}'s is {_shape(own[key])}")
    return {k: v.to(own[k].dtype) for k, v in mapped.items()}


def load_published(path, model: str, num_classes: int | None = None, width_mult: float = 1.0,
                   **gate_args) -> GatedNetwork:
    """The registered network ``model`` (its paper widths times ``width_mult``; ``gate_args`` as
    :func:`models.default_arch`'s, default ``net='dense'``) with the weights of the published checkpoint
    ``path`` in any of the formats above. ``num_classes`` defaults to the checkpoint's classifier's; a
    mismatch, or a checkpoint of another network, is a one-line ``UsageError``."""
    if model not in NETWORKS:
        raise UsageError(f"unknown network {model!r}; expected one of {sorted(NETWORKS)}")
    gate_args.setdefault("net", "dense")
    state = checkpoint_state(load_foreign(path), str(path))
    network = build_model(default_arch(model, num_classes or 10, width_mult, **gate_args))
    if num_classes is None:
        head = translate(type(network), state).get(f"{network.weight_layers[-1].name}.weight")
        if head is not None and head.dim() == 2 and head.shape[0] != network.arch["num_classes"]:
            network = build_model(default_arch(model, head.shape[0], width_mult, **gate_args))
    network.load_state_dict(import_state(network, state, str(path)), strict=False)
    return network


def _width_mult(full: GatedNetwork, mapped: dict) -> float:
    """The width multiplier of a (pruned or not) checkpoint of ``full``'s family: its first conv or hidden
    Linear whose output channels no pruning removes (an ungated layer: the CIFAR ResNets' and GoogLeNet's
    stem, APIB VGG16's hidden Linear, ResNet50's first conv3) against the paper width; 1 where the family
    has none (every conv gated, as this project's VGG16) or the file lacks it."""
    for record in full.weight_layers:
        if record.out_gate is None and record.role != "classifier":
            weight = mapped.get(f"{record.name}.weight")
            return 1.0 if weight is None or weight.dim() < 2 else weight.shape[0] / record.out_channels
    return 1.0


def load_published_pruned(path, model: str, checkpoint=None) -> tuple[GatedNetwork, dict]:
    """``(compact network, uncut arch)``: the already pruned network in the checkpoint ``path`` (any of the
    formats above, e.g. what HSIC-Lasso's ``prune.py`` / ``train.py`` save) as this project's compact
    ``model`` (``net='dense'``, the kept widths read off the tensors' shapes, the file's weights), and the
    arch of the unpruned network of that width and head (the baseline its reductions are reported against).
    Kept channels are taken as the first ones of each layer (a pruned network holds only the kept ones). A
    file of another network, or with a layer wider than the network's, is one ``UsageError`` line.
    ``checkpoint``: the file's contents, when already read (:func:`utils.checkpoint.load_foreign`)."""
    if model not in NETWORKS:
        raise UsageError(f"unknown network {model!r}; expected one of {sorted(NETWORKS)}")
    state = checkpoint_state(load_foreign(path) if checkpoint is None else checkpoint, str(path))
    cls = NETWORKS[model].model_class()
    mapped = translate(cls, state)
    full = build_model(default_arch(model, 10, net="dense"))
    head = mapped.get(f"{full.weight_layers[-1].name}.weight")
    classes = head.shape[0] if head is not None and head.dim() == 2 else 10
    dense = build_model(default_arch(model, classes, _width_mult(full, mapped), net="dense"))
    keep = []
    for layer in dense.gated_layers:
        weight = mapped.get(f"{layer.conv}.weight")
        if weight is None:
            raise UsageError(f"{path} is not a {model} checkpoint: it lacks {layer.conv + '.weight'!r}")
        if not 0 < weight.shape[0] <= layer.width:
            raise UsageError(f"{path} is not a pruned {model} of these widths: {layer.conv!r} has "
                             f"{weight.shape[0]} filters, {model}'s at most {layer.width}")
        keep.append(torch.arange(weight.shape[0]))
    compact = build_model(dense.compact_arch(keep))
    compact.load_state_dict(import_state(compact, state, str(path)), strict=False)
    return compact, dense.arch


def torchvision_resnet50(ctx, instead: str = "give the file as CHECKPOINT") -> Path:
    """torchvision's ResNet50 weights (``pretrained=True``: IMAGENET1K_V1) in torch.hub's cache,
    downloaded there by rank 0 of ``ctx`` (utils.distributed) if absent, as the authors'
    ``models.resnet50(pretrained=True)``; absent and not downloadable, one ``UsageError`` line ending in
    ``instead``, how to give the file by hand."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_RESNET50.rsplit("/", 1)[1]
    failure = None
    if ctx.is_main and not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(TORCHVISION_RESNET50, str(path), hash_prefix="0676ba61")
        except Exception as e:  # noqa: BLE001 - no network, a proxy, a bad file: one line
            failure = brief(str(e))
    ctx.barrier()
    if failure or not path.exists():
        raise UsageError(f"--pretrained: torchvision's ResNet50 weights are not in {path} and could not be downloaded "
                         f"({failure or 'see rank 0'}); fetch {TORCHVISION_RESNET50} and {instead}")
    return path


def load_weights(model: GatedNetwork, path) -> str:
    """Start ``model`` (gated or dense, of any width) from the weights of the checkpoint ``path``: an authors'
    published baseline in any of the formats above, torchvision's ResNet50 file, or a training checkpoint of
    this project (its ``model``, gates left out), names mapped by ``FOREIGN_KEYS``. The gates keep their own
    initialisation. A file that does not fit (another network, width or head) is one ``UsageError`` line.
    Returns what the file was, for the log."""
    raw = load_foreign(path)
    if isinstance(raw, dict) and raw.get("format") == CHECKPOINT_FORMAT and isinstance(raw.get("model"), dict):
        state = {k: v for k, v in raw["model"].items() if not k.startswith("gates.")}
        kind = f"a {raw.get('arch', {}).get('model', '?')} training checkpoint of this project"
    else:
        state = checkpoint_state(raw, str(path))
        kind = "a published checkpoint"
    model.load_state_dict(import_state(model, state, str(path)), strict=False)
    return kind
