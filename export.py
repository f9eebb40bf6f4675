"""Export the pruned network of a training checkpoint as a compact dense model.

    python export.py runs/resnet56_cifar10_dep_lam5e-07/best.pt        # -> .../pruned.pt
    python export.py runs/resnet56_cifar10_dep_lam5e-07 -o small.pt     # a run directory means its last.pt

Training runs already write ``pruned.pt`` at their end; this script does the
same for any checkpoint (``best.pt``, ``epoch_<k>.pt``, an interrupted
``last.pt``). What the file holds, how gates are folded and what happens to
fully closed layers and the ResNet56 stem: ``models/export.py``. Load it with
``from models import load_pruned``.
"""
import sys
from pathlib import Path

from utils.cli import OneLineParser, human
from utils.errors import run_reporting_errors


def export(checkpoint, out=None) -> Path:
    # Torch and the models are imported here, not with the script: --help and a mistaken flag are
    # answered without them.
    from models import build_model, load_model_state, save_pruned
    from utils.checkpoint import load_checkpoint
    path = Path(checkpoint)
    path = path / "last.pt" if path.is_dir() else path
    state = load_checkpoint(path)
    model = build_model(state["arch"])
    load_model_state(model, state, path)
    out = path.with_name("pruned.pt") if out is None else Path(out)
    if out.is_dir():
        out = out / "pruned.pt"
    args = state.get("args") or {}
    _, payload = save_pruned(model, out, dict(dataset=args.get("dataset"), data_dir=args.get("data_dir"),
                                              epoch=state.get("epoch"), checkpoint=str(path)))
    src = payload["arch"]["source"]
    print(f"wrote {out}: {src['model']} ({src['net']}{', backward' if src['back_dep'] else ''}), kept "
          f"{sum(src['kept'])}/{sum(src['dense_widths'])} channels; MACs {human(payload['macs'])} of "
          f"{human(src['macs_dense'])} (-{100 * (1 - payload['macs'] / src['macs_dense']):.1f}%); params "
          f"{human(payload['params'])} of {human(src['params_dense'])} "
          f"(-{100 * (1 - payload['params'] / src['params_dense']):.1f}%)")
    return out


def main(argv=None) -> int:
    parser = OneLineParser(prog="export.py", description="Write the compact pruned model (pruned.pt) of a checkpoint.")
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a training checkpoint, or a run directory (its last.pt)")
    parser.add_argument("-o", "--out", metavar="OUT", help="output file or directory (default: pruned.pt next to CHECKPOINT)")
    args = parser.parse_args(argv)
    return run_reporting_errors(parser.prog, lambda: export(args.checkpoint, args.out))


if __name__ == "__main__":
    sys.exit(main())
