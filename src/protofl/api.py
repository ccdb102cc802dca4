"""``protofl.run(config) -> RunResult``: data, partition, algorithm, engine, records, in one call.

The work is the runner's (:mod:`protofl.runner`); this module keeps its public names."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from protofl.config import ConfigError, RunConfig
from protofl.runner import (
    PreparedData,
    check_dataset_name,
    fingerprint,
    prepare_data,
    resolve_config,
    run_rounds,
    run_summary,
    write_partition_records,
    write_run_records,
)

log = logging.getLogger("protofl")


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What a run produced: ``summary`` (as in summary.json), ``history`` (metrics per evaluated
    round), and the run folder (None when the run wrote nothing to disk)."""

    summary: dict[str, Any]
    history: list[dict[str, Any]]
    run_dir: Path | None
    config: RunConfig


def run(
    config: RunConfig | Mapping[str, Any] | str | Path,
    *,
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
    resume: bool = False,
    stop_after: int | None = None,
) -> RunResult:
    """Run one federated experiment in-process.

    ``config`` is a :class:`RunConfig`, a mapping in the TOML layout, or a TOML file. With ``out``
    the run folder receives config.toml, metrics.jsonl, summary.json, checkpoints, plots and
    report.md; ``resume=True`` continues from ``out``'s last checkpoint (the config there is used).
    """
    from protofl.rundir import RunFolder

    folder = RunFolder(out, resume=resume) if out is not None else None
    run_dir = folder.path if folder is not None else None
    if resume:
        if folder is None:
            raise ConfigError("cannot resume: name the run folder (out)")
        if overrides:
            raise ConfigError("cannot change the configuration of a run being resumed (no --set with --resume)")
    if folder is not None:
        folder.check()  # before anything is read or written
    if resume:
        config = RunConfig.from_toml(run_dir / "config.toml")
    config = resolve_config(config, overrides)
    with folder.lock() if folder is not None else contextlib.nullcontext():
        return _run_locked(config, run_dir, resume, stop_after)


def _run_locked(config: RunConfig, run_dir: Path | None, resume: bool, stop_after: int | None) -> RunResult:
    from protofl.engine import Simulation

    torch.manual_seed(config.seed)
    data = prepare_data(config)

    def simulation(algorithm, **kwargs) -> Simulation:
        return Simulation(algorithm, data.clients, data.test_x, data.test_y, config.federation, config.seed,
                          test_groups=data.test_groups, **kwargs)

    summary, history = run_rounds(config, data, simulation, run_dir, resume=resume, stop_after=stop_after)
    return RunResult(summary, history, run_dir, config)


__all__ = ["PreparedData", "RunResult", "check_dataset_name", "fingerprint", "prepare_data", "resolve_config", "run",
           "run_summary", "write_partition_records", "write_run_records"]
