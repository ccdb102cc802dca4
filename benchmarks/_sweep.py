"""Benchmark grids that are a plain product of configuration keys, run as a ``protofl sweep``.

The sweep runs the cells in worker processes with ``federation.threads`` torch threads each, skips
finished cells and resumes killed ones from their checkpoints, and writes ``sweep.json`` and the
grouped comparison (``report/``) next to the run folders; a script then builds its own tables from the
cells' summaries.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from protofl.sweep import SweepSpec, run_sweep


def sweep_grid(
    base: Mapping[str, Any],
    grid: Sequence[tuple[str, Sequence[Any]]],
    seeds: Sequence[int],
    workers: int,
    out: Path,
) -> list[tuple[dict[str, Any], dict[str, Any], Path]]:
    """Run ``base`` × ``grid`` × ``seeds`` as a sweep in ``out``; returns ``(settings, summary, folder)``
    per cell in grid order then seeds, ``settings`` holding each grid key's value and ``seed``. A cell
    whose effective settings repeat an earlier one's ran once: it gets that cell's summary and folder."""
    spec = SweepSpec(base, tuple((key, tuple(values)) for key, values in grid), tuple(seeds), workers)
    run_sweep(spec, out)
    cells = []
    for cell, config, same_as in spec.resolved():
        folder = out / (same_as or cell.name)
        settings = {key: _get(config, key) for key, _ in spec.grid}
        settings["seed"] = config.seed
        cells.append((settings, json.loads((folder / "summary.json").read_text()), folder))
    return cells


def _get(config: Any, key: str) -> Any:
    """The value of ``section.key`` in a resolved :class:`protofl.config.RunConfig`."""
    node: Any = config.to_dict()
    for part in key.split("."):
        node = node[part]
    return node
