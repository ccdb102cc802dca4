"""``protofl.run(config) -> RunResult``: data, partition, algorithm, engine, records, in one call.

The work is the runner's (:mod:`protofl.runner`); this module keeps its public names."""

from __future__ import annotations

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
    from protofl.engine import Simulation
    from protofl.engine.checkpoint import has_checkpoint

    run_dir = Path(out) if out is not None else None
    if resume:
        if run_dir is None or not (run_dir / "config.toml").exists():
            raise ConfigError(f"cannot resume: {run_dir} holds no config.toml of an earlier run")
        if overrides:
            raise ConfigError("cannot change the configuration of a run being resumed (no --set with --resume)")
        config = RunConfig.from_toml(run_dir / "config.toml")
    elif run_dir is not None and has_checkpoint(run_dir / "checkpoint"):
        raise ConfigError(f"{run_dir} already holds a run; resume it (--resume {run_dir}) or choose another --out")
    config = resolve_config(config, overrides)
    torch.manual_seed(config.seed)
    data = prepare_data(config)

    def simulation(algorithm, **kwargs) -> Simulation:
        return Simulation(algorithm, data.clients, data.test_x, data.test_y, config.federation, config.seed,
                          test_groups=data.test_groups, **kwargs)

    summary, history = run_rounds(config, data, simulation, run_dir, resume=resume, stop_after=stop_after)
    return RunResult(summary, history, run_dir, config)


__all__ = ["PreparedData", "RunResult", "check_dataset_name", "fingerprint", "prepare_data", "resolve_config", "run",
           "run_summary", "write_partition_records", "write_run_records"]
