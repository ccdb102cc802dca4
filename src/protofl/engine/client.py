"""A client's side of a round, written once for every transport.

The in-process transport calls these functions for the clients it holds; a Flower node calls them for
its one partition. Given the algorithm, a client's state and data, the broadcast it received, the round
and the run's seed, :func:`client_round` derives the client's generator and runs its step, so the two
transports cannot drift apart in what a client does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from protofl.algorithms.base import Algorithm, ClientData
from protofl.payload import Payload
from protofl.seeds import derive_seed

#: What a client step returns: its new state, its reply and its metrics (e.g. ``train_loss``).
StepResult = tuple[dict[str, Any], Payload, dict[str, float]]


def client_generator(seed: int, round_index: int, client: int) -> torch.Generator:
    """The generator of client ``client`` in round ``round_index``: derived from ``(seed, round, client)``."""
    return torch.Generator().manual_seed(derive_seed(seed, round_index, client))


def client_round(
    algorithm: Algorithm, state: dict[str, Any], data: ClientData, received: Payload, *, round_index: int, seed: int
) -> StepResult:
    """One client's step of round ``round_index`` (the budget check and the broadcast's validation are the
    caller's: they come before anything is released)."""
    return algorithm.client_step(state, data, received, client_generator(seed, round_index, data.client_id))


def client_rounds_batched(
    algorithm: Algorithm,
    states: Sequence[dict[str, Any]],
    datas: Sequence[ClientData],
    received: Payload,
    *,
    round_index: int,
    seed: int,
) -> list[StepResult]:
    """:func:`client_round` for several clients as one batched program (same results, same order)."""
    generators = [client_generator(seed, round_index, data.client_id) for data in datas]
    return algorithm.client_step_batched(list(states), list(datas), received, generators)


@torch.no_grad()
def client_evaluation(
    algorithm: Algorithm, state: dict[str, Any], data: ClientData, received: Payload
) -> dict[str, float]:
    """A client's personalised metrics (empty when it holds no test split)."""
    if not len(data.y_test):
        return {}
    return algorithm.evaluate_client(state, received, data)


def client_profile(data: ClientData) -> dict[str, int]:
    """What a client's per-round record says about its data: training samples and classes held."""
    return {"samples": int(len(data.y_train)), "classes": int(torch.unique(data.y_train).numel())}
