"""Per-client records: one row per client per evaluated round, for every engine.

The round loop (:meth:`protofl.engine.rounds.RoundDriver.client_records`) builds a round's rows
(personal metrics, samples, classes, privacy spent, bytes on the wire, what happened to the client this
round) and hands them to the ``on_round`` hook under ``row["clients"]``; the run folder keeps them in ``clients.csv``
(:class:`ClientTable`), and summary.json's worst-client and percentile figures come from the last
evaluated round's rows (:func:`client_figures`).
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: What happened to a client in a round: trained and its reply was accepted (``ok``), was not sampled,
#: dropped out, sent a reply the server rejected, or was lost (a node that never answered).
CLIENT_STATUSES = ("ok", "not-sampled", "dropped", "rejected", "lost")
#: The leading columns of clients.csv; the personal metrics of the method follow.
LEADING_COLUMNS = ("round", "client", "status", "samples", "classes")
TRAILING_COLUMNS = ("epsilon", "bytes_up", "bytes_down")
#: How many of the worst clients summary.json and report.md name.
WORST_COUNT = 5


@dataclasses.dataclass(frozen=True)
class ClientTable:
    """``clients.csv`` of a run folder: appended every evaluated round, cut back on resume."""

    path: Path

    def append(self, round_index: int, records: Sequence[Mapping[str, Any]]) -> None:
        rows = [{"round": round_index, **r} for r in records]
        header = self._header()
        columns = _columns([*(header or ()), *(k for r in rows for k in r)])
        if header is not None and header != columns:  # a new metric appeared: rewrite with the wider header
            rows = self.read() + rows
            header = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w" if header is None else "a", newline="") as fh:
            writer = csv.DictWriter(fh, columns)
            if header is None:
                writer.writeheader()
            writer.writerows({k: _cell(r.get(k)) for k in columns} for r in rows)

    def keep_rounds_up_to(self, last_round: int) -> None:
        """Drop rows of rounds after ``last_round`` (written by a process killed before its checkpoint)."""
        if not self.path.exists():
            return
        rows = [r for r in self.read() if r["round"] <= last_round]
        self.path.unlink()
        if rows:
            by_round: dict[int, list[dict[str, Any]]] = {}
            for r in rows:
                by_round.setdefault(r.pop("round"), []).append(r)
            for round_index, records in by_round.items():
                self.append(round_index, records)

    def read(self) -> list[dict[str, Any]]:
        """The rows, numbers parsed (empty cells are None)."""
        if not self.path.exists():
            return []
        with open(self.path, newline="") as fh:
            return [{k: _parse(k, v) for k, v in row.items()} for row in csv.DictReader(fh)]

    def last_round(self) -> list[dict[str, Any]]:
        """The rows of the last round in the table."""
        rows = self.read()
        if not rows:
            return []
        last = rows[-1]["round"]
        return [r for r in rows if r["round"] == last]

    def _header(self) -> list[str] | None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return None
        with open(self.path, newline="") as fh:
            return next(csv.reader(fh))


def _columns(keys: Iterable[str]) -> list[str]:
    seen = list(dict.fromkeys(keys))
    middle = [k for k in seen if k not in LEADING_COLUMNS and k not in TRAILING_COLUMNS]
    return [*LEADING_COLUMNS, *sorted(middle), *TRAILING_COLUMNS]


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return value


def _parse(key: str, text: str) -> Any:
    if text == "":
        return None
    if key == "status":
        return text
    number = float(text)
    return int(number) if key in ("round", "client", "samples", "classes", "bytes_up", "bytes_down") else number


def client_figures(records: Sequence[Mapping[str, Any]], metric: str = "personal_acc") -> dict[str, Any]:
    """summary.json's per-client figures from one round's rows: worst-client and 10th-percentile
    ``metric`` over the evaluated clients, the worst clients' ids, and max/mean epsilon spent."""
    scored = sorted((r[metric], r["client"]) for r in records if r.get(metric) is not None)
    values = np.asarray([v for v, _ in scored], dtype=float)
    eps = [r["epsilon"] for r in records if r.get("epsilon") is not None]
    return {
        f"{metric}_worst": float(values.min()) if len(values) else None,
        f"{metric}_p10": float(np.percentile(values, 10)) if len(values) else None,
        "worst_clients": [int(k) for _, k in scored[:WORST_COUNT]],
        "epsilon_max": float(max(eps)) if eps else None,
        "epsilon_mean": float(np.mean(eps)) if eps else None,
    }
