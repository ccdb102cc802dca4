"""Sweeps: a grid of settings × seeds, one run folder per cell, resumable.

``protofl sweep CONFIG --grid privacy.epsilon=1,4,8 --grid privacy.mechanism=igpp,vpp --seeds 0,1,2
--out DIR`` (or a ``[sweep]`` table in CONFIG) runs every combination in worker processes
(``workers``; each gets ``cores / workers`` torch threads unless ``federation.threads`` says
otherwise). Every cell is checked before any runs: a key that does not exist, a value of the wrong
type or an empty grid is an error naming it. Cells whose effective settings coincide (e.g. epsilon
budgets of a run without privacy) run once. Running the same sweep again skips finished cells
(``summary.json`` with a final status) and resumes killed or interrupted ones from their checkpoints.
``DIR/sweep.json`` lists the cells; ``DIR/report/`` holds the comparison (``protofl report DIR``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from protofl.config import ConfigError, apply_overrides, check, parse_override

log = logging.getLogger("protofl.sweep")

#: Statuses of a cell that running the sweep again leaves alone (anything else is resumed).
FINAL_STATUSES = ("completed", "stopped: budget", "stopped: too few replies")


def _literal(value: Any) -> str:
    """``value`` as a TOML literal (for a ``key=value`` override)."""
    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


def _short(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)
    return "".join(c if c.isalnum() or c in ".-+" else "-" for c in text)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of a sweep: its folder name and the overrides applied to the base configuration."""

    name: str
    overrides: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A grid (``key`` -> values, in order) over a base configuration, times ``seeds`` (empty: the
    base's own seed), run by ``workers`` processes."""

    base: Mapping[str, Any]
    grid: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    seeds: tuple[int, ...] = ()
    workers: int = 1

    def __post_init__(self) -> None:
        check(
            bool(self.grid) or bool(self.seeds),
            "sweep",
            "empty grid: give --grid KEY=V1,V2 (or [sweep] grid) and/or --seeds",
        )
        keys = [k for k, _ in self.grid]
        for key, values in self.grid:
            check(bool(key), "sweep.grid", "a key is empty")
            check(key != "seed", "sweep.grid.seed", "use seeds (--seeds 0,1,2) for seeds")
            check(len(values) > 0, f"sweep.grid.{key}", "no values")
            check(keys.count(key) == 1, f"sweep.grid.{key}", "given twice")
            check(len(set(map(repr, values))) == len(values), f"sweep.grid.{key}", f"repeated values in {list(values)}")
        for seed in self.seeds:
            check(
                isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0,
                "sweep.seeds",
                f"expected whole numbers >= 0, got {seed!r}",
            )
        check(len(set(self.seeds)) == len(self.seeds), "sweep.seeds", f"repeated seeds in {list(self.seeds)}")
        check(
            isinstance(self.workers, int) and self.workers >= 1, "sweep.workers", f"must be >= 1, got {self.workers!r}"
        )

    @classmethod
    def from_toml(
        cls,
        path: str | Path,
        grid: Sequence[str] = (),
        seeds: Sequence[int] | None = None,
        workers: int | None = None,
        overrides: Sequence[str] = (),
    ) -> SweepSpec:
        """The ``[sweep]`` table of a TOML configuration (``grid`` = {key = [values]}, ``seeds``,
        ``workers``), the rest being the base; command-line ``grid`` entries (``key=v1,v2``) add to or
        replace the table's, ``seeds``/``workers`` replace its own."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        table = data.pop("sweep", {})
        check(isinstance(table, Mapping), "sweep", "expected a table")
        unknown = sorted(set(table) - {"grid", "seeds", "workers"})
        check(not unknown, f"sweep.{unknown[0] if unknown else ''}", "unknown key; valid keys are grid, seeds, workers")
        table_grid = table.get("grid", {})
        check(isinstance(table_grid, Mapping), "sweep.grid", "expected a table of key = [values]")
        merged: dict[str, tuple[Any, ...]] = {}
        for key, values in table_grid.items():
            check(isinstance(values, list), f"sweep.grid.{key}", f"expected a list of values, got {values!r}")
            merged[key] = tuple(values)
        merged.update(parse_grid(grid))
        table_seeds = table.get("seeds", [])
        check(isinstance(table_seeds, list), "sweep.seeds", f"expected a list, got {table_seeds!r}")
        return cls(
            apply_overrides(data, overrides),
            tuple(merged.items()),
            tuple(seeds if seeds is not None else table_seeds),
            workers or table.get("workers", 1),
        )

    def cells(self) -> list[Cell]:
        """Every combination, in grid order then seeds."""
        shorts = [k.rsplit(".", 1)[-1] for k, _ in self.grid]
        names = [s if shorts.count(s) == 1 else k for s, (k, _) in zip(shorts, self.grid)]
        axes = [[(name, key, v) for v in values] for name, (key, values) in zip(names, self.grid)]
        if self.seeds:
            axes.append([("seed", "seed", s) for s in self.seeds])
        return [
            Cell(
                "_".join(f"{name}-{_short(v)}" for name, _, v in combo),
                tuple(f"{key}={_literal(v)}" for _, key, v in combo),
            )
            for combo in itertools.product(*axes)
        ]

    def resolved(self) -> list[tuple[Cell, Any, str | None]]:
        """``(cell, resolved config, name of an earlier cell with the same effective settings or None)``
        for every cell; any invalid cell raises :class:`ConfigError` naming the cell and the key."""
        from protofl.api import fingerprint, resolve_config

        out: list[tuple[Cell, Any, str | None]] = []
        seen: dict[str, str] = {}
        for cell in self.cells():
            try:
                config = resolve_config(self.base, cell.overrides)
            except ConfigError as exc:
                raise ConfigError(f"sweep cell {cell.name}: {exc}") from None
            digest = fingerprint(config)
            out.append((cell, config, seen.get(digest)))
            seen.setdefault(digest, cell.name)
        return out


def parse_grid(entries: Sequence[str]) -> dict[str, tuple[Any, ...]]:
    """``["a.b=1,2", "c=x,y"]`` -> ``{"a.b": (1, 2), "c": ("x", "y")}`` (each value a TOML literal or
    a plain string)."""
    grid: dict[str, tuple[Any, ...]] = {}
    for entry in entries:
        key, sep, raw = entry.partition("=")
        key = key.strip()
        check(bool(sep) and bool(key), "--grid", f"{entry!r}: expected KEY=V1,V2,..., e.g. privacy.epsilon=1,4,8")
        parts = [p.strip() for p in raw.split(",") if p.strip()]
        check(bool(parts), f"sweep.grid.{key}", "no values")
        check(key not in grid, f"sweep.grid.{key}", "given twice")
        grid[key] = tuple(parse_override(f"v={p}")[1] for p in parts)
    return grid


def cell_state(run_dir: Path) -> str:
    """``done`` (a final summary), ``resume`` (a checkpoint, or an interrupted summary) or ``new``."""
    from protofl.engine.checkpoint import has_checkpoint

    summary = run_dir / "summary.json"
    if summary.exists() and json.loads(summary.read_text()).get("status", "completed") in FINAL_STATUSES:
        return "done"
    from protofl.rundir import is_run_folder

    # a folder with config.toml but no checkpoint yet (killed in its first round) resumes from round 1
    return "resume" if has_checkpoint(run_dir / "checkpoint") or is_run_folder(run_dir) else "new"


def run_cell(base: Mapping[str, Any], overrides: Sequence[str], run_dir: str, workers: int) -> tuple[str, str]:
    """Run (or resume, or skip) one cell; returns its final status and what was done (``ran``,
    ``resumed from round N``, ``already done``). Runs in a worker process too."""
    from protofl.api import run
    from protofl.privacy import BudgetExceededError
    from protofl.runtime import WORKERS_ENV

    os.environ[WORKERS_ENV] = str(workers)
    folder = Path(run_dir)
    state = cell_state(folder)
    if state == "done":
        return json.loads((folder / "summary.json").read_text()).get("status", "completed"), "already done"
    action = "ran"
    try:
        if state == "resume":
            from protofl.engine.checkpoint import load_checkpoint

            checkpoint = load_checkpoint(folder / "checkpoint")
            # a folder with config.toml but no checkpoint yet (killed in its first round) resumes from round 1
            action = "resumed from round 1" if checkpoint is None else f"resumed from round {checkpoint['round']}"
            run(None, out=folder, resume=True)  # type: ignore[arg-type]
        else:
            run(dict(base), out=folder, overrides=overrides)
    except BudgetExceededError:
        return "stopped: budget", action  # a designed outcome: its summary.json says so
    return "completed", action


def run_sweep(spec: SweepSpec, out: str | Path) -> dict[str, Any]:
    """Run every cell of ``spec`` under ``out`` (validated first); returns and writes ``sweep.json``
    (each cell's folder, overrides and outcome) and the comparison in ``out/report``. A cell that
    fails is recorded and the others go on; :class:`SweepFailed` is raised at the end if any failed."""
    from protofl.records import write_json

    out = Path(out)
    plan = spec.resolved()
    out.mkdir(parents=True, exist_ok=True)
    cells: dict[str, dict[str, Any]] = {
        cell.name: {"overrides": list(cell.overrides), "status": "pending" if dup is None else f"same as {dup}"}
        for cell, _, dup in plan
    }
    manifest = {
        "workers": spec.workers,
        "grid": {k: list(v) for k, v in spec.grid},
        "seeds": list(spec.seeds),
        "cells": cells,
    }
    write_json(out / "sweep.json", manifest)
    todo = [(cell, str(out / cell.name)) for cell, _, dup in plan if dup is None]
    log.info(
        "sweep: %d cells (%d with settings of an earlier cell), %d worker process(es)",
        len(plan),
        len(plan) - len(todo),
        spec.workers,
    )

    def record(cell: Cell, status: str, action: str = "") -> None:
        cells[cell.name]["status"] = status
        if action:
            cells[cell.name]["last_action"] = action
        write_json(out / "sweep.json", manifest)
        log.info("sweep cell %s: %s%s", cell.name, status, f" ({action})" if action else "")

    if spec.workers == 1:
        for cell, folder in todo:
            try:
                record(cell, *run_cell(spec.base, cell.overrides, folder, 1))
            except Exception as exc:  # noqa: BLE001 - recorded; the other cells go on
                record(cell, f"failed: {type(exc).__name__}: {exc}")
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(spec.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {
                pool.submit(run_cell, dict(spec.base), cell.overrides, folder, spec.workers): cell
                for cell, folder in todo
            }
            for future, cell in futures.items():
                try:
                    record(cell, *future.result())
                except Exception as exc:  # noqa: BLE001 - recorded; the other cells go on
                    record(cell, f"failed: {type(exc).__name__}: {exc}")
    from protofl.report import compare_runs

    if any(c["status"] in FINAL_STATUSES for c in cells.values()):
        compare_runs([out], out / "report")
    failed = [name for name, c in cells.items() if c["status"].startswith("failed")]
    if failed:
        raise SweepFailed(
            f"{len(failed)} of {len(cells)} sweep cells failed ({', '.join(failed)}); "
            f"see {out / 'sweep.json'}; run the sweep again to retry them"
        )
    return manifest


class SweepFailed(RuntimeError):
    """Some cells of a sweep failed (each one's reason is in sweep.json)."""
