"""What a run tells the world each round: one log line, TensorBoard scalars and histograms, and the
user's own ``on_round(row)`` callback (``protofl.run(..., on_round=f)``).

Every engine calls the same hook with each evaluated round's metrics row; the row carries the round's
per-client records under ``"clients"`` (see :mod:`protofl.client_records`).
"""

from __future__ import annotations

import math
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

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _open(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        return self._writer
