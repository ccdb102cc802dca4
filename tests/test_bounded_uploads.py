"""The server's projection of noisy prototype uploads onto the R-ball (``privacy.bound_uploads``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protofl.algorithms import Task, get_algorithm
from protofl.config import ModelConfig, PrivacyConfig
from protofl.payload import Payload


def _algorithm(name: str, **privacy):
    config = PrivacyConfig(epsilon=4.0, accountant="rdp", planned_releases=2, **privacy)
    options = {"batch_size": 8, **({"model_sharing": "none"} if name == "fpl" else {})}
    return get_algorithm(name).from_options(options, Task((8,), 3, ModelConfig(feature_dim=4, hidden_dim=8)), config)


def _upload(protos, counts=(10.0, 10.0, 10.0)):
    return Payload(
        {
            "classes": np.arange(3),
            "prototypes": np.asarray(protos, np.float32),
            "counts": np.asarray(counts, np.float64),
        },
        {"method": "fedproto"},
    )


def test_noisy_uploads_are_projected_onto_the_clip_ball_before_aggregation():
    algo = _algorithm("fedproto", mechanism="igpp", clip_bound=2.0)
    far = [[30.0, 40.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    state, _ = algo.server_step(algo.init_server_state(0), [_upload(far)])
    # a row outside the ball lands on its boundary in the same direction; rows inside are unchanged
    assert state["prototypes"][0].tolist() == pytest.approx([1.2, 1.6, 0.0, 0.0])
    assert state["prototypes"][1].tolist() == pytest.approx([0.0, 0.0, -1.0, 0.0])


@pytest.mark.parametrize("privacy", [{"mechanism": "none"}, {"mechanism": "igpp", "bound_uploads": False}])
def test_no_projection_without_a_release_or_when_switched_off(privacy):
    algo = _algorithm("fedproto", clip_bound=2.0, **privacy)
    far = [[30.0, 40.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    counts = (10, 10, 10) if privacy["mechanism"] == "none" else (10.0, 10.0, 10.0)
    upload = _upload(far, counts)
    if privacy["mechanism"] == "none":
        upload = Payload({**upload.arrays, "counts": np.asarray(counts, np.int64)}, upload.metadata)
    state, _ = algo.server_step(algo.init_server_state(0), [upload])
    assert state["prototypes"][0].tolist() == pytest.approx([30.0, 40.0, 0.0, 0.0])


def test_the_projection_never_moves_a_noisy_mean_further_from_the_true_one():
    """Projection onto a convex set that holds the truth is non-expansive toward it."""
    algo = _algorithm("fedproto", mechanism="igpp", clip_bound=1.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        truth = torch.randn(3, 4, generator=g)
        truth = truth / truth.norm(dim=1, keepdim=True).clamp_min(1.0)  # inside the unit ball
        noisy = truth + 5 * torch.randn(3, 4, generator=g)
        (projected,) = algo.bounded_uploads([_upload(noisy.numpy())])
        before = (noisy - truth).norm(dim=1)
        after = (torch.from_numpy(projected["prototypes"]).double() - truth.double()).norm(dim=1)
        assert (after <= before.double() + 1e-5).all()


def test_uploads_of_a_round_are_projected_each_as_alone():
    """The server projects a round's uploads in one program: each upload's rows come back in its own reply,
    in order, equal to that upload's rows projected by ``clip_rows`` in float64 and cast back to its dtype,
    its other arrays untouched (an upload of no rows included)."""
    from protofl.privacy.mechanisms import clip_rows

    algo = _algorithm("fedproto", mechanism="igpp", relation="replace-one", clip_bound=1.5)
    g = np.random.default_rng(0)
    uploads = [
        Payload(
            {
                "classes": np.arange(n),
                "prototypes": (g.normal(size=(n, 4)) * scale).astype(dtype),
                "counts": np.full(n, 5, np.int64),
            },
            {"method": "fedproto"},
        )
        for n, scale, dtype in [(3, 4.0, np.float32), (0, 1.0, np.float32), (1, 0.1, np.float64), (2, 9.0, np.float32)]
    ]
    together = algo.bounded_uploads(uploads)
    assert len(together) == len(uploads)
    for upload, projected in zip(uploads, together):
        rows = torch.from_numpy(upload["prototypes"].astype(np.float64))
        expected = clip_rows(rows, 1.5).numpy().astype(upload["prototypes"].dtype)
        assert projected["prototypes"].dtype == upload["prototypes"].dtype
        assert projected["prototypes"].shape == upload["prototypes"].shape
        assert np.array_equal(projected["prototypes"], expected)
        assert np.array_equal(projected["classes"], upload["classes"])
    assert not np.array_equal(together[0]["prototypes"], uploads[0]["prototypes"])  # rows outside were moved
    assert algo.bounded_uploads([]) == []
