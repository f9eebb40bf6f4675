"""Atomic, code-free checkpoints.

Files are written to a temporary name in the same directory, flushed to
disk, and renamed over the old one, so a crash or a full disk never leaves a
half-written file: the previous one stays intact. ``last.pt`` keeps its
predecessor as ``last.prev.pt``, so even a file corrupted later (a bad disk,
a truncated copy) leaves a good one to resume from.

Everything saved is tensors and plain Python values, and every load uses
``torch.load(..., weights_only=True)``, which refuses pickled objects: a
tampered file cannot run code. Other code bases' checkpoints (:func:`load_foreign`)
load through the same unpickler, their pickled objects read as inert data.
"""
import json
import os
import pickle
import shutil
import struct
import warnings
import zipfile
from pathlib import Path

import torch

from .errors import UsageError, brief

FORMAT = "dep-l0-checkpoint/1"


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _write_then_rename(path: Path, write, keep_previous: bool = False) -> None:
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, previous_of(path))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"could not write {path} ({e.strerror or e}); the previous file is intact") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def previous_of(path: Path) -> Path:
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(state: dict, path, keep_previous: bool = False) -> None:
    """Write ``state`` atomically; with ``keep_previous`` the replaced file becomes ``<stem>.prev.pt``."""
    _write_then_rename(Path(path), lambda f: torch.save(state, f), keep_previous)


def write_json(data: dict, path) -> None:
    _write_then_rename(Path(path), lambda f: f.write(json.dumps(data, indent=2).encode() + b"\n"))


def link_or_copy(src, dst) -> None:
    """Make ``dst`` a copy of ``src`` atomically: a hard link where possible, no second write."""
    src, dst = Path(src), Path(dst)
    tmp = _temporary(dst)
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"could not write {dst} ({e.strerror or e})") from e


def _check_zip(path: Path) -> None:
    """A zip-format file's CRC-32s: torch's reader does not check them, so damage inside a tensor
    would load silently as different numbers."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, struct.error) as e:
        # ValueError includes a damaged member name that no longer decodes as UTF-8.
        raise UsageError(f"{path} is not a readable checkpoint (truncated or corrupt: "
                         f"{brief(str(e)) or type(e).__name__})") from e
    if damaged is not None:
        raise UsageError(f"{path} is corrupt (checksum mismatch in {damaged})")


class _RefusedGlobal(Exception):
    """The file names a Python object (a pickle GLOBAL) that ``weights_only`` refuses."""


def _torch_load(path: Path):
    """``torch.load(weights_only=True)`` with one-line errors; a refused global is ``_RefusedGlobal``."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        if refused:
            raise _RefusedGlobal(brief(refused[0])) from e
        raise UsageError(f"{path} is not a readable checkpoint (not a torch file of plain tensors and values)") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, struct.error, KeyError, IndexError) as e:
        raise UsageError(f"{path} is not a readable checkpoint (truncated or corrupt: "
                         f"{brief(str(e)) or type(e).__name__})") from e


def load_checkpoint(path, expected_format: str = FORMAT) -> dict:
    """Load a file of this project safely, or raise a one-line UsageError."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    _check_zip(path)
    try:
        state = _torch_load(path)
    except _RefusedGlobal as e:
        raise UsageError(f"refusing to load {path}: it holds Python objects that could run code ({e})") from e
    if not isinstance(state, dict) or state.get("format") != expected_format:
        raise UsageError(f"{path} is not a {expected_format} file")
    return state


class ForeignObject:
    """A Python object pickled in another code base's checkpoint (a whole model, its command-line
    arguments), read back as inert data: the arguments and state it was pickled with, in ``args`` and
    ``state``. Its class is never imported and none of its code runs; ``name`` is the class's
    ``module.qualname`` as the file spells it."""

    name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<foreign {self.name}>"


def load_foreign(path) -> dict:
    """Load another code base's checkpoint (the authors' published baselines) safely.

    Tensors and plain values load as with :func:`load_checkpoint`. A zip-format file (``torch.save``
    since PyTorch 1.6) that also pickles objects of other classes (GReg's checkpoints hold the
    whole ``model``) loads with each such class replaced by an inert :class:`ForeignObject`
    subclass, through torch's ``weights_only`` unpickler: nothing of the file's code is imported
    or run, and globals of modules torch blocks (``os``, ``subprocess``, ...) are still refused.
    An old-format file with objects is refused. Returns the loaded object (a dict for every
    format this project reads); errors are one-line ``UsageError`` s."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    _check_zip(path)
    try:
        return _torch_load(path)
    except _RefusedGlobal as e:
        if not zipfile.is_zipfile(path):
            raise UsageError(f"refusing to load {path}: an old-format torch file that holds Python objects "
                             f"({e}); save its state_dict alone with torch.save") from e
        refused = e
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, ValueError, OSError, pickle.UnpicklingError) as e:
        raise UsageError(f"refusing to load {path}: it holds Python objects that could run code ({refused})") from e
    placeholders = [(type(name.rsplit(".", 1)[-1], (ForeignObject,), {"name": name}), name) for name in sorted(names)]
    try:
        with torch.serialization.safe_globals(placeholders):
            return _torch_load(path)
    except _RefusedGlobal as e:  # a global of a module torch blocks
        raise UsageError(f"refusing to load {path}: it holds Python objects that could run code ({e})") from e
