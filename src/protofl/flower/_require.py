"""The optional dependency: Flower is imported lazily, so protofl works without the ``flower`` extra."""

from __future__ import annotations

import importlib

#: The Flower releases this integration is written and tested against (see docs/flower.md).
SUPPORTED = "1.41"


class FlowerMissingError(ImportError):
    """Flower (``flwr``) is not installed."""


def require_flwr():
    """The ``flwr`` module, or a clear error telling how to install it."""
    try:
        flwr = importlib.import_module("flwr")
    except ImportError:
        raise FlowerMissingError(
            "running on Flower needs the optional dependency flwr: pip install 'protofl[flower]'"
        ) from None
    version = getattr(flwr, "__version__", "")
    if not version.startswith(SUPPORTED + "."):
        import logging

        logging.getLogger("protofl.flower").warning(
            "flwr %s is installed; protofl's Flower app is tested with %s.x", version, SUPPORTED
        )
    return flwr
