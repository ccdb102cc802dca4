"""Payloads as Flower records, and back.

A :class:`~protofl.payload.Payload` travels as a Flower ``RecordDict`` holding an ``ArrayRecord``
(``"payload"``: one ``Array`` per named array, e.g. ``classes`` and ``prototypes`` of whatever classes
this client holds) and a ``ConfigRecord`` (``"protofl"``: the payload's metadata as JSON plus the
protocol fields: round, partition, the server's decision on the node's last reply). Parsing is strict:
anything malformed raises :class:`~protofl.payload.PayloadError`; the caller then validates the
payload against the algorithm's :class:`~protofl.payload.PayloadSpec` with :func:`protofl.payload.validate`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from protofl.payload import Payload, PayloadError

PAYLOAD = "payload"
FIELDS = "protofl"
METADATA = "metadata"


def to_record_dict(payload: Payload | None, **fields: Any) -> Any:
    """A ``RecordDict`` carrying ``payload`` (if any) and the protocol ``fields`` (Flower config values)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    records: dict[str, Any] = {}
    config = {k: v for k, v in fields.items() if v is not None}
    if payload is not None:
        records[PAYLOAD] = ArrayRecord({name: Array(arr) for name, arr in payload.arrays.items()})
        config[METADATA] = json.dumps(dict(payload.metadata))
    records[FIELDS] = ConfigRecord(config)
    return RecordDict(records)


def fields_of(content: Any) -> dict[str, Any]:
    """The protocol fields of a ``RecordDict`` (empty if it carries none)."""
    config = content.config_records.get(FIELDS) if content is not None else None
    return dict(config) if config is not None else {}


def payload_of(content: Any) -> Payload:
    """The payload in a ``RecordDict``; :class:`PayloadError` if it is missing or malformed."""
    try:
        arrays = content.array_records[PAYLOAD]
        metadata = json.loads(fields_of(content)[METADATA])
    except KeyError as exc:
        raise PayloadError(f"malformed message: no {exc.args[0]!r} record") from None
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"malformed message metadata: {exc}") from None
    if not isinstance(metadata, Mapping):
        raise PayloadError("malformed message metadata: not a JSON object")
    parsed = {}
    for name, array in arrays.items():
        try:
            parsed[name] = array.numpy()
        except Exception as exc:  # untrusted bytes: any failure to decode is a malformed payload
            raise PayloadError(f"array {name!r} cannot be decoded: {type(exc).__name__}: {exc}") from None
    return Payload(parsed, metadata)


def wire_size(payload: Payload) -> int:
    """Bytes of ``payload`` in protofl's own wire format: the figure every engine reports, so byte
    counts compare across engines (Flower's message framing is not counted)."""
    return len(payload.to_bytes())
