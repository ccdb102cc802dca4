"""Run folders: what a run leaves behind.

``config.toml`` (fully resolved), ``metrics.jsonl`` (one JSON object per evaluated round),
``summary.json``, ``checkpoint/``, ``partition.md`` and plots, ``report.md``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from protofl._io import atomic_write
from protofl.errors import ReportError

#: Metrics compared when picking the ``best`` round (higher is better).
SUMMARY_KEYS = ("global_acc", "personal_acc_mean", "personal_acc_std")
#: Keys that measure time and so differ between otherwise identical runs.
TIMING_KEYS = frozenset(
    {"round_seconds", "eval_seconds", "elapsed_seconds", "wall_seconds", "seconds_per_round", "peak_memory_mb"}
)


def write_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode()))


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(_clean(row)) + "\n" for row in history))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl; :class:`ReportError` names the file and line that cannot be read."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise ReportError(f"{path}: missing (not a complete protofl run folder)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: cannot read it ({exc})") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except (ValueError, RecursionError) as exc:
            raise ReportError(f"{path}: line {number} is not JSON ({exc})") from None
    return rows


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(_clean(data), indent=2) + "\n")


def read_summary(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        raise ReportError(f"{run_dir} is not a protofl run folder (no summary.json)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ReportError(f"{path}: cannot be read as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def accuracy_keys(row: dict[str, Any]) -> list[str]:
    """The headline metrics in a metrics row: every ``global_*`` metric and every personal ``*_mean``/``_std``."""
    return [
        k
        for k in row
        if k.startswith("global_") or (k.startswith("personal_") and (k.endswith("_mean") or k.endswith("_std")))
    ]


def summarize_history(history: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``final`` (last evaluated round) and ``best`` (the evaluated round with the highest headline
    accuracy: global_acc where the method has a global model, else personal_acc_mean)."""
    if not history:
        empty = {k: None for k in SUMMARY_KEYS}
        return empty, dict(empty, round=None)
    last = history[-1]
    keys = accuracy_keys(last)
    final = {k: last.get(k) for k in (*SUMMARY_KEYS, *keys)}
    final["round"] = last["round"]
    headline = "global_acc" if last.get("global_acc") is not None else "personal_acc_mean"
    best_row = max(history, key=lambda row: -1.0 if row.get(headline) is None else row[headline])
    best = {k: best_row.get(k) for k in (*SUMMARY_KEYS, *keys)}
    best["round"] = best_row["round"]
    best["selected_by"] = headline
    return final, best
