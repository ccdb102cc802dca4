"""Atomic checkpoints: written to a temporary file and renamed, so a run killed mid-write leaves the
previous complete checkpoint in place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from protofl._io import atomic_write

CHECKPOINT_NAME = "state.pt"


def _on_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value


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
    # Our own checkpoints hold tensors, dicts, lists and numbers only: load with weights_only.
    return torch.load(path, weights_only=True, map_location="cpu")
