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

from protofl.config import ConfigError, RunConfig, from_mapping, to_mapping
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


def resolve_config(config: RunConfig | Mapping[str, Any] | str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """A :class:`RunConfig` with the method's options validated and its defaults filled in."""
    from protofl.algorithms import get_algorithm

    if not isinstance(config, (RunConfig, Mapping, str, Path)):
        raise ConfigError(f"config: expected a RunConfig, a mapping in the TOML layout or the path of a TOML file, "
                          f"got {type(config).__name__}")
    if isinstance(config, (str, Path)):
        config = RunConfig.from_toml(config, overrides)
    elif isinstance(config, Mapping):
        config = RunConfig.from_dict(config).replace(*overrides)
    elif overrides:
        config = config.replace(*overrides)
    algorithm_cls = get_algorithm(config.method_name)
    config = dataclasses.replace(config, privacy=config.privacy.resolved(config.federation.rounds))
    method_config = algorithm_cls.resolve_options(from_mapping(algorithm_cls.Config, config.method_options, "method."), config)
    algorithm_cls.validate_privacy(method_config, config.privacy)
    check_accountant(config.privacy.accountant)
    check_dataset_name(config.data.dataset)
    if config.data.features != "pixels":
        from protofl.data import ENCODERS

        if config.data.features not in ENCODERS:
            raise ConfigError(f"data.features: {config.data.features!r} is not one of pixels, {', '.join(sorted(ENCODERS))}")
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
        kind = name.split(":", 1)[0]
        if kind not in ("idx", "cifar"):
            raise ConfigError(f"data.dataset: unknown folder kind {kind!r}; use idx:/path or cifar:/path")
        return
    if name not in DATASETS:
        raise ConfigError(f"data.dataset: unknown dataset {name!r}; valid datasets are {', '.join(sorted(DATASETS))}, "
                          "or idx:/folder, cifar:/folder for files you hold")


def fingerprint(config: RunConfig) -> str:
    """A digest of everything that determines a run's results (progress bars and schedule of
    checkpoints excluded)."""
    data = config.to_dict()
    data["federation"].pop("progress", None)
    data["federation"].pop("checkpoint_every", None)
    data["federation"].pop("batch_clients", None)  # how many clients share one batched program
    if data["federation"].get("execution") == "per-client":
        data["federation"].pop("execution")  # the reference path: fingerprints of earlier runs stay valid
    if not config.privacy.enabled:
        data.pop("privacy", None)  # privacy settings change nothing while privacy is off
    return hashlib.sha256(repr(sorted(_flatten(data).items())).encode()).hexdigest()[:16]


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def prepare_data(config: RunConfig) -> PreparedData:
    """Load (and embed) the dataset, partition its training pool, build per-client tensors."""
    from protofl.algorithms import ClientData
    from protofl.data import embed, load_dataset, make_partition

    progress = config.federation.progress
    splits = load_dataset(config.data.dataset, progress=progress)
    if config.data.features != "pixels":
        splits = embed(splits, encoder=config.data.features, image_size=config.data.image_size, progress=progress)
    train = splits.train
    if config.data.max_train_samples and config.data.max_train_samples < len(train):
        train = train.subset(_stratified_subset(train.y, config.data.max_train_samples, config.seed))
    partition = make_partition(train.y, config.partition, seed=config.seed, domains=train.domain,
                               num_classes=train.num_classes)
    x = torch.from_numpy(np.ascontiguousarray(train.x, dtype=np.float32))
    y = torch.from_numpy(train.y.astype(np.int64))
    clients = [
        ClientData(k, x[torch.tensor(tr)], y[torch.tensor(tr)], x[torch.tensor(te)], y[torch.tensor(te)])
        for k, (tr, te) in enumerate(zip(partition.train, partition.test))
    ]
    test_groups = {}
    if splits.test.domain is not None:
        test_groups = {name: torch.from_numpy(np.flatnonzero(splits.test.domain == d))
                       for d, name in enumerate(splits.test.domain_names)}
    return PreparedData(
        clients=clients,
        test_x=torch.from_numpy(np.ascontiguousarray(splits.test.x, dtype=np.float32)),
        test_y=torch.from_numpy(splits.test.y.astype(np.int64)),
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
        raise ConfigError(f"data.max_train_samples: {size} is fewer than the {classes} classes of the training set; "
                          f"keep at least one sample of each (>= {classes}), or 0 for all")
    try:
        kept, _ = train_test_split(index, train_size=size, stratify=labels, random_state=seed)
    except ValueError as exc:
        raise ConfigError(f"data.max_train_samples: cannot draw {size} samples stratified by class ({exc})") from None
    return np.sort(kept)


def run_summary(config: RunConfig, history: list[dict[str, Any]], *, privacy: dict[str, Any] | None,
                wall_seconds: float, seconds_per_round: float, bytes_up: int, bytes_down: int,
                **extra: Any) -> dict[str, Any]:
    """summary.json of a run, whichever engine ran it (``extra``: engine-specific fields, e.g. the
    in-process ``execution`` or Flower's ``engine`` and ``incidents``)."""
    from protofl.records import summarize_history

    final, best = summarize_history(history)
    return {
        "method": config.method_name,
        "dataset": config.data.dataset,
        "features": config.data.features,
        "partition": to_mapping(config.partition),
        "clients": config.partition.num_clients,
        "rounds": config.federation.rounds,
        "seed": config.seed,
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
    plot_partition_heatmap(data.partition, data.pool_labels, run_dir / "partition_heatmap.png", class_names=names)


def build_algorithm(config: RunConfig, data: PreparedData):
    """The configured method for ``data``'s input shape and classes."""
    from protofl.algorithms import Task, get_algorithm

    task = Task(data.input_shape, data.num_classes, config.model)
    return get_algorithm(config.method_name).from_options(config.method_options, task, config.privacy)


def run_rounds(config: RunConfig, data: PreparedData, driver_for: Callable[..., Any], run_dir: Path | None, *,
               resume: bool, require_checkpoint: bool = False,
               stop_after: int | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run ``config``'s rounds with the driver ``driver_for(algorithm, checkpoint_dir=..., fingerprint=...,
    on_round=...)`` builds; with ``run_dir``, write the run folder as the rounds go (config.toml,
    metrics.jsonl, the partition's records, checkpoints) and at the end (summary.json, plots, report.md).
    ``resume``: continue from ``run_dir``'s checkpoint; where there is none, start from round 1 or, with
    ``require_checkpoint``, refuse (a Flower run: starting over would repeat releases the nodes' ledgers
    already hold). Returns the summary and the history."""
    from protofl.records import write_atomic, write_metrics

    algorithm = build_algorithm(config, data)

    def on_round(row: dict[str, Any]) -> None:
        if run_dir is not None:
            write_metrics(run_dir / "metrics.jsonl", driver.history)

    driver = driver_for(algorithm, checkpoint_dir=None if run_dir is None else run_dir / "checkpoint",
                        fingerprint=fingerprint(config), on_round=on_round)
    if resume and not driver.resume():
        if require_checkpoint:
            raise RuntimeError(f"cannot resume: {driver.checkpoint_dir} holds no checkpoint of this run; "
                               "start a new run (without --resume) in another folder")
        log.warning("no checkpoint in %s: starting from round 1", run_dir)
    if run_dir is not None:
        if not resume:
            write_atomic(run_dir / "config.toml", config.to_toml())
        write_metrics(run_dir / "metrics.jsonl", driver.history)
        write_partition_records(run_dir, data)
    history = driver.run(stop_after=stop_after)
    failure = learning_failure(history)
    summary = run_summary(config, history, privacy=driver.transport.privacy_report(),
                          wall_seconds=driver.wall_seconds, seconds_per_round=driver.elapsed / max(driver.round, 1),
                          bytes_up=driver.bytes_up, bytes_down=driver.bytes_down,
                          **driver.transport.summary_fields(), **failure_fields(failure))
    if run_dir is not None:
        write_run_records(run_dir, config, history, summary)
    if failure is not None:
        where = f"; its records are in {run_dir}" if run_dir is not None else ""
        raise RunFailedError(f"the run could not learn: {failure}; no accuracy is reported{where}")
    return summary, history
