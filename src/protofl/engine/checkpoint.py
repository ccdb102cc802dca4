"""Atomic checkpoints: written to a temporary file and renamed, so a run killed mid-write leaves the
previous complete checkpoint in place."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "state.pt"


def save_checkpoint(directory: Path, state: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CHECKPOINT_NAME
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".state-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_checkpoint(directory: Path) -> dict[str, Any] | None:
    """The last complete checkpoint in ``directory``, or None if there is none."""
    path = directory / CHECKPOINT_NAME
    if not path.exists():
        return None
    # Our own checkpoints hold tensors, dicts, lists and numbers only: load with weights_only.
    return torch.load(path, weights_only=True)
