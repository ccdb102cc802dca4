"""The replay attack on a prototype release, for the tests of secret noise.

A server that knows the run's seed replays a client's noise: it seeds the client's generator as the
client does (``client_generator(seed, round, client)``), advances it past the client's local training
(one shuffle of its ``n`` training examples per epoch, ``n`` being the sum of the counts its reply
carries), draws the release's noise with the run's own privacy layer on all-zero features (whose clipped
class means are zero, so what it releases is the noise alone) and subtracts it from the reply. What the
server uses is what it knows: the run configuration (seed included), the round, the partition id, its
broadcast (here: none is needed) and the reply. The tests compare what it recovers with the clean
prototypes, computed from the client's own state (which the server never sees).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from protofl.engine.client import client_generator
from protofl.training import minibatches


def replayed_prototypes(algorithm, seed: int, round_index: int, client: int, reply) -> tuple[np.ndarray, np.ndarray]:
    """What a server that replays client ``client``'s noise of round ``round_index`` takes for its clean
    prototypes, and the noise scale (std per class and coordinate) of the release."""
    classes = torch.as_tensor(np.asarray(reply["classes"]), dtype=torch.long)
    counts = torch.as_tensor(np.asarray(reply["counts"]), dtype=torch.long)
    n = int(counts.sum())
    generator = client_generator(seed, round_index, client)
    for _ in range(algorithm.config.local_epochs):
        minibatches(n, algorithm.config.batch_size, generator)
    labels = torch.repeat_interleave(classes, counts)
    noise = algorithm.privacy_layer.noisy_prototypes(torch.zeros(n, algorithm.model.feature_dim), labels, generator)
    assert torch.equal(noise.classes, classes), "the replay does not see the classes the client released"
    recovered = np.asarray(reply["prototypes"], dtype=np.float64) - noise.prototypes.double().numpy()
    return recovered, noise.noise_std.double().numpy()


def clean_prototypes(algorithm, state: Mapping[str, Any], data, bound: float) -> np.ndarray:
    """The clean class means (features clipped to ``bound``) a client's release of ``state`` noised: what
    no one but the client knows."""
    from protofl.algorithms.base import compute_features

    z = compute_features(algorithm, state["params"], data.x_train).double()
    z = z * torch.clamp(bound / z.norm(dim=1, keepdim=True).clamp_min(1e-12), max=1.0)
    classes = torch.unique(data.y_train)
    return torch.stack([z[data.y_train == c].mean(0) for c in classes]).numpy()


def replay_error(recovered: np.ndarray, clean: np.ndarray, std: np.ndarray) -> float:
    """The root mean square of the replay's error, in units of the noise scale: about 0 where the server
    removed the noise, about sqrt(2) where it subtracted an independent draw."""
    return float(np.sqrt(np.mean(((recovered - clean) / std) ** 2)))
