"""Mutation fuzzing of protofl's loaders, run in a process of its own so its peak memory is its own.

``python tests/_fuzz.py TARGET COUNT SEED FOLDER`` writes a valid file of TARGET's kind into FOLDER,
loads COUNT mutants of it (bit flips, interesting bytes, boundary integers over 4- and 8-byte fields,
truncations, insertions, deletions, duplicated spans) and prints one JSON object: how many loaded,
how many raised the loader's typed error, the first crashes (any other exception, MemoryError included:
the loop runs under an address-space limit set with ``resource.setrlimit``) and the growth of the
process's peak resident memory over the loop.
"""

from __future__ import annotations

import json
import pickle
import resource
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF)
BOUNDARY_INTS = (0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1, 10**12)


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One to four random edits of ``data``."""
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        kind = int(rng.integers(0, 7))
        pos = int(rng.integers(0, max(len(buf), 1)))
        if kind == 0 and buf:  # flip a bit
            buf[pos] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1 and buf:  # an interesting byte
            buf[pos] = INTERESTING_BYTES[int(rng.integers(0, len(INTERESTING_BYTES)))]
        elif kind == 2 and len(buf) >= 8:  # a boundary integer over a 4- or 8-byte field, either endianness
            value = BOUNDARY_INTS[int(rng.integers(0, len(BOUNDARY_INTS)))]
            width = 4 if rng.random() < 0.5 else 8
            order = "big" if rng.random() < 0.5 else "little"
            pos = min(pos, len(buf) - width)
            buf[pos : pos + width] = (value % 2 ** (8 * width)).to_bytes(width, order)
        elif kind == 3:  # truncate
            del buf[pos:]
        elif kind == 4:  # insert random bytes
            buf[pos:pos] = rng.integers(0, 256, size=int(rng.integers(1, 16))).astype(np.uint8).tobytes()
        elif kind == 5:  # delete a span
            del buf[pos : pos + int(rng.integers(1, 16))]
        else:  # duplicate a span
            buf[pos:pos] = buf[pos : pos + int(rng.integers(1, 64))]
    return bytes(buf)


# --------------------------------------------------------------------------------------------------
# Targets: (write a valid file into a folder and return its path, load that path, the typed error)


def _idx_file(folder: Path, compress: bool) -> Path:
    from protofl.data.formats import write_idx

    images = np.random.default_rng(0).integers(0, 256, size=(12, 8, 8)).astype(np.uint8)
    return write_idx(folder / ("images.gz" if compress else "images"), images, compress=compress)


def _idx_target(compress: bool):
    from protofl.data.formats import DataFormatError, read_idx

    return (lambda folder: _idx_file(folder, compress)), read_idx, DataFormatError


def _cifar_target():
    from protofl.data.formats import DataFormatError, load_cifar_folder

    def write(folder: Path) -> Path:
        rng = np.random.default_rng(0)
        for name, n in (("data_batch_1", 6), ("test_batch", 3)):
            batch = {
                b"batch_label": b"batch",
                b"data": rng.integers(0, 256, size=(n, 3072)).astype(np.uint8),
                b"labels": [int(v) for v in rng.integers(0, 10, size=n)],
            }
            (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        (folder / "batches.meta").write_bytes(
            pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}, protocol=2)
        )
        return folder / "data_batch_1"

    return write, (lambda path: load_cifar_folder(path.parent)), DataFormatError


def _checkpoint_target():
    import torch

    from protofl.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    def write(folder: Path) -> Path:
        state = {
            "round": 2,
            "fingerprint": "0123456789abcdef",
            "server_state": {"weight": torch.randn(4, 3), "bias": torch.zeros(4)},
            "client_states": {0: {"weight": torch.randn(4, 3), "steps": 7}},
            "history": [{"round": 1, "global_acc": 0.5}, {"round": 2, "global_acc": 0.6}],
            "bytes_up": 100,
            "bytes_down": 200,
            "elapsed": 1.5,
            "wall_seconds": 2.5,
        }
        return save_checkpoint(folder, state)

    return write, (lambda path: load_checkpoint(path.parent)), CheckpointError


def _summary_target():
    from protofl.errors import ReportError
    from protofl.records import write_json, write_metrics
    from protofl.report import compare_runs

    def write(folder: Path) -> Path:
        row = {
            "round": 1,
            "global_acc": 0.5,
            "personal_acc_mean": 0.6,
            "personal_acc_std": 0.1,
            "train_loss": 0.7,
            "bytes_up": 10,
            "bytes_down": 20,
            "round_seconds": 0.1,
        }
        final = {"global_acc": 0.5, "personal_acc_mean": 0.6, "personal_acc_std": 0.1, "round": 2}
        summary = {
            "method": "fedavg",
            "dataset": "optdigits",
            "features": "pixels",
            "partition": {"scheme": "dirichlet", "alpha": 0.5, "imbalance_factor": 1.0},
            "clients": 4,
            "rounds": 2,
            "seed": 0,
            "final": final,
            "best": {**final, "selected_by": "global_acc"},
            "epsilon": 3.2,
            "delta": 1e-5,
            "privacy": {
                "mechanism": "igpp",
                "noise_multiplier": 1.1,
                "epsilon_budget": 8.0,
                "accountant": "pld",
                "epsilon_pld_max": 3.2,
                "epsilon_rdp_max": 3.9,
                "max_releases_by_a_client": 2,
            },
            "wall_seconds": 3.0,
            "seconds_per_round": 1.2,
            "bytes_up": 100,
            "bytes_down": 200,
            "peak_memory_mb": 300.0,
        }
        run = folder / "run"
        run.mkdir(exist_ok=True)
        write_metrics(run / "metrics.jsonl", [row, {**row, "round": 2}])
        (run / "config.toml").write_text('seed = 0\n[method]\nname = "fedavg"\n')
        write_json(run / "summary.json", summary)
        return run / "summary.json"

    def load(path: Path) -> Path:
        return compare_runs([path.parent], path.parent.parent / "report")

    return write, load, ReportError


TARGETS: dict[str, Callable[[], tuple]] = {
    "idx-plain": lambda: _idx_target(False),
    "idx-gzip": lambda: _idx_target(True),
    "cifar": _cifar_target,
    "checkpoint": _checkpoint_target,
    "summary": _summary_target,
}


#: The address space a mutant set may add to its process: an allocation past it fails with MemoryError,
#: which no loader turns into its typed error, so it counts as a crash.
ADDRESS_SPACE_ALLOWANCE = 1 << 30


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB). Linux's VmHWM belongs to the program since its exec;
    ``ru_maxrss`` would include the pre-exec peak of the (forked) test process that started it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _limit_address_space() -> None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                size = int(line.split()[1]) * 1024
                resource.setrlimit(resource.RLIMIT_AS, (size + ADDRESS_SPACE_ALLOWANCE, resource.RLIM_INFINITY))
                return
    except (OSError, ValueError):
        pass


def fuzz(target: str, count: int, seed: int, folder: Path, plot: bool = False) -> dict:
    write, load, typed_error = TARGETS[target]()
    if target == "summary" and not plot:
        import protofl.report

        # The comparison's table and every check run for each mutant; drawing the (validated) curves
        # takes 0.1 s a mutant, so the large sets skip it (the slow set draws them).
        protofl.report.plot_learning_curves = lambda runs, path: path
    path = write(folder)
    original = path.read_bytes()
    load(path)  # the valid file loads
    rng = np.random.default_rng(seed)
    _limit_address_space()
    before = peak_rss_mb()
    counts = {"loaded": 0, "refused": 0}
    crashes: list[str] = []
    handle = open(path, "r+b")  # rewritten in place: creating a file anew costs milliseconds on some filesystems
    for i in range(count):
        data = mutate(original, rng)
        handle.seek(0)
        handle.write(data)
        handle.truncate()
        handle.flush()
        try:
            load(path)
            counts["loaded"] += 1
        except typed_error as exc:
            counts["refused"] += 1
            if str(path.parent) not in str(exc) and str(path) not in str(exc):
                crashes.append(f"mutant {i}: {type(exc).__name__} does not name the file: {exc}")
        except Exception as exc:  # noqa: BLE001 - any other exception is the finding
            crashes.append(f"mutant {i}: {type(exc).__name__}: {str(exc)[:200]}")
    handle.close()
    growth_mb = peak_rss_mb() - before
    return {**counts, "crashes": crashes[:10], "crash_count": len(crashes), "peak_growth_mb": growth_mb}


if __name__ == "__main__":
    name, n, seed, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    print(json.dumps(fuzz(name, n, seed, out, plot="--plot" in sys.argv)))
