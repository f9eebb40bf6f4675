"""Atomic, code-free checkpoints.

Files are written to a temporary name in the same directory, flushed to
disk, and renamed over the old one, so a crash or a full disk never leaves a
half-written file: the previous one stays intact. ``last.pt`` keeps its
predecessor as ``last.prev.pt``, so even a file corrupted later (a bad disk,
a truncated copy) leaves a good one to resume from.

Everything saved is tensors and plain Python values, and every load uses
``torch.load(..., weights_only=True)``, which refuses pickled objects: a
tampered file cannot run code.
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


def load_checkpoint(path, expected_format: str = FORMAT) -> dict:
    """Load a file of this project safely, or raise a one-line UsageError."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    if zipfile.is_zipfile(path):
        # torch's reader does not check the zip's CRC-32s, so damage inside a
        # tensor would load silently as different numbers.
        try:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, struct.error) as e:
            # ValueError includes a damaged member name that no longer decodes as UTF-8.
            raise UsageError(f"{path} is not a readable checkpoint (truncated or corrupt: "
                             f"{brief(str(e)) or type(e).__name__})") from e
        if damaged is not None:
            raise UsageError(f"{path} is corrupt (checksum mismatch in {damaged})")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        if refused:
            raise UsageError(f"refusing to load {path}: it holds Python objects that could run code "
                             f"({brief(refused[0])})") from e
        raise UsageError(f"{path} is not a readable checkpoint (not a torch file of plain tensors and values)") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, struct.error, KeyError, IndexError) as e:
        raise UsageError(f"{path} is not a readable checkpoint (truncated or corrupt: "
                         f"{brief(str(e)) or type(e).__name__})") from e
    if not isinstance(state, dict) or state.get("format") != expected_format:
        raise UsageError(f"{path} is not a {expected_format} file")
    return state
