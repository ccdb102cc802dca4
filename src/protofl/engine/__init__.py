"""Engines that run algorithms: the in-process simulation (the default)."""

from protofl.engine.simulation import RunInterrupted, Simulation, derive_seed, sample_clients

__all__ = ["RunInterrupted", "Simulation", "derive_seed", "sample_clients"]
