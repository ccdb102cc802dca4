"""The round loop's allocator setting (``protofl.runtime.retain_freed_memory``)."""

import os
import platform
import subprocess
import sys

import pytest
import torch

import protofl.engine.rounds as rounds
from protofl.algorithms import ClientData, Task, get_algorithm
from protofl.config import FederationConfig, ModelConfig
from protofl.engine import Simulation
from protofl.runtime import retain_freed_memory


def test_the_environments_malloc_settings_are_left_to_it(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1000000")
    assert retain_freed_memory() == "environment"


#: A process that allocates and frees a 40 MB tensor 10 times and prints the page faults taken, after
#: ``retain_freed_memory(256 MB)`` when asked. glibc serves a block above 32 MB with a fresh ``mmap``
#: whatever its adaptive threshold (10,240 faults each); kept for reuse, most rounds take it from the heap.
_ROUNDS = """
import resource, sys, torch
from protofl.runtime import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory(256 << 20) == "retained"
def round_():
    torch.empty(40 << 20, dtype=torch.uint8).fill_(1)
round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    round_()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_keeps_freed_memory_for_reuse():
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    faults = {
        mode: int(
            subprocess.run(
                [sys.executable, "-c", _ROUNDS, mode], env=env, capture_output=True, text=True, check=True
            ).stdout
        )
        for mode in ("default", "retain")
    }
    assert faults["default"] > 50_000 and faults["retain"] < faults["default"] / 2, faults


def test_a_limit_outside_what_mallopt_takes_is_refused():
    with pytest.raises(ValueError, match="limit"):
        retain_freed_memory(1 << 40)


def test_the_round_loop_applies_it(monkeypatch):
    calls = []
    monkeypatch.setattr(rounds, "retain_freed_memory", lambda: calls.append(1) or "retained")
    task = Task(input_shape=(4,), num_classes=2, model=ModelConfig(feature_dim=3, hidden_dim=5))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 4, generator=g), torch.randint(0, 2, (12,), generator=g)
    clients = [ClientData(0, x[:10], y[:10], x[10:], y[10:])]
    fed = FederationConfig(rounds=2, checkpoint_every=0, progress=False)
    sim = Simulation(get_algorithm("fedavg").from_options({}, task), clients, x[10:], y[10:], fed, seed=0)
    sim.run()
    assert calls == [1] and len(sim.history) == 2
