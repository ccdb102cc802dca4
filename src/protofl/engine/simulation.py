"""The in-process simulation: the round driver over the in-process transport, under its historical name.

``Simulation(algorithm, clients, test_x, test_y, federation, seed, ...)`` is a
:class:`~protofl.engine.rounds.RoundDriver` whose transport is an
:class:`~protofl.engine.inprocess.InProcessTransport` holding ``clients``; it adds nothing to the round.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import torch

from protofl.algorithms.base import Algorithm, ClientData
from protofl.config import FederationConfig
from protofl.engine.client_store import STORE_FOLDER
from protofl.engine.inprocess import InProcessTransport
from protofl.engine.rounds import RoundCallback, RoundDriver


class Simulation(RoundDriver):
    """Runs ``algorithm`` over ``clients`` in one process (see :class:`~protofl.engine.rounds.RoundDriver`)."""

    transport: InProcessTransport

    def __init__(
        self,
        algorithm: Algorithm,
        clients: Sequence[ClientData],
        test_x: torch.Tensor,
        test_y: torch.Tensor,
        federation: FederationConfig,
        seed: int,
        checkpoint_dir: Path | None = None,
        fingerprint: str = "",
        on_round: RoundCallback | None = None,
        test_groups: Mapping[str, torch.Tensor] | None = None,
    ):
        super().__init__(
            algorithm,
            InProcessTransport(
                algorithm,
                clients,
                federation,
                seed,
                store_dir=None if checkpoint_dir is None else checkpoint_dir / STORE_FOLDER,
            ),
            federation,
            seed,
            test_x=test_x,
            test_y=test_y,
            test_groups=test_groups,
            checkpoint_dir=checkpoint_dir,
            fingerprint=fingerprint,
            on_round=on_round,
        )

    @property
    def clients(self) -> Sequence[ClientData]:
        return self.transport.clients

    @property
    def client_states(self) -> MutableMapping[int, dict[str, Any]]:
        return self.transport.client_states

    def client_state(self, k: int) -> dict[str, Any]:
        return self.transport.client_state(k)
