"""protofl: privacy-preserving, prototype-based federated learning.

The public API is what this module exports: ``run(config) -> RunResult`` (with your own data,
model and ``on_round`` callback), the configuration classes, sweeps, comparisons, the privacy audit
(``audit_run``), and what a method of
your own needs (``Algorithm``, ``LocalTrainingConfig``, ``register``). Imports are lazy so that ``protofl --help`` starts fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "run": "protofl.api",
    "RunResult": "protofl.api",
    "RunConfig": "protofl.config",
    "DataConfig": "protofl.config",
    "PartitionConfig": "protofl.config",
    "FederationConfig": "protofl.config",
    "ModelConfig": "protofl.config",
    "PrivacyConfig": "protofl.config",
    "ConfigError": "protofl.errors",
    "ProtoflError": "protofl.errors",
    "CheckpointError": "protofl.errors",
    "CompileError": "protofl.errors",
    "DataFormatError": "protofl.errors",
    "ReportError": "protofl.errors",
    "RunFailedError": "protofl.errors",
    "RunFolderError": "protofl.errors",
    "RunLockedError": "protofl.errors",
    "RunInterrupted": "protofl.engine",
    "BudgetExceededError": "protofl.privacy",
    "load_dataset": "protofl.data",
    "make_partition": "protofl.data",
    "UserData": "protofl.custom",
    "FeatureNet": "protofl.models",
    "Algorithm": "protofl.algorithms",
    "LocalTrainingConfig": "protofl.algorithms",
    "register": "protofl.algorithms",
    "SweepSpec": "protofl.sweep",
    "run_sweep": "protofl.sweep",
    "compare_runs": "protofl.report",
    "audit_run": "protofl.privacy.audit",
    "AuditSettings": "protofl.privacy.audit",
    "AuditResult": "protofl.privacy.audit",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from protofl.algorithms import Algorithm, LocalTrainingConfig, register
    from protofl.api import RunResult, run
    from protofl.config import DataConfig, FederationConfig, ModelConfig, PartitionConfig, PrivacyConfig, RunConfig
    from protofl.custom import UserData
    from protofl.data import load_dataset, make_partition
    from protofl.engine import RunInterrupted
    from protofl.errors import (
        CheckpointError,
        CompileError,
        ConfigError,
        DataFormatError,
        ProtoflError,
        ReportError,
        RunFailedError,
        RunFolderError,
        RunLockedError,
    )
    from protofl.models import FeatureNet
    from protofl.privacy import BudgetExceededError
    from protofl.privacy.audit import AuditResult, AuditSettings, audit_run
    from protofl.report import compare_runs
    from protofl.sweep import SweepSpec, run_sweep


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'protofl' has no attribute {name!r}")
