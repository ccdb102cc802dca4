"""``protofl.run(config) -> RunResult``: data, partition, algorithm, engine, records, in one call."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import resource
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protofl.config import ConfigError, RunConfig, from_mapping, to_mapping

log = logging.getLogger("protofl")


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What a run produced: ``summary`` (as in summary.json), ``history`` (metrics per evaluated
    round), and the run folder (None when the run wrote nothing to disk)."""

    summary: dict[str, Any]
    history: list[dict[str, Any]]
    run_dir: Path | None
    config: RunConfig


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedData:
    """A dataset split among clients, as tensors, with what the algorithm needs to know."""

    clients: list
    test_x: torch.Tensor
    test_y: torch.Tensor
    input_shape: tuple[int, ...]
    num_classes: int
    partition: Any
    pool_labels: np.ndarray
    class_names: tuple[str, ...]
    #: Test-set indices of each domain (empty for single-domain data): global accuracy is also reported per domain.
    test_groups: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


def resolve_config(config: RunConfig | Mapping[str, Any] | str | Path, overrides: Sequence[str] = (), *,
                   user_data: bool = False) -> RunConfig:
    """A :class:`RunConfig` with the method's options validated and its defaults filled in (the
    dataset's presets first, :mod:`protofl.presets`); the device is checked to exist. ``user_data``:
    the data comes from ``protofl.run(dataset=...)``, not from ``data.dataset``."""
    from protofl.algorithms import get_algorithm
    from protofl.plugins import load_plugins
    from protofl.presets import preset_options
    from protofl.runtime import check_supported, resolve_device

    if isinstance(config, (str, Path)):
        config = RunConfig.from_toml(config, overrides)
    elif isinstance(config, Mapping):
        config = RunConfig.from_dict(config).replace(*overrides)
    elif overrides:
        config = config.replace(*overrides)
    load_plugins()
    algorithm_cls = get_algorithm(config.method_name)
    options = {**preset_options(config.data.dataset, config.method_name, algorithm_cls.Config,
                                 config.method_options), **config.method_options}
    method_config = algorithm_cls.resolve_options(from_mapping(algorithm_cls.Config, options, "method."), config)
    algorithm_cls.validate_privacy(method_config, config.privacy)
    if config.privacy.mechanism != "none" and not config.privacy.planned_releases:
        config = config.replace(f"privacy.planned_releases={config.federation.rounds}")
    check_supported(resolve_device(config.federation.device))
    if not user_data:
        check_dataset_name(config.data.dataset)
    if config.data.features != "pixels":
        from protofl.data import ENCODERS

        if config.data.features not in ENCODERS:
            raise ConfigError(f"data.features: {config.data.features!r} is not one of pixels, {', '.join(sorted(ENCODERS))}")
    return dataclasses.replace(config, method={"name": config.method_name, **to_mapping(method_config)})


def check_dataset_name(name: str) -> None:
    from protofl.data import DATASETS
    from protofl.data.datasets import SYNTHETIC_GAUSSIAN, parse_synthetic_options

    if name.partition(":")[0] == SYNTHETIC_GAUSSIAN:  # a generated benchmark workload, options in the name
        try:
            parse_synthetic_options(name.partition(":")[2])
        except ValueError as exc:
            raise ConfigError(f"data.dataset: {exc}") from None
        return
    if ":" in name:
        from protofl.custom import USER_PREFIX, user_dataset_error

        kind = name.split(":", 1)[0]
        if name.startswith(USER_PREFIX):
            raise user_dataset_error(name)
        if kind not in ("idx", "cifar"):
            raise ConfigError(f"data.dataset: unknown folder kind {kind!r}; use idx:/path or cifar:/path")
        return
    if name not in DATASETS:
        raise ConfigError(f"data.dataset: unknown dataset {name!r}; valid datasets are {', '.join(sorted(DATASETS))}, "
                          "or idx:/folder, cifar:/folder for files you hold")


def fingerprint(config: RunConfig) -> str:
    """A digest of everything that determines a run's results (progress bars and schedule of
    checkpoints excluded)."""
    return hashlib.sha256(repr(sorted(effective_settings(config).items())).encode()).hexdigest()[:16]


def effective_settings(config: RunConfig) -> dict[str, Any]:
    """The settings that determine a run's results, as flat ``section.key`` -> value (what
    :func:`fingerprint` digests; ``protofl report`` groups runs by the keys in which these differ)."""
    data = config.to_dict()
    data["federation"].pop("progress", None)
    data["federation"].pop("checkpoint_every", None)
    data["federation"].pop("batch_clients", None)  # how many clients share one batched program
    data["federation"].pop("threads", None)  # where and how fast, not what: a checkpoint resumes anywhere
    data["federation"].pop("device", None)
    data.pop("logging", None)
    if data["federation"].get("execution") == "per-client":
        data["federation"].pop("execution")  # the reference path: fingerprints of earlier runs stay valid
    if not config.privacy.enabled:
        data.pop("privacy", None)  # privacy settings change nothing while privacy is off
    return _flatten(data)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def prepare_data(config: RunConfig, splits: Any = None, device: Any = None) -> PreparedData:
    """Load (and embed) the dataset (or use ``splits``, a :class:`~protofl.data.DatasetSplits` of the
    user's), partition its training pool, build per-client tensors (moved once onto ``device``)."""
    from protofl.algorithms import ClientData
    from protofl.data import embed, load_dataset, make_partition

    progress = config.federation.progress
    if splits is None:
        splits = load_dataset(config.data.dataset, progress=progress)
    if config.data.features != "pixels":
        splits = embed(splits, encoder=config.data.features, image_size=config.data.image_size, progress=progress)
    train = splits.train
    if config.data.max_train_samples and config.data.max_train_samples < len(train):
        train = train.subset(_stratified_subset(train.y, config.data.max_train_samples, config.seed))
    partition = make_partition(train.y, config.partition, seed=config.seed, domains=train.domain,
                               num_classes=train.num_classes)
    x = torch.from_numpy(np.ascontiguousarray(train.x, dtype=np.float32)).to(device)
    y = torch.from_numpy(train.y.astype(np.int64)).to(device)
    clients = [
        ClientData(k, x[torch.tensor(tr)], y[torch.tensor(tr)], x[torch.tensor(te)], y[torch.tensor(te)])
        for k, (tr, te) in enumerate(zip(partition.train, partition.test))
    ]
    test_groups = {}
    if splits.test.domain is not None:
        test_groups = {name: torch.from_numpy(np.flatnonzero(splits.test.domain == d)).to(device)
                       for d, name in enumerate(splits.test.domain_names)}
    return PreparedData(
        clients=clients,
        test_x=torch.from_numpy(np.ascontiguousarray(splits.test.x, dtype=np.float32)).to(device),
        test_y=torch.from_numpy(splits.test.y.astype(np.int64)).to(device),
        input_shape=tuple(train.x.shape[1:]),
        num_classes=train.num_classes,
        partition=partition,
        pool_labels=train.y,
        class_names=splits.class_names,
        test_groups=test_groups,
    )


def _stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    kept, _ = train_test_split(index, train_size=size, stratify=labels, random_state=seed)
    return np.sort(kept)


def run(
    config: RunConfig | Mapping[str, Any] | str | Path,
    *,
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
    resume: bool = False,
    stop_after: int | None = None,
    dataset: Any = None,
    model: Any = None,
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

    A run stopped by its privacy budget, by Ctrl-C (or any other stop the engine raises) still writes
    summary.json (``status`` says why it stopped), report.md and plots for the rounds done, then
    re-raises.
    """
    from protofl.algorithms import Task, get_algorithm
    from protofl.client_records import ClientTable, client_figures
    from protofl.engine import Simulation
    from protofl.engine.checkpoint import has_checkpoint
    from protofl.records import write_atomic, write_metrics
    from protofl.runtime import apply_threads, resolve_device, resolve_threads
    from protofl.tracking import ROUND_LOGGER, TensorBoardTracker, round_line

    run_dir = Path(out) if out is not None else None
    if resume:
        if run_dir is None or not (run_dir / "config.toml").exists():
            raise ConfigError(f"cannot resume: {run_dir} holds no config.toml of an earlier run")
        if overrides:
            raise ConfigError("cannot change the configuration of a run being resumed (no --set with --resume)")
        config = RunConfig.from_toml(run_dir / "config.toml")
    elif run_dir is not None and has_checkpoint(run_dir / "checkpoint"):
        raise ConfigError(f"{run_dir} already holds a run; resume it (--resume {run_dir}) or choose another --out")
    splits = None
    if dataset is not None:
        from protofl.custom import UserData

        if not isinstance(dataset, UserData):
            raise TypeError(f"dataset: expected a protofl.UserData, got {type(dataset).__name__}")
        splits = dataset.splits()
        overrides = (*overrides, f'data.dataset="{splits.name}"')
        if resume:  # the dataset key of the resumed config already names the data
            overrides = ()
    config = resolve_config(config, overrides, user_data=dataset is not None)
    if dataset is not None and config.data.dataset != splits.name:
        raise ConfigError(f"data.dataset: the run in {run_dir} was on {config.data.dataset!r}, not {splits.name!r}")
    if config.data.features != "pixels" and dataset is not None and splits.train.x.ndim != 4:
        raise ConfigError("data.features: an encoder needs images (N, C, H, W); use features = 'pixels' for vectors")
    tracker = None
    if config.logging.tensorboard:
        if run_dir is None:
            raise ConfigError("logging.tensorboard: needs a run folder (out=...)")
        TensorBoardTracker.check_available()
        tracker = TensorBoardTracker(run_dir / "tensorboard")
    runtime = {**apply_threads(resolve_threads(config.federation.threads)),
               "device": str(resolve_device(config.federation.device))}
    torch.manual_seed(config.seed)

    data = prepare_data(config, splits, device=torch.device(runtime["device"]))
    algorithm_cls = get_algorithm(config.method_name)
    if model is not None:
        from protofl.custom import FactoryTask

        task: Task = FactoryTask(data.input_shape, data.num_classes, config.model, factory=model)
    else:
        task = Task(data.input_shape, data.num_classes, config.model)
    algorithm = algorithm_cls.from_options(config.method_options, task, config.privacy)
    table = None if run_dir is None else ClientTable(run_dir / "clients.csv")
    round_log = logging.getLogger(ROUND_LOGGER)
    last_clients: list[dict[str, Any]] = []  # the last evaluated round's per-client records

    def on_round_hook(row: dict[str, Any]) -> None:
        last_clients[:] = row.get("clients", [])
        if run_dir is not None:
            write_metrics(run_dir / "metrics.jsonl", simulation.history)
            table.append(row["round"], row.get("clients", []))
        round_log.info(round_line(row, config.federation.rounds))
        if tracker is not None:
            tracker(row)
        if on_round is not None:
            on_round(row)

    simulation = Simulation(
        algorithm, data.clients, data.test_x, data.test_y, config.federation, config.seed,
        checkpoint_dir=None if run_dir is None else run_dir / "checkpoint",
        fingerprint=fingerprint(config), on_round=on_round_hook, test_groups=data.test_groups,
    )
    if resume and not simulation.resume():
        log.warning("no checkpoint in %s: starting from round 1", run_dir)
    if run_dir is not None:
        if not resume:
            write_atomic(run_dir / "config.toml", config.to_toml())
        write_metrics(run_dir / "metrics.jsonl", simulation.history)
        table.keep_rounds_up_to(simulation.round)
        _write_partition_records(run_dir, data)

    def finish(status: str) -> RunResult:
        summary = run_summary(config, simulation.history, privacy=algorithm.privacy_report(simulation.client_states),
                              wall_seconds=simulation.wall_seconds,
                              seconds_per_round=simulation.elapsed / max(simulation.round, 1),
                              bytes_up=simulation.bytes_up, bytes_down=simulation.bytes_down,
                              execution=simulation.execution, status=status, rounds_done=simulation.round,
                              **runtime)
        if not last_clients and table is not None:  # resumed after the last evaluated round
            last_clients[:] = table.last_round()
        if last_clients:
            summary["per_client"] = client_figures(last_clients)
        if run_dir is not None:
            write_run_records(run_dir, config, simulation.history, summary)
        return RunResult(summary, simulation.history, run_dir, config)

    try:
        simulation.run(stop_after=stop_after)
    except BaseException as exc:
        status = stop_status(exc)
        if status is not None:
            try:
                finish(status)
                log.warning("run %s after round %d: summary.json and report.md hold the rounds done",
                            status, simulation.round)
            except Exception:  # the records of a stop must not hide why it stopped
                log.exception("could not write the records of the stopped run")
        raise
    finally:
        if tracker is not None:
            tracker.close()
    return finish("completed")


def stop_status(exc: BaseException) -> str | None:
    """summary.json's ``status`` of a run that ``exc`` stopped, or None for a failure (a bug, bad
    data) whose records are not worth writing."""
    import sys

    from protofl.engine import RunInterrupted
    from protofl.privacy import BudgetExceededError

    if isinstance(exc, BudgetExceededError):
        return "stopped: budget"
    if isinstance(exc, (KeyboardInterrupt, RunInterrupted)):
        return "interrupted"
    server = sys.modules.get("protofl.flower.server")  # loaded only where Flower runs the rounds
    if server is not None and isinstance(exc, server.NotEnoughReplies):
        return "stopped: too few replies"
    return None


def run_summary(config: RunConfig, history: list[dict[str, Any]], *, privacy: dict[str, Any] | None,
                wall_seconds: float, seconds_per_round: float, bytes_up: int, bytes_down: int,
                status: str = "completed", rounds_done: int | None = None, **extra: Any) -> dict[str, Any]:
    """summary.json of a run, whichever engine ran it (``extra``: engine-specific fields, e.g. the
    in-process ``execution``, ``threads`` and ``device`` or Flower's ``engine`` and ``incidents``).
    ``status``: ``completed``, ``stopped: budget``, ``stopped: too few replies`` or ``interrupted``;
    ``rounds_done``: rounds finished (default: the last evaluated one)."""
    from protofl.records import summarize_history
    from protofl.runtime import git_commit, versions

    final, best = summarize_history(history)
    if rounds_done is None:
        rounds_done = history[-1]["round"] if history else 0
    return {
        "method": config.method_name,
        "dataset": config.data.dataset,
        "features": config.data.features,
        "partition": to_mapping(config.partition),
        "clients": config.partition.num_clients,
        "rounds": config.federation.rounds,
        "seed": config.seed,
        "status": status,
        "rounds_done": rounds_done,
        "final": final,
        "best": best,
        "epsilon": privacy["epsilon"] if privacy else None,
        "delta": privacy["delta"] if privacy else None,
        "privacy": privacy,
        "wall_seconds": wall_seconds,
        "seconds_per_round": seconds_per_round,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "versions": versions(),
        "commit": git_commit(),
        **extra,
    }


def write_run_records(run_dir: Path, config: RunConfig, history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """metrics.jsonl, summary.json, learning_curves.png and report.md of a finished run."""
    from protofl.records import write_atomic, write_json, write_metrics
    from protofl.report import plot_learning_curves, run_report

    write_metrics(run_dir / "metrics.jsonl", history)
    write_json(run_dir / "summary.json", summary)
    plot_learning_curves([(config.method_name, history)], run_dir / "learning_curves.png")
    write_atomic(run_dir / "report.md", run_report(run_dir))


def _write_partition_records(run_dir: Path, data: PreparedData) -> None:
    from protofl.data.partition_report import partition_table, plot_partition_heatmap
    from protofl.records import write_atomic

    names = data.class_names or None
    write_atomic(run_dir / "partition.md", partition_table(data.partition, data.pool_labels, class_names=names))
    # The heat map counts what the table counts: each client's training samples per class.
    plot_partition_heatmap(data.partition, data.pool_labels, run_dir / "partition_heatmap.png", class_names=names,
                           split="train")
