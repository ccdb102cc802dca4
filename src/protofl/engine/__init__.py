"""Engines that run algorithms: the in-process simulation (the default); :mod:`protofl.flower` runs the
same algorithms on Flower."""

from protofl.engine.simulation import (
    RunInterrupted,
    Simulation,
    derive_seed,
    metrics_row,
    privacy_metrics,
    sample_clients,
    simulated_dropouts,
    summarize_client_metrics,
)

__all__ = ["RunInterrupted", "Simulation", "derive_seed", "metrics_row", "privacy_metrics", "sample_clients",
           "simulated_dropouts", "summarize_client_metrics"]
