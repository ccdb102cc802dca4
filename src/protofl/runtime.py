"""Where and how a run executes: its device, its torch threads, and the versions it ran with.

``federation.device`` and ``federation.threads`` are resolved here, once, before any data is loaded;
summary.json and report.md record the result (with the versions of protofl, torch, Flower and Python,
and the git commit when protofl runs from a checkout).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import logging
import os
import platform
import subprocess
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from protofl.config import ConfigError

log = logging.getLogger("protofl.runtime")

#: Signals that asked the command to stop (Ctrl-C, SIGTERM), appended by the command line's handler; the
#: round loop stops before the next round when one is here (see :func:`check_stop`).
STOP_SIGNALS: list[int] = []


def check_stop() -> None:
    """Raise :class:`KeyboardInterrupt` when a stop signal was received but its interrupt was lost (Python
    drops an exception raised while a finaliser runs)."""
    if STOP_SIGNALS:
        raise KeyboardInterrupt


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Run a block (the round loop) with the objects alive at its start moved out of the garbage
    collector's reach (``gc.freeze``) and given back at its end (``gc.unfreeze``). A run's process holds
    hundreds of thousands of long-lived objects (modules, data, client states); every full collection
    walks them all (about 0.2 s in the speed benchmark's process, one every few dozen rounds), while the
    garbage a round makes is in the young objects. Objects made inside the block are collected as usual;
    if something froze objects before (``gc.get_freeze_count()``), the block leaves them as they are."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


#: How much freed memory the C allocator keeps for reuse while the rounds run (:func:`retain_freed_memory`).
HEAP_RETAIN_BYTES = 64 << 20
#: glibc's ``mallopt`` parameters (``malloc.h``) and the environment variables that set them.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


def retain_freed_memory(limit: int = HEAP_RETAIN_BYTES) -> str:
    """Have glibc's allocator keep up to ``limit`` bytes of freed memory for reuse instead of handing it
    back to the system: blocks up to ``limit`` come from the heap (not a fresh ``mmap`` each time) and the
    heap is trimmed only past ``limit`` of free space at its top. A batched round allocates and frees
    megabyte-sized activations, gradients and optimiser state every round; with glibc's defaults each
    round takes them from the system again (thousands of page faults a round, every page zeroed).

    Returns what applies, for the log: ``"retained"`` (set now), ``"environment"`` (the process's
    ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` decide, left as they are) or ``"unavailable"``
    (not glibc, e.g. macOS or musl). The setting is the process's and stays after the rounds (glibc has no
    way back to its adaptive default); the memory it keeps is at most ``limit`` beyond what is in use."""
    if not 0 < limit < 2**31:
        raise ValueError(f"retain_freed_memory: limit must be in (0, 2**31) bytes, got {limit}")
    if any(name in os.environ for name in _MALLOC_ENV):
        return "environment"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "unavailable"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if mallopt(_M_MMAP_THRESHOLD, limit) and mallopt(_M_TRIM_THRESHOLD, limit):
        return "retained"
    return "unavailable"


#: A sweep sets this in its worker processes: how many processes share the machine's cores.
WORKERS_ENV = "PROTOFL_WORKERS"


def resolve_device(name: str) -> Any:
    """The ``torch.device`` for ``federation.device``; a CUDA device this machine lacks is a
    :class:`ConfigError` (raised before any work)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ConfigError(
            f"federation.device: {name!r} asked for, but this machine has no CUDA device "
            f"(torch {torch.__version__}, {build}); use 'cpu' or 'auto'"
        )
    index = int(name.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"federation.device: {name!r} asked for, but this machine has {count} CUDA device(s)")
    return torch.device("cuda", index)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and ``taskset`` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - platforms without affinity
        return os.cpu_count() or 1


def worker_processes() -> int:
    """How many worker processes share this machine's cores (1 outside a sweep)."""
    try:
        return max(1, int(os.environ.get(WORKERS_ENV, "1")))
    except ValueError:
        raise ConfigError(
            f"{WORKERS_ENV}: expected a whole number of worker processes, got {os.environ[WORKERS_ENV]!r}"
        ) from None


def resolve_threads(threads: int) -> int:
    """``federation.threads``, with 0 meaning the available cores divided among the worker processes
    (all of them for a process alone, ``cores / workers`` in a sweep's worker). An explicit count that,
    times the worker processes, exceeds the cores is kept but logged as oversubscribed: the threads
    would take turns on the cores, each round slower than with fewer."""
    if threads > 0:
        cores, workers = available_cores(), worker_processes()
        if threads * workers > cores:
            log.warning(
                "federation.threads = %d in each of %d worker process(es) on %d core(s): %d threads compete for "
                "the cores (oversubscribed); 0 divides the cores among the workers",
                threads,
                workers,
                cores,
                threads * workers,
            )
        return threads
    return max(1, available_cores() // worker_processes())


def apply_threads(threads: int) -> dict[str, int]:
    """Set torch's intra-op and inter-op threads and the thread pools of the BLAS libraries loaded in this
    process (numpy's: the privacy releases' matrix products run there), so that a sweep's workers do not
    each start a pool the size of the machine; returns what is in force. The inter-op pool can only be
    sized before its first use in a process: a later call keeps the size it has."""
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        pass  # already started in this process (e.g. a second run in one Python session)
    threadpool_limits(limits=threads, user_api="blas")
    blas = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    return {
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "blas_threads": max(blas, default=0),
    }


def versions() -> dict[str, str | None]:
    """Versions of protofl, torch, Flower (None where not installed) and Python."""
    import torch

    import protofl

    def installed(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "protofl": protofl.__version__,
        "torch": torch.__version__,
        "flwr": installed("flwr"),
        "python": platform.python_version(),
    }


@functools.cache
def git_commit() -> str | None:
    """The commit of the checkout protofl is imported from (``-dirty`` with uncommitted changes), or
    None when it is not a git checkout (an installed wheel) or git is missing."""
    source = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, check=False, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no", "."],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
