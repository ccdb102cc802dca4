"""What a report reads from a run folder, checked before it is used.

summary.json and metrics.jsonl are written by protofl, but a report reads whatever is in the folders it
is given: a file edited by hand, truncated, or from another program. Every field a report uses is
checked for its type here, so a bad file ends in one :class:`~protofl.errors.ReportError` naming the
file and the field, never in a traceback halfway through writing the report.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from protofl.errors import ReportError
from protofl.records import read_metrics, read_summary

__all__ = ["load_history", "load_summary"]

NUMBER = (int, float)
NONE = type(None)

#: summary.json: the fields a report uses and their JSON types (bool is never a number).
SUMMARY_FIELDS: dict[str, tuple[type, ...]] = {
    "method": (str,),
    "dataset": (str,),
    "features": (str,),
    "partition": (dict,),
    "clients": (int,),
    "rounds": (int,),
    "seed": (int,),
    "final": (dict,),
    "best": (dict,),
    "epsilon": (*NUMBER, NONE),
    "delta": (*NUMBER, NONE),
    "privacy": (dict, NONE),
    "wall_seconds": NUMBER,
    "seconds_per_round": NUMBER,
    "bytes_up": NUMBER,
    "bytes_down": NUMBER,
}
OPTIONAL_SUMMARY_FIELDS: dict[str, tuple[type, ...]] = {"peak_memory_mb": NUMBER}
#: ``final`` and ``best``: one evaluated round's headline metrics.
ROUND_FIELDS: dict[str, tuple[type, ...]] = {
    "global_acc": (*NUMBER, NONE),
    "personal_acc_mean": (*NUMBER, NONE),
    "personal_acc_std": (*NUMBER, NONE),
}
OPTIONAL_ROUND_FIELDS: dict[str, tuple[type, ...]] = {"round": (int, NONE)}
PARTITION_FIELDS: dict[str, tuple[type, ...]] = {"scheme": (str,)}
OPTIONAL_PARTITION_FIELDS: dict[str, tuple[type, ...]] = {
    "alpha": NUMBER,
    "classes_per_client": (int,),
    "imbalance_factor": NUMBER,
}
#: ``privacy`` (where a mechanism ran): what the run's report says of it.
PRIVACY_FIELDS: dict[str, tuple[type, ...]] = {
    "mechanism": (str,),
    "noise_multiplier": NUMBER,
    "epsilon_budget": NUMBER,
    "accountant": (str,),
    "epsilon_pld_max": (*NUMBER, NONE),
    "epsilon_rdp_max": (*NUMBER, NONE),
    "max_releases_by_a_client": (int,),
}
OPTIONAL_PRIVACY_FIELDS: dict[str, tuple[type, ...]] = {
    "selection_epsilon_per_release": (*NUMBER, NONE),
    "sensitivity": (str, NONE),
}
#: metrics.jsonl: one row per evaluated round.
ROW_FIELDS: dict[str, tuple[type, ...]] = {"round": (int,)}
OPTIONAL_ROW_FIELDS: dict[str, tuple[type, ...]] = {
    "global_acc": (*NUMBER, NONE),
    "personal_acc_mean": (*NUMBER, NONE),
    "personal_acc_std": (*NUMBER, NONE),
    "personal_proto_acc_mean": (*NUMBER, NONE),
    "train_loss": (*NUMBER, NONE),
    "bytes_up": NUMBER,
    "bytes_down": NUMBER,
    "round_seconds": NUMBER,
}


def _check(
    data: Any, where: str, required: Mapping[str, tuple[type, ...]], optional: Mapping[str, tuple[type, ...]] = {}
) -> None:
    if not isinstance(data, dict):
        raise ReportError(f"{where}: expected a JSON object, got {type(data).__name__}")
    for key, types in (*required.items(), *optional.items()):
        if key not in data:
            if key in required:
                raise ReportError(f"{where}: missing field {key!r}")
            continue
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, types):
            names = " or ".join("null" if t is NONE else t.__name__ for t in types)
            raise ReportError(f"{where}: field {key!r} must be {names}, got {value!r:.60}")


def load_summary(run_dir: Path) -> dict[str, Any]:
    """The run's summary.json, with every field a report uses checked."""
    summary = read_summary(run_dir)
    where = str(Path(run_dir) / "summary.json")
    _check(summary, where, SUMMARY_FIELDS, OPTIONAL_SUMMARY_FIELDS)
    if summary["rounds"] < 1:
        raise ReportError(f"{where}: field 'rounds' must be >= 1, got {summary['rounds']}")
    _check(summary["partition"], f"{where}: partition", PARTITION_FIELDS, OPTIONAL_PARTITION_FIELDS)
    for name in ("final", "best"):
        _check(summary[name], f"{where}: {name}", ROUND_FIELDS, OPTIONAL_ROUND_FIELDS)
    if summary["privacy"] and summary["epsilon"] is not None:
        _check(summary["privacy"], f"{where}: privacy", PRIVACY_FIELDS, OPTIONAL_PRIVACY_FIELDS)
    return summary


def load_history(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl rows, each checked for the fields a report uses."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = read_metrics(path)
    for number, row in enumerate(rows, 1):
        _check(row, f"{path}: line {number}", ROW_FIELDS, OPTIONAL_ROW_FIELDS)
    return rows
