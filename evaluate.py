"""Evaluate a training checkpoint or a ``pruned.pt`` on the validation set.

    python evaluate.py runs/vgg16_cifar10_dep_lam1e-06/best.pt
    python evaluate.py runs/vgg16_cifar10_dep_lam1e-06/pruned.pt --data-dir ./data
    python evaluate.py runs/resnet50_imagenet_dep_lam5e-09/pruned.pt --data-dir /path/to/imagenet
    python evaluate.py runs/resnet56_dummy-cifar10_dep_lam5e-07/last.pt --dummy

Prints top-1 (and top-5 for ImageNet), MACs and params. The data flags are
the training scripts'; the dataset and data directory default to the ones the
run was trained on (recorded in the checkpoint and in ``pruned.pt``). A
training checkpoint is evaluated with its deterministic test gates, a
``pruned.pt`` as the compact model: the two give the same numbers.
"""
import sys

from utils.cli import DATASETS, OneLineParser, human, nonneg_int, positive_int, usable_cpus
from utils.errors import UsageError, run_reporting_errors


def load_model(path):
    """``(model, info)`` from a training checkpoint (a run directory: its last.pt) or a pruned.pt."""
    # Torch and the models are imported here and in evaluate(), not with the script: --help and a
    # mistaken flag are answered without them.
    from models import build_model, load_model_state
    from models.export import FORMAT as PRUNED_FORMAT
    from models.export import build_pruned, sparse_cost, tied_cost
    from pruning.sparse import sparse_layers
    from utils.checkpoint import FORMAT as CHECKPOINT_FORMAT
    from utils.checkpoint import load_checkpoint
    try:
        state = load_checkpoint(path)
    except UsageError as e:
        if not str(e).endswith(f"is not a {CHECKPOINT_FORMAT} file"):
            raise
        try:
            payload = load_checkpoint(path, PRUNED_FORMAT)
        except UsageError as e2:
            if str(e2).endswith(f"is not a {PRUNED_FORMAT} file"):
                raise UsageError(f"{path} is neither a training checkpoint nor a pruned.pt") from e2
            raise
        model, source = build_pruned(payload), payload["arch"]["source"]
        return model, dict(kind="pruned model", dataset=source.get("dataset"), data_dir=source.get("data_dir"),
                           dummy=bool(source.get("dummy")),
                           macs=payload["macs"], params=payload["params"],
                           macs_dense=source["macs_dense"], params_dense=source["params_dense"])
    model = build_model(state["arch"])
    load_model_state(model, state, path)
    args = state.get("args") or {}
    tied = (state.get("method") or {}).get("tied_values")
    if tied:
        # Tied weights (--sparse static --tied): each tied layer counts its free values.
        macs, params = tied_cost(model, tied)
    elif args.get("sparse") or args.get("method") == "imp":
        # Unstructured sparse training: its inactive weights are exact zeros; count the rest.
        # The checkpoint names its sparse layers (older ones: the default rule).
        names = (state.get("method") or {}).get("layers") or [w.name for w in sparse_layers(model)]
        macs, params = sparse_cost(model, names)
    else:
        macs, params = model.cost.pruned(model.gates.kept())
    macs_dense, params_dense = model.cost.dense()
    return model.eval(), dict(kind=f"checkpoint, epoch {state.get('epoch')}", dataset=args.get("dataset"),
                              data_dir=args.get("data_dir"), dummy=bool(args.get("dummy")), macs=macs, params=params,
                              macs_dense=macs_dense, params_dense=params_dense)


def evaluate(args) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from engine.trainer import evaluate_model
    from utils.data import DeviceNormalize, build_datasets
    from utils.run import limit_threads
    limit_threads()
    model, info = load_model(args.path)
    if info["dummy"] and not args.dummy and args.dataset is None and args.data_dir is None:
        # A run on synthetic data is evaluated on synthetic data unless real data is named.
        args.dummy = True
        print(f"{args.path} was trained on synthetic data (--dummy); evaluating on the same "
              f"(give --dataset/--data-dir for real data)")
    arch = model.arch
    dataset = args.dataset or info["dataset"] or (
        "imagenet" if arch["model"] == "resnet50" else "cifar100" if arch["num_classes"] == 100 else "cifar10")
    size = 224 if dataset == "imagenet" else 32
    if arch.get("input_size") != size:
        raise UsageError(f"{args.path} is a {arch['model']} for {arch.get('input_size')}x{arch.get('input_size')} "
                         f"images; --dataset {dataset} gives {size}x{size}")
    if args.num_classes is not None and args.num_classes != arch["num_classes"]:
        raise UsageError(f"--num_classes {args.num_classes}: {args.path} has {arch['num_classes']} classes")
    data_dir = args.data_dir or info["data_dir"] or ("./data" if dataset != "imagenet" else None)
    if data_dir is None and not args.dummy:
        raise UsageError("give the ImageNet directory with --data-dir (or --dummy for synthetic data)")
    _, val_set, _ = build_datasets(dataset, data_dir, dummy=args.dummy, num_classes=arch["num_classes"])
    if args.gpu is not None and not torch.cuda.is_available():
        print(f"warning: --gpu {args.gpu} given but CUDA is not available; running on the CPU", file=sys.stderr)
    device = torch.device("cuda", args.gpu) if args.gpu is not None and torch.cuda.is_available() else torch.device("cpu")
    loader = DataLoader(val_set, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                        pin_memory=device.type == "cuda")
    stats = evaluate_model(model.to(device), loader, DeviceNormalize(dataset, device), args.limit_batches)
    top5 = f"  top-5 {stats['top5']:.2f}%" if dataset == "imagenet" else ""
    print(f"{args.path} ({info['kind']}): {arch['model']} on {'dummy ' if args.dummy else ''}{dataset} val, "
          f"{stats['examples']} images")
    print(f"top-1 {stats['top1']:.2f}%{top5}  MACs {human(info['macs'])} (-{100 * (1 - info['macs'] / info['macs_dense']):.1f}%)"
          f"  params {human(info['params'])} (-{100 * (1 - info['params'] / info['params_dense']):.1f}%)")
    return dict(stats, macs=info["macs"], params=info["params"], dataset=dataset)


def main(argv=None) -> int:
    p = OneLineParser(prog="evaluate.py", description="Evaluate a checkpoint or a pruned.pt on the validation set.")
    p.add_argument("path", metavar="PATH", help="a training checkpoint (or run directory: its last.pt) or a pruned.pt")
    p.add_argument("--dataset", choices=DATASETS, help="default: the one the run was trained on")
    p.add_argument("--data-dir", "--data_dir", dest="data_dir", metavar="DIR", help="default: the run's")
    p.add_argument("--num_classes", type=positive_int, help="must match the model (a check)")
    p.add_argument("--dummy", action="store_true", help="synthetic data of the right shape")
    p.add_argument("-b", "--batch-size", type=positive_int, default=256)
    p.add_argument("-j", "--workers", type=nonneg_int, default=min(4, usable_cpus()),
                   help="data-loading processes (default: 4, or the CPUs this process may use if fewer)")
    p.add_argument("--limit-batches", type=positive_int, metavar="N", help="at most N batches")
    p.add_argument("--gpu", "--gpu_id", dest="gpu", type=nonneg_int, help="CUDA device index (default: CPU)")
    args = p.parse_args(argv)
    return run_reporting_errors(p.prog, lambda: evaluate(args))


if __name__ == "__main__":
    sys.exit(main())
