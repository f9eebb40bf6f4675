"""Atomic, code-free checkpoints.

Files are written to a temporary name in the same directory and renamed over
the old one, so a crash or a full disk never leaves a half-written
checkpoint. Everything saved is tensors and plain Python values, and every
load uses ``torch.load(..., weights_only=True)``, which refuses pickled
objects: a tampered file cannot run code.
"""
import json
import os
import pickle
import zipfile
from pathlib import Path

import torch

from .errors import UsageError

FORMAT = "dep-l0-checkpoint/1"


def _replace_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"could not write {path} ({e.strerror or e}); the previous file is intact") from e


def save_checkpoint(state: dict, path) -> None:
    _replace_atomically(Path(path), lambda f: torch.save(state, f))


def write_json(data: dict, path) -> None:
    _replace_atomically(Path(path), lambda f: f.write(json.dumps(data, indent=2).encode() + b"\n"))


def load_checkpoint(path, expected_format: str = FORMAT) -> dict:
    """Load a checkpoint of this project safely, or raise a one-line UsageError."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UsageError(f"refusing to load {path}: it holds Python objects that could run code "
                         f"({str(e).splitlines()[0][:120]})") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise UsageError(f"{path} is not a readable checkpoint (truncated or corrupt: "
                         f"{str(e).splitlines()[0][:120]})") from e
    if not isinstance(state, dict) or state.get("format") != expected_format:
        raise UsageError(f"{path} is not a {expected_format} file")
    return state
