"""Atomic checkpoints: written to a temporary file and renamed, so a run killed mid-write leaves the
previous complete checkpoint in place. A checkpoint that cannot be read (empty, truncated, damaged,
not written by protofl, or asking for anything but tensors and containers) is refused with a
:class:`~protofl.errors.CheckpointError` naming the file."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from protofl._io import atomic_write
from protofl.errors import CheckpointError

CHECKPOINT_NAME = "state.pt"
#: What every protofl checkpoint holds (a run's round and the fingerprint of its configuration).
REQUIRED_KEYS = ("round", "fingerprint")


def on_device(value: Any, device: Any) -> Any:
    """``value`` (tensors in dicts, lists and tuples) with every tensor on ``device``: a checkpoint's
    state (always on the CPU) onto the run's device, or the other way round."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: on_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_device(v, device) for v in value)
    return value


def _on_cpu(value: Any) -> Any:
    return on_device(value, "cpu")


def save_checkpoint(directory: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` with every tensor on the CPU, so that the checkpoint loads on any machine."""
    state = _on_cpu(state)
    return atomic_write(directory / CHECKPOINT_NAME, lambda fh: torch.save(state, fh))


def has_checkpoint(directory: Path) -> bool:
    return (directory / CHECKPOINT_NAME).exists()


def load_checkpoint(directory: Path) -> dict[str, Any] | None:
    """The last complete checkpoint in ``directory``, or None if there is none."""
    path = directory / CHECKPOINT_NAME
    if not path.exists():
        return None
    hint = "move it away to start the run over"
    state = load_tensors(path, hint)
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        raise CheckpointError(f"{path}: not a protofl checkpoint (no {' and '.join(REQUIRED_KEYS)}); {hint}")
    return state


def load_tensors(path: Path, hint: str) -> Any:
    """What ``path`` (written by ``torch.save``) holds, loaded on the CPU if it holds tensors and
    containers only; anything else (empty, truncated, damaged, asking for more) is a
    :class:`~protofl.errors.CheckpointError` naming the file and ending with ``hint``."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint; {hint}")
    # Our own checkpoints hold tensors, dicts, lists and numbers only: load with weights_only.
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        first = " ".join(str(exc).split())[:200]
        raise CheckpointError(
            f"{path}: refused to load: it asks for more than tensors and containers ({first}); {hint}"
        ) from None
    except (
        RuntimeError,
        EOFError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        OverflowError,
        OSError,
        zipfile.BadZipFile,
        UnicodeDecodeError,
        NotImplementedError,
        AssertionError,
    ) as exc:
        raise CheckpointError(f"{path}: truncated or damaged ({type(exc).__name__}); {hint}") from None
