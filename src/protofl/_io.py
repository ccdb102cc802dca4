"""Atomic file writes: write a temporary file in the target's folder, fsync, rename over the target.
A process killed mid-write leaves the previous complete file in place."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: Path, write: Callable[[BinaryIO], object], mode: int | None = None, sync: bool = True) -> Path:
    """Call ``write(fh)`` on a temporary binary file and rename it to ``path`` (with file ``mode``; default:
    what a plain create gives under the umask). ``sync=False``: no fsync (the caller makes the file
    durable later, e.g. with one ``os.sync()`` for many files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            if sync:
                os.fsync(fh.fileno())
        # mkstemp makes 0600; give what a plain create would, unless told otherwise
        os.chmod(tmp, 0o666 & ~current_umask() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
