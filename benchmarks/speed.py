"""The speed benchmark: many clients as one batched program. Seconds per round, start-up and peak memory of a
FedProto round, per-client against batched execution, and each privacy mechanism's share of a round.

The workload (the issue's): 10 classes, 32-d inputs, about 200 training samples per client (the
registered ``synthetic-gaussian`` workload: Gaussian class means plus unit noise, 220 samples per client
split IID, 20 kept as the client's test split), protofl's embedding model (adapter + MLP, hidden 64,
feature dim 64, 9.2k parameters), 1 local epoch of 4 batches of at most 50, SGD lr 0.05 momentum 0.9,
CE + MSE to the global prototype, count-weighted prototype aggregation; every client takes part in
every round. Every column is built from one run configuration (:func:`run_config`) through protofl's
data pipeline.

Columns: a plain per-client loop (torch.optim, no engine: the issue's reference), protofl's
per-client path, protofl's batched path, and protofl's Flower simulation (``run_on_flower`` with
``mode="simulation"``: the ServerApp and a ClientApp per client on Flower's Ray runtime, same
configuration, same algorithm code; see :func:`run_flower` for how its rounds are timed). Every
configuration runs in a fresh process: start-up is from process launch to the engine being ready for
round 1 (imports, data, clients), the first round (lazy imports, warm-up) is reported apart, seconds
per round are the median of rounds 2+, and peak memory is the peak summed RSS of the process tree
(Ray's processes included), polled every 20 ms.

Also: 10,000 clients on the cached Fashion-MNIST EfficientNet-Lite0 embeddings (batched), and the
share of a round's time spent in the ``vpp`` and ``igpp`` release mechanisms.

    python benchmarks/speed.py            # everything, about 10 minutes on 2 cores
    python benchmarks/speed.py --quick    # N = 10 and 100 only
    python benchmarks/speed.py --parts cores breakdown --rounds 8   # the N = 100 round: plain loop against
                                          # batched at 1 and 2 threads, launched in turn, and its profile
    python benchmarks/speed.py --parts cores --compile --rounds 12   # also the batched round with its
                                          # step compiled (federation.compile), at 1 and 2 threads

Writes benchmarks/results/speed/{results.json, table.md} and the section between the speed markers
in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "speed"
DOCS = HERE.parent / "docs" / "benchmarks.md"
BEGIN, END = "<!-- speed:begin -->", "<!-- speed:end -->"

WORKLOAD = {
    "classes": 10,
    "input_dim": 32,
    "feature_dim": 64,
    "hidden_dim": 64,
    "samples": 200,
    "test_samples": 20,
    "batch_size": 50,
    "local_epochs": 1,
    "lr": 0.05,
    "momentum": 0.9,
}


# --------------------------------------------------------------------------------------------------
# Child side: one configuration in this (fresh) process


#: VPP with the selection that reads no client data (the top-k of the broadcast's between-class
#: variance), beside the default private ANOVA selection in the privacy part.
VPP_PUBLIC_SELECTION = "vpp+broadcast-variance"


def run_config(n: int, rounds: int, privacy: str = "none", eval_every: int = 10**6) -> dict:
    """The workload as a run configuration: every column (in-process and Flower) is built from it. The
    data is the registered ``synthetic-gaussian`` workload (Gaussian class means + unit noise, from the
    seed), 220 samples per client split IID, 10 % of each client's (stratified) kept as its test split."""
    w = WORKLOAD
    per_client = w["samples"] + w["test_samples"]
    cfg: dict[str, Any] = {
        "seed": 0,
        "data": {
            "dataset": f"synthetic-gaussian:train={n * per_client},test=200,dim={w['input_dim']},"
            f"classes={w['classes']},seed=0"
        },
        "partition": {
            "scheme": "iid",
            "num_clients": n,
            "min_client_size": 2,
            "test_fraction": w["test_samples"] / per_client,
        },
        "federation": {
            "rounds": rounds,
            "eval_every": min(eval_every, rounds),
            "checkpoint_every": 0,
            "progress": False,
        },
        "model": {"feature_dim": w["feature_dim"], "hidden_dim": w["hidden_dim"]},
        "method": {
            "name": "fedproto",
            "optimizer": "sgd",
            "lr": w["lr"],
            "momentum": w["momentum"],
            "batch_size": w["batch_size"],
            "local_epochs": w["local_epochs"],
            "aggregation": "weighted",
        },
    }
    if privacy != "none":
        # ``mechanism`` or ``mechanism+selection`` (VPP's selection of its group A)
        mechanism, _, selection = privacy.partition("+")
        cfg["privacy"] = {"mechanism": mechanism, "planned_releases": rounds}
        if selection:
            cfg["privacy"]["selection"] = selection
    return cfg


def synthetic_clients(n: int, rounds: int = 1, privacy: str = "none", compile: bool = False):
    """The clients of the workload and its algorithm, through protofl's data pipeline (as ``protofl.run``
    and every Flower node build them); ``compile``: its batched rounds compile their step
    (``federation.compile``)."""
    from protofl.algorithms import Task, get_algorithm
    from protofl.api import prepare_data, resolve_config

    config = resolve_config(run_config(n, rounds, privacy))
    data = prepare_data(config)
    task = Task(data.input_shape, data.num_classes, config.model, compile=compile)
    algo = get_algorithm(config.method_name).from_options(config.method_options, task, config.privacy)
    return data.clients, algo


def run_engine(
    execution: str, n: int, rounds: int, privacy: str = "none", profile_release: bool = False, compile: bool = False
) -> dict:
    """protofl's in-process engine on the workload; training time of each round (no evaluation). ``compile``:
    the batched round's step and feature pass compiled (``federation.compile``); the first round then holds
    the compile, and the number of programs dynamo compiled is recorded."""
    import torch

    from protofl.config import FederationConfig
    from protofl.engine import Simulation
    from protofl.runtime import retain_freed_memory

    clients, algo = synthetic_clients(n, rounds, privacy, compile)
    # Evaluation is off (eval_every beyond the rounds run): the figures are of the rounds themselves.
    fed = FederationConfig(
        rounds=10**6, eval_every=10**6, checkpoint_every=0, progress=False, execution=execution, compile=compile
    )
    sim = Simulation(
        algo, clients, torch.zeros(0, WORKLOAD["input_dim"]), torch.zeros(0, dtype=torch.int64), fed, seed=0
    )
    mechanism = _time_mechanism(algo, profile_release)
    heap = retain_freed_memory()  # as protofl's round loop does (``Simulation.run``)
    ready, ready_cpu = time.time(), time.process_time()
    out = _rounds(lambda r: sim.run_round(r), rounds, mechanism)
    out.update(ready=ready, ready_cpu=ready_cpu, execution=sim.execution, batched_step=algo.batched_step(), heap=heap)
    if compile:
        from torch._dynamo.utils import counters

        out["compiled_graphs"] = int(counters["stats"]["unique_graphs"])
    return out


#: Parts of a release timed inside it (module, function name, label), for the release's profile; a name
#: the imported protofl lacks (an older checkout) is skipped.
RELEASE_PARTS = (
    ("protofl.privacy.mechanisms", "_anova", "ANOVA scores"),
    ("protofl.privacy.mechanisms", "_top_k_batch", "private top-k (Laplace noise + peeling)"),
    ("protofl.privacy.mechanisms", "gaussian_noise", "Gaussian noise draw (per client)"),
    ("protofl.privacy.layer", "vpp_release", "mechanism"),
    ("protofl.privacy.layer", "igpp_release", "mechanism"),
    ("protofl.privacy.layer", "vpp_release_batch", "mechanism"),
    ("protofl.privacy.layer", "igpp_release_batch", "mechanism"),
)

#: What a VPP round computes besides the release (module, name): the diagnostics of each client's
#: selection on its clean features (the round row's vpp_selected_energy and vpp_overlap).
DIAGNOSTICS = (
    ("protofl.algorithms.fedproto", "selection_diagnostics"),
    ("protofl.algorithms.fedproto", "selection_diagnostics_batch"),
)


def _time_mechanism(algo, profile_release: bool = False) -> dict[str, float]:
    """Wrap the privacy mechanism so that its CPU time is counted per round (reset by ``_rounds``):
    ``check`` is the engine's budget check before the round (the accountant), ``release`` the release
    itself (clipping, selection, noise, spending from the ledger); the ``part:`` entries time pieces of
    the release (:data:`RELEASE_PARTS`) for its profile, with ``profile_release`` only (their timers
    cost about 2 µs a call, which would inflate the shares)."""
    import importlib

    spent = {"check": 0.0, "release": 0.0, "diagnostics": 0.0}
    mech = getattr(algo, "privacy_layer", None)

    def wrap(owner, name, key):
        if hasattr(owner, name):
            time_calls(owner, name, key, spent)

    if mech is not None:
        for name, key in (("release", "release"), ("release_batch", "release"), ("check_next", "check")):
            wrap(mech, name, key)
        for module, name in DIAGNOSTICS:
            wrap(importlib.import_module(module), name, "diagnostics")
        for module, name, label in RELEASE_PARTS if profile_release else ():
            wrap(importlib.import_module(module), name, f"part:{label}")
    return spent


def time_calls(owner, name: str, key: str, spent: dict[str, float], wall: dict[str, float] | None = None) -> None:
    """Replace ``owner.name`` by a wrapper adding each call's CPU seconds to ``spent[key]`` (and its wall
    seconds to ``wall[key]``, given ``wall``)."""
    fn = getattr(owner, name)

    def timed(*args, **kwargs):
        t, w = time.process_time(), time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[key] += time.process_time() - t
            if wall is not None:
                wall[key] += time.perf_counter() - w

    spent.setdefault(key, 0.0)
    if wall is not None:
        wall.setdefault(key, 0.0)
    setattr(owner, name, staticmethod(timed) if isinstance(owner.__dict__.get(name), staticmethod) else timed)


def _rounds(step, rounds: int, mechanism: dict[str, float] | None = None) -> dict:
    """Time ``rounds`` calls of ``step``, with the objects alive before them frozen out of the garbage
    collector's full collections, as protofl's round loop runs its rounds (``protofl.runtime.frozen_heap``):
    otherwise a full collection of the whole process (about 0.2 s) lands in whichever part of a round
    happens to allocate when it is due, e.g. in a release's ledger, and is counted as that part's time."""
    from protofl.runtime import frozen_heap

    wall, cpu = [], []
    mechanism = mechanism if mechanism is not None else {"check": 0.0, "release": 0.0}
    per_round: dict[str, list[float]] = {key: [] for key in mechanism}
    with frozen_heap():
        for r in range(1, rounds + 1):
            for key in mechanism:
                mechanism[key] = 0.0
            t, c = time.perf_counter(), time.process_time()
            step(r)
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            for key, value in mechanism.items():
                per_round[key].append(value)
    return {"round_wall": wall, "round_cpu": cpu, **{f"mechanism_{key}": values for key, values in per_round.items()}}


def run_plain(n: int, rounds: int) -> dict:
    """The reference: a plain per-client loop with torch.optim and one nn.Module, no engine."""
    import torch
    import torch.nn.functional as F

    w = WORKLOAD
    clients, algo = synthetic_clients(n)
    model = algo.task.build_model()
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    states = [init] * n
    table = torch.zeros(w["classes"], w["feature_dim"])
    have = torch.zeros(w["classes"], dtype=torch.bool)
    ready = time.time()

    def one_round(r: int) -> None:
        nonlocal table, have
        sums = torch.zeros(w["classes"], w["feature_dim"], dtype=torch.float64)
        counts = torch.zeros(w["classes"], dtype=torch.float64)
        for k, data in enumerate(clients):
            model.load_state_dict(states[k])
            opt = torch.optim.SGD(model.parameters(), lr=w["lr"], momentum=w["momentum"])
            g = torch.Generator().manual_seed(r * 100003 + k)
            order = torch.randperm(data.num_train, generator=g)
            for start in range(0, data.num_train, w["batch_size"]):
                idx = order[start : start + w["batch_size"]]
                x, y = data.x_train[idx], data.y_train[idx]
                z, logits = model(x)
                loss = F.cross_entropy(logits, y)
                mask = have[y]
                if mask.any():
                    loss = loss + F.mse_loss(z[mask], table[y[mask]])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            states[k] = {name: v.detach().clone() for name, v in model.state_dict().items()}
            with torch.no_grad():
                z, _ = model(data.x_train)
            c = torch.bincount(data.y_train, minlength=w["classes"]).double()
            sums.index_add_(0, data.y_train, z.double())
            counts += c
        have = counts > 0
        table = (sums / counts.clamp_min(1)[:, None]).float()

    ready_cpu = time.process_time()
    out = _rounds(one_round, rounds)
    out.update(ready=ready, ready_cpu=ready_cpu, execution="plain loop")
    return out


def run_flower(n: int, rounds: int, timeout: float = 1800.0) -> dict:
    """The workload through protofl's Flower simulation runtime (``run_on_flower(mode="simulation")``: the
    ServerApp and one ClientApp per client on Flower's Ray backend), from the same run configuration and
    the same algorithm code as the in-process columns.

    The server writes a metrics row only for an evaluated round, and a round's evaluation rides on the
    next round's training messages; so rounds are evaluated every other round (2, 4, ...), and the rows of
    those rounds time pure training rounds (``round_seconds``: server side of the exchange, nodes' work
    included). Round 1 is ``elapsed`` of round 2's row minus round 2. Start-up: until the ServerApp has
    built its data and algorithm (its first, empty metrics.jsonl appears). CPU seconds are spread over
    Ray's processes and not reported."""
    import shutil
    import tempfile
    import threading

    from protofl.flower import run_on_flower
    from protofl.records import read_metrics

    rounds = 2 * max(2, (rounds + 1) // 2)  # even: the last round is an even, evaluated one
    out = Path(tempfile.mkdtemp(prefix="protofl-speed-flower-"))
    metrics = out / "run" / "metrics.jsonl"
    ready: list[float] = []

    def watch() -> None:
        while not ready and not done.is_set():
            if metrics.exists():
                ready.append(time.time())
            time.sleep(0.01)

    done = threading.Event()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        # past ``timeout`` run_on_flower raises and its Federation shuts the SuperLink and Ray down
        run_on_flower(run_config(n, rounds, eval_every=2), out / "run", mode="simulation", timeout=timeout)
        rows = read_metrics(metrics)
    finally:
        done.set()
        watcher.join()
        shutil.rmtree(out, ignore_errors=True)
    timed = {row["round"]: row["round_seconds"] for row in rows}
    first = rows[0]["elapsed_seconds"] - rows[0]["round_seconds"]
    walls = [first] + [timed[r] for r in sorted(timed)]
    return {
        "ready": ready[0] if ready else float("nan"),
        "execution": "flower-simulation",
        "round_wall": walls,
        "round_cpu": [float("nan")] * len(walls),
        "mechanism_check": [0.0] * len(walls),
        "mechanism_release": [0.0] * len(walls),
        "timed_rounds": [1, *sorted(timed)],
    }


def run_cached_embeddings(n: int, rounds: int, fraction: float) -> dict:
    """FedProto, batched, on the cached EfficientNet-Lite0 embeddings of Fashion-MNIST (IID over ``n``
    clients, ``fraction`` of them per round), through protofl.run's data pipeline."""
    from protofl.algorithms import Task, get_algorithm
    from protofl.api import prepare_data, resolve_config
    from protofl.engine import Simulation

    config = resolve_config(
        {
            "seed": 0,
            "data": {"dataset": "fashion-mnist", "features": "efficientnet-lite0", "image_size": 32},
            "partition": {"scheme": "iid", "num_clients": n, "min_client_size": 2},
            "federation": {"rounds": rounds, "client_fraction": fraction, "execution": "batched", "progress": False},
            "model": {"feature_dim": 64, "hidden_dim": 64},
            "method": {"name": "fedproto", "optimizer": "sgd", "lr": 0.05, "batch_size": 50},
        }
    )
    data = prepare_data(config)
    task = Task(data.input_shape, data.num_classes, config.model)
    algo = get_algorithm("fedproto").from_options(config.method_options, task, config.privacy)
    fed = dataclasses.replace(config.federation, rounds=10**6, eval_every=10**6, checkpoint_every=0)
    sim = Simulation(algo, data.clients, data.test_x[:0], data.test_y[:0], fed, seed=0)
    ready, ready_cpu = time.time(), time.process_time()
    out = _rounds(lambda r: sim.run_round(r), rounds)
    params = sum(v.numel() for v in algo.initial_params(0).values())
    out.update(
        ready=ready,
        ready_cpu=ready_cpu,
        execution=sim.execution,
        clients_with_state=len(sim.client_states),
        params_per_client=params,
        train_samples=sum(d.num_train for d in data.clients),
    )
    return out


#: The breakdown's parts that run inside another timed part: (inner, outer); the outer part is reported
#: without them.
NESTED = (
    ("local training: batch schedule (each client's shuffles)", "local training: forward + backward"),
    ("local training: optimiser updates", "local training: forward + backward"),
)


def breakdown(n: int, rounds: int, operators: bool = True) -> dict:
    """CPU and wall seconds per round of the batched path's parts (rounds 2+), for the profile, and (with
    ``operators``) the shares of torch's operators in the rounds' CPU time (torch.profiler, a separate set
    of rounds)."""
    import gc

    import protofl.algorithms.base as base_mod
    import protofl.algorithms.fedproto as fedproto_mod
    import protofl.engine.client as client_mod
    import protofl.training as training_mod
    from protofl.engine import inprocess
    from protofl.payload import Payload
    from protofl.prototypes import PrototypeAccumulator

    spent: dict[str, float] = {}
    wall: dict[str, float] = {}

    def wrap(owner, name, label):
        time_calls(owner, name, label, spent, wall)

    # The batched client step (ModelAlgorithm's, in protofl.algorithms.base) calls these by name.
    wrap(base_mod, "train_batched", "local training: forward + backward")
    wrap(training_mod, "batch_schedule", NESTED[0][0])
    wrap(training_mod.StackedOptimizer, "step", NESTED[1][0])
    wrap(base_mod, "batched_features", "features for the prototypes (forward of every train row)")
    # the class sums of every client in one product (an older checkout: one accumulator per client)
    sums = "stacked_sums" if hasattr(PrototypeAccumulator, "stacked_sums") else "per_client"
    wrap(PrototypeAccumulator, sums, "per-client class sums and counts")
    wrap(fedproto_mod.FedProto, "release_prototypes", "per-class means")
    if hasattr(fedproto_mod.FedProto, "clean_prototypes_batch"):  # the batched round's means, all clients at once
        wrap(fedproto_mod.FedProto, "clean_prototypes_batch", "per-class means")
    wrap(base_mod, "unstack_params", "client states out of the stack")
    wrap(base_mod, "stack_params", "client states into the stack")
    wrap(client_mod, "client_generator", "client generators (seed derivation)")
    wrap(Payload, "to_bytes", "replies to bytes")
    wrap(inprocess.InProcessTransport, "_through_wire", "payloads parsed back + validation")
    wrap(fedproto_mod.FedProto, "server_step", "server aggregation")
    result = run_engine("batched", n, 1)  # warm-up (lazy imports) in a throwaway engine
    spent.update(dict.fromkeys(spent, 0.0))
    wall.update(dict.fromkeys(wall, 0.0))
    full_before = gc.get_stats()[-1]["collections"]
    result = run_engine("batched", n, rounds)
    full_collections = gc.get_stats()[-1]["collections"] - full_before
    start = time.process_time()
    gc.collect()  # what one full collection of this process costs (protofl.runtime.frozen_heap spares the run's)
    full_collection_s = time.process_time() - start
    measured = rounds
    parts = {k: v / measured for k, v in spent.items()}
    parts_wall = {k: v / measured for k, v in wall.items()}
    for inner, outer in NESTED:
        parts[outer] -= parts[inner]
        parts_wall[outer] -= parts_wall[inner]
    total = statistics.fmean(result["round_cpu"])
    total_wall = statistics.fmean(result["round_wall"])
    rest = "everything else (engine loop, replies built, client store)"
    parts[rest] = total - sum(parts.values())
    parts_wall[rest] = total_wall - sum(parts_wall.values())
    return {
        "round_cpu": total,
        "round_wall_mean": total_wall,
        "parts": parts,
        "parts_wall": parts_wall,
        "operators": operator_shares(n, max(2, rounds // 2)) if operators else [],
        "full_collections": full_collections,
        "full_collection_s": full_collection_s,
        "batched_step": result["batched_step"],
        "frozen_heap": True,
    }


def operator_shares(n: int, rounds: int, top: int = 30) -> list[tuple[str, float, int, float]]:
    """``(operator, share of the self CPU time, calls per round, self seconds per round)`` of torch's
    operators in ``rounds`` batched rounds under torch.profiler (after one warm-up round), the ``top``
    largest. The profiler's self time is the wall time inside the operator on the thread that called it,
    so at 2 threads an operator that splits across both cores shows a shorter time than at 1."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from protofl.config import FederationConfig
    from protofl.engine import Simulation

    clients, algo = synthetic_clients(n, rounds + 1)
    fed = FederationConfig(rounds=10**6, eval_every=10**6, checkpoint_every=0, progress=False, execution="batched")
    sim = Simulation(
        algo, clients, torch.zeros(0, WORKLOAD["input_dim"]), torch.zeros(0, dtype=torch.int64), fed, seed=0
    )
    sim.run_round(1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for r in range(2, rounds + 2):
            sim.run_round(r)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ranked = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return [
        (e.key, e.self_cpu_time_total / total, round(e.count / rounds), e.self_cpu_time_total / 1e6 / rounds)
        for e in ranked
    ]


def child_main(args: argparse.Namespace) -> None:
    from protofl.runtime import apply_threads

    threads = apply_threads(args.threads)  # protofl's thread policy: torch's pools and numpy's BLAS
    if args.kind == "plain":
        out = run_plain(args.clients, args.rounds)
    elif args.kind == "flower":
        out = run_flower(args.clients, args.rounds, args.flower_timeout)
    elif args.kind == "embeddings":
        out = run_cached_embeddings(args.clients, args.rounds, args.fraction)
    elif args.kind == "breakdown":
        out = breakdown(args.clients, args.rounds)
    elif args.kind == "batched-compiled":
        out = run_engine("batched", args.clients, args.rounds, args.privacy, args.profile_release, compile=True)
    else:
        out = run_engine(args.kind, args.clients, args.rounds, args.privacy, args.profile_release)
    import resource

    out["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["threads_in_force"] = threads
    print("RESULT " + json.dumps(out), flush=True)


# --------------------------------------------------------------------------------------------------
# Parent side: launch, watch the process tree, tabulate


def _tree_rss_mb(root: int) -> float:
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
            fields = stat[stat.rindex(")") + 2 :].split()
            ppid, pages = int(fields[1]), int(fields[21])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = pages
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total * os.sysconf("SC_PAGE_SIZE") / 2**20


LOAD_SAMPLES: list[float] = []


def launch(
    kind: str,
    clients: int,
    rounds: int,
    threads: int,
    privacy: str = "none",
    fraction: float = 1.0,
    timeout: float = 1800,
    flower_timeout: float = 300.0,
    profile_release: bool = False,
) -> dict:
    load = os.getloadavg()[0]
    LOAD_SAMPLES.append(load)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--clients",
        str(clients),
        "--rounds",
        str(rounds),
        "--threads",
        str(threads),
        "--privacy",
        privacy,
        "--fraction",
        str(fraction),
        *(["--profile-release"] if profile_release else []),
        "--flower-timeout",
        str(flower_timeout),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, _tree_rss_mb(proc.pid))
        time.sleep(0.02)
        if time.time() - start > timeout:
            proc.kill()
            proc.wait()
            return {"kind": kind, "clients": clients, "error": f"ran past {timeout:g} s (killed)"}
    stdout, stderr = proc.communicate()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        message = (stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"kind": kind, "clients": clients, "error": message}
    out = json.loads(lines[-1][len("RESULT ") :])
    out.update(
        kind=kind, clients=clients, privacy=privacy, peak_tree_mb=max(peak, out["ru_maxrss_mb"]), load_at_launch=load
    )
    if "ready" in out:
        out["startup_s"] = out["ready"] - start
    if "round_wall" in out:
        later = out["round_wall"][1:] or out["round_wall"]
        out["s_per_round"] = statistics.median(later)
        out["cpu_s_per_round"] = statistics.median(out["round_cpu"][1:] or out["round_cpu"])
        out["first_round_s"] = out["round_wall"][0]
        cpu_later = out["round_cpu"][1:] or out["round_cpu"]
        for part in ("check", "release", "diagnostics"):
            values = out.get(f"mechanism_{part}", [0.0])[1:] or out.get(f"mechanism_{part}", [0.0])
            out[f"mechanism_{part}_s"] = statistics.fmean(values)
            out[f"mechanism_{part}_share"] = sum(values) / sum(cpu_later) if sum(cpu_later) else 0.0
    print(
        f"{kind:>10} N={clients:<6} {privacy:>5}: "
        + (
            f"{out.get('s_per_round', float('nan')):.4f} s/round (cpu {out.get('cpu_s_per_round', float('nan')):.4f}), "
            f"start-up {out.get('startup_s', float('nan')):.2f} s, peak {out['peak_tree_mb']:.0f} MB"
        ),
        file=sys.stderr,
        flush=True,
    )
    return out


def _fmt(row: dict | None, key: str, spec: str) -> str:
    if row is None:
        return "—"
    if "error" in row:
        return "n/a"
    return format(row[key], spec)


def tabulate(results: dict, args: argparse.Namespace, command: str) -> str:
    grid = results.get("grid", [])
    kinds = ["plain", "per-client", "batched", "flower"]
    names = {
        "plain": "plain loop",
        "per-client": "protofl per-client",
        "batched": "protofl batched",
        "flower": "protofl Flower simulation",
    }
    sizes = sorted({row["clients"] for row in grid})
    lookup = {(row["kind"], row["clients"]): row for row in grid}
    w = WORKLOAD
    lines = [
        (
            f"FedProto round on the `synthetic-gaussian` workload (docs/data.md: Gaussian class means + unit noise, "
            f"{w['classes']} classes, {w['input_dim']}-d inputs), {w['samples'] + w['test_samples']} samples per client "
            f"split IID, {w['test_samples']} of them (stratified) kept as the client's test split, so 198-202 training "
            f"samples per client at N = 100; adapter + MLP model (hidden {w['hidden_dim']}, feature dim {w['feature_dim']}), "
            f"1 local epoch of 4 batches of at most 50 (a fifth of 1-2 for the clients past 200), SGD lr {w['lr']} momentum {w['momentum']}, CE + MSE to the global "
            "prototype, count-weighted aggregation, all clients every round. Every column is built from the same run "
            "configuration (`run_config` in benchmarks/speed.py) through protofl's data pipeline; the Flower column runs "
            'it with `protofl.flower.run_on_flower(..., mode="simulation")`. Evaluation off in the in-process columns '
            f"(see the Flower note below). {args.threads} torch thread(s). {_load_text(results)}"
        ),
        "",
        "Commands: " + "; ".join(f"{part}: `{cmd}`" for part, cmd in sorted(results.get("commands", {}).items())),
        "",
        (
            "Seconds per round: median of rounds 2+ (wall / CPU). Start-up: process launch to the engine ready for "
            "round 1 (imports, data, clients), wall and the process's CPU seconds. First round: round 1 alone, with its lazy imports. Peak: summed RSS of "
            "the whole process tree."
        ),
        "",
        "| clients | path | s / round (wall) | s / round (CPU) | speed-up vs per-client (wall / CPU) | start-up (wall / CPU s) | first round (s) | peak (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in sizes:
        base = lookup.get(("per-client", n))
        for kind in kinds:
            row = lookup.get((kind, n))
            if row is None:
                continue
            if "error" in row:
                lines.append(f"| {n} | {names[kind]} | n/a: {row['error']} | | | | | |")
                continue
            flower = kind == "flower"  # its work runs in Ray's processes: no CPU seconds of one process
            speed = (
                f"{base['s_per_round'] / row['s_per_round']:.1f}×"
                + ("" if flower else f" / {base['cpu_s_per_round'] / row['cpu_s_per_round']:.1f}×")
                if base and "error" not in base and "s_per_round" in row
                else "—"
            )
            cpu = "—" if flower else _fmt(row, "cpu_s_per_round", ".4f")
            startup_cpu = "—" if flower else _fmt(row, "ready_cpu", ".2f")
            lines.append(
                f"| {n} | {names[kind]} | {_fmt(row, 's_per_round', '.4f')} | {cpu} "
                f"| {speed} | {_fmt(row, 'startup_s', '.2f')} / {startup_cpu} "
                f"| {_fmt(row, 'first_round_s', '.2f')} "
                f"| {_fmt(row, 'peak_tree_mb', '.0f')} |"
            )
    if any(row["kind"] == "flower" for row in grid):
        lines += [
            "",
            (
                "Flower column: protofl's ServerApp and one ClientApp per client on Flower's simulation runtime (Ray), "
                "same configuration, same algorithm code. Its server writes a row only for an evaluated round and an "
                "evaluation rides on the next round's training messages, so those runs evaluate every other round and "
                "the seconds per round are the median of the training phase (`round_seconds`) of rounds 2, 4, 6 (no "
                "evaluation in them); round 1 is the first round. Start-up: launch to the ServerApp having built its data "
                "and algorithm (Ray and the nodes' first start fall in round 1). Peak: the whole process tree (the "
                "SuperLink, the ServerApp, Ray's workers). Where the time goes: the ServerApp polls the SuperLink for "
                f"replies every {_flower_poll()} s (`POLL_SECONDS` in protofl/flower/transport.py), so a round takes a whole "
                "number of polls, on top of Flower's messaging and the ClientApps run in Ray's actors."
            ),
        ]
    lines += _targets(lookup, results)
    emb = results.get("embeddings")
    if emb:
        lines += ["", "### 10,000 clients on cached embeddings", ""]
        if "error" in emb:
            lines.append(f"Not run: {emb['error']}")
        else:
            lines += [
                (
                    f"FedProto, batched, Fashion-MNIST EfficientNet-Lite0 embeddings (1280-d, cached), IID over "
                    f"{emb['clients']} clients ({emb['train_samples']} training samples in all), a fraction "
                    f"{args.fraction} of the clients per round, model hidden 64 / feature dim 64 "
                    f"({emb['params_per_client']} parameters, {emb['params_per_client'] * 4 / 2**20:.2f} MB per personal "
                    f"model), {len(emb['round_wall'])} rounds."
                ),
                "",
                "| clients | per round | s / round (wall, each round) | start-up (s) | clients holding a model after | peak (MB) |",
                "|---|---|---|---|---|---|",
                (
                    f"| {emb['clients']} | {round(args.fraction * emb['clients'])} | "
                    f"{', '.join(f'{v:.2f}' for v in emb['round_wall'])} | {emb['startup_s']:.1f} | "
                    f"{emb['clients_with_state']} | {emb['peak_tree_mb']:.0f} |"
                ),
            ]
    priv = results.get("privacy", [])
    if priv:
        lines += [
            "",
            "### Privacy mechanisms' share of a round",
            "",
            (
                f"FedProto with `[privacy] mechanism = ...` (epsilon 8, fixed-features sensitivity), same workload, "
                f"{args.privacy_clients} clients, CPU seconds per round (rounds 2+): the engine's budget check "
                "before the round (the accountant: epsilon after one more release) and the releases (clipping, "
                "selection, noise, spending from the ledger), each as a share of the round's CPU time."
            ),
            "",
            (
                "VPP's selection diagnostics (each client's clean ANOVA and between-class energy for the round row's "
                "`vpp_selected_energy` and `vpp_overlap`) are not part of the release and are given apart. `vpp` "
                'selects its group A privately (`selection = "private-anova"`, the default: each client\'s ANOVA '
                f"and a peeling); `{VPP_PUBLIC_SELECTION}` takes it from the global prototypes the client received "
                '(`selection = "broadcast-variance"`: no client data read, no epsilon spent on it).'
            ),
            "",
            (
                "| mechanism | path | round (wall s) | round (CPU s) | budget check (CPU s) | releases (CPU s) | "
                "share: check | share: releases | share: mechanism | VPP diagnostics (share) | load at launch |"
            ),
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in priv:
            if "error" in row:
                lines.append(f"| {row['privacy']} | {row['kind']} | n/a: {row['error']} |" + " |" * 8)
                continue
            lines.append(
                f"| {row['privacy']} | {names[row['kind']]} | {row['s_per_round']:.4f} | {row['cpu_s_per_round']:.4f} | "
                f"{row['mechanism_check_s']:.4f} | {row['mechanism_release_s']:.4f} | "
                f"{100 * row['mechanism_check_share']:.1f} % | {100 * row['mechanism_release_share']:.1f} % | "
                f"{100 * (row['mechanism_check_share'] + row['mechanism_release_share']):.1f} % | "
                f"{100 * row.get('mechanism_diagnostics_share', 0.0):.1f} % | {row.get('load_at_launch', math.nan):.1f} |"
            )
    profiled = [row for row in results.get("release_profile", []) if "error" not in row]
    if profiled:
        lines += [
            "",
            (
                "### Where a release's time goes (CPU seconds per round, all clients, rounds 2+; separate runs "
                "with timers inside the release)"
            ),
            "",
            (
                "`mechanism` is the release function itself (vpp_release / igpp_release: the parts listed above it "
                "plus clipping and the class means); the rest of the release is the ledger (loading it from the "
                "client's state, the budget check and recording the spend)."
            ),
            "",
            "| mechanism | path | "
            + " | ".join(label for _, _, label in RELEASE_PARTS[:3])
            + " | mechanism (all of the release function) | ledger and bookkeeping | release |",
            "|---|---|" + "---|" * 6,
        ]
        for row in profiled:
            parts = [
                statistics.fmean(
                    row.get(f"mechanism_part:{label}", [0.0])[1:] or row.get(f"mechanism_part:{label}", [0.0])
                )
                for _, _, label in RELEASE_PARTS[:4]
            ]
            mechanism_s = parts[3]
            lines.append(
                f"| {row['privacy']} | {names[row['kind']]} | "
                + " | ".join(f"{v:.4f}" for v in parts)
                + f" | {row['mechanism_release_s'] - mechanism_s:.4f} | {row['mechanism_release_s']:.4f} |"
            )
    threads = [row for row in results.get("thread_rounds", []) if "error" not in row]
    if threads:
        lines += [
            "",
            "### The batched round at 1 and 2 threads",
            "",
            (
                f"protofl batched, {threads[0]['clients']} clients, the workload above, with and without a release, "
                "under protofl's thread policy (`protofl.runtime.apply_threads`: torch's intra-op and inter-op "
                "pools and numpy's BLAS pool set to the count). Median of rounds 2+. CPU / wall above 1 means the "
                "round ran on more than one core at a time; the load average at each launch says how busy the "
                "cores were with other work."
            ),
            "",
            "| mechanism | threads | s / round (wall) | s / round (CPU) | CPU / wall | releases (share of CPU) | load at launch |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in threads:
            lines.append(
                f"| {row['privacy']} | {row['threads_in_force']['threads']} | {row['s_per_round']:.4f} | "
                f"{row['cpu_s_per_round']:.4f} | {row['cpu_s_per_round'] / row['s_per_round']:.2f} | "
                f"{100 * row['mechanism_release_share']:.1f} % | {row['load_at_launch']:.1f} |"
            )
    prof = results.get("breakdown")
    if prof and "parts" in prof:
        lines += [
            "",
            f"### Where a batched round's time goes ({prof['clients']} clients, CPU seconds per round"
            + (f"; local step: {prof['batched_step']})" if "batched_step" in prof else ")"),
            "",
            "| part | CPU s / round | share |",
            "|---|---|---|",
        ]
        for name, value in sorted(prof["parts"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {name} | {value:.4f} | {100 * value / prof['round_cpu']:.0f} % |")
        lines.append(f"| **round** | **{prof['round_cpu']:.4f}** | |")
        lines += _threads_breakdown(prof, results.get("breakdown_threads"))
        if "full_collection_s" in prof:
            lines += [
                "",
                (
                    f"The garbage collector: {prof['full_collections']} full collection(s) during these rounds "
                    + (
                        "(with the objects alive before the rounds frozen, as in protofl's round loop, a full "
                        "collection walks only what the rounds made)"
                        if prof.get("frozen_heap")
                        else "(run by `run_round` directly, outside the round loop's frozen heap)"
                    )
                    + f"; one full collection of the whole process afterwards took {prof['full_collection_s']:.3f} CPU-s."
                ),
            ]
        if prof.get("operators"):
            lines += [
                "",
                (
                    "torch's operators in the same rounds (torch.profiler, a separate set of rounds): each one's "
                    "share of the self time of all operators, the largest first. The profiler clocks wall time "
                    "inside each operator, so on busy cores the shares are the steadier reading."
                ),
                "",
                "| operator | share | calls / round |",
                "|---|---|---|",
            ]
            for name, share, calls, *_ in prof["operators"][:14]:
                lines.append(f"| `{name}` | {100 * share:.1f} % | {calls} |")
            lines += _threads_operators(prof["operators"], (results.get("breakdown_threads") or {}).get("operators"))
    lines += _cores_table(results.get("cores", []))
    return "\n".join(lines) + "\n"


def _threads_breakdown(one: dict, two: dict | None) -> list[str]:
    """The breakdown's parts at 1 thread (CPU and wall) against 2 threads (wall and CPU), means over the
    rounds 2+ of one process each: which parts a second thread shortens and which stay serial."""
    if not two or "parts_wall" not in two or "parts_wall" not in one:
        return []
    out = [
        "",
        (
            "The same parts at 2 threads (a second process, launched after the first; seconds per round, means of "
            "rounds 2+): wall at 2 threads against wall at 1 says what the second core shortens; a part whose CPU "
            "at 2 threads is about twice its wall ran on both cores (or had torch's second thread waiting on it)."
        ),
        "",
        "| part | 1 thread: wall | 1 thread: CPU | 2 threads: wall | 2 threads: CPU | wall saved |",
        "|---|---|---|---|---|---|",
    ]
    for name, value in sorted(one["parts_wall"].items(), key=lambda kv: -kv[1]):
        w2, c2 = two["parts_wall"].get(name, math.nan), two["parts"].get(name, math.nan)
        out.append(f"| {name} | {value:.4f} | {one['parts'][name]:.4f} | {w2:.4f} | {c2:.4f} | {value - w2:+.4f} |")
    out.append(
        f"| **round** | **{one['round_wall_mean']:.4f}** | **{one['round_cpu']:.4f}** | "
        f"**{two['round_wall_mean']:.4f}** | **{two['round_cpu']:.4f}** | "
        f"{one['round_wall_mean'] - two['round_wall_mean']:+.4f} |"
    )
    return out


def _threads_operators(one: list, two: list | None) -> list[str]:
    """torch's largest operators at 1 thread against the same at 2 threads: self seconds per round (the wall
    time inside each operator), so the ratio says which operators a second thread shortens."""
    if not two or len(one[0]) < 4:
        return []
    at_two = {row[0]: row for row in two}
    out = [
        "",
        (
            "The same operators at 2 threads (the 2-thread breakdown's profiled rounds): milliseconds per round "
            "inside each operator on the calling thread, and what a second thread makes of it."
        ),
        "",
        "| operator | 1 thread (ms / round) | 2 threads (ms / round) | 1 thread / 2 threads |",
        "|---|---|---|---|",
    ]
    for name, _, _, seconds in one[:14]:
        other = at_two.get(name)
        t2 = other[3] if other else math.nan
        out.append(f"| `{name}` | {1e3 * seconds:.2f} | {1e3 * t2:.2f} | {seconds / t2 if t2 else math.nan:.2f}× |")
    return out


def _cores_table(rows: list[dict]) -> list[str]:
    """The ``cores`` part: the plain loop and the batched round at N = 100, launched in turn."""
    rows = [row for row in rows if "error" not in row]
    if not rows:
        return []
    reps = sorted({row["rep"] for row in rows})
    out = [
        "",
        f"### The batched round against the plain loop, 1 and 2 threads, launched in turn ({rows[0]['clients']} clients)",
        "",
        (
            f"{len(reps)} repetitions of three fresh processes one after the other: the plain per-client loop at 1 "
            "thread, protofl batched at 1 thread and at 2 threads (the thread policy, `protofl.runtime."
            "apply_threads`); seconds per round are the median of rounds 2+ of each process, and the ratio is "
            "the plain loop's over the batched round's of the same repetition (so both ran under about the same "
            "load). The last rows are the medians over the repetitions."
        ),
        "",
        "| repetition | path | threads | s / round (wall) | s / round (CPU) | plain / batched (wall / CPU) | load at launch |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {"plain": "plain loop", "batched": "protofl batched", "batched-compiled": "protofl batched, compiled step"}

    def ratio(plain: dict | None, row: dict) -> str:
        if plain is None or row["kind"] == "plain":
            return "—"
        return f"{plain['s_per_round'] / row['s_per_round']:.1f}× / {plain['cpu_s_per_round'] / row['cpu_s_per_round']:.1f}×"

    for rep in reps:
        group = [row for row in rows if row["rep"] == rep]
        plain = next((row for row in group if row["kind"] == "plain"), None)
        for row in group:
            out.append(
                f"| {rep} | {names[row['kind']]} | {row['threads_in_force']['threads']} | {row['s_per_round']:.4f} | "
                f"{row['cpu_s_per_round']:.4f} | {ratio(plain, row)} | {row['load_at_launch']:.1f} |"
            )
    kinds = [("plain", 1), ("batched", 1), ("batched", 2), ("batched-compiled", 1), ("batched-compiled", 2)]
    for kind, threads in kinds:
        same = [row for row in rows if row["kind"] == kind and row["threads_in_force"]["threads"] == threads]
        if not same:
            continue
        ratios = []
        for row in same:
            plain = next((p for p in rows if p["kind"] == "plain" and p["rep"] == row["rep"]), None)
            if plain is not None and kind != "plain":
                ratios.append(
                    (plain["s_per_round"] / row["s_per_round"], plain["cpu_s_per_round"] / row["cpu_s_per_round"])
                )
        text = (
            f"{statistics.median(r[0] for r in ratios):.1f}× / {statistics.median(r[1] for r in ratios):.1f}×"
            if ratios
            else "—"
        )
        out.append(
            f"| median | {names[kind]} | {threads} | {statistics.median(r['s_per_round'] for r in same):.4f} | "
            f"{statistics.median(r['cpu_s_per_round'] for r in same):.4f} | {text} | "
            f"{statistics.median(r['load_at_launch'] for r in same):.1f} |"
        )
    compiled = [row for row in rows if row["kind"] == "batched-compiled"]
    if compiled:
        out += [
            "",
            "The compiled rows (`federation.compile`, `--compile`): the first round, which compiles the step and the "
            "feature pass, took "
            + ", ".join(f"{row['first_round_s']:.1f}" for row in compiled)
            + " s wall (in launch order; the inductor cache in `TORCHINDUCTOR_CACHE_DIR` fills at the first); "
            "programs compiled per process: "
            + ", ".join(str(row.get("compiled_graphs", "?")) for row in compiled)
            + ".",
        ]
    return out


def _load_text(results: dict) -> str:
    load = results.get("load", [math.nan, math.nan])
    during = results.get("load_during") or []
    text = f"1-minute load average when it started {load[0]:.2f}, when it ended {load[1]:.2f}"
    if during:
        text += (
            f", over the run (sampled at each launch) {min(during):.2f}–{max(during):.2f}, "
            f"mean {statistics.fmean(during):.2f}"
        )
    return text + (
        " (the 2 cores are shared with other jobs, so wall times are noisy; CPU seconds of the process "
        "are given next to them)."
    )


def _flower_poll() -> str:
    try:
        from protofl.flower.transport import POLL_SECONDS
    except ImportError:
        return "?"
    return f"{POLL_SECONDS:g}"


def _targets(lookup: dict, results: dict) -> list[str]:
    """The speed targets at N = 100 against the figures reached (benchmarks, not timed tests)."""

    def get(kind, key):
        row = lookup.get((kind, 100))
        return row.get(key) if row and "error" not in row else None

    batched, plain, flower = get("batched", "s_per_round"), get("plain", "s_per_round"), get("flower", "s_per_round")
    shares = [
        (row["privacy"], row["kind"], row["mechanism_check_share"] + row["mechanism_release_share"])
        for row in results.get("privacy", [])
        if "error" not in row
    ]
    out = ["", "### The speed targets at N = 100 (1 thread)", "", "| target | reached | met |", "|---|---|---|"]

    def line(target, value, ok):
        out.append(f"| {target} | {value} | {'—' if ok is None else ('yes' if ok else '**no**')} |")

    line(
        "batched round <= 0.05 s",
        f"{batched:.4f} s (CPU {get('batched', 'cpu_s_per_round'):.4f} s)" if batched else "n/a",
        batched <= 0.05 if batched else None,
    )
    line(
        "10x faster than the plain loop",
        f"{plain / batched:.1f}x" if plain and batched else "n/a",
        plain / batched >= 10 if plain and batched else None,
    )
    line(
        "25x faster than Flower's simulation",
        f"{flower / batched:.1f}x" if flower and batched else "n/a",
        flower / batched >= 25 if flower and batched else None,
    )
    startup = get("batched", "startup_s")
    line("start-up <= 3 s (batched)", f"{startup:.2f} s" if startup else "n/a", startup <= 3 if startup else None)
    peak = get("batched", "peak_tree_mb")
    line("peak <= 400 MB (batched)", f"{peak:.0f} MB" if peak else "n/a", peak <= 400 if peak else None)
    for mech, kind, share in shares:
        line(f"{mech} ({kind}): privacy mechanism <= 10 % of a round", f"{100 * share:.1f} %", share <= 0.10)
    return out


def write_docs(table: str) -> None:
    text = DOCS.read_text()
    block = f"{BEGIN}\n{table}{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n## The speed benchmark: many clients as one batched program\n\n" + block + "\n"
    DOCS.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=100, help=argparse.SUPPRESS)
    parser.add_argument("--privacy", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--profile-release", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--fraction", type=float, default=0.1, help="fraction of the 10,000 embedding clients sampled per round"
    )
    parser.add_argument("--rounds", type=int, default=4, help="rounds per configuration (median of rounds 2+)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument(
        "--per-client-max", type=int, default=1000, help="largest N for the plain loop and the per-client path"
    )
    parser.add_argument("--privacy-clients", type=int, default=100)
    parser.add_argument("--embedding-clients", type=int, default=10000)
    parser.add_argument("--quick", action="store_true", help="N = 10 and 100, no embeddings run")
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["grid", "privacy", "threads", "breakdown", "embeddings"],
        help="run only these parts (also: cores, the N = 100 plain loop and batched round at 1 and 2 threads, "
        "launched in turn); the others are kept from an earlier results.json in --out",
    )
    parser.add_argument(
        "--flower-timeout",
        type=float,
        default=300.0,
        help="seconds a Flower simulation run may take before it is stopped and reported as such",
    )
    parser.add_argument(
        "--repetitions", type=int, default=3, help="launches of each configuration in the cores part (in turn)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="the cores part also runs the batched round with its step compiled (federation.compile), in turn",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.child:
        args.kind = args.child
        child_main(args)
        return
    if args.quick:
        args.sizes = [n for n in args.sizes if n <= 100]
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    load_start = os.getloadavg()[0]
    previous = args.out / "results.json"
    results: dict[str, Any] = (
        json.loads(previous.read_text())
        if previous.exists() and set(args.parts) != {"grid", "privacy", "threads", "breakdown", "embeddings"}
        else {}
    )
    results.update(workload=WORKLOAD, threads=args.threads)
    LOAD_SAMPLES.clear()
    if "grid" in args.parts:
        grid = []
        for n in args.sizes:
            rounds = args.rounds if n <= 1000 else max(2, min(args.rounds, 3))
            for kind in ("plain", "per-client", "batched", "flower"):
                if kind == "flower" and n > 1000:
                    continue  # the issue asks for 10,000 clients on the in-process engine only
                if kind in ("plain", "per-client") and n > args.per_client_max:
                    continue
                grid.append(
                    launch(
                        kind,
                        n,
                        rounds,
                        args.threads,
                        flower_timeout=args.flower_timeout,
                        timeout=args.flower_timeout + 120 if kind == "flower" else 1800,
                    )
                )
        results["grid"] = grid
    if "privacy" in args.parts:
        results["privacy"] = [
            launch(kind, args.privacy_clients, args.rounds, args.threads, privacy=mech)
            for mech in ("vpp", "igpp")
            for kind in ("per-client", "batched")
        ] + [launch("batched", args.privacy_clients, args.rounds, args.threads, privacy=VPP_PUBLIC_SELECTION)]
        results["release_profile"] = [
            launch("batched", args.privacy_clients, args.rounds, args.threads, privacy=mech, profile_release=True)
            for mech in ("vpp", "igpp")
        ]
    if "threads" in args.parts:
        results["thread_rounds"] = [
            launch("batched", args.privacy_clients, args.rounds, threads, privacy=mech)
            for mech in ("none", "igpp", "vpp")
            for threads in (1, 2)
        ]
    if "cores" in args.parts:
        cores = []
        for rep in range(1, args.repetitions + 1):
            kinds = [("plain", 1), ("batched", 1), ("batched", 2)]
            if args.compile:
                kinds += [("batched-compiled", 1), ("batched-compiled", 2)]
            for kind, threads in kinds:
                row = launch(kind, 100, args.rounds, threads)
                row["rep"] = rep
                cores.append(row)
        results["cores"] = cores
    if "breakdown" in args.parts:
        results["breakdown"] = launch("breakdown", 100, args.rounds, args.threads)
        results["breakdown"]["clients"] = 100
        # the same parts at 2 threads (the thread policy on this machine's cores): where the wall time goes
        results["breakdown_threads"] = launch("breakdown", 100, args.rounds, 2)
        results["breakdown_threads"]["clients"] = 100
    if "embeddings" in args.parts and not args.quick:
        results["embeddings"] = launch("embeddings", args.embedding_clients, 2, args.threads, fraction=args.fraction)
    results["load"] = [load_start, os.getloadavg()[0]]
    results["load_during"] = [*LOAD_SAMPLES, results["load"][1]]
    results.setdefault("commands", {})
    for part in args.parts:
        results["commands"][part] = command
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    table = tabulate(results, args, command)
    (args.out / "table.md").write_text(table)
    if args.out == RESULTS:
        write_docs(table)
    print(table)


if __name__ == "__main__":
    main()
