"""Moved to :mod:`protofl.training` (the batched loop lives below the algorithms); the engine still
imports :func:`chunks` from here."""

from protofl.training import chunks

__all__ = ["chunks"]
