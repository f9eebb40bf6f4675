"""Console lines and TensorBoard events of a run.

TensorBoard tags are the reference's (``Train/loss``, ``Test/Accuracy``,
``Test/Average loss``, text ``z``; for ImageNet also ``train/acc1``,
``train/acc5``, ``test/acc1``, ``test/acc5``) plus ``train/l0_penalty`` (the
method's loss term), ``train/lr``, ``sparsity/macs``, ``sparsity/params`` and
``sparsity/macs_reduction``, each epoch the image ``channels``: kept vs
original channels per gated layer (utils/plots.py), and whatever the pruning
method logs itself (L0's ``z/``, ``mode_z/``, ``qz_loga/`` per layer and
``budget/*``; GReg's ``greg/*``).
"""
import datetime
import json
import time
from pathlib import Path

from tensorboardX import summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event

from .cli import human
from .errors import UsageError
from .plots import channels_image, run_title


class EventFile:
    """TensorBoard events written synchronously (tensorboardX's file format and
    summary builders, without its background thread: that thread dies silently
    on a full disk, after which every later write blocks forever). A failed
    write stops the run with one line instead."""

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.writer = self._guard(lambda: EventsWriter(str(self.out_dir / "events")))

    def _guard(self, write):
        try:
            return write()
        except OSError as e:
            raise UsageError(f"cannot write TensorBoard events to {self.out_dir} ({e.strerror or e})") from e

    def add(self, value: "summary.Summary", step: int) -> None:
        self._guard(lambda: self.writer.write_event(Event(summary=value, wall_time=time.time(), step=step)))

    def add_scalar(self, tag, value, step):
        self.add(summary.scalar(tag, value), step)

    def add_histogram(self, tag, values, step):
        self.add(summary.histogram(tag, values, "auto"), step)

    def add_image(self, tag, image_hwc, step):
        self.add(summary.image(tag, image_hwc, dataformats="HWC"), step)

    def add_text(self, tag, text, step):
        self.add(summary.text(tag, text), step)

    def flush(self):
        self._guard(self.writer.flush)

    def close(self):
        self._guard(self.writer.close)


class RunLogger:
    """Writes the console lines and TensorBoard events of rank 0; silent on other ranks."""

    def __init__(self, out_dir, imagenet: bool, enabled: bool = True, loss_name: str = "l0"):
        self.imagenet = imagenet
        self.loss_name = loss_name
        self.enabled = enabled
        self.writer = EventFile(out_dir) if enabled else None

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        print(text, flush=True)

    def start(self, settings: dict, device, out_dir, n_train, n_val, world_size=1):
        """The run's header: directory, device, data sizes and every setting (``settings``)."""
        if not self.enabled:
            return
        print(f"run directory: {out_dir}")
        processes = f" x {world_size} processes" if world_size > 1 else ""
        print(f"device: {device}{processes}; {n_train} training / {n_val} validation images")
        print("arguments: " + json.dumps(settings, sort_keys=True, default=str))
        self.writer.add_text("args", json.dumps(settings, sort_keys=True, indent=1, default=str), 0)

    def progress(self, epoch, step, steps, loss, penalty, lr, images_per_s, eta_s, run_eta_s=None, phase=None):
        """A progress line: the epoch's ETA and, given ``run_eta_s``, the whole run's (training steps
        at the current rate; evaluations not counted); ``phase`` labels the epoch (e.g. fine-tune)."""
        if not self.enabled:
            return
        global_step = epoch * steps + step
        eta = datetime.timedelta(seconds=round(eta_s))
        run_eta = f"  run ETA {datetime.timedelta(seconds=round(run_eta_s))}" if run_eta_s is not None else ""
        label = f"  ({phase})" if phase else ""
        print(f"Epoch [{epoch + 1}][{step:>{len(str(steps))}}/{steps}]  loss {loss:.4f}  {self.loss_name} "
              f"{penalty:.4f}  lr {lr:.4g}  {images_per_s:.0f} img/s  ETA {eta}{run_eta}{label}", flush=True)
        self.writer.add_scalar("Train/loss", loss, global_step)
        self.writer.add_scalar("train/l0_penalty", penalty, global_step)
        self.writer.add_scalar("train/lr", lr, global_step)

    def scalars(self, global_step, values: dict) -> None:
        """TensorBoard scalars ``{tag: value}`` (a pruning method's progress scalars)."""
        if not self.enabled:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step)

    def epoch(self, epoch, train_stats, val_stats, results, method=None, seconds=None):
        if not self.enabled:
            return
        w, step = self.writer, epoch + 1
        w.add_scalar("Test/Accuracy", val_stats["top1"], step)
        w.add_scalar("Test/Average loss", val_stats["loss"], step)
        if self.imagenet:
            w.add_scalar("train/acc1", train_stats["top1"], step)
            w.add_scalar("train/acc5", train_stats["top5"], step)
            w.add_scalar("test/acc1", val_stats["top1"], step)
            w.add_scalar("test/acc5", val_stats["top5"], step)
        w.add_scalar("sparsity/macs", results["macs_pruned"], step)
        w.add_scalar("sparsity/params", results["params_pruned"], step)
        w.add_scalar("sparsity/macs_reduction", results["macs_reduction"], step)
        kept = [c["kept"] for c in results["channels"]]
        if method is not None:
            method.log_epoch(w, step, kept)
        w.add_text("z", str(kept), step)
        w.add_image("channels", channels_image(results["channels"], run_title(results)), step)
        w.flush()
        top5 = f" top-5 {val_stats['top5']:.2f}%" if self.imagenet else ""
        total = sum(c["total"] for c in results["channels"])
        print(f"Epoch {step}: top-1 {val_stats['top1']:.2f}%{top5} (best {results['best_top1']:.2f}%)  "
              f"val loss {val_stats['loss']:.4f}  kept {sum(kept)}/{total} channels  "
              f"MACs {human(results['macs_pruned'])} (-{results['macs_reduction']:.1f}%)  "
              f"params {human(results['params_pruned'])} (-{results['params_reduction']:.1f}%)"
              + (f"  {seconds:.0f} s" if seconds is not None else ""), flush=True)

    def close(self):
        if not self.enabled:
            return
        self.writer.close()
