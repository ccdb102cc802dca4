"""One objective per method: the per-client path is unchanged by the rewrite, a subclass that changes only
the loss stays batched, the prototype release happens in one method, and the weighted losses ignore
padding."""

import numpy as np
import pytest
import torch
from objective_reference import CASES, REFERENCE, TASK, clients, outcome

from protofl.algorithms import get_algorithm
from protofl.algorithms.fedavg import FedAvg
from protofl.algorithms.fedhpro import hpal_loss, hpcl_loss
from protofl.algorithms.fpl import cpcl_loss
from protofl.config import PrivacyConfig
from protofl.payload import Payload
from protofl.training import masked_cross_entropy, minibatches


@pytest.mark.parametrize("case", list(CASES))
def test_the_per_client_step_repeats_the_recorded_outcomes(case):
    """Two rounds of per-client steps reproduce what the code produced before its objectives became one
    weighted loss: the same random draws (exactly), the same integers, and floats within rounding (the
    weighted means sum in another order than ``F.cross_entropy`` / ``F.mse_loss``)."""
    ref = np.load(REFERENCE)
    got = outcome(case)
    keys = sorted(k for k in ref.files if k.startswith(case + "/"))
    assert keys == sorted(got)
    for key in keys:
        a, b = ref[key], got[key]
        assert a.shape == b.shape and a.dtype == b.dtype, key
        if a.dtype.kind == "f" and not key.endswith("next_draw"):
            scale = float(np.abs(a).max()) if a.size else 0.0
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * max(scale, 1.0), err_msg=key)
        else:
            np.testing.assert_array_equal(b, a, err_msg=key)


class LabelSmoothedFedAvg(FedAvg):
    """Not registered: FedAvg whose only change is its loss."""

    name = "fedavg-smoothed"

    def loss(self, params, x, y, weight, context):
        logits = self.forward(params, x)[1]
        uniform = -torch.log_softmax(logits, -1).mean(-1)
        return 0.8 * masked_cross_entropy(logits, y, weight) + 0.2 * (uniform * weight).sum() / weight.sum().clamp_min(
            1
        )


def test_a_subclass_that_changes_only_the_loss_stays_batched_and_matches():
    algo = LabelSmoothedFedAvg.from_options({"batch_size": 8}, TASK)
    assert algo.batched_unsupported() is None
    data = clients()
    received = algo.broadcast(algo.init_server_state(0))
    gens = lambda: [torch.Generator().manual_seed(10 + k) for k in range(len(data))]
    ref = [algo.client_step({}, d, received, g) for d, g in zip(data, gens())]
    got = algo.client_step_batched([{}] * len(data), data, received, gens())
    plain = FedAvg.from_options({"batch_size": 8}, TASK).client_step({}, data[0], received, gens()[0])
    for (_, r_ref, m_ref), (_, r_got, m_got) in zip(ref, got):
        for key in r_ref.arrays:
            np.testing.assert_allclose(r_got[key], r_ref[key], atol=2e-5, rtol=1e-4)
        assert m_got["train_loss"] == pytest.approx(m_ref["train_loss"], rel=1e-5)
    # ... and the loss it trains is its own, not FedAvg's.
    assert not np.allclose(ref[0][1]["param/head.weight"], plain[1]["param/head.weight"])


@pytest.mark.parametrize("privacy", [None, PrivacyConfig(mechanism="igpp", epsilon=4.0, planned_releases=3)])
def test_both_paths_release_prototypes_through_release_prototypes_only(privacy, monkeypatch):
    algo = get_algorithm("fedproto").from_options({"batch_size": 8}, TASK, privacy)
    calls = []
    original = algo.release_prototypes

    def counted(z, y, clean, generator, client_state, client_id, *rest):
        calls.append(client_id)
        return original(z, y, clean, generator, client_state, client_id, *rest)

    original_batch = algo.release_prototypes_batch

    def counted_batch(stacked, outcomes):  # a batched round's release of all its clients at once
        calls.extend(o.data.client_id for o in outcomes)
        return original_batch(stacked, outcomes)

    monkeypatch.setattr(algo, "release_prototypes", counted)
    monkeypatch.setattr(algo, "release_prototypes_batch", counted_batch)
    if algo.privacy_layer is not None:
        for name in ("release", "release_batch"):
            release = getattr(algo.privacy_layer, name)
            monkeypatch.setattr(algo.privacy_layer, name, _forbidden_outside(calls, release))
    data = clients()
    received = algo.broadcast(algo.init_server_state(0))
    states = [algo.init_client_state(0) for _ in data]
    per_client = [
        algo.client_step(s, d, received, torch.Generator().manual_seed(k)) for k, (s, d) in enumerate(zip(states, data))
    ]
    assert calls == [0, 1, 2]
    batched = algo.client_step_batched(states, data, received, [torch.Generator().manual_seed(k) for k in range(3)])
    assert calls == [0, 1, 2, 0, 1, 2]
    for (s_ref, r_ref, _), (s_got, r_got, _) in zip(per_client, batched):
        assert s_ref.keys() == s_got.keys()
        np.testing.assert_allclose(r_got["prototypes"], r_ref["prototypes"], atol=2e-5, rtol=1e-4)
        np.testing.assert_array_equal(r_got["counts"], r_ref["counts"])


def _forbidden_outside(calls, release):
    """The mechanism's release, refusing to run unless release_prototypes (or release_prototypes_batch)
    has been entered since the last release."""
    seen = {"n": 0}

    def guarded(*args, **kwargs):
        assert len(calls) > seen["n"], "the release mechanism was called outside release_prototypes"
        seen["n"] = len(calls)
        return release(*args, **kwargs)

    return guarded


def test_weighted_losses_ignore_padding_and_stay_finite_on_it():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 6, generator=g).requires_grad_(True)
    y = torch.tensor([0, 1, 0, 3, 2])
    weight = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])  # rows 3 and 4: padding (class 3 has no cluster)
    cluster_classes = torch.tensor([0, 0, 1, 2])
    clusters = torch.randn(4, 6, generator=g)
    padded = cpcl_loss(z, y, cluster_classes, clusters, 0.02, weight)
    real = cpcl_loss(z[:3], y[:3], cluster_classes, clusters, 0.02)
    assert float(padded.detach()) == pytest.approx(float(real.detach()), rel=1e-6)
    padded.backward()
    assert torch.isfinite(z.grad).all() and torch.equal(z.grad[3:], torch.zeros(2, 6))
    z = z.detach()

    summaries = torch.nn.functional.normalize(torch.randn(3, 6, generator=g), dim=1)
    classes = torch.tensor([0, 1, 2])
    assert float(hpcl_loss(z, y, summaries, 0.05, 0.5, classes, weight)) == pytest.approx(
        float(hpcl_loss(z[:3], y[:3], summaries, 0.05, 0.5, classes)), rel=1e-6
    )
    targets = torch.randn(5, 6, generator=g)
    assert float(hpal_loss(z, targets, 1.0, weight)) == pytest.approx(float(hpal_loss(z[:3], targets[:3])), rel=1e-6)


def test_minibatches_cut_one_permutation_and_draw_it_even_for_no_data():
    g, h = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    batches = minibatches(10, 4, g)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat(batches), torch.randperm(10, generator=h))
    assert minibatches(0, 4, g) == []
    torch.randperm(0, generator=h)
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=h))


def test_the_batched_step_of_a_received_payload_leaves_the_payload_alone():
    algo = get_algorithm("fedavg").from_options({"batch_size": 8}, TASK)
    received = algo.broadcast(algo.init_server_state(0))
    before = {k: v.copy() for k, v in received.arrays.items()}
    algo.client_step_batched([{}] * 3, clients(), received, [torch.Generator().manual_seed(k) for k in range(3)])
    assert isinstance(received, Payload)
    for k, v in before.items():
        np.testing.assert_array_equal(received[k], v)
