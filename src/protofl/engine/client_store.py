"""Where the in-process engine keeps its clients' personal state between their rounds.

``federation.client_store = "memory"`` (the default) keeps every state that exists in one dict: memory
grows with every client that ever trained. ``"disk"`` keeps the ``federation.client_cache`` most recently
used states in memory and the others in files under the run's checkpoint folder
(``checkpoint/client-states/``; a temporary folder, removed at the end, for a run without a run folder),
so memory is bounded by the cache and the round's cohort, not by the population.

Both stores are mappings ``client id -> state`` in the order clients first stored a state (so every
fold over them, e.g. the privacy report, runs in the same order on either). A state read back from disk
equals the state stored, tensor for tensor and bit for bit.

Checkpoints stay consistent: each state written to disk goes to a new file (``{client}.{version}.pt``,
written under a temporary name and renamed), never over the one a checkpoint names; a checkpoint of the
disk store writes the states still only in memory to disk first, flushes every file written since the
last checkpoint to the disk (one ``os.sync()``, far cheaper than an fsync per file) and records which
version of each client's state it holds. A file is deleted once
neither the current states, nor the last checkpoint, nor the one before it (which stays the complete one
until the new one's write has finished) names it. On resume, files no checkpoint names (written after it
by the interrupted process) are deleted.

``federation.client_state_precision = "float16"`` (off by default: it changes results) rounds a state's
floating-point tensors to float16 when the state is stored (the privacy ledger and tensors with values
beyond float16's range are kept exact), on either store; disk files then hold them as float16. Rounding
when stored, not when evicted, keeps a run's results independent of the cache size and the checkpoint
schedule, so a resumed run still equals an uninterrupted one.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import torch

from protofl._io import atomic_write
from protofl.engine.checkpoint import on_device
from protofl.privacy.accounting import LEDGER_KEY

State = dict[str, Any]

#: Checkpoint keys: the memory store's states, the disk store's index.
MEMORY_KEY = "client_states"
DISK_KEY = "client_store"
#: The name of the disk store's folder inside the checkpoint folder.
STORE_FOLDER = "client-states"
_FILE = re.compile(r"(\d+)\.(\d+)\.pt")
_HALF_MAX = float(torch.finfo(torch.float16).max)
_ROUNDED_DTYPES = (torch.float32, torch.float64)


def rounded_to_float16(value: Any, key: str = "") -> Any:
    """``value`` (a state or part of one) with every float32/float64 tensor rounded to float16's values
    (kept in its dtype); the privacy ledger and tensors with values beyond float16's range are kept as
    they are."""
    if key == LEDGER_KEY:
        return value
    if isinstance(value, torch.Tensor):
        if value.dtype not in _ROUNDED_DTYPES or not value.numel():
            return value
        if not bool(torch.isfinite(value).all()) or float(value.abs().max()) > _HALF_MAX:
            return value
        return value.to(torch.float16).to(value.dtype)
    if isinstance(value, dict):
        return {k: rounded_to_float16(v, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(rounded_to_float16(v) for v in value)
    return value


def _encode(value: Any, half: bool) -> Any:
    """What goes into a state's file: tensors on the CPU, each owning just its own storage (a view of
    a larger tensor would save the whole), float tensors as float16 when ``half`` (they were rounded
    when stored: the conversion is exact) with their dtype kept in ``dtypes``."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.untyped_storage().nbytes() != t.nbytes or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        if half and t.dtype in _ROUNDED_DTYPES and t.numel() and t.to(torch.float16).to(t.dtype).equal(t):
            return {"__half__": t.to(torch.float16), "dtype": str(t.dtype).removeprefix("torch.")}
        return t
    if isinstance(value, dict):
        return {k: _encode(v, half and k != LEDGER_KEY) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_encode(v, half) for v in value)
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "__half__" in value and len(value) == 2:
            return value["__half__"].to(getattr(torch, value["dtype"]))
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_decode(v) for v in value)
    return value


class MemoryClientStore(MutableMapping[int, State]):
    """Every client's state in one dict (``federation.client_store = "memory"``)."""

    kind = "memory"

    def __init__(self, directory: Path | None = None, cache: int = 0, precision: str = "exact"):
        #: Where a disk store of this run would keep its files (read when resuming a checkpoint of one).
        self.directory = directory
        self.cache = cache  # not used: every state is in memory
        self.precision = precision
        self._states: dict[int, State] = {}

    def __getitem__(self, k: int) -> State:
        return self._states[k]

    def __setitem__(self, k: int, state: State) -> None:
        self._states[k] = rounded_to_float16(state) if self.precision == "float16" else state

    def __delitem__(self, k: int) -> None:
        del self._states[k]

    def __iter__(self) -> Iterator[int]:
        return iter(self._states)

    def __len__(self) -> int:
        return len(self._states)

    @property
    def in_memory(self) -> int:
        """How many states this process holds in memory now."""
        return len(self._states)

    def checkpoint(self) -> dict[str, Any]:
        """The store's part of a checkpoint."""
        return {MEMORY_KEY: self._states}

    def restore(self, checkpoint: Mapping[str, Any]) -> None:
        """Take the states of ``checkpoint`` (written by either store)."""
        if DISK_KEY in checkpoint:
            source = DiskClientStore(self._disk_folder(), cache=0)
            source.restore(checkpoint)
            self._states = {k: source[k] for k in source}
        else:
            self._states = dict(checkpoint[MEMORY_KEY])

    def _disk_folder(self) -> Path:
        if self.directory is None:
            raise ValueError("the checkpoint keeps its client states on disk, but this run has no checkpoint folder")
        return self.directory


class DiskClientStore(MutableMapping[int, State]):
    """The ``cache`` most recently used states in memory, the others in files in ``directory`` (a
    temporary folder, removed with the store, where ``None``); see the module docstring."""

    kind = "disk"

    def __init__(self, directory: Path | None, cache: int, precision: str = "exact"):
        self.cache = cache
        self.precision = precision
        if directory is None:
            directory = Path(tempfile.mkdtemp(prefix="protofl-client-states-"))
            weakref.finalize(self, shutil.rmtree, directory, True)
        self.directory = Path(directory)
        #: Every client with a state, in the order they first stored one.
        self._order: dict[int, None] = {}
        #: The states in memory, least recently used first, and those of them not yet on disk.
        self._hot: OrderedDict[int, State] = OrderedDict()
        self._dirty: set[int] = set()
        #: Each client's current file version, and every version of its that is on disk.
        self._index: dict[int, int] = {}
        self._files: dict[int, set[int]] = {}
        #: The index named by the last checkpoint and by the one before it (see the module docstring).
        self._pinned: tuple[dict[int, int], dict[int, int]] = ({}, {})
        self._next_version = 0
        self._scanned = False
        #: Files written since the last checkpoint are not yet known to be on the disk itself.
        self._unsynced = False

    # -- the mapping ---------------------------------------------------------------------------------
    def __getitem__(self, k: int) -> State:
        state = self._hot.get(k)
        if state is not None:
            self._hot.move_to_end(k)
            return state
        if k not in self._index:
            raise KeyError(k)
        state = self._read(k, self._index[k])
        self._hot[k] = state
        self._evict()
        return state

    def __setitem__(self, k: int, state: State) -> None:
        self._order.setdefault(k, None)
        self._hot[k] = rounded_to_float16(state) if self.precision == "float16" else state
        self._hot.move_to_end(k)
        self._dirty.add(k)
        self._evict()

    def __delitem__(self, k: int) -> None:
        if k not in self._order:
            raise KeyError(k)
        del self._order[k]
        self._hot.pop(k, None)
        self._dirty.discard(k)
        old = self._index.pop(k, None)
        if old is not None:
            self._release(k, old)

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._order))

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, k: object) -> bool:
        return k in self._order

    @property
    def in_memory(self) -> int:
        """How many states this process holds in memory now (at most ``cache`` between rounds)."""
        return len(self._hot)

    # -- files ---------------------------------------------------------------------------------------
    def _path(self, k: int, version: int) -> Path:
        return self.directory / f"{k // 1000}" / f"{k}.{version}.pt"

    def _read(self, k: int, version: int) -> State:
        from protofl.engine.checkpoint import load_tensors
        from protofl.errors import CheckpointError

        path = self._path(k, version)
        hint = "the run folder's client states are incomplete; start the run over in a new folder"
        try:
            entry = load_tensors(path, hint)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: the state of client {k} the checkpoint names is missing; {hint}") from None
        if not isinstance(entry, dict) or "state" not in entry or "device" not in entry:
            raise CheckpointError(f"{path}: not a client state of protofl's; {hint}")
        device = torch.device(entry["device"])
        state = _decode(entry["state"])
        return state if device.type == "cpu" else on_device(state, device)

    def _write(self, k: int, state: State) -> None:
        if not self._scanned:
            self._remove_unnamed()
        version = self._next_version
        self._next_version += 1
        buffer = io.BytesIO()
        torch.save({"state": _encode(state, self.precision == "float16"), "device": _device_of(state)}, buffer)
        atomic_write(self._path(k, version), lambda fh: fh.write(buffer.getbuffer()), sync=False)
        self._unsynced = True
        old = self._index.get(k)
        self._index[k] = version
        self._files.setdefault(k, set()).add(version)
        if old is not None:
            self._release(k, old)

    def _release(self, k: int, version: int) -> None:
        """Delete client ``k``'s file ``version`` unless a state or a checkpoint still names it."""
        if self._index.get(k) == version or any(pinned.get(k) == version for pinned in self._pinned):
            return
        self._path(k, version).unlink(missing_ok=True)
        versions = self._files.get(k, set())
        versions.discard(version)
        if not versions:
            self._files.pop(k, None)

    def _evict(self) -> None:
        while len(self._hot) > self.cache:
            k, state = self._hot.popitem(last=False)
            if k in self._dirty:
                self._dirty.discard(k)
                self._write(k, state)

    def _remove_unnamed(self) -> None:
        """Delete the files in the folder that name no state of this store (left by a process that
        stopped after its last checkpoint, and the temporary files of writes it never finished), and
        continue the versions after the highest seen."""
        self._scanned = True
        if not self.directory.is_dir():
            return
        for path in self.directory.glob("*/.*.pt-*.tmp"):
            path.unlink(missing_ok=True)
        for path in self.directory.glob("*/*.pt"):
            match = _FILE.fullmatch(path.name)
            if match is None:
                continue
            k, version = int(match[1]), int(match[2])
            self._next_version = max(self._next_version, version + 1)
            if version not in self._files.get(k, ()):
                path.unlink(missing_ok=True)

    # -- checkpoints ---------------------------------------------------------------------------------
    def checkpoint(self) -> dict[str, Any]:
        """Write every state still only in memory to disk and return the index a checkpoint holds. The
        files the checkpoint before the last one named (now superseded) are deleted here."""
        for k in [k for k in self._hot if k in self._dirty]:
            self._dirty.discard(k)
            self._write(k, self._hot[k])
        if self._unsynced:  # one flush of every file written since the last checkpoint, before it names them
            os.sync()
            self._unsynced = False
        older, last = self._pinned
        self._pinned = (last, dict(self._index))
        for k, version in older.items():
            self._release(k, version)
        clients = list(self._order)
        return {
            DISK_KEY: {
                "clients": torch.tensor(clients, dtype=torch.int64, device="cpu"),
                "versions": torch.tensor([self._index[k] for k in clients], dtype=torch.int64, device="cpu"),
                "precision": self.precision,
            }
        }

    def restore(self, checkpoint: Mapping[str, Any]) -> None:
        """Take the states of ``checkpoint`` (written by either store); files it does not name are
        deleted."""
        self._hot.clear()
        self._dirty.clear()
        self._order, self._index, self._files = {}, {}, {}
        if DISK_KEY in checkpoint:
            entry = checkpoint[DISK_KEY]
            clients, versions = entry["clients"].tolist(), entry["versions"].tolist()
            self._order = dict.fromkeys(clients)
            self._index = dict(zip(clients, versions))
            self._files = {k: {v} for k, v in self._index.items()}
            self._pinned = ({}, dict(self._index))
            self._remove_unnamed()
            missing = [k for k, v in self._index.items() if not self._path(k, v).exists()]
            if missing:
                from protofl.errors import CheckpointError

                raise CheckpointError(
                    f"{self.directory}: the checkpoint names client states that are not there "
                    f"({len(missing)} missing, e.g. client {missing[0]}); the run folder is incomplete"
                )
        else:
            self._pinned = ({}, {})
            self._remove_unnamed()
            for k, state in checkpoint[MEMORY_KEY].items():
                self[k] = state


def _device_of(state: Any) -> str:
    """The device of the state's first tensor (``cpu`` if it has none)."""
    if isinstance(state, torch.Tensor):
        return str(state.device)
    values = state.values() if isinstance(state, dict) else state if isinstance(state, (list, tuple)) else ()
    for v in values:
        device = _device_of(v)
        if device != "cpu":
            return device
    return "cpu"


#: The store each ``federation.client_store`` names; each is built as ``Store(directory, cache, precision)``.
STORES: dict[str, type[MemoryClientStore] | type[DiskClientStore]] = {
    "memory": MemoryClientStore,
    "disk": DiskClientStore,
}
