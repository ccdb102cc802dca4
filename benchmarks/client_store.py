"""The client-state store at scale: peak memory and seconds per round of FedProto (batched) on the cached
Fashion-MNIST EfficientNet-Lite0 embeddings when clients' personal models stay in memory
(``federation.client_store = "memory"``) and when the least recently used go to disk (``"disk"``).

- 10,000 clients, IID through protofl's data pipeline, 10 % sampled per round, 2 rounds: the
  memory store (before) against the disk store (after).
- 100,000 clients, 1 % sampled per round, 5 rounds, disk store, a checkpoint after every round. Fashion-MNIST
  has 60,000 training images, too few for 100,000 disjoint clients: each client holds a window of 6
  consecutive examples (5 to train on, 1 to test) of the training pool (whose labels come in no order),
  windows overlapping (each image is held by about 10 clients). The clients' data are views of the one
  pool (no copies), so the memory measured is the engine's, not a data set's.

Model: adapter + MLP head, hidden 64, feature dim 64 (170,026 parameters, 0.65 MB a personal model), SGD
lr 0.05, batch 50, 1 local epoch. No evaluation in the rounds timed (over 100,000 clients it would
dominate). Each configuration runs in a fresh process with 1 torch thread; the peak is that process's
peak RSS (``ru_maxrss``). The load average of the machine is recorded before and after.

    python benchmarks/client_store.py               # both parts, about 5 minutes on a quiet core
    python benchmarks/client_store.py --parts 10k   # the 10,000-client comparison only

Writes benchmarks/results/client_store/{results.json, table.md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "client_store"
MODEL = {"feature_dim": 64, "hidden_dim": 64}
METHOD = {"name": "fedproto", "optimizer": "sgd", "lr": 0.05, "batch_size": 50, "local_epochs": 1}
DATA = {"dataset": "fashion-mnist", "features": "efficientnet-lite0", "image_size": 32}


def _timed_rounds(sim, rounds: int) -> dict[str, Any]:
    wall, cpu = [], []
    for r in range(1, rounds + 1):
        t, c = time.perf_counter(), time.process_time()
        sim.run_round(r)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"round_wall": wall, "round_cpu": cpu}


def ten_thousand(store: str, clients: int, fraction: float, rounds: int) -> dict[str, Any]:
    """``clients`` IID clients through protofl's data pipeline, no checkpoints (as the speed benchmark's
    10,000-client run)."""
    import dataclasses

    from protofl.algorithms import Task, get_algorithm
    from protofl.api import prepare_data, resolve_config
    from protofl.engine import Simulation

    config = resolve_config(
        {
            "seed": 0,
            "data": DATA,
            "partition": {"scheme": "iid", "num_clients": clients, "min_client_size": 2},
            "federation": {
                "rounds": rounds,
                "client_fraction": fraction,
                "execution": "batched",
                "progress": False,
                "client_store": store,
            },
            "model": MODEL,
            "method": METHOD,
        }
    )
    data = prepare_data(config)
    task = Task(data.input_shape, data.num_classes, config.model)
    algo = get_algorithm("fedproto").from_options(config.method_options, task, config.privacy)
    fed = dataclasses.replace(config.federation, rounds=10**6, eval_every=10**6, checkpoint_every=0)
    sim = Simulation(algo, data.clients, data.test_x[:0], data.test_y[:0], fed, seed=0)
    out = _timed_rounds(sim, rounds)
    out.update(clients_with_state=len(sim.client_states), states_in_memory=sim.client_states.in_memory)
    return out


def hundred_thousand(clients: int, fraction: float, rounds: int, cache: int) -> dict[str, Any]:
    """``clients`` clients on overlapping windows of the training pool (see the module
    docstring), disk store, a checkpoint after every round."""
    import numpy as np
    import torch

    from protofl.algorithms import ClientData, Task, get_algorithm
    from protofl.config import FederationConfig, ModelConfig
    from protofl.data import embed, load_dataset
    from protofl.engine import Simulation

    pool = embed(load_dataset("fashion-mnist", progress=False), encoder="efficientnet-lite0", image_size=32).train
    x = torch.from_numpy(np.ascontiguousarray(pool.x, dtype=np.float32))  # float32 already: no copy
    y = torch.from_numpy(pool.y.astype(np.int64))
    window, train = 6, 5
    starts = [(k * window) % (len(y) - window) for k in range(clients)]
    data = [
        ClientData(k, x[s : s + train], y[s : s + train], x[s + train : s + window], y[s + train : s + window])
        for k, s in enumerate(starts)
    ]
    task = Task(tuple(x.shape[1:]), int(pool.num_classes), ModelConfig(**MODEL))
    options = {key: value for key, value in METHOD.items() if key != "name"}
    algo = get_algorithm("fedproto").from_options(options, task)
    fed = FederationConfig(
        rounds=10**6,
        eval_every=10**6,
        checkpoint_every=1,
        client_fraction=fraction,
        execution="batched",
        progress=False,
        client_store="disk",
        client_cache=cache,
    )
    with tempfile.TemporaryDirectory(prefix="protofl-client-store-bench-") as folder:
        sim = Simulation(algo, data, x[:0], y[:0], fed, seed=0, checkpoint_dir=Path(folder) / "checkpoint")
        out = _timed_rounds(sim, rounds)
        files = list((Path(folder) / "checkpoint").rglob("*.pt"))
        out.update(
            clients_with_state=len(sim.client_states),
            states_in_memory=sim.client_states.in_memory,
            files=len(files),
            disk_mb=sum(f.stat().st_size for f in files) / 2**20,
        )
    return out


def child(args: argparse.Namespace) -> None:
    import resource

    import torch

    torch.set_num_threads(1)
    if args.child == "10k":
        out = ten_thousand(args.store, args.clients, args.fraction, args.rounds)
    else:
        out = hundred_thousand(args.clients, args.fraction, args.rounds, args.cache)
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


def launch(part: str, **options: Any) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", part]
    for key, value in options.items():
        command += [f"--{key}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{part} {options}: failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"part": part, **options, "process_s": time.perf_counter() - start, **json.loads(lines[-1][7:])}


def tabulate(results: dict[str, Any], command: str) -> str:
    load = results["load"]
    lines = [
        f"Command: `{command}` (1 torch thread; load average {load[0]:.1f} before, {load[1]:.1f} after, on 2 cores "
        "shared with other jobs: wall times are inflated, CPU seconds less so).",
        "",
        "| clients | sampled per round | store | rounds | s / round, wall (each round) | s / round, CPU (each round) "
        "| clients holding a state after | states in memory after | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['clients']} | {round(r['fraction'] * r['clients'])} | {r.get('store', 'disk')}"
            f"{'' if r.get('store', 'disk') == 'memory' else ', cache ' + str(r.get('cache', 256))} | {r['rounds']} | "
            f"{', '.join(f'{v:.2f}' for v in r['round_wall'])} | {', '.join(f'{v:.2f}' for v in r['round_cpu'])} | "
            f"{r['clients_with_state']} | {r['states_in_memory']} | {r['peak_mb']:.0f} |"
        )
    for r in results["runs"]:
        if "files" in r:
            lines += [
                "",
                f"{r['clients']} clients: after {r['rounds']} rounds the checkpoint folder holds {r['files']} files "
                f"({r['disk_mb']:.0f} MB); rounds include writing a checkpoint after each.",
            ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--store", default="disk", help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=100_000, help=argparse.SUPPRESS)
    parser.add_argument("--fraction", type=float, default=0.01, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=5, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=int, default=256, help="federation.client_cache of the disk store")
    parser.add_argument("--parts", nargs="+", default=["10k", "100k"], choices=["10k", "100k"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    load_before = os.getloadavg()[0]
    runs = []
    if "10k" in args.parts:
        for store in ("memory", "disk"):
            runs.append(launch("10k", store=store, clients=10_000, fraction=0.1, rounds=2))
    if "100k" in args.parts:
        runs.append(launch("100k", clients=100_000, fraction=0.01, rounds=5, cache=args.cache))
    results = {"runs": runs, "load": [load_before, os.getloadavg()[0]], "command": command}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    table = tabulate(results, command)
    (args.out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
