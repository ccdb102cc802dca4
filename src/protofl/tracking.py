"""What a run tells the world each round: one log line, TensorBoard scalars and histograms, and the
user's own ``on_round(row)`` callback (``protofl.run(..., on_round=f)``).

Every engine calls the same hook with each evaluated round's metrics row; the row carries the round's
per-client records under ``"clients"`` (see :mod:`protofl.client_records`).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from protofl.config import ConfigError

#: The logger of the per-round lines (INFO; the command line shows it whatever the progress setting).
ROUND_LOGGER = "protofl.rounds"


def round_line(row: Mapping[str, Any], rounds: int) -> str:
    """``round 3/10: global acc 85.20%, personal acc 80.10%, eps 2.31, 0.512 MB up, 0.498 MB down, 2.3 s``."""
    parts = [f"round {row['round']}/{rounds}:"]
    if row.get("global_acc") is not None:
        parts.append(f"global acc {100 * row['global_acc']:.2f}%,")
    if row.get("personal_acc_mean") is not None:
        parts.append(f"personal acc {100 * row['personal_acc_mean']:.2f}%,")
    if row.get("privacy_epsilon_max") is not None:
        parts.append(f"eps {row['privacy_epsilon_max']:.3g},")
    seconds = (row.get("round_seconds") or 0.0) + (row.get("eval_seconds") or 0.0)
    parts.append(
        f"{row.get('bytes_up', 0) / 1e6:.3f} MB up, {row.get('bytes_down', 0) / 1e6:.3f} MB down, {seconds:.1f} s"
    )
    return " ".join(parts)


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class TensorBoardTracker:
    """TensorBoard event files in ``log_dir``: every numeric metric of every evaluated round as a scalar
    (tag = the metrics key, step = the round) and, per round, histograms of the clients' personal
    metrics, epsilon and bytes (tags ``clients/KEY``). Uses the ``tensorboard`` package's writer
    through ``torch.utils.tensorboard``."""

    #: Per-client columns drawn as histograms (besides every ``personal_*`` metric).
    CLIENT_HISTOGRAMS = ("epsilon", "bytes_up", "bytes_down", "samples")

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self._writer = None

    @staticmethod
    def check_available() -> None:
        """A clear error (before any work) when the ``tensorboard`` package is missing."""
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError(
                "logging.tensorboard: needs the tensorboard package: pip install 'protofl[tracking]'"
            ) from None

    def __call__(self, row: Mapping[str, Any]) -> None:
        import numpy as np

        writer = self._open()
        step = int(row["round"])
        for key, value in row.items():
            if key != "round" and _numeric(value):
                writer.add_scalar(key, value, step)
        clients = row.get("clients") or []
        keys = sorted({k for c in clients for k in c if k.startswith("personal_")}) + list(self.CLIENT_HISTOGRAMS)
        for key in keys:
            values = [c[key] for c in clients if _numeric(c.get(key))]
            if values:
                writer.add_histogram(f"clients/{key}", np.asarray(values, dtype=float), step)
        writer.flush()

    def close(self, error: BaseException | None = None) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _open(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        return self._writer


#: Characters MLflow accepts in a metric or parameter name; any other (e.g. the ``@`` of
#: ``global_acc@mnist``) is written as ``/`` (``global_acc/mnist``).
_MLFLOW_NAME = re.compile(r"[^/\w.\- :]")


def mlflow_name(key: str) -> str:
    """``key`` as an MLflow metric or parameter name."""
    return _MLFLOW_NAME.sub("/", key)


class MLflowTracker:
    """An MLflow run holding what TensorBoard gets as scalars: every numeric metric of every evaluated
    round (step = the round), plus the resolved configuration as parameters (flat ``section.key``). A run
    folder remembers its MLflow run (``mlflow_run.json``), so a resumed run goes on logging into it.

    ``uri`` empty: MLflow's own default; ``experiment`` is created when missing."""

    #: The run folder's record of its MLflow run.
    RECORD = "mlflow_run.json"

    def __init__(self, uri: str, experiment: str, run_name: str, params: Mapping[str, Any], run_dir: Path | None):
        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self.params = dict(params)
        self.run_dir = None if run_dir is None else Path(run_dir)
        self._client: Any = None
        self._run_id: str | None = None

    @staticmethod
    def check_available() -> None:
        """A clear error (before any work) when the ``mlflow`` package is missing."""
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise ConfigError("logging.mlflow: needs the mlflow package: pip install 'protofl[mlflow]'") from None

    @property
    def run_id(self) -> str | None:
        """The MLflow run's id (once :meth:`start` has run)."""
        return self._run_id

    def start(self) -> None:
        """Open the MLflow run (a resumed run's own) now, before any work: a tracking store that cannot
        be reached or written stops the run here, in one line naming the URI."""
        try:
            self._open()
        except Exception as exc:  # noqa: BLE001 - MLflow raises its own, SQLAlchemy's or requests' errors
            text = str(exc).strip()
            reason = text.splitlines()[0] if text else type(exc).__name__
            where = self.uri or "MLflow's default tracking URI"
            raise ConfigError(f"logging.mlflow_uri: cannot log to {where}: {reason}") from None

    def __call__(self, row: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        client, run_id = self._open()
        step = int(row["round"])
        now = int(time.time() * 1000)
        metrics = [
            Metric(mlflow_name(key), float(value), now, step)
            for key, value in row.items()
            if key != "round" and _numeric(value)
        ]
        for start in range(0, len(metrics), 1000):  # MLflow's limit per batch
            client.log_batch(run_id, metrics=metrics[start : start + 1000])

    def close(self, error: BaseException | None = None) -> None:
        """End the MLflow run: ``FINISHED`` (also when stopped by the privacy budget, a designed
        outcome), ``KILLED`` when interrupted, ``FAILED`` on an error."""
        if self._client is None:
            return
        from protofl.engine.rounds import RunInterrupted
        from protofl.privacy import BudgetExceededError

        if error is None or isinstance(error, BudgetExceededError):
            status = "FINISHED"
        elif isinstance(error, (KeyboardInterrupt, RunInterrupted, SystemExit)):
            status = "KILLED"
        else:
            status = "FAILED"
        self._client.set_terminated(self._run_id, status=status)
        self._client = None

    def _open(self) -> tuple[Any, str]:
        if self._client is not None:
            assert self._run_id is not None
            return self._client, self._run_id
        import json

        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        record = None if self.run_dir is None else self.run_dir / self.RECORD
        if record is not None and record.exists():  # a resumed run: the MLflow run it began (wherever it was)
            logged = json.loads(record.read_text())
            client = MlflowClient(tracking_uri=logged["tracking_uri"])
            self._run_id = logged["run_id"]
            client.update_run(self._run_id, status="RUNNING")
        else:
            client = MlflowClient(tracking_uri=self.uri or None)
            experiment = client.get_experiment_by_name(self.experiment)
            experiment_id = (
                experiment.experiment_id if experiment is not None else client.create_experiment(self.experiment)
            )
            self._run_id = client.create_run(experiment_id, run_name=self.run_name).info.run_id
            params = [Param(mlflow_name(k), str(v)) for k, v in self.params.items()]
            for start in range(0, len(params), 100):  # MLflow's limit per batch
                client.log_batch(self._run_id, params=params[start : start + 100])
            if record is not None:
                from protofl.records import write_json

                write_json(record, {"tracking_uri": client.tracking_uri, "run_id": self._run_id})
        self._client = client
        return client, self._run_id


class Trackers:
    """The trackers a run's configuration asks for (``[logging]``), called together with each evaluated
    round's row and closed together (``error``: what ended the run, if anything did)."""

    def __init__(self, trackers: list[Any]):
        self.trackers = trackers

    @classmethod
    def for_run(cls, config: Any, run_dir: Path | None) -> Trackers | None:
        """The trackers of ``config`` (a resolved :class:`~protofl.config.RunConfig`) for a run in
        ``run_dir``; ``None`` when it asks for none. A missing package is an error before any work."""
        from protofl.config import _flatten

        logging_config = config.logging
        trackers: list[Any] = []
        if logging_config.tensorboard:
            TensorBoardTracker.check_available()
            assert run_dir is not None  # protofl.run refuses tensorboard without a run folder
            trackers.append(TensorBoardTracker(run_dir / "tensorboard"))
        if logging_config.mlflow:
            MLflowTracker.check_available()
            trackers.append(
                MLflowTracker(
                    logging_config.mlflow_uri,
                    logging_config.mlflow_experiment,
                    run_dir.name if run_dir is not None else "protofl",
                    _flatten(config.to_dict()),
                    run_dir,
                )
            )
            trackers[-1].start()
        return cls(trackers) if trackers else None

    def __call__(self, row: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker(row)

    def close(self, error: BaseException | None = None) -> None:
        for tracker in self.trackers:
            tracker.close(error)
