"""The published command lines of GReg's README (MingSun-Tse/Regularization-Pruning) and HSIC-Lasso's
README (songxmu/APIB), verbatim, parsed by prune.py's own parser with its checks.

The commands below are copied from the two READMEs as data (GReg's at commit a404402, APIB's at
6ed8d9d). Each is read as the authors meant it: environment assignments
(``CUDA_VISIBLE_DEVICES=0,1``) and ``python main.py`` dropped, the rest split with shlex. Two
readings are needed for APIB's: its lines end in ``\\`` without a space before it (``--model
vgg16\\``), which a shell would join into one word with the next line (``vgg16--dataset``), so the
continuations are read as spaces; and its placeholders ``[pre-trained model dir]`` / ``[dataset
path]`` are replaced by a path. GReg's unquoted ``[0,0.75,...]`` and ``Experiments/*...*`` reach the
script as written when no file matches them (the shell leaves them as they are).

Every command must parse, and mean what the authors' code does with it (the network, its weights,
the method, the settings); the networks this project lacks (GReg's VGG19 and ResNet34) parse and
are refused with one line when the run starts. Two of GReg's commands run end to end on synthetic
data: its scratch training of ResNet56 and GReg-1 from that run's checkpoint through its
``--base_model_path`` pattern.

HSIC-Lasso's ``train.py`` commands fine-tune an already pruned network in a separate script; here
``prune.py --method hsic`` fine-tunes in the same run, and the same ``prune.py`` runs them as written
(``python prune.py`` for ``python train.py``): ``--ckpt_path`` names the pruned network and nothing is
searched (tests/test_hsic_finetune.py runs the VGG16 one end to end).
"""
import json
import shlex

import pytest
import torch

import prune
from conftest import run_script
from engine import prune_job
from pruning import METHODS

pytestmark = pytest.mark.usefixtures("one_thread")

GREG_README = [
    'CUDA_VISIBLE_DEVICES=0 python main.py --arch resnet56 --dataset cifar10 --method L1 --stage_pr [0,0,0,0,0] --batch_size 128 --wd 0.0005 --lr_ft 0:0.1,100:0.01,150:0.001 --epochs 200 --project scratch__resnet56__cifar10',
    'CUDA_VISIBLE_DEVICES=0 python main.py --arch vgg19 --dataset cifar100 --method L1 --stage_pr [0-18:0] --batch_size 256 --wd 0.0005 --lr_ft 0:0.1,100:0.01,150:0.001 --epochs 200 --project scratch__vgg19__cifar100',
    'CUDA_VISIBLE_DEVICES=1 python main.py --method GReg-1 -a resnet56 --dataset cifar10 --wd 0.0005 --lr_ft 0:0.01,60:0.001,90:0.0001 --epochs 120 --base_model_path Experiments/*scratch__resnet56__cifar10*/weights/checkpoint_best.pth --batch_size_prune 128 --batch_size 128 --update_reg_interval 10 --stabilize 10000 --stage_pr [0,0.75,0.75,0.32,0] --project GReg-1__resnet56__cifar10__2.55x_pr0.750.32 --screen',
    'CUDA_VISIBLE_DEVICES=1 python main.py --method GReg-2 -a resnet56 --dataset cifar10 --wd 0.0005 --lr_ft 0:0.01,60:0.001,90:0.0001 --epochs 120 --base_model_path Experiments/*scratch__resnet56__cifar10*/weights/checkpoint_best.pth --batch_size_prune 128 --batch_size 128 --update_reg_interval 10 --stabilize 10000 --stage_pr [0,0.75,0.75,0.32,0] --project GReg-2__resnet56__cifar10__2.55x_pr0.750.32 --screen',
    'CUDA_VISIBLE_DEVICES=1 python main.py --method GReg-1 -a vgg19 --dataset cifar100 --wd 0.0005 --lr_ft 0:0.01,60:0.001,90:0.0001 --epochs 120 --base_model_path Experiments/*scratch__vgg19__cifar100*/weights/checkpoint_best.pth --batch_size_prune 256 --batch_size 256 --update_reg_interval 10 --stabilize 10000 --stage_pr [1-15:0.7] --project GReg-1__vgg19__cifar100__8.84x_pr0.7 --screen',
    'CUDA_VISIBLE_DEVICES=1 python main.py --method GReg-2 -a vgg19 --dataset cifar100 --wd 0.0005 --lr_ft 0:0.01,60:0.001,90:0.0001 --epochs 120 --base_model_path Experiments/*scratch__vgg19__cifar100*/weights/checkpoint_best.pth --batch_size_prune 256 --batch_size 256 --update_reg_interval 10 --stabilize 10000 --stage_pr [1-15:0.7] --project GReg-2__vgg19__cifar100__8.84x_pr0.7 --screen',
    'CUDA_VISIBLE_DEVICES=0,1 python main.py --dataset imagenet --arch resnet34 --pretrained --method GReg-1 --screen --stage_pr [0,0.5,0.6,0.4,0,0] --skip_layers [1.0,2.0,2.3,3.0,3.5] --project GReg-1__resnet34__imagenet__1.32x_pr0.50.60.4',
    'CUDA_VISIBLE_DEVICES=0,1 python main.py --dataset imagenet --arch resnet34 --pretrained --method GReg-2 --screen --stage_pr [0,0.5,0.6,0.4,0,0] --skip_layers [1.0,2.0,2.3,3.0,3.5] --project GReg-2__resnet34__imagenet__1.32x_pr0.50.60.4',
    'CUDA_VISIBLE_DEVICES=0,1 python main.py --dataset imagenet --arch resnet50 --pretrained --method GReg-1 --screen --stage_pr [0,0.3,0.3,0.3,0.14,0] --project GReg-1__resnet50__imagenet__1.49x_pr0.30.14',
    'CUDA_VISIBLE_DEVICES=0,1 python main.py --dataset imagenet --arch resnet50 --pretrained --method GReg-2 --screen --stage_pr [0,0.3,0.3,0.3,0.14,0] --project GReg-2__resnet50__imagenet__1.49x_pr0.30.14',
    'CUDA_VISIBLE_DEVICES=0,1 python main.py --dataset imagenet --arch resnet50 --pretrained --method GReg-1 --screen --stage_pr [0,0.6,0.6,0.6,0.21,0] --project GReg-1__resnet50__imagenet__2.31x_pr0.60.21',
    'CUDA_VISIBLE_DEVICES=0,1 python main.py --dataset imagenet --arch resnet50 --pretrained --method GReg-2 --screen --stage_pr [0,0.6,0.6,0.6,0.21,0] --project GReg-2__resnet50__imagenet__2.31x_pr0.60.21',
    'CUDA_VISIBLE_DEVICES=0,1 python main.py --dataset imagenet --arch resnet50 --pretrained --method GReg-1 --screen --stage_pr [0,0.74,0.74,0.6,0.21,0] --project GReg-1__resnet50__imagenet__2.56x_pr0.740.60.21',
    'CUDA_VISIBLE_DEVICES=0,1 python main.py --dataset imagenet --arch resnet50 --pretrained --method GReg-2 --screen --stage_pr [0,0.74,0.74,0.6,0.21,0] --project GReg-2__resnet50__imagenet__2.56x_pr0.740.60.21',
    'CUDA_VISIBLE_DEVICES=0,1 python main.py --dataset imagenet --arch resnet50 --pretrained --method GReg-1 --screen --stage_pr [0,0.68,0.68,0.68,0.5,0] --project GReg-1__resnet50__imagenet__3.06x_pr0.680.5',
    'CUDA_VISIBLE_DEVICES=0,1 python main.py --dataset imagenet --arch resnet50 --pretrained --method GReg-2 --screen --stage_pr [0,0.68,0.68,0.68,0.5,0] --project GReg-2__resnet50__imagenet__3.06x_pr0.680.5',
    'CUDA_VISIBLE_DEVICES=0,1 python main.py --dataset imagenet --arch resnet50 --pretrained --method GReg-1 --wg weight --screen --stage_pr [0,0.827,0.827,0.827,0.827,0.827] --project GReg-1__resnet50__imagenet__wgweight_pr0.827',
    'CUDA_VISIBLE_DEVICES=0,1 python main.py --dataset imagenet --arch resnet50 --pretrained --method GReg-2 --wg weight --screen --stage_pr [0,0.827,0.827,0.827,0.827,0.827] --project GReg-2__resnet50__imagenet__wgweight_pr0.827',
    'CUDA_VISIBLE_DEVICES=0,1 python main.py --dataset imagenet --arch resnet50 --pretrained --method L1 --screen --stage_pr [0,0.68,0.68,0.68,0.5,0] --project L1__resnet50__imagenet__3.06x_pr0.680.5',
    'CUDA_VISIBLE_DEVICES=0,1 python main.py --dataset imagenet --arch resnet50 --pretrained --method L1 --pick_pruned rand --screen --stage_pr [0,0.68,0.68,0.68,0.5,0] --project L1__resnet50__imagenet__3.06x_pr0.680.5__randpruning',
    'CUDA_VISIBLE_DEVICES=0,1 python main.py --dataset imagenet --arch resnet50 --pretrained --method L1 --pick_pruned max --screen --stage_pr [0,0.68,0.68,0.68,0.5,0] --project L1__resnet50__imagenet__3.06x_pr0.680.5__maxpruning',
]

APIB_README = [
    'python main.py \\\n--model vgg16\\\n--dataset cifar10\\\n--target 107000000 \\\n--ckpt [pre-trained model dir] \\\n--data_path [dataset path]\\\n--omega 40\\\n--tolerance 0.01\\\n--alpha 5e-5\n',
    'python main.py \\\n--model resnet56\\\n--dataset cifar10\\\n--target 57000000 \\\n--ckpt [pre-trained model dir] \\\n--data_path [dataset path]\\\n--omega 5\\\n--tolerance 0.01\\\n--alpha 8e-4\n',
    'python main.py \\\n--model resnet110\\\n--dataset cifar10\\\n--target 96000000 \\\n--ckpt [pre-trained model dir] \\\n--data_path [dataset path]\\\n--omega 5\\\n--tolerance 0.01\\\n--alpha 8e-9\n',
    'python main.py \\\n--model googlenet\\\n--dataset cifar10\\\n--target 568000000 \\\n--ckpt [pre-trained model dir] \\\n--data_path [dataset path]\\\n--omega 9\\\n--tolerance 0.01\\\n--alpha 4e-8\n',
    'python main.py \\\n--model resnet50\\\n--dataset imagenet\\\n--target 1550000000 \\\n--ckpt [pre-trained model dir] \\\n--data_path [dataset path]\\\n--omega 1\\\n--tolerance 0.01\\\n--alpha 7e-5\n',
]

# APIB's train.py (fine-tuning a pruned network): prune.py --ckpt_path (see the docstring).
APIB_TRAIN = [
    'python train.py \\\n--model vgg16\\\n--dataset cifar10\\\n--lr 0.1\\\n--batch_size 256 \\\n--ckpt_path [pruned model dir]\\\n--data_path [dataset path]\n',
    'python train.py \\\n--model resnet50\\\n--dataset imagenet\\\n--lr 0.01\\\n--batch_size 128 \\\n--ckpt_path [pruned model dir]\\\n--data_path [dataset path]\n',
]

PLACEHOLDERS = {"[pre-trained model dir]": "pretrained/model.pth", "[dataset path]": "datasets/cifar"}


def words(command: str) -> list[str]:
    """The words after ``python main.py``, read as the authors meant them (see the docstring)."""
    text = command.replace("\\\n", " ")
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    argv = shlex.split(text)
    while "=" in argv[0]:
        argv.pop(0)  # CUDA_VISIBLE_DEVICES=...
    assert argv[:2] == ["python", "main.py"], argv
    return argv[2:]


def flag(argv: list[str], name: str):
    return argv[argv.index(name) + 1] if name in argv else None


def test_the_commands_are_the_readmes():
    assert len(GREG_README) == 21 and len(APIB_README) == 5 and len(APIB_TRAIN) == 2
    assert sum("--wg weight" in c for c in GREG_README) == 2 and sum("--skip_layers" in c for c in GREG_README) == 2


@pytest.mark.parametrize("command", GREG_README, ids=lambda c: flag(words(c), "--project"))
def test_greg_readme_command_parses_as_its_code_reads_it(command):
    argv = words(command)
    args = prune.parse_args(argv)
    assert METHODS.get(args.method).name == {"L1": "l1", "GReg-1": "greg1", "GReg-2": "greg2"}[flag(argv, "--method")]
    theirs = flag(argv, "--arch") or flag(argv, "-a")
    assert args.authors_arch == theirs
    assert args.arch == {"resnet56": "resnet56a", "resnet50": "resnet50"}.get(theirs)  # vgg19, resnet34: none here
    assert args.source_kind == ("greg" if "--base_model_path" in argv else "pretrained" if "--pretrained" in argv
                                else "scratch")
    assert args.checkpoint is None and args.base_model_path == flag(argv, "--base_model_path")
    assert args.stage_pr == flag(argv, "--stage_pr") and args.project == flag(argv, "--project")
    assert args.wg == (flag(argv, "--wg") or "filter") and args.skip_layers == flag(argv, "--skip_layers")
    assert args.pick_pruned == (flag(argv, "--pick_pruned") or "min")
    if "--stabilize" in argv:  # an abbreviation of --stabilize_reg_interval (GReg's argparse accepts those)
        assert args.stabilize_reg_interval == int(flag(argv, "--stabilize"))
    for name, dest in (("--batch_size", "batch_size"), ("--batch_size_prune", "batch_size_prune"),
                       ("--update_reg_interval", "update_reg_interval"), ("--epochs", "epochs")):
        if name in argv:
            assert getattr(args, dest) == int(flag(argv, name))
    if "--wd" in argv:
        assert args.weight_decay == float(flag(argv, "--wd"))
    if "--lr_ft" in argv:
        assert args.lr_ft == prune.lr_schedule(flag(argv, "--lr_ft"))
    assert args.screen == ("--screen" in argv)


@pytest.mark.parametrize("command", APIB_README, ids=lambda c: flag(words(c), "--model"))
def test_hsic_readme_command_parses_as_its_code_reads_it(command):
    argv = words(command)
    args = prune.parse_args(argv)
    assert args.method == "hsic" and args.source_kind == "apib"  # its main.py has no --method: HSIC-Lasso is all it runs
    assert args.arch == {"vgg16": "vgg16_apib", "resnet56": "resnet56a", "resnet110": "resnet110a",
                         "googlenet": "googlenet", "resnet50": "resnet50"}[flag(argv, "--model")]
    assert args.checkpoint == "pretrained/model.pth" and args.data_dir == "datasets/cifar"
    assert args.target == int(flag(argv, "--target")) and args.omega == int(flag(argv, "--omega"))
    assert args.alpha == float(flag(argv, "--alpha")) and args.tolerance == float(flag(argv, "--tolerance"))
    assert args.dataset == flag(argv, "--dataset")


@pytest.mark.parametrize("command", APIB_TRAIN, ids=lambda c: c.split("--model ")[1].split("\\")[0])
def test_hsic_readme_train_command_parses_as_its_code_reads_it(command):
    text = command.replace("\\\n", " ").replace("[pruned model dir]", "pruned.pth.tar").replace("[dataset path]", "d")
    argv = shlex.split(text)
    assert argv[:2] == ["python", "train.py"]
    args = prune.parse_args(argv[2:])
    assert args.method == "hsic" and args.source_kind == "pruned" and args.checkpoint == "pruned.pth.tar"
    assert args.arch == {"vgg16": "vgg16_apib", "resnet50": "resnet50"}[flag(argv, "--model")]
    assert (args.lr, args.batch_size, args.data_dir) == (float(flag(argv, "--lr")), int(flag(argv, "--batch_size")), "d")
    assert args.target is None and args.target_macs is None and args.stage_pr is None


@pytest.mark.parametrize("argv, needle", [
    (["best.pt", "--base_model_path", "x.pth", "--method", "l1", "--stage_pr", "0,0,0,0,0"], "both name the checkpoint"),
    (["--ckpt", "x.pth", "--target", "57000000"], "takes its --model NAME"),
    (["--model", "resnet20", "--ckpt", "x.pth", "--target", "57000000"], "HSIC-Lasso's networks here are"),
    (["--pretrained", "--method", "l1", "--stage_pr", "0,0.5,0.5,0.5,0.5,0"], "--arch / -a NAME"),
    (["best.pt", "--stage_pr", "0,0.5,0.5,0.5,0"], "required: --method"),
    (["best.pt", "--arch", "resnet34", "--method", "l1", "--stage_pr", "0,0.5,0.5,0.5,0"], "invalid choice"),
    (["--arch", "resnet56", "--method", "hsic", "--target-macs", "0.5"], "--stage_pr of zeros"),
    (["best.pt", "--data_path", "a", "--data-dir", "b", "--method", "l1", "--stage_pr", "0,0,0,0,0"], "give one"),
])
def test_what_does_not_combine_is_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as stop:
        prune.parse_args(argv)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines


def test_pretrained_reads_torchvisions_file_from_the_hub_cache(tmp_path, monkeypatch):
    """GReg's --pretrained: torchvision's resnet50 weights (pretrained=True) where torch.hub keeps them;
    absent and not downloadable, one line naming the file to fetch."""
    from utils import distributed
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    ctx = distributed.Context()

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(prune_job.UsageError, match="could not be downloaded .*network is unreachable.*resnet50-0676ba61"):
        prune_job.torchvision_resnet50(ctx)
    cached = tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    cached.write_bytes(b"")
    assert prune_job.torchvision_resnet50(ctx) == cached


def test_greg_scratch_training_then_greg1_through_base_model_path(tmp_path):
    """GReg's README Step 3 and Step 4 (1) as written, shortened with appended flags: ResNet56 (its
    option A, resnet56a) trained from scratch into runs/<--project>, then GReg-1 from that checkpoint
    found through the README's pattern; at GReg's ratios its 4 / 8 / 43 conv1 filters per stage stay
    (GReg's 2.55x: 49.12 M MACs)."""
    short = ["--dummy", "--epochs", "1", "--limit-batches", "1", "-j", "0", "-b", "16", "--seed", "0"]
    proc = run_script("prune.py", *words(GREG_README[0]), *short, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    scratch = json.loads((tmp_path / "runs" / "scratch__resnet56__cifar10" / "results.json").read_text())
    assert scratch["model"] == "resnet56a" and scratch["macs_pruned"] == scratch["macs_dense"]
    argv = [w.replace("Experiments/*scratch__resnet56__cifar10*/weights/checkpoint_best.pth",
                      "runs/*scratch__resnet56__cifar10*/best.pt") for w in words(GREG_README[2])]
    fast = ["--batch_size_prune", "16", "--update_reg_interval", "1", "--stabilize", "1", "--reg_granularity_prune",
            "0.4"]
    proc = run_script("prune.py", *argv, *short, *fast, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "--screen (GReg's --screen_print): no effect here" in proc.stdout
    results = json.loads((tmp_path / "runs" / "GReg-1__resnet56__cifar10__2.55x_pr0.750.32" / "results.json").read_text())
    assert results["method"] == "greg1" and results["pruning_phase"]["done"]
    assert [c["kept"] for c in results["channels"]][::9] == [4, 8, 43] and results["macs_pruned"] == 49_121_920


def _apib_name(key: str) -> str:
    """This project's ResNet50 tensor name as HSIC-Lasso's ResNet_ImageNet (APIB models/resnet_imagenet.py)
    names it: conv1.conv / conv1.bn, layer{s}.{j}.conv{k}.conv / .bn, layer{s}.{j}.downsample.conv / .bn."""
    import re
    if key.startswith("conv1."):
        return "conv1.conv." + key[len("conv1."):]
    if key.startswith("bn1."):
        return "conv1.bn." + key[len("bn1."):]
    match = re.match(r"layers\.(\d+)\.(.*)", key)
    if match is None:
        return key
    k, rest = int(match.group(1)), match.group(2)
    stage, first = next((s, f) for s, f in ((4, 13), (3, 7), (2, 3), (1, 0)) if k >= f)
    rest = re.sub(r"^conv(\d)\.", r"conv\1.conv.", rest)
    rest = re.sub(r"^bn(\d)\.", r"conv\1.bn.", rest)
    rest = rest.replace("downsample.0.", "downsample.conv.").replace("downsample.1.", "downsample.bn.")
    return f"layer{stage}.{k - first}.{rest}"


@pytest.mark.parametrize("naming", ["torchvision", "apib"])
def test_resnet50_checkpoints_of_greg_and_hsic_lasso_load(naming, tmp_path):
    """GReg's --base_model_path checkpoint of a torchvision ResNet50 (DataParallel's module. names) and
    HSIC-Lasso's --ckpt of its own ResNet50 (conv and BN wrapped in Sequentials) load tensor for tensor."""
    import torchvision
    from utils import distributed
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None).state_dict()
    want = prune_job._torchvision_resnet50(reference)  # this project's names
    if naming == "torchvision":
        saved = {"state_dict": {f"module.{k}": v for k, v in reference.items()}, "arch": "resnet50"}
        argv = ["--base_model_path", str(tmp_path / "ckpt.pth"), "-a", "resnet50", "--method", "GReg-1",
                "--stage_pr", "[0,0.6,0.6,0.6,0.21,0]"]
    else:
        saved = {"state_dict": {_apib_name(k): v for k, v in want.items()}}
        argv = ["--model", "resnet50", "--ckpt", str(tmp_path / "ckpt.pth"), "--target", "1550000000"]
    torch.save(saved, tmp_path / "ckpt.pth")
    source = prune_job.named_source(prune.parse_args(argv), distributed.Context())
    assert source["dataset"] == "imagenet" and source["arch"]["model"] == "resnet50"
    got = prune_job.dense_model(source).state_dict()
    for key, value in want.items():
        assert torch.equal(got[key], value), key
