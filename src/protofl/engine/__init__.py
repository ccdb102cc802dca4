"""Engines that run algorithms: one round driver (:mod:`protofl.engine.rounds`) over a transport, in
process (:class:`Simulation`, the default) or on Flower (:mod:`protofl.flower`)."""

from protofl.engine.inprocess import InProcessTransport
from protofl.engine.rounds import (
    ClientEvaluation,
    Exchange,
    RoundDriver,
    RunInterrupted,
    Transport,
    metrics_row,
    privacy_metrics,
    sample_clients,
    simulated_dropouts,
    summarize_client_metrics,
)
from protofl.engine.simulation import Simulation
from protofl.seeds import derive_seed

__all__ = [
    "ClientEvaluation",
    "Exchange",
    "InProcessTransport",
    "RoundDriver",
    "RunInterrupted",
    "Simulation",
    "Transport",
    "derive_seed",
    "metrics_row",
    "privacy_metrics",
    "sample_clients",
    "simulated_dropouts",
    "summarize_client_metrics",
]
