"""The pruned network as a real, smaller model: ``pruned.pt``.

:func:`export_pruned` turns a gated model into a *compact* one: the same model
class built with ``net='dense'`` and the kept widths, so there is no second
copy of any architecture. For every conv and linear layer (the structure
records of ``models/structure.py``, never module names found by searching)
it keeps the output channels whose test gate is non-zero and the input
channels the producing gated layer kept. Its eval-mode output equals the
gated model's eval-mode output up to float rounding:

- **Gates are folded into BatchNorm.** A gate multiplies BN's output, so a
  test gate ``z_c`` (also one strictly between 0 and 1) becomes
  ``weight_c *= z_c, bias_c *= z_c``. Since ``z >= 0`` it commutes with the
  ReLU and max-pool that follow, and because BN's affine comes after the
  normalisation the fold holds in train mode as well.
  A gated layer without BatchNorm (LeNet-300-100 with ``batch_norm=False``)
  folds the gate into its own weight rows and bias instead.
- **A fully closed layer keeps one exactly-zero channel.** If every gate of a
  layer is 0 the compact model keeps one channel (channel 0) with its
  filter, conv bias, BN weight and bias and running mean set to 0 (running
  variance 1), so its output is exactly 0 (as in the gated model) and the
  network stays a valid chain of layers. ``CostModel.pruned`` counts that
  channel, so the reported MACs/params, this model's and a FLOP counter's
  agree exactly.
- **ResNet56 stem.** The stem feeds the first block's *identity* shortcut.
  A closed stem channel removes the stem filter, its BN entry and the first
  block's conv1 input channel, but not the residual stream's channel: the
  stream keeps its full width (16), because the first block's conv2 and
  every later block still write and read all of it. In the compact model the
  first block adds its ``k`` kept stem channels into their positions of the
  full-width block output (``out.index_add(1, stem_index, x)``; the index is
  a buffer rebuilt from ``arch['stem_index']``), which costs no MACs. The
  closed positions receive nothing, exactly the zeros the gated model adds.
- **ResNet50 stem** feeds a projection shortcut, so both ``layers.0.conv1``
  and ``layers.0.downsample.0`` simply lose the closed input channels.

- **Unstructured sparsity** (pruning/sparse.py) removes no channel: the
  compact model has the dense widths and the pruned weights are exact zeros
  in its state dict; its ``macs``/``params`` count only the non-zero weights
  of the sparse layers (``arch['source']['sparse_layers']``), see
  :func:`sparse_cost`.

``pruned.pt`` holds only tensors and plain Python values, so it loads with
``torch.load(path, weights_only=True)`` anywhere::

    {'format': 'dep-l0-pruned/1',
     'arch': {...compact model's arch..., 'source': {...the gated model...}},
     'state_dict': {...}, 'macs': int, 'params': int,
     'macs_thop': int}   # thop's count (--cost-convention thop); absent for sparse networks

and :func:`load_pruned` rebuilds the compact model (in eval mode) with
:func:`models.build_model`. It is built from standard layers only, so
``torch.export.export`` works on it.
"""
from pathlib import Path

import torch

from . import build_model
from .common import GatedNetwork

FORMAT = "dep-l0-pruned/1"


@torch.no_grad()
def kept_indices(model: GatedNetwork, gates: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per gated layer, the indices of the channels the compact model keeps
    (the open ones, or ``[0]`` where every gate is closed); ``gates`` (``(total,)``)
    defaults to the model's test gates."""
    z = (model.gates.test_gates() if gates is None else gates).detach().float().cpu()
    out = []
    for gates in z.split(model.gates.widths):
        index = gates.nonzero().flatten()
        out.append(index if index.numel() else torch.zeros(1, dtype=torch.long))
    return out


def compact_arch(model: GatedNetwork, keep: list[torch.Tensor]) -> dict:
    """The arch dict of the compact model: same family, ``net='dense'``, kept widths (the model's own rule)."""
    return model.compact_arch(keep)


@torch.no_grad()
def compact_state_dict(model: GatedNetwork, keep: list[torch.Tensor], gates: torch.Tensor | None = None) -> dict:
    """The compact model's state dict: kept slices, gates folded into BN."""
    source = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    z = (model.gates.test_gates() if gates is None else gates).detach().cpu().split(model.gates.widths)
    closed = [bool((zl == 0).all()) for zl in z]
    out = {}
    for w in model.weight_layers:
        rows = keep[w.out_gate] if w.out_gate is not None else None
        cols = keep[w.in_gate] if w.in_gate is not None else None
        weight = source[f"{w.name}.weight"]
        weight = weight if rows is None else weight[rows]
        weight = weight if cols is None else weight[:, cols]
        dead = w.out_gate is not None and closed[w.out_gate]
        # A gated layer without BatchNorm (an MLP's hidden layer without BN): the gate folds into its own
        # rows and bias instead, relu(z (W x + b)) = relu((z W) x + z b) for z >= 0.
        fold = z[w.out_gate][rows] if rows is not None and w.bn is None else None
        if fold is not None:
            weight = weight * fold.to(weight.dtype).view(-1, *([1] * (weight.dim() - 1)))
        out[f"{w.name}.weight"] = torch.zeros_like(weight) if dead else weight.clone()
        if w.bias:
            bias = source[f"{w.name}.bias"]
            bias = bias if rows is None else bias[rows]
            bias = bias if fold is None else bias * fold.to(bias.dtype)
            out[f"{w.name}.bias"] = torch.zeros_like(bias) if dead else bias.clone()
        if w.bn is None:
            continue
        bn = {key: source[f"{w.bn}.{key}"] for key in ("weight", "bias", "running_mean", "running_var")}
        if rows is not None:
            bn = {key: value[rows] for key, value in bn.items()}
            gate = z[w.out_gate][rows].to(bn["weight"].dtype)
            bn["weight"] = bn["weight"] * gate
            bn["bias"] = bn["bias"] * gate
        if dead:
            bn = dict(weight=torch.zeros_like(bn["weight"]), bias=torch.zeros_like(bn["bias"]),
                      running_mean=torch.zeros_like(bn["running_mean"]),
                      running_var=torch.ones_like(bn["running_var"]))
        for key, value in bn.items():
            out[f"{w.bn}.{key}"] = value.clone()
        tracked = f"{w.bn}.num_batches_tracked"
        if tracked in source:
            out[tracked] = source[tracked].clone()
    return out


def _count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def sparse_cost(model: GatedNetwork, sparse_layers) -> tuple[int, int]:
    """(MACs, params) of ``model`` counting only the non-zero weights of the layers named in
    ``sparse_layers`` (every weight of the others): ``CostModel.sparse``."""
    names = set(sparse_layers)
    counts = model.cost.weights_per_layer().clone()
    for i, w in enumerate(model.weight_layers):
        if w.name in names:
            counts[i] = float(torch.count_nonzero(model.get_submodule(w.name).weight))
    return model.cost.sparse(counts)


def tied_cost(model: GatedNetwork, tied: dict) -> tuple[int, int]:
    """(MACs, params) of ``model`` when each layer named in ``tied`` holds only ``tied[name]`` free
    values shared by all its weights (pruning/tied.py): every weight still multiplies (the dense
    MACs), and the parameters count the free values instead of the layer's weights."""
    macs, params = model.cost.dense()
    for name, values in tied.items():
        params += int(values) - model.get_submodule(name).weight.numel()
    return macs, params


@torch.no_grad()
def export_pruned(model: GatedNetwork, source_info: dict | None = None, gates: torch.Tensor | None = None,
                  sparse_layers=(), tied: dict | None = None):
    """Return ``(compact_model, payload)``: the compact model (CPU, eval mode)
    and the dict that :func:`save_pruned` writes.

    ``source_info`` adds plain values (dataset, epoch, checkpoint path, ...)
    to ``arch['source']``. ``gates`` (``(total,)``) is the decision to export, default the
    model's test gates: a pruning method's (``PruningMethod.channel_gates``) for a dense model.
    ``sparse_layers`` names layers with unstructured sparsity (pruning/sparse.py): their pruned
    weights are exact zeros in the state dict, and ``macs``/``params`` count only their non-zero
    weights (:func:`sparse_cost` of the compact model). ``tied`` (``{layer: free values}``) names
    layers with tied weights (pruning/tied.py): the state dict holds their full tensors and
    ``params`` counts their free values (:func:`tied_cost`).
    """
    gates = model.gates.test_gates() if gates is None else gates
    keep = kept_indices(model, gates)
    arch = compact_arch(model, keep)
    compact = build_model(arch)
    compact.load_state_dict(compact_state_dict(model, keep, gates), strict=True)
    compact.eval()
    kept_counts = model.gates.per_layer_sum((gates > 0).float()).long().cpu()
    # pruned.pt's macs are conv + linear MACs whatever the run reports (macs_thop: thop's count).
    macs, params = model.cost.pruned(kept_counts, "conv")
    # The compact model's own structure must price exactly as the gated model's
    # pruned cost, and its real parameters must number the same (a cheap guard;
    # tests also check against torch's FLOP counter).
    counted = _count_params(compact)
    if compact.cost.dense("conv") != (macs, params) or counted != params:
        raise AssertionError(f"export cost mismatch: model says {(macs, params)}, compact structure says "
                             f"{compact.cost.dense('conv')}, parameter count {counted}")
    macs_thop = model.cost.pruned(kept_counts, "thop")[0]
    macs_dense, params_dense = model.cost.dense("conv")
    source = dict(arch=dict(model.arch), model=model.arch["model"], net=model.gates.net,
                  back_dep=bool(model.gates.back_dep), layers=[g.name for g in model.gated_layers],
                  dense_widths=list(model.gates.widths), kept=[int(k) for k in kept_counts.tolist()],
                  macs_dense=macs_dense, params_dense=params_dense)
    if sparse_layers:
        macs, params = sparse_cost(compact, sparse_layers)
        source["sparse_layers"] = list(sparse_layers)
    if tied:
        macs, params = tied_cost(compact, tied)
        source["tied_layers"] = {name: int(values) for name, values in tied.items()}
    source.update(source_info or {})
    payload = dict(format=FORMAT, arch=dict(compact.arch, source=source),
                   state_dict={k: v.clone() for k, v in compact.state_dict().items()},
                   macs=int(macs), params=int(params))
    if not sparse_layers and not tied:
        payload["macs_thop"] = int(macs_thop)
    return compact, payload


def save_pruned(model: GatedNetwork, path, source_info: dict | None = None, gates: torch.Tensor | None = None,
                sparse_layers=(), tied: dict | None = None):
    """Export ``model`` (at ``gates``, default its test gates; ``sparse_layers`` and ``tied`` as in
    :func:`export_pruned`) and write ``pruned.pt`` atomically; returns ``(compact, payload)``."""
    from utils.checkpoint import save_checkpoint

    compact, payload = export_pruned(model, source_info, gates, sparse_layers, tied)
    save_checkpoint(payload, Path(path))
    return compact, payload


def build_pruned(payload: dict) -> GatedNetwork:
    """Rebuild the compact model from a loaded ``pruned.pt`` payload (eval mode)."""
    arch = {k: v for k, v in payload["arch"].items() if k != "source"}
    model = build_model(arch)
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.eval()


def read_pruned(path) -> dict:
    """Load a ``pruned.pt`` payload safely (``weights_only``); a run directory
    means its ``pruned.pt``. Other files raise a one-line ``UsageError``."""
    from utils.checkpoint import load_checkpoint

    path = Path(path)
    if path.is_dir():
        path = path / "pruned.pt"
    return load_checkpoint(path, expected_format=FORMAT)


def load_pruned(path) -> GatedNetwork:
    """``pruned.pt`` -> the compact model, on the CPU, in eval mode."""
    return build_pruned(read_pruned(path))
