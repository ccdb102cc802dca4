"""The thread policy: torch's and numpy's BLAS pools sized together, oversubscription said."""

import logging

import pytest
import torch
from threadpoolctl import threadpool_info

from protofl import runtime
from protofl.runtime import WORKERS_ENV, apply_threads, resolve_threads


def blas_pools():
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


@pytest.fixture
def restore_threads():
    before, pools = torch.get_num_threads(), max(blas_pools(), default=1)
    yield
    apply_threads(before)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=pools, user_api="blas")


def test_apply_threads_sizes_numpy_blas_with_torch(restore_threads):
    import numpy as np

    np.ones((4, 4)) @ np.ones((4, 4))  # numpy's BLAS is loaded
    assert blas_pools(), "numpy's BLAS pool is visible to threadpoolctl"
    for threads in (2, 1):  # one of them differs from the pool's size before the call
        got = apply_threads(threads)
        assert got["threads"] == torch.get_num_threads() == threads
        assert got["blas_threads"] == threads and set(blas_pools()) == {threads}


def test_an_oversubscribing_thread_count_is_said_and_kept(monkeypatch, caplog):
    monkeypatch.setattr(runtime, "available_cores", lambda: 2)
    monkeypatch.setenv(WORKERS_ENV, "2")
    with caplog.at_level(logging.WARNING, logger="protofl.runtime"):
        assert resolve_threads(0) == 1  # the policy: cores / workers
        assert resolve_threads(1) == 1
        assert not caplog.records
        assert resolve_threads(2) == 2  # explicit wins, but 2 workers x 2 threads on 2 cores
    assert len(caplog.records) == 1 and "federation.threads = 2" in caplog.records[0].getMessage()
    assert "oversubscribed" in caplog.records[0].getMessage()
    monkeypatch.delenv(WORKERS_ENV)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="protofl.runtime"):
        assert resolve_threads(0) == 2  # a process alone takes every core
        assert resolve_threads(2) == 2
    assert not caplog.records
