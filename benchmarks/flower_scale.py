"""Flower at many nodes: protofl's Flower simulation runtime at N nodes (default 1,000), 5 rounds, next
to the in-process engine (per-client and batched) on the same run configuration: the speed benchmark's
workload (benchmarks/speed.py ``run_config``: FedProto on synthetic Gaussian data, 220 samples a client).

Reported per engine: seconds per round (wall; the rows' ``round_seconds + eval_seconds``, every round
evaluated), start-up (launch to the server ready for round 1), peak memory and CPU seconds of the whole
process tree (for Flower: every process carrying the run's FLWR_HOME, the SuperLink, the ServerApp, Ray's
daemons and actors, sampled every second; CPU of a process is its last sample), and the 1-minute load
average before and after. Each engine runs in a fresh process, one after the other. Writes
benchmarks/results/flower_scale/{table.md, results.json}.

    OMP_NUM_THREADS=1 python benchmarks/flower_scale.py --clients 1000 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import RESULTS, command_line

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def config(n: int, rounds: int) -> dict:
    from speed import run_config

    cfg = run_config(n, rounds, eval_every=1)
    cfg["federation"]["checkpoint_every"] = 0
    # One torch thread per process, as each Flower ClientApp gets one CPU: the in-process columns at the
    # default policy (every core) ran two threads that wait on each other on loaded cores (510 s of wall for
    # a round that takes 8.5 s at one thread).
    cfg["federation"]["threads"] = 1
    return cfg


def _tree(marker: str | None) -> dict[int, tuple[float, int]]:
    """``{pid: (cpu seconds, rss bytes)}`` of this process and its descendants, and, with ``marker``, of
    every process whose environment holds it."""
    me = os.getpid()
    parents: dict[int, int] = {}
    stats: dict[int, tuple[float, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[int(entry)] = int(fields[1])
        stats[int(entry)] = ((int(fields[11]) + int(fields[12])) / TICKS, int(fields[21]) * PAGE)

    def ours(pid: int) -> bool:
        p = pid
        for _ in range(64):
            if p == me:
                return True
            if p in (0, 1) or p not in parents:
                break
            p = parents[p]
        if marker is None:
            return False
        try:
            return marker.encode() in Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return False

    return {pid: value for pid, value in stats.items() if ours(pid)}


class Sampler:
    """Peak summed RSS and CPU seconds of the process tree (see the module docstring)."""

    def __init__(self, marker: str | None = None, every: float = 1.0):
        self.marker, self.every = marker, every
        self.cpu: dict[int, float] = {}
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        tree = _tree(self.marker)
        for pid, (cpu, _) in tree.items():
            self.cpu[pid] = max(cpu, self.cpu.get(pid, 0.0))
        self.peak = max(self.peak, sum(rss for _, rss in tree.values()))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sample()
        self._stop.set()
        self._thread.join()


def run_one(engine: str, n: int, rounds: int, timeout: float) -> dict:
    """One engine, in this (fresh) process."""
    import protofl
    from protofl.records import read_metrics

    cfg = config(n, rounds)
    out = Path(tempfile.mkdtemp(prefix=f"protofl-flower-scale-{engine}-"))
    run_dir = out / "run"
    start = time.time()
    ready: list[float] = []
    done = threading.Event()

    def watch() -> None:  # the server is ready for round 1 once it has opened metrics.jsonl
        while not ready and not done.is_set():
            if (run_dir / "metrics.jsonl").exists():
                ready.append(time.time())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    error = None
    marker = f"FLWR_HOME={out / 'w' / 'flwr-home'}" if engine == "flower-simulation" else None
    try:
        with Sampler(marker) as sampler:
            if engine == "flower-simulation":
                from protofl.flower import run_on_flower

                run_on_flower(cfg, run_dir, mode="simulation", workdir=out / "w", timeout=timeout)
            else:
                cfg["federation"]["execution"] = engine.removeprefix("in-process ")
                protofl.run(cfg, out=run_dir)
        rows = read_metrics(run_dir / "metrics.jsonl")
    except Exception as exc:  # reported in the table
        error, rows = f"{type(exc).__name__}: {exc}", []
    finally:
        done.set()
        watcher.join()
    wall = time.time() - start
    result = {
        "engine": engine,
        "clients": n,
        "rounds": rounds,
        "error": error,
        "per_round": [r["round_seconds"] + r["eval_seconds"] for r in rows],
        "clients_lost": sum(r.get("clients_lost", 0) for r in rows),
        "startup_s": (ready[0] - start) if ready else None,
        "wall_s": wall,
        "cpu_s": sum(sampler.cpu.values()),
        "peak_mb": sampler.peak / 2**20,
        "personal_acc": rows[-1].get("personal_acc_mean") if rows else None,
    }
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--engines", default="in-process per-client,in-process batched,flower-simulation")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds a Flower run may take")
    parser.add_argument("--out", type=Path, default=RESULTS / "flower_scale")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one engine, print its JSON
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.clients, args.rounds, args.timeout)), flush=True)
        return

    results = []
    for engine in args.engines.split(","):
        load = os.getloadavg()[0]
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                engine,
                "--clients",
                str(args.clients),
                "--rounds",
                str(args.rounds),
                "--timeout",
                str(args.timeout),
            ],
            capture_output=True,
            text=True,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            result = {"engine": engine, "error": f"exit {proc.returncode}: {tail[0]}"}
        else:
            result = json.loads(lines[-1].removeprefix("RESULT "))
        result.update(load_before=load, load_after=os.getloadavg()[0])
        results.append(result)
        print(json.dumps(result), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"# Flower at {args.clients} nodes, {args.rounds} rounds, next to the in-process engine",
        "",
        f"`{command_line()}` on {platform.machine()} with {os.cpu_count()} cores, OMP_NUM_THREADS="
        f"{os.environ['OMP_NUM_THREADS']}, flwr {__import__('flwr').__version__}. The speed benchmark's workload "
        "(FedProto, synthetic Gaussian data, 220 samples a client), every round evaluated. Each engine in a fresh "
        "process, one after the other; the machine is shared (1-minute load average at each launch and end given).",
        "",
        "| engine | s/round (mean) | s/round (each round) | start-up (s) | wall (s) | CPU (s, process tree) "
        "| peak (MB, process tree) | clients lost | final personal acc | load (before → after) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.get("error"):
            lines.append(
                f"| {r['engine']} | n/a: {r['error']} | | | | | | | | {r['load_before']:.1f} → {r['load_after']:.1f} |"
            )
            continue
        acc = f"{100 * r['personal_acc']:.2f}%" if r.get("personal_acc") is not None else "—"
        lines.append(
            f"| {r['engine']} | {statistics.mean(r['per_round']):.2f} | {', '.join(f'{s:.2f}' for s in r['per_round'])} "
            f"| {r['startup_s']:.1f} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_mb']:.0f} | {r['clients_lost']} "
            f"| {acc} | {r['load_before']:.1f} → {r['load_after']:.1f} |"
        )
    lines += [""]
    (args.out / "table.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
