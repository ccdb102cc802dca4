"""``protofl.run(config) -> RunResult``: data, partition, algorithm, engine, records, in one call.

The work is the runner's (:mod:`protofl.runner`); this module keeps its public names."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from protofl.config import ConfigError, RunConfig, effective_settings
from protofl.runner import (
    PreparedData,
    check_dataset_name,
    fingerprint,
    prepare_data,
    resolve_config,
    run_rounds,
    run_summary,
    stop_status,
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
    dataset: Any = None,
    model: Callable[..., Any] | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Run one federated experiment in-process.

    ``config`` is a :class:`RunConfig`, a mapping in the TOML layout, or a TOML file. With ``out``
    the run folder receives config.toml, metrics.jsonl, clients.csv, summary.json, checkpoints, plots
    and report.md; ``resume=True`` continues from ``out``'s last checkpoint (the config there is used).

    Bring your own: ``dataset`` is a :class:`protofl.UserData` (arrays or torch Datasets, optional
    domain ids); ``model`` a factory ``(input_shape, num_classes, model_config) -> nn.Module``
    following the feature-model protocol (:mod:`protofl.custom`); methods of your own are registered
    with ``protofl.register`` or an entry point (:mod:`protofl.plugins`). ``on_round(row)`` is called
    after every evaluated round with its metrics row and the per-client records in ``row["clients"]``.

    A run stopped by its privacy budget, by Ctrl-C or SIGTERM still writes summary.json (``status``
    says why it stopped), report.md and plots for the rounds done, then re-raises.
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
        assert run_dir is not None  # resuming needs a run folder (checked above)
        config = RunConfig.from_toml(run_dir / "config.toml")
    splits = None
    if dataset is not None:
        from protofl.custom import UserData

        if not isinstance(dataset, UserData):
            raise ConfigError(f"dataset: expected a protofl.UserData, got {type(dataset).__name__}")
        splits = dataset.splits()
        overrides = (*overrides, f'data.dataset="{splits.name}"')
        if resume:  # the dataset key of the resumed config already names the data
            overrides = ()
    config = resolve_config(config, overrides, user_data=dataset is not None, user_model=model is not None)
    if splits is not None and config.data.dataset != splits.name:
        raise ConfigError(f"data.dataset: the run in {run_dir} was on {config.data.dataset!r}, not {splits.name!r}")
    if config.data.features != "pixels" and splits is not None and splits.train.x.ndim != 4:
        raise ConfigError("data.features: an encoder needs images (N, C, H, W); use features = 'pixels' for vectors")
    if config.logging.tensorboard and run_dir is None:
        raise ConfigError("logging.tensorboard: needs a run folder (out=...)")
    with folder.lock() if folder is not None else contextlib.nullcontext():
        return _run_locked(config, run_dir, resume, stop_after, splits, model, on_round)


def _run_locked(
    config: RunConfig,
    run_dir: Path | None,
    resume: bool,
    stop_after: int | None,
    splits: Any,
    model: Callable[..., Any] | None,
    on_round: Callable[[dict[str, Any]], None] | None,
) -> RunResult:
    from protofl.engine import Simulation
    from protofl.runtime import apply_threads, resolve_device, resolve_threads
    from protofl.tracking import Trackers

    tracker = Trackers.for_run(config, run_dir)
    runtime: dict[str, Any] = {
        **apply_threads(resolve_threads(config.federation.threads)),
        "device": str(resolve_device(config.federation.device)),
    }
    torch.manual_seed(config.seed)
    data = prepare_data(config, splits, device=torch.device(runtime["device"]))

    def simulation(algorithm, **kwargs) -> Simulation:
        return Simulation(
            algorithm,
            data.clients,
            data.test_x,
            data.test_y,
            config.federation,
            config.seed,
            test_groups=data.test_groups,
            **kwargs,
        )

    try:
        summary, history = run_rounds(
            config,
            data,
            simulation,
            run_dir,
            resume=resume,
            stop_after=stop_after,
            model=model,
            on_round=on_round,
            tracker=tracker,
            extra=runtime,
        )
    finally:
        if tracker is not None:
            tracker.close(sys.exc_info()[1])  # what ended the run, if anything did
    return RunResult(summary, history, run_dir, config)


__all__ = [
    "PreparedData",
    "RunResult",
    "check_dataset_name",
    "effective_settings",
    "fingerprint",
    "prepare_data",
    "resolve_config",
    "run",
    "run_summary",
    "stop_status",
    "write_partition_records",
    "write_run_records",
]
