"""A client's side of a round, written once for every transport.

The in-process transport calls these functions for the clients it holds; a Flower node calls them for
its one partition. Given the algorithm, a client's state and data, the broadcast it received, the round
and the run's seed, :func:`client_round` derives the client's generator and runs its step, so the two
transports cannot drift apart in what a client does.

Every random draw of a client step (its shuffles, DP-SGD's Poisson sampling and noise, VPP's private
selection, the release noise) comes from that one generator. It is seeded from ``(run seed, round,
client)``, or, given the client's noise secret (``privacy.noise = secret``), from ``HMAC(secret, round,
client)``: then whoever knows the run seed (on Flower, the server) cannot replay the noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from protofl.algorithms.base import Algorithm, ClientData
from protofl.payload import Payload
from protofl.seeds import derive_seed, secret_seed

#: What a client step returns: its new state, its reply and its metrics (e.g. ``train_loss``).
StepResult = tuple[dict[str, Any], Payload, dict[str, float]]


def client_generator(seed: int, round_index: int, client: int, secret: bytes | None = None) -> torch.Generator:
    """The generator of client ``client`` in round ``round_index``: derived from ``(seed, round, client)``,
    or, with the client's noise ``secret``, from the secret alone (``seed`` is then not used)."""
    if secret is not None:
        return torch.Generator(device="cpu").manual_seed(secret_seed(secret, round_index, client))
    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, round_index, client))


def client_round(
    algorithm: Algorithm,
    state: dict[str, Any],
    data: ClientData,
    received: Payload,
    *,
    round_index: int,
    seed: int,
    secret: bytes | None = None,
) -> StepResult:
    """One client's step of round ``round_index`` (the budget check and the broadcast's validation are the
    caller's: they come before anything is released); ``secret``: the client's noise secret, if it has one."""
    return algorithm.client_step(state, data, received, client_generator(seed, round_index, data.client_id, secret))


def client_rounds_batched(
    algorithm: Algorithm,
    states: Sequence[dict[str, Any]],
    datas: Sequence[ClientData],
    received: Payload,
    *,
    round_index: int,
    seed: int,
    secrets: Sequence[bytes | None] | None = None,
) -> list[StepResult]:
    """:func:`client_round` for several clients as one batched program (same results, same order);
    ``secrets``: each client's noise secret (``None``: seeded)."""
    keys = list(secrets) if secrets is not None else [None] * len(datas)
    generators = [client_generator(seed, round_index, data.client_id, key) for data, key in zip(datas, keys)]
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
