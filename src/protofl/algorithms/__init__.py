"""Federated algorithms, one module each, found through the registry ``ALGORITHMS``."""

from protofl.algorithms.base import ALGORITHMS, Algorithm, ClientData, LocalTrainingConfig, Task, get_algorithm, register
from protofl.algorithms import creff, fedavg, fedhpro, fedprox, fedproto, fedtgp, fpl, local  # noqa: F401  (registers them)

__all__ = ["ALGORITHMS", "Algorithm", "ClientData", "LocalTrainingConfig", "Task", "get_algorithm", "register"]
