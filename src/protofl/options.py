"""One-line meanings of a method's options, for ``protofl methods``.

An option's meaning is the ``#:`` comment above its field in the ``Config`` dataclass that declares it
(the same comments the docs are written from); the options every method inherits from
:class:`~protofl.algorithms.LocalTrainingConfig` are described here.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

#: The local-training options every method's Config inherits.
LOCAL_TRAINING = {
    "local_epochs": "passes over the client's training split per round",
    "batch_size": "minibatch size of local training",
    "optimizer": "sgd, adam or adamw (decoupled weight decay); its state is reset every round",
    "lr": "learning rate of local training",
    "momentum": "SGD momentum",
    "weight_decay": "L2 penalty (adamw: decoupled weight decay)",
    # Declared without a comment of its own by dpfedavg's Config.
    "steps_per_round": "local DP-SGD steps per round",
}

_FIELD = re.compile(r"^\s*(\w+)\s*:[^=]*=")


def _comments(cls: type) -> dict[str, str]:
    """``field -> the #: comment lines above it`` in the body of ``cls`` (empty where the source is unavailable)."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    # A comment describes the field below it and the fields that follow it without a blank line
    # (e.g. "SGD steps, learning rate and momentum" above three fields).
    out, pending, comment = {}, [], ""
    for line in lines:
        text = line.strip()
        if text.startswith("#:"):
            pending.append(text[2:].strip())
            continue
        match = _FIELD.match(line)
        if match:
            if pending:
                comment, pending = " ".join(pending), []
            if comment:
                out[match.group(1)] = comment
        elif not text.startswith("#"):
            pending, comment = [], ""
    return out


def option_help(config_cls: type) -> list[tuple[str, Any, str]]:
    """``(option, default, one-line meaning)`` of every field of a method's Config."""
    from protofl.algorithms import LocalTrainingConfig

    meanings = dict(LOCAL_TRAINING)
    for cls in reversed(config_cls.__mro__):
        if dataclasses.is_dataclass(cls) and cls is not LocalTrainingConfig:
            meanings.update(_comments(cls))
    out = []
    for f in dataclasses.fields(config_cls):
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        meaning = meanings.get(f.name, "(undocumented)")
        out.append((f.name, default, meaning.split(". ")[0].rstrip(".")))
    return out
