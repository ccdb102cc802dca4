"""Federated algorithms, one module each, found through the registry ``ALGORITHMS``."""

from protofl.algorithms import (  # noqa: F401  (registers them)
    creff,
    dpfedavg,
    dpgauss,
    fedavg,
    fedgh,
    fedhpro,
    fedhypevae,
    fedproto,
    fedprox,
    fedtgp,
    fpl,
    local,
)
from protofl.algorithms.base import (
    ALGORITHMS,
    Algorithm,
    ClientData,
    LocalTrainingConfig,
    ModelAlgorithm,
    Task,
    get_algorithm,
    register,
)

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "ClientData",
    "LocalTrainingConfig",
    "ModelAlgorithm",
    "Task",
    "get_algorithm",
    "register",
]
