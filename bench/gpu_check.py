"""Every check that needs a GPU, in one command of at most 8 minutes on a bare lent machine.

    python bench/gpu_check.py                     # writes $OUT/{log.txt,results.md,results.json}
    python bench/gpu_check.py --out DIR --budget 450
    python bench/gpu_check.py --dry-run           # the same steps on the CPU, tiny: the plumbing
    python bench/gpu_check.py --list              # the steps and their commands

Made for a machine that is lent rarely and briefly, with no network: nothing here may waste it.

* **Packages.** What the image lacks is installed from the wheels in ``bench/wheels`` (pure
  Python: tensorboardX, and protobuf should the image's not do), offline, into a folder outside
  the repository that every step then finds first (``pip install --no-index --target``).
* **Steps.** Each runs as a subprocess, unbuffered, with its own time limit and a global budget
  (``--budget``, default 450 s): a step starts only if ``MIN_STEP_S`` seconds are left and is cut
  at its limit or the budget, whichever comes first, so a slow step cannot starve the later ones
  and the whole run stays under 8 minutes. Most important first: the CUDA tests, the training
  step of every network and gate type, the projected 300-epoch run, the peers through prune.py
  and the engine, inference of exported models, two processes (only with 2 GPUs), then the
  loader benchmarks.
* **Output.** Every step's output is appended as it comes to one log, ``log.txt``; each step
  prints one status line (ok, FAIL, TIMEOUT, SKIP, NOT RUN); ``results.md`` holds every figure in
  ``bench/RESULTS.md``'s form (device, torch, CUDA and the command beside each), and
  ``results.json`` the same for programs. Those three files are all it writes into the output
  folder (``--out``, else ``$OUT``, else ``bench/gpu_out``), rewritten after every step, so a run
  killed from outside still leaves what it had measured; everything else (data, runs) goes to a
  temporary folder, removed at the end.
* **Exit status** 0 only when every step passed or was skipped on purpose (one GPU: no
  two-process run); 1 when any failed, timed out or could not run.

``--dry-run`` runs the same scripts with the same flags on the CPU at tiny sizes (a fake device:
CUDA hidden), which is what tests/test_gpu_check.py runs to prove the plumbing; ``--only`` and
``--skip`` select steps, ``--inject-failure`` adds a failing and a timed-out step.
"""
import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WHEELS = REPO / "bench" / "wheels"
BUDGET_S = 450
MIN_STEP_S = 10
FILES = ("log.txt", "results.md", "results.json")
ENV_MARK = "GPU_CHECK_ENV "

# What the steps import, by module; the wheels carried for those the lent image may lack.
REQUIRED = ("torch", "torchvision", "numpy", "PIL", "pytest", "sklearn", "matplotlib", "tensorboardX.proto.event_pb2")
CARRIED = {"tensorboardX.proto.event_pb2": "tensorboardX", "google.protobuf": "protobuf"}

PROBE = """
import importlib, json, sys
out = {}
for name in sys.argv[1:]:
    try:
        module = importlib.import_module(name)
        out[name] = dict(ok=True, file=getattr(module, "__file__", None))
    except Exception as e:
        out[name] = dict(ok=False, error=f"{type(e).__name__}: {e}")
print(json.dumps(out))
"""

ENV_SCRIPT = f"""
import json, platform, subprocess, torch
info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            gpus=torch.cuda.device_count(), devices=[])
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    info["devices"].append(dict(name=p.name, memory_gib=round(p.total_memory / 2 ** 30, 1),
                                capability=f"{{p.major}}.{{p.minor}}", multiprocessors=p.multi_processor_count))
if info["gpus"]:
    info["bf16"] = torch.cuda.is_bf16_supported()
    info["tf32_conv_default"] = torch.backends.cudnn.allow_tf32
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=20).stdout.strip()
    except Exception as e:
        info["nvidia_smi"] = f"unavailable ({{type(e).__name__}})"
print({ENV_MARK!r} + json.dumps(info), flush=True)
"""


# --------------------------------------------------------------------------- figures


def keep(*prefixes, contains=(), drop=()):
    """A figure filter: the output lines that start with one of ``prefixes`` or contain one of
    ``contains``, less those starting with one of ``drop``."""
    def select(lines):
        return [line for line in lines if (line.startswith(prefixes) or any(c in line for c in contains))
                and not line.startswith(drop)]
    return select


def table_after(marker):
    """The lines from the first one starting with ``marker`` on (a script's closing table), with
    the header line before it (the device, torch and CUDA versions)."""
    def select(lines):
        for i, line in enumerate(lines):
            if line.startswith(marker):
                head = [lines[0]] if lines and i > 0 else []
                return head + [line for line in lines[i:] if line.strip()]
        return lines[-12:]
    return select


def last_progress(lines):
    progress = [line for line in lines if line.startswith("Epoch [")]
    return progress[-2:] + [line for line in lines if line.startswith(("pruned model:", "greg: iteration", "budget:",
                                                                      "deepr:", "hsic", "cut:"))][-4:]


# --------------------------------------------------------------------------- steps


@dataclass
class Step:
    name: str
    section: str                 # the heading it goes under in results.md
    command: list                # argv (the first element is the Python interpreter or a program)
    limit: int                   # seconds
    figures: object = None       # output lines -> the lines that are figures
    needs: tuple = ()            # steps that must have passed first
    skip: str | None = None      # a reason not to run it (not a failure)
    results: str | None = None   # a run directory whose results.json is summarised
    note: str = ""


def plan(python: str, work: Path, dry: bool, gpus: int, inject: bool = False) -> list:
    """The steps, most important first. ``dry``: the same commands on the CPU at tiny sizes."""
    py = [python, "-u"]
    w = str(work)
    steps = []

    def add(*args, **kwargs):
        steps.append(Step(*args, **kwargs))

    add("env", "Machine", [*py, "-c", ENV_SCRIPT], 60)
    # The CUDA variants of the tests (ids with 'cuda': the device fixture's CUDA parameter and the
    # CUDA-only tests). TF32 / bf16 tolerances are the tests' own.
    tests = ["tests/test_bn_gate.py", "tests/test_data.py", "tests/test_sampling.py", "tests/test_lagged_any.py",
             "tests/test_device_paths.py", "tests/test_host_syncs.py"]
    add("cuda_tests", "CUDA tests", [*py, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-k", "cuda", *tests],
        45 if dry else 150,
        keep(contains=("passed", "failed", "skipped", "error", "host syncs per step")))

    device = ["--device", "cpu"] if dry else ["--device", "cuda"]
    tiny_step = ["--width-mult", "0.125", "-b", "4", "--steps", "1", "--reps", "1", "--warmup", "1"]
    train_step = {  # model: (batch, steps, reps, warmup, limit fp32, limit bf16)
        "resnet56": (128, 10, 5, 3, 60, 60), "vgg16": (128, 10, 5, 3, 60, 60), "resnet50": (256, 4, 4, 2, 110, 80)}
    for precision in ("bf16", "fp32"):
        for model, (batch, n, reps, warmup, limit32, limit16) in train_step.items():
            flags = ["--amp", "--channels-last"] if precision == "bf16" else []
            sizes = tiny_step if dry else ["-b", str(batch), "--steps", str(n), "--reps", str(reps),
                                           "--warmup", str(warmup)]
            add(f"train_step_{model}_{precision}", "Training step: gate overhead (bench/train_step.py)",
                [*py, "bench/train_step.py", "--model", model, *device, *sizes, *flags],
                30 if dry else (limit16 if precision == "bf16" else limit32), keep("", drop=("rep ",)),
                note="fp32: float32 tensors, cuDNN's default TF32 convolutions; bf16: --amp (bf16 autocast) with "
                     "channels-last. Peak memory per variant measured alone.")

    epoch = ["--images", "64", "--test-images", "16", "--epochs", "2", "-b", "16", "-j", "0", "--width-mult",
             "0.125"] if dry else \
        ["--epochs", "3"]
    add("epoch_vgg16", "300-epoch CIFAR Dep-L0 run, projected (bench/epoch_time.py)",
        [*py, "bench/epoch_time.py", "--model", "vgg16", "--net", "dep", "--amp", "--channels-last", *epoch],
        40 if dry else 120, keep("epoch ", "seconds per epoch", "projected", "vgg16", "resnet56", "NVIDIA", "CPU"),
        note="The real training script on 50,000 random CIFAR-sized images, the training set held on the GPU "
             "(--loader auto); an epoch is the interval between two epoch ends (training, evaluation, checkpoint); "
             "the first is not timed. Goal: 300 epochs of VGG16 in at most 15 minutes on one H100.")

    run = ["--dummy", "--seed", "0"] + (["-j", "0", "--limit-batches", "2", "-b", "16"] if dry else
                                        ["-j", "4", "--limit-batches", "20", "-b", "128"])
    width = ["--width-mult", "0.125"] if dry else []
    add("dense_checkpoint", "Peers through prune.py and the engine", [
        *py, "train_resnet56.py", "--net", "dense", *width, "--epoch", "1", *run, "-p", "10",
        "--out-dir", f"{w}/dense"], 40 if dry else 60, last_progress, results=f"{w}/dense")
    greg = ["--update_reg_interval", "1", "--stabilize_reg_interval", "3" if dry else "20",
            "--reg_granularity_prune", "0.2", "--batch_size_prune", "16" if dry else "128", "--epochs", "1"]
    add("prune_greg1", "Peers through prune.py and the engine", [
        *py, "prune.py", f"{w}/dense/best.pt", "--method", "GReg-1", "--stage_pr", "0,0.5,0.5,0.5,0", *greg, *run,
        "-p", "10", "--amp", "--channels-last", "--out-dir", f"{w}/greg1"], 40 if dry else 90, last_progress,
        needs=("dense_checkpoint",), results=f"{w}/greg1")
    add("prune_hsic", "Peers through prune.py and the engine", [
        *py, "prune.py", f"{w}/dense/best.pt", "--method", "hsic", "--target-macs", "0.5", "--alpha", "1e-3",
        "--calib-batch-size", "16" if dry else "64", "--epochs", "1", *run, "-p", "10",
        "--out-dir", f"{w}/hsic"], 60 if dry else 90, last_progress, needs=("dense_checkpoint",),
        results=f"{w}/hsic")
    add("sparse_deepr", "Peers through prune.py and the engine", [
        *py, "train_resnet56.py", "--sparse", "deepr", "--density", "0.2", *width, "--epoch", "1", *run, "-p", "10",
        "--out-dir", f"{w}/deepr"], 40 if dry else 60, last_progress, results=f"{w}/deepr")

    inference = ["--device", "cpu", "--batches", "1,2", "--reps", "1", "--warmup", "0", "--min-time", "0.01"] if dry \
        else ["--device", "cuda", "--batches", "1,64,256", "--reps", "5", "--warmup", "3"]
    add("inference_greg1", "Inference: dense vs exported pruned model (bench/inference.py)",
        [*py, "bench/inference.py", "--checkpoint", f"{w}/greg1/pruned.pt", *inference], 40 if dry else 60,
        keep("|", "#", "MACs", "CUDA:", "CPU:"), needs=("prune_greg1",),
        note="A ResNet56 that prune.py's GReg-1 cut (ratios 0.5 in every stage) and exported, on random input.")
    add("inference_vgg16", "Inference: dense vs exported pruned model (bench/inference.py)",
        [*py, "bench/inference.py", "--model", "vgg16", "--keep", "0.5", *inference], 40 if dry else 60,
        keep("|", "#", "MACs", "CUDA:", "CPU:"))
    add("epoch_resnet56", "300-epoch CIFAR Dep-L0 run, projected (bench/epoch_time.py)",
        [*py, "bench/epoch_time.py", "--model", "resnet56", "--net", "dep", "--amp", "--channels-last", *epoch],
        40 if dry else 120, keep("epoch ", "seconds per epoch", "projected", "vgg16", "resnet56", "NVIDIA", "CPU"))
    add("ddp_2_processes", "Two processes (torchrun)", [
        *py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train_resnet56.py", "--net",
        "dep", *width, "--epoch", "1", *run, "-p", "10", "--out-dir", f"{w}/ddp"], 60 if dry else 90,
        last_progress, skip=None if gpus >= 2 else f"{gpus} GPU(s): a 2-process run needs 2",
        results=f"{w}/ddp")
    add("sparse_step_resnet50", "Sparse training step, ResNet50 (bench/sparse_step.py)", [
        *py, "bench/sparse_step.py", "--model", "resnet50", *device,
        *(["-b", "2", "--width-mult", "0.125", "--steps", "1", "--reps", "1", "--warmup", "1"] if dry else
          ["-b", "128", "--density", "0.2", "--steps", "5", "--reps", "3", "--warmup", "2", "--period", "5",
           "--n-prune-params", "400000"])], 40 if dry else 90, keep("", drop=("rep ", "warmed up")))
    add("input_pipeline", "ImageNet input pipeline (bench/input_pipeline.py)", [
        *py, "bench/input_pipeline.py",
        *(["--workers", "0", "--images", "8", "--reps", "1"] if dry else
          ["--workers", "4,8,16", "--images", "2048", "--reps", "2"])], 30 if dry else 60, table_after(" workers"))
    if inject:
        add("injected_failure", "Injected", [*py, "-c", "print('a step that fails on purpose'); raise SystemExit(3)"],
            30)
        add("injected_timeout", "Injected", [*py, "-c", "import time; print('sleeping', flush=True); time.sleep(60)"],
            2)
    return steps


# --------------------------------------------------------------------------- packages


def install_command(python: str, target: Path, names) -> list:
    """pip, offline, from the carried wheels only, into ``target`` (no dependencies: each is named)."""
    return [python, "-m", "pip", "install", "--no-index", "--find-links", str(WHEELS.relative_to(REPO)), "--no-deps",
            "--no-compile", "--no-cache-dir", "--disable-pip-version-check", "-q", "--target", str(target), *names]


def probe(python: str, env: dict, log) -> dict:
    proc = subprocess.run([python, "-c", PROBE, *REQUIRED], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=120)
    log.write(proc.stdout + proc.stderr)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {name: dict(ok=False, error=f"probe failed: {proc.stderr.strip()[-300:]}") for name in REQUIRED}


def prepare_packages(python: str, target: Path, env: dict, log, force: bool = False) -> tuple[bool, str, list]:
    """Install what the image lacks from bench/wheels into ``target`` (first on PYTHONPATH in
    ``env``). ``force``: install every carried wheel (the dry run proves they install offline and
    import from there). Returns (ok, message, the install commands run)."""
    commands = []
    found = probe(python, env, log)
    missing = [name for name, result in found.items() if not result["ok"]]
    log.write(f"missing before: {missing or 'nothing'}\n")
    wanted = list(CARRIED.values()) if force else (["tensorboardX"] if "tensorboardX.proto.event_pb2" in missing
                                                   else [])
    for attempt in range(2):
        if not wanted:
            break
        command = install_command(python, target, wanted)
        commands.append(command)
        log.write("$ " + shlex.join(command) + "\n")
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
        log.write(proc.stdout + proc.stderr)
        found = probe(python, env, log)
        missing = [name for name, result in found.items() if not result["ok"]]
        error = found.get("tensorboardX.proto.event_pb2", {}).get("error", "")
        # tensorboardX installed but the image's protobuf too old for its generated code: carry ours too.
        wanted = ["protobuf"] if attempt == 0 and "protobuf" in error else []
    if force:
        where = found.get("tensorboardX.proto.event_pb2", {}).get("file") or ""
        if not where.startswith(str(target)):
            return False, f"the carried tensorboardX did not import from {target} (got {where or 'nothing'})", commands
    if missing:
        return False, "missing: " + ", ".join(f"{m} ({found[m]['error'][:120]})" for m in missing), commands
    installed = sorted({c for command in commands for c in command[command.index(str(target)) + 1:]})
    return True, (f"installed from bench/wheels: {', '.join(installed)}" if installed else "all present"), commands


# --------------------------------------------------------------------------- running


class Log:
    """The one log: every line written through, flushed at once."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def write(self, text: str) -> None:
        self.file.write(text)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def run_command(command, limit: float, env: dict, log: Log) -> tuple:
    """(return code or None when cut at ``limit``, output lines): the process group is killed at
    the limit (loader workers and torchrun's ranks too)."""
    lines = []
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", env=env, start_new_session=True)

    def read():
        for line in proc.stdout:
            log.write(line)
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        code = None
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=10)
    return code, lines


def shown(command, python: str, work: Path) -> str:
    """A command as the report shows it: ``python``, the temporary folder as ``$WORK``."""
    words = ["python" if word == python else word.replace(str(work), "$WORK") for word in command]
    if words[:2] == ["python", "-u"]:
        words.pop(1)
    if "-c" in words and words.index("-c") == 1:
        words[2] = words[2].strip().splitlines()[0][:60] + " ..."
    return shlex.join(words)


def results_summary(run_dir: Path) -> list:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        return []
    results = json.loads(path.read_text())
    keys = ("method", "top1", "macs_reduction", "params_reduction", "epochs_done", "wall_time_s", "device",
            "world_size", "density_active")
    return ["results.json: " + ", ".join(f"{k} {results[k]:.4g}" if isinstance(results[k], float) else
                                         f"{k} {results[k]}" for k in keys if k in results)]


class Report:
    """results.md and results.json, rewritten after every step."""

    def __init__(self, out: Path, command: str, dry: bool):
        self.out, self.command, self.dry = out, command, dry
        self.started = time.time()
        self.env, self.steps = {}, []

    def device_line(self) -> str:
        env = self.env
        if not env:
            return "device unknown (the env step did not report)"
        if self.dry or not env.get("devices"):
            device = "CPU (dry run: no GPU)" if self.dry else "no CUDA device"
        else:
            d = env["devices"][0]
            device = f"{d['name']} ({env['gpus']} GPU{'s' if env['gpus'] > 1 else ''}, {d['memory_gib']} GiB)"
        return (f"{device}; torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, "
                f"Python {env.get('python')}")

    def write(self) -> None:
        failed = [s for s in self.steps if s["failed"]]
        date = datetime.datetime.fromtimestamp(self.started).strftime("%Y-%m-%d %H:%M")
        md = [f"# GPU check ({'dry run, ' if self.dry else ''}{date})", "",
              f"Device: {self.device_line()}", ""]
        if self.env.get("nvidia_smi"):
            md += [f"nvidia-smi: {self.env['nvidia_smi']}", ""]
        md += ["Command:", "", f"    {self.command}", "",
               f"{len(self.steps)} steps in {time.time() - self.started:.0f} s: "
               f"{sum(s['status'] == 'ok' for s in self.steps)} ok, {len(failed)} failed or not run, "
               f"{sum(s['status'] == 'SKIP' for s in self.steps)} skipped.", "",
               "| step | status | seconds | limit |", "|---|---|---:|---:|"]
        md += [f"| {s['name']} | {s['status']}{': ' + s['message'] if s['message'] else ''} | {s['seconds']:.1f} | "
               f"{s['limit']:.0f} |" for s in self.steps]
        section = None
        for s in self.steps:
            if not s["figures"] and s["status"] in ("SKIP", "NOT RUN"):
                continue
            if s["section"] != section:
                section = s["section"]
                md += ["", f"## {section}", ""]
                if s.get("note"):
                    md += [s["note"], ""]
            md += [f"{s['name']}: {s['status']} in {s['seconds']:.1f} s. {self.device_line()}.", "",
                   f"    {s['command']}", ""]
            if s["figures"]:
                md += ["```", *s["figures"], "```", ""]
        (self.out / "results.md").write_text("\n".join(md) + "\n")
        (self.out / "results.json").write_text(json.dumps(dict(
            command=self.command, dry_run=self.dry, started=date, seconds=round(time.time() - self.started, 1),
            device=self.device_line(), env=self.env, ok=not failed, steps=self.steps), indent=1) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output folder (default: $OUT, else bench/gpu_out)")
    p.add_argument("--budget", type=float, help=f"seconds for all steps together (default {BUDGET_S}; dry run 900)")
    p.add_argument("--dry-run", action="store_true", help="on the CPU, tiny sizes: check the plumbing")
    p.add_argument("--only", help="comma-separated step names to run (the others are left out)")
    p.add_argument("--skip", help="comma-separated step names to leave out")
    p.add_argument("--fake-gpus", type=int, help="plan for this many GPUs (dry run: 1)")
    p.add_argument("--inject-failure", action="store_true", help="add a failing and a timed-out step")
    p.add_argument("--force-wheels", action="store_true", help="install the carried wheels even where present "
                                                               "(the dry run does)")
    p.add_argument("--list", action="store_true", help="print the steps and exit")
    p.add_argument("--python", default=sys.executable, help="the interpreter the steps run with")
    args = p.parse_args(argv)

    out = Path(args.out or os.environ.get("OUT") or REPO / "bench" / "gpu_out").resolve()
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    site = work / "site"
    gpus = args.fake_gpus if args.fake_gpus is not None else (1 if args.dry_run else None)
    steps = plan(args.python, work, args.dry_run, gpus if gpus is not None else 1, args.inject_failure)
    names = [s.name for s in steps]
    chosen = set(args.only.split(",")) if args.only else set(names)
    chosen -= set(args.skip.split(",")) if args.skip else set()
    if unknown := chosen - set(names) - {"wheels"}:
        p.error(f"unknown steps: {', '.join(sorted(unknown))} (steps: wheels, {', '.join(names)})")
    if args.list:
        print("wheels: " + shlex.join(install_command("python", Path("$WORK/site"), ["tensorboardX"])))
        for s in steps:
            print(f"{s.name} ({s.limit} s): {shown(s.command, args.python, work)}")
        shutil.rmtree(work, ignore_errors=True)
        return 0

    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:  # this run's files only
        (out / name).unlink(missing_ok=True)
    budget = args.budget or (900 if args.dry_run else BUDGET_S)
    deadline = time.monotonic() + budget
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("OUT", None)  # no step writes into the output folder
    if args.dry_run:  # the fake device: no CUDA, one thread per process on a shared CPU
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = shlex.join(["python", "bench/gpu_check.py", *(argv if argv is not None else sys.argv[1:])])
    log = Log(out / "log.txt")
    report = Report(out, command, args.dry_run)
    log.write(f"# {command}\n# {datetime.datetime.now().isoformat(timespec='seconds')}, budget {budget:.0f} s, "
              f"work folder {work}\n")
    print(f"gpu_check: budget {budget:.0f} s, output {out}", flush=True)
    failed = False

    def finish(name, status, seconds, limit, message="", command_shown="", figures=(), section="", note="",
               is_failure=None):
        nonlocal failed
        is_failure = status not in ("ok", "SKIP") if is_failure is None else is_failure
        failed |= is_failure
        line = f"[{status:>7}] {name:<26} {seconds:6.1f} s / {limit:.0f} s  {message}".rstrip()
        print(line, flush=True)
        log.write(f"=== {line}\n")
        report.steps.append(dict(name=name, status=status, failed=is_failure, seconds=round(seconds, 1),
                                 limit=limit, message=message, command=command_shown, figures=list(figures),
                                 section=section, note=note))
        report.write()

    try:
        if "wheels" in chosen or not args.only:
            started = time.monotonic()
            log.write("\n=== wheels: what the image lacks, from bench/wheels\n")
            try:
                ok, message, commands = prepare_packages(args.python, site, env, log,
                                                         force=args.force_wheels or args.dry_run)
            except (OSError, subprocess.SubprocessError) as e:
                ok, message, commands = False, f"{type(e).__name__}: {e}", []
            finish("wheels", "ok" if ok else "FAIL", time.monotonic() - started, 120, message,
                   "; ".join(shown(c, args.python, work) for c in commands), section="Packages")
        for step in steps:
            if step.name not in chosen:
                continue
            done = {s["name"]: s["status"] for s in report.steps}
            shown_command = shown(step.command, args.python, work)
            if step.skip:
                finish(step.name, "SKIP", 0.0, step.limit, step.skip, shown_command, section=step.section)
                continue
            blocked = [n for n in step.needs if done.get(n) != "ok"]
            if blocked:
                finish(step.name, "NOT RUN", 0.0, step.limit, f"needs {', '.join(blocked)}", shown_command,
                       section=step.section)
                continue
            left = deadline - time.monotonic()
            if left < MIN_STEP_S:
                finish(step.name, "NOT RUN", 0.0, step.limit, f"the budget is spent ({left:.0f} s left)",
                       shown_command, section=step.section)
                continue
            limit = min(step.limit, left)
            log.write(f"\n=== {step.name} (limit {limit:.0f} s): {shown_command}\n")
            started = time.monotonic()
            code, lines = run_command(step.command, limit, env, log)
            seconds = time.monotonic() - started
            if step.name == "env":
                for line in lines:
                    if line.startswith(ENV_MARK):
                        report.env = json.loads(line[len(ENV_MARK):])
                if report.env and gpus is None:
                    gpus = report.env.get("gpus", 0)
                    ddp = next(s for s in steps if s.name == "ddp_2_processes")
                    ddp.skip = None if gpus >= 2 else f"{gpus} GPU(s): a 2-process run needs 2"
                if report.env and not args.dry_run and not report.env.get("gpus"):
                    code = code if code else 4
                    lines.append("no CUDA device: this check needs one (or --dry-run)")
            figures = step.figures(lines) if step.figures else []
            if step.results:
                figures += results_summary(Path(step.results))
            if code is None:
                status, message = "TIMEOUT", f"cut at {limit:.0f} s"
            elif code == 0:
                status, message = "ok", (figures[-1][:100] if figures else "")
            else:
                status, message = "FAIL", f"exit {code}: " + (lines[-1][:100] if lines else "no output")
            if step.name == "env" and report.env:
                message = report.device_line()
            if status != "ok":  # what went wrong, for the report
                figures += ["(last lines of the output)", *lines[-15:]]
            finish(step.name, status, seconds, limit, message, shown_command, figures or lines[-5:], step.section,
                   step.note)
    finally:
        log.write(f"\n=== done in {time.time() - report.started:.0f} s, {'FAILED' if failed else 'all passed'}\n")
        log.close()
        report.write()
        shutil.rmtree(work, ignore_errors=True)
    text = (out / "results.md").read_text()
    print("\n" + (text if len(text) <= 9000 else text[:9000] + "\n[... the rest in results.md]"), flush=True)
    print(f"gpu_check: {'FAILED' if failed else 'all passed'} in {time.time() - report.started:.0f} s; "
          f"{', '.join(str(out / name) for name in FILES)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
