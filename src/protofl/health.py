"""Whether a finished run learned anything, judged from its metrics rows.

A run cannot learn when a round's replies were all rejected (the server had nothing to aggregate: a
client producing non-finite updates, e.g. with an infinite weight decay, is rejected every round) or
when no round produced a finite training loss. Such a run ends with :class:`~protofl.errors.RunFailedError`
and ``status = "failed"`` in summary.json rather than a printed accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["failure_fields", "learning_failure"]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def learning_failure(history: Sequence[dict[str, Any]], losses_kept: bool = False) -> str | None:
    """Why the run of ``history`` (metrics rows) could not learn, or None if nothing says so
    (``losses_kept``: the clients kept their training losses, as a private Flower run's nodes do, so the
    rows carry none to judge by)."""
    for row in history:
        answered = row.get("clients_sampled", 0) - row.get("clients_dropped", 0)
        if answered > 0 and row.get("clients_rejected", 0) >= answered:
            return (
                f"round {row['round']}: all {answered} replies were rejected (see the log for why), so the "
                "server had nothing to aggregate"
            )
    if history and not losses_kept and not any(_finite(row.get("train_loss")) for row in history):
        return "no round produced a finite training loss"
    return None


def failure_fields(failure: str | None) -> dict[str, Any]:
    """The summary.json fields of a run that could not learn (none for one that could)."""
    return {} if failure is None else {"status": "failed", "failure": failure}
