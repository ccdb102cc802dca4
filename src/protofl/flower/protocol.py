"""The protocol between the Flower server and its nodes: message kinds and typed fields, in one place.

Every message carries its fields in the ``protofl`` config record (see :mod:`protofl.flower.records`);
both sides name and read them through the :class:`Field` constants here. Reading a field converts it to
its type: a malformed value raises ``ValueError``, ``TypeError`` or ``KeyError``, which the server turns
into a rejection (never a crash).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")

#: Message kinds (Flower's ``message_type``).
QUERY = "query"  # which partition does this node hold?
TRAIN = "train"  # one client step of a round (and, with evaluate-round, the evaluation of the round before)
EVALUATE = "evaluate"  # personalised metrics and privacy spent after a round

_REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class Field(Generic[T]):
    """A protocol field: its name on the wire and how its value is read."""

    name: str
    parse: Callable[[Any], T]

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("Field.name must not be empty")

    def read(self, fields: Mapping[str, Any], default: Any = _REQUIRED) -> T:
        """The field's value in ``fields`` (``KeyError`` if absent and no default), converted to its type."""
        if self.name not in fields and default is not _REQUIRED:
            return default
        return self.parse(fields[self.name])

    def within(self, fields: Mapping[str, Any]) -> bool:
        return self.name in fields


def _int_list(value: Any) -> list[int]:
    return [int(v) for v in value]


def _bool_list(value: Any) -> list[bool]:
    return [bool(v) for v in value]


def _json(value: Any) -> Any:
    return json.loads(value)


# -- every message from the server ---------------------------------------------------------------------
ROUND = Field("round", int)
#: The server's decisions on the node's last training replies (rounds, and whether each was accepted).
DECISION_ROUNDS = Field("decision-rounds", _int_list)
DECISION_ACCEPTED = Field("decision-accepted", _bool_list)
# -- train and evaluate messages ---------------------------------------------------------------------
#: A train message that also asks for the evaluation of this earlier round.
EVALUATE_ROUND = Field("evaluate-round", int)
#: Report the spend under every accountant (the final evaluation), not only the run's own.
PRIVACY_ALL = Field("privacy-all", bool)
# -- replies ---------------------------------------------------------------------------------------
PARTITION_ID = Field("partition-id", int)
TRAIN_LOSS = Field("train-loss", float)
#: The method's row metrics of the node's training step (``Algorithm.row_metrics``), JSON ``{name: value}``.
ROW_METRICS = Field("row-metrics", lambda value: {str(k): float(v) for k, v in json.loads(value).items()})
#: Why the node refused to train (its next release would exceed its privacy budget).
BUDGET_EXCEEDED = Field("budget-exceeded", str)
#: The round an evaluation is of; whether the node evaluated (it holds a test split); its metric names.
EVALUATED_ROUND = Field("evaluated-round", int)
EVALUATED = Field("evaluated", bool)
METRIC_KEYS = Field("metric-keys", list)
#: The node's privacy spend report (JSON), or null where nothing is protected.
PRIVACY = Field("privacy", _json)
#: The node's training samples and classes (its per-client record).
TRAIN_SAMPLES = Field("train-samples", int)
TRAIN_CLASSES = Field("train-classes", int)


def pack(values: Mapping[Field[Any], Any]) -> dict[str, Any]:
    """Fields by their wire names (a ``privacy`` report is written as JSON)."""
    return {field.name: json.dumps(value) if field is PRIVACY else value for field, value in values.items()}
