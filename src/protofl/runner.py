"""What every engine needs around its round loop: the configuration resolved, the data prepared and
partitioned, a run's fingerprint, and its records (summary.json, metrics.jsonl, plots, report, the
partition's table). The in-process engine (:func:`protofl.api.run`) and the Flower server app are both
short calls into :func:`run_rounds`; a Flower node prepares its data with :func:`prepare_data`.
"""

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

from protofl.config import ConfigError, RunConfig, effective_settings, from_mapping, to_mapping
from protofl.errors import RunFailedError
from protofl.health import failure_fields, learning_failure

log = logging.getLogger("protofl")


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


def resolve_config(
    config: RunConfig | Mapping[str, Any] | str | Path,
    overrides: Sequence[str] = (),
    *,
    user_data: bool = False,
    user_model: bool = False,
) -> RunConfig:
    """A :class:`RunConfig` with the method's options validated and its defaults filled in (the
    dataset's presets first, :mod:`protofl.presets`); the device is checked to exist. ``user_data``:
    the data comes from ``protofl.run(dataset=...)``, not from ``data.dataset``; ``user_model``: the
    model from ``protofl.run(model=...)``."""
    from protofl.algorithms import get_algorithm
    from protofl.plugins import load_plugins
    from protofl.presets import preset_options
    from protofl.privacy import statement
    from protofl.runtime import resolve_device

    if not isinstance(config, (RunConfig, Mapping, str, Path)):
        raise ConfigError(
            f"config: expected a RunConfig, a mapping in the TOML layout or the path of a TOML file, "
            f"got {type(config).__name__}"
        )
    if isinstance(config, (str, Path)):
        config = RunConfig.from_toml(config, overrides)
    elif isinstance(config, Mapping):
        config = RunConfig.from_dict(config).replace(*overrides)
    elif overrides:
        config = config.replace(*overrides)
    load_plugins()
    algorithm_cls = get_algorithm(config.method_name)
    config = dataclasses.replace(config, privacy=config.privacy.resolved(config.federation.rounds))
    options = {
        **preset_options(config.data.dataset, config.method_name, algorithm_cls.Config, config.method_options),
        **config.method_options,
    }
    method_config = algorithm_cls.resolve_options(from_mapping(algorithm_cls.Config, options, "method."), config)
    algorithm_cls.validate_privacy(method_config, config.privacy)
    statement.check_sensitivity(config, user_model=user_model)
    check_accountant(config.privacy.accountant)
    resolve_device(config.federation.device)  # a CUDA device this machine lacks: refused before any work
    if not user_data:
        check_dataset_name(config.data.dataset)
    if config.data.features != "pixels":
        from protofl.data import ENCODERS

        if config.data.features not in ENCODERS:
            raise ConfigError(
                f"data.features: {config.data.features!r} is not one of pixels, {', '.join(sorted(ENCODERS))}"
            )
    return dataclasses.replace(config, method={"name": config.method_name, **to_mapping(method_config)})


def check_accountant(name: str) -> None:
    """``privacy.accountant`` names a registered accountant (:func:`protofl.privacy.register_accountant`)."""
    from protofl.privacy import ACCOUNTANTS

    if name not in ACCOUNTANTS:
        raise ConfigError(f"privacy.accountant: {name!r} is not one of {', '.join(sorted(ACCOUNTANTS))}")


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
        raise ConfigError(
            f"data.dataset: unknown dataset {name!r}; valid datasets are {', '.join(sorted(DATASETS))}, "
            "or idx:/folder, cifar:/folder for files you hold"
        )


def fingerprint(config: RunConfig) -> str:
    """A digest of everything that determines a run's results (:func:`protofl.config.effective_settings`:
    progress bars, the schedule of checkpoints, threads and device excluded)."""
    return hashlib.sha256(repr(sorted(effective_settings(config).items())).encode()).hexdigest()[:16]


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
    partition = make_partition(
        train.y, config.partition, seed=config.seed, domains=train.domain, num_classes=train.num_classes
    )
    x = torch.from_numpy(np.ascontiguousarray(train.x, dtype=np.float32)).to(device)
    y = torch.from_numpy(train.y.astype(np.int64)).to(device)
    rows = [
        (torch.tensor(tr, device="cpu"), torch.tensor(te, device="cpu"))
        for tr, te in zip(partition.train, partition.test)
    ]
    clients = [ClientData(k, x[tr], y[tr], x[te], y[te]) for k, (tr, te) in enumerate(rows)]
    test_groups = {}
    if splits.test.domain is not None:
        test_groups = {
            name: torch.from_numpy(np.flatnonzero(splits.test.domain == d)).to(device)
            for d, name in enumerate(splits.test.domain_names)
        }
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
    classes = len(np.unique(labels))
    if size < classes:
        raise ConfigError(
            f"data.max_train_samples: {size} is fewer than the {classes} classes of the training set; "
            f"keep at least one sample of each (>= {classes}), or 0 for all"
        )
    try:
        kept, _ = train_test_split(index, train_size=size, stratify=labels, random_state=seed)
    except ValueError as exc:
        raise ConfigError(f"data.max_train_samples: cannot draw {size} samples stratified by class ({exc})") from None
    return np.sort(kept)


def with_statement(report: dict[str, Any] | None, config: RunConfig, engine: str) -> dict[str, Any] | None:
    """A run's privacy report with what its ε means (:func:`protofl.privacy.statement.privacy_statement`)."""
    from protofl.privacy.statement import privacy_statement

    return None if report is None else {**report, **privacy_statement(config.privacy, engine)}


def run_summary(
    config: RunConfig,
    history: list[dict[str, Any]],
    *,
    privacy: dict[str, Any] | None,
    wall_seconds: float,
    seconds_per_round: float,
    bytes_up: int,
    bytes_down: int,
    status: str = "completed",
    rounds_done: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """summary.json of a run, whichever engine ran it (``extra``: engine-specific fields, e.g. the
    in-process ``execution``, ``threads`` and ``device`` or Flower's ``engine`` and ``incidents``).
    ``status``: ``completed``, ``stopped: budget``, ``stopped: too few replies``, ``interrupted`` or
    ``failed``; ``rounds_done``: rounds finished (default: the last evaluated one)."""
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


def write_partition_records(run_dir: Path, data: PreparedData) -> None:
    from protofl.data.partition_report import partition_table, plot_partition_heatmap
    from protofl.records import write_atomic

    names = data.class_names or None
    write_atomic(run_dir / "partition.md", partition_table(data.partition, data.pool_labels, class_names=names))
    # The heat map counts what the table counts: each client's training samples per class.
    plot_partition_heatmap(
        data.partition, data.pool_labels, run_dir / "partition_heatmap.png", class_names=names, split="train"
    )


def build_algorithm(config: RunConfig, data: PreparedData, model: Callable[..., Any] | None = None):
    """The configured method for ``data``'s input shape and classes (``model``: a factory of the user's,
    :mod:`protofl.custom`)."""
    from protofl.algorithms import Task, get_algorithm
    from protofl.runtime import resolve_device

    device = str(resolve_device(config.federation.device))
    compiled = config.federation.compile
    if model is not None:
        from protofl.custom import FactoryTask

        task: Task = FactoryTask(
            data.input_shape, data.num_classes, config.model, device=device, factory=model, compile=compiled
        )
    else:
        task = Task(data.input_shape, data.num_classes, config.model, device=device, compile=compiled)
    return get_algorithm(config.method_name).from_options(config.method_options, task, config.privacy)


def run_rounds(
    config: RunConfig,
    data: PreparedData,
    driver_for: Callable[..., Any],
    run_dir: Path | None,
    *,
    resume: bool,
    require_checkpoint: bool = False,
    stop_after: int | None = None,
    model: Callable[..., Any] | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    tracker: Any = None,
    extra: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run ``config``'s rounds with the driver ``driver_for(algorithm, checkpoint_dir=..., fingerprint=...,
    on_round=...)`` builds; with ``run_dir``, write the run folder as the rounds go (config.toml,
    metrics.jsonl, clients.csv, the partition's records, checkpoints) and at the end (summary.json, plots,
    report.md). Every evaluated row is logged on one line, handed to ``tracker`` and to ``on_round``.
    ``resume``: continue from ``run_dir``'s checkpoint; where there is none, start from round 1 or, with
    ``require_checkpoint``, refuse (a Flower run: starting over would repeat releases the nodes' ledgers
    already hold). A run stopped by its budget, too few replies or an interruption still writes its
    records (``status`` says why), then the stop is raised again. Returns the summary and the history."""
    from protofl.client_records import ClientTable, client_figures
    from protofl.records import write_atomic, write_metrics
    from protofl.tracking import ROUND_LOGGER, round_line

    algorithm = build_algorithm(config, data, model)
    table = None if run_dir is None else ClientTable(run_dir / "clients.csv")
    round_log = logging.getLogger(ROUND_LOGGER)
    last_clients: list[dict[str, Any]] = []  # the last evaluated round's per-client records

    def on_round_hook(row: dict[str, Any]) -> None:
        last_clients[:] = row.get("clients", [])
        if run_dir is not None:
            assert table is not None  # made whenever there is a run folder
            write_metrics(run_dir / "metrics.jsonl", driver.history)
            table.append(row["round"], row.get("clients", []))
        round_log.info(round_line(row, config.federation.rounds))
        if tracker is not None:
            tracker(row)
        if on_round is not None:
            on_round(row)

    driver = driver_for(
        algorithm,
        checkpoint_dir=None if run_dir is None else run_dir / "checkpoint",
        fingerprint=fingerprint(config),
        on_round=on_round_hook,
    )
    if resume and not driver.resume():
        if require_checkpoint:
            raise RuntimeError(
                f"cannot resume: {driver.checkpoint_dir} holds no checkpoint of this run; "
                "start a new run (without --resume) in another folder"
            )
        log.warning("no checkpoint in %s: starting from round 1", run_dir)
    if run_dir is not None:
        if not resume:
            write_atomic(run_dir / "config.toml", config.to_toml())
        write_metrics(run_dir / "metrics.jsonl", driver.history)
        assert table is not None  # made whenever there is a run folder
        table.keep_rounds_up_to(driver.round)
        write_partition_records(run_dir, data)

    def finish(status: str, **fields: Any) -> dict[str, Any]:
        summary = run_summary(
            config,
            driver.history,
            privacy=with_statement(driver.transport.privacy_report(), config, driver.transport.kind),
            wall_seconds=driver.wall_seconds,
            seconds_per_round=driver.elapsed / max(driver.round, 1),
            bytes_up=driver.bytes_up,
            bytes_down=driver.bytes_down,
            status=status,
            rounds_done=driver.round,
            **driver.transport.summary_fields(),
            **(extra or {}),
            **fields,
        )
        if not last_clients and table is not None:  # resumed after the last evaluated round
            last_clients[:] = table.last_round()
        if last_clients:
            summary["per_client"] = client_figures(last_clients)
        if run_dir is not None:
            write_run_records(run_dir, config, driver.history, summary)
        return summary

    try:
        driver.run(stop_after=stop_after)
    except BaseException as exc:
        status = stop_status(exc)
        if status is not None:
            try:
                finish(status)
                log.info("run %s after round %d: summary.json and report.md hold the rounds done", status, driver.round)
            except Exception:  # the records of a stop must not hide why it stopped
                log.exception("could not write the records of the stopped run")
        raise
    failure = learning_failure(driver.history, losses_kept=driver.transport.kept_on_nodes)
    fields = failure_fields(failure)
    summary = finish(fields.pop("status", "completed"), **fields)
    if failure is not None:
        where = f"; its records are in {run_dir}" if run_dir is not None else ""
        raise RunFailedError(f"the run could not learn: {failure}; no accuracy is reported{where}")
    return summary, driver.history


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
    transport = sys.modules.get("protofl.flower.transport")  # loaded only where Flower runs the rounds
    if transport is not None and isinstance(exc, transport.NotEnoughReplies):
        return "stopped: too few replies"
    return None
