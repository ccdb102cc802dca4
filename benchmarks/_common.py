"""Shared pieces of the benchmark scripts: run a grid of configs in worker processes, aggregate."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _worker(args: tuple[dict[str, Any], str, int, int | None]) -> dict[str, Any]:
    config, out, threads, stop_after = args
    import torch

    torch.set_num_threads(threads)
    import protofl

    # the run applies federation.threads itself (0 would mean every core, in each worker)
    config = {**config, "federation": {**config.get("federation", {}), "threads": threads}}
    from protofl.api import resolve_config
    from protofl.config import RunConfig

    folder = Path(out)
    resume = False
    if (folder / "config.toml").exists():
        # An earlier run of this job: reuse or continue it only if it had exactly this configuration
        # (both resolved by today's code, so sections added since with their defaults compare equal).
        stored = resolve_config(RunConfig.from_toml(folder / "config.toml")).to_toml()
        if stored != resolve_config(config).to_toml():
            raise SystemExit(f"{folder} holds a run of another configuration: delete it to rerun")
        if (folder / "summary.json").exists():
            summary = json.loads((folder / "summary.json").read_text())
            # a run stopped early (stop_after, Ctrl-C) is continued, not taken for a finished one
            if summary["status"] == "completed" or (stop_after is not None and summary["rounds_done"] >= stop_after):
                return summary
        resume = (folder / "checkpoint").exists()
    from protofl.engine import RunInterrupted

    try:
        result = protofl.run(None if resume else config, out=folder, resume=resume, stop_after=stop_after)
    except RunInterrupted:  # stopped after round stop_after on purpose: summary.json holds the rounds done
        return json.loads((folder / "summary.json").read_text())
    return result.summary


def run_grid(
    jobs: list[tuple[dict[str, Any], Path]], workers: int, threads: int, stop_after: int | None = None
) -> list[dict[str, Any]]:
    """Run ``(config, run_dir)`` jobs, ``workers`` processes at a time with ``threads`` torch threads each.
    A job whose folder holds a completed run (summary.json) is not run again; one with a checkpoint is
    resumed. ``stop_after=r`` stops every run after round r (a checkpoint round, so that a later call
    continues it); a run already past r is not run."""
    ctx = mp.get_context("spawn")
    args = [(config, str(out), threads, stop_after) for config, out in jobs]
    start = time.perf_counter()
    with ctx.Pool(workers, maxtasksperchild=1) as pool:
        summaries = []
        for i, summary in enumerate(pool.imap(_worker, args)):
            summaries.append(summary)
            print(
                f"[{i + 1}/{len(args)}] {Path(args[i][1]).name}: final {summary['final']} "
                f"({time.perf_counter() - start:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    return summaries


def mean_std(values: list[float | None], pct: bool = True) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    scale = 100 if pct else 1
    mean = statistics.fmean(values) * scale
    std = statistics.pstdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def write_table(out: Path, header: str, lines: list[str], summaries: dict[str, Any]) -> None:
    """Write a grid's ``table.md`` (``header`` then the table ``lines``) and its runs' ``summaries.json`` into
    ``out``, and print the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(header + "\n".join(lines) + "\n")
    (out / "summaries.json").write_text(json.dumps(summaries, indent=1))
    print((out / "table.md").read_text())
