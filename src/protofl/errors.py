"""The errors a user can cause, as one family: every one is a :class:`ProtoflError`.

The command line prints a :class:`ProtoflError` as one line (``error: ...``) and exits with the class's
``exit_code``; the Python API raises it as it is. Each subclass also derives from the builtin class
that older code caught (``ValueError``, ``RuntimeError``), so ``except ValueError`` still works.
"""

from __future__ import annotations

import pickle

__all__ = [
    "CheckpointError",
    "CompileError",
    "ConfigError",
    "DataFormatError",
    "ProtoflError",
    "ReportError",
    "RunFailedError",
    "RunFolderError",
    "RunLockedError",
    "UnknownSourceError",
    "UnsafePickleError",
]


class ProtoflError(Exception):
    """Something a user supplied (a config, a file, a folder) cannot be used; the message says which
    and why, in one line."""

    #: The command line's exit status for this error.
    exit_code = 2
    #: What the command line prints before the message (after ``error: ``).
    prefix = ""


class ConfigError(ProtoflError, ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""

    prefix = "invalid configuration: "


class RunFolderError(ConfigError):
    """``--out`` cannot be used as a run folder (it holds other files, is not a folder, cannot be
    written), or a run folder cannot be resumed. (A :class:`ConfigError`: where a run writes is part
    of what it is asked to do.)"""

    prefix = ""


class RunLockedError(RunFolderError):
    """Another process is writing the run folder."""


class DataFormatError(ProtoflError, ValueError):
    """A file is not in the expected format (wrong magic number, truncated, inconsistent, out-of-range
    values, larger than its own size can justify)."""


class UnsafePickleError(DataFormatError, pickle.UnpicklingError):
    """A pickle asks for something the restricted unpickler does not rebuild (code, or an allocation
    its file cannot justify)."""


class UnknownSourceError(ProtoflError, KeyError):
    """No data source of that name is registered."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


class CheckpointError(ProtoflError, ValueError):
    """A checkpoint is empty, truncated, damaged or not protofl's."""


class ReportError(ProtoflError, ValueError):
    """A run folder's records (summary.json, metrics.jsonl) cannot be read, or a report would be
    written where it must not be."""


class RunFailedError(ProtoflError, RuntimeError):
    """The run could not learn (every reply of a round rejected, no finite training loss): no accuracy
    is reported as a result."""

    exit_code = 4


class CompileError(ProtoflError, RuntimeError):
    """``federation.compile`` is on and ``torch.compile`` could not compile the batched round's step or
    feature pass (there is no fallback to the eager step: turn the setting off to run eagerly)."""
