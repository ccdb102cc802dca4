"""Run folders are protofl's only where protofl made them.

A run writes into ``--out`` only if it is a new or empty folder, or, with ``--resume``, a run folder
(it holds the ``config.toml`` of an earlier run). Anything else is refused before anything is written,
so a user's folder is left byte-identical. While a process writes a run folder it holds an exclusive
lock on the folder's lock file: a second writer is refused at once, from the first second of the run
on (before any checkpoint exists). On taking the lock, temporary files left by atomic writes that a
killed process never finished are removed.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from protofl.errors import RunFolderError, RunLockedError

__all__ = ["LOCK_NAME", "RunFolder", "RunFolderLock", "is_run_folder", "leftover_temporaries"]

#: The lock file in every run folder (held while a process writes the folder).
LOCK_NAME = ".protofl.lock"
#: The file that makes a folder a run folder that can be resumed.
CONFIG_NAME = "config.toml"
#: The sub-folders in which atomic writes may leave temporary files.
_ATOMIC_FOLDERS = (".", "checkpoint")


def leftover_temporaries(path: Path) -> list[Path]:
    """Temporary files that interrupted atomic writes (:func:`protofl._io.atomic_write`) left in a run
    folder: ``.NAME-XXXX.tmp`` next to the file they were to replace."""
    found = []
    for sub in _ATOMIC_FOLDERS:
        folder = Path(path) / sub
        if folder.is_dir():
            found += [p for p in folder.glob(".*.tmp") if p.is_file() and not p.is_symlink()]
    return sorted(found)


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` holds what a protofl run writes first (its configuration)."""
    return (Path(path) / CONFIG_NAME).is_file()


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ENAMETOOLONG:
        return "the path is too long for this filesystem"
    if exc.errno == errno.EROFS:
        return "the filesystem is read-only"
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    return exc.strerror or str(exc)


class RunFolder:
    """The run folder ``out`` of a new run (``resume=False``) or of one being resumed.

    :meth:`check` refuses a folder the run may not write, without writing anything; :meth:`lock`
    checks again, creates the folder and holds its lock (use it as a context manager).
    """

    def __init__(self, out: str | Path, *, resume: bool = False):
        if not str(out).strip():
            raise RunFolderError("--out: the path is empty; name a new or empty folder for the run")
        self.path = Path(out)
        self.resume = resume

    def _entries(self) -> list[str] | None:
        """The folder's entries, or None if it does not exist."""
        try:
            if not self.path.is_dir():
                if self.path.exists() or self.path.is_symlink():
                    raise RunFolderError(f"--out {self.path}: not a folder; name a new or empty folder for the run")
                self.path.stat()  # raises for a path that cannot exist (too long, a file as a parent)
                return None
            return sorted(os.listdir(self.path))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RunFolderError(f"--out {self.path}: {_reason(exc)}") from None

    def check(self) -> None:
        """Refuse (:class:`RunFolderError`) a folder this run may not write; writes nothing."""
        entries = self._entries()
        if entries is not None and LOCK_NAME in entries:
            self._probe_lock()
        self._check_content(entries)

    def _check_content(self, entries: list[str] | None) -> None:
        temporaries = {p.name for p in leftover_temporaries(self.path)} if entries else set()
        content = [e for e in entries or () if e != LOCK_NAME and e not in temporaries]
        if self.resume:
            if CONFIG_NAME not in content:
                raise RunFolderError(f"cannot resume: {self.path} holds no {CONFIG_NAME} of an earlier run")
            return
        if not content:
            return
        if CONFIG_NAME in content:
            raise RunFolderError(
                f"{self.path} already holds a run; resume it (--resume {self.path}) or choose another --out"
            )
        raise RunFolderError(
            f"--out {self.path}: the folder holds other files ({', '.join(content[:3])}"
            f"{', ...' if len(content) > 3 else ''}); protofl writes runs only into a new or "
            "empty folder, and left this one as it was"
        )

    def _probe_lock(self) -> None:
        """Refuse at once if another process holds the folder's lock (takes nothing)."""
        try:
            fd = os.open(self.path / LOCK_NAME, os.O_RDONLY)
        except OSError:
            return
        try:
            _try_lock(fd, self.path)
            _unlock(fd)
        finally:
            os.close(fd)

    def lock(self) -> RunFolderLock:
        """Check, create the folder and take its lock; temporary files of interrupted writes are removed."""
        self.check()
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunFolderError(f"--out {self.path}: cannot write there ({_reason(exc)})") from None
        try:
            _try_lock(fd, self.path)
            self._check_content(self._entries())  # what another process wrote before we held the lock
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            for tmp in leftover_temporaries(self.path):
                tmp.unlink(missing_ok=True)
        except BaseException:
            os.close(fd)
            raise
        return RunFolderLock(self.path, fd, created)


class RunFolderLock:
    """The held lock of a run folder; :meth:`release` (or leaving the ``with`` block) lets it go. A
    folder the lock created that still holds nothing else (the run failed before writing) is removed."""

    def __init__(self, path: Path, fd: int, created: bool = False):
        self.path = path
        self._fd: int | None = fd
        self._created = created

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if self._created and os.listdir(self.path) == [LOCK_NAME]:
                (self.path / LOCK_NAME).unlink()
                self.path.rmdir()
        except OSError:  # another process may be looking at it: leaving an empty folder is harmless
            pass
        _unlock(self._fd)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunFolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _try_lock(fd: int, path: Path) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no locking
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        except OSError:
            holder = "unknown"
        raise RunLockedError(
            f"{path} is being written by another protofl process (pid {holder}); wait for it to "
            "finish or choose another --out"
        ) from None


def _unlock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        return
    fcntl.flock(fd, fcntl.LOCK_UN)
