"""The batched round's cheaper per-client work and the releases' float32 passes, each against its plain
definition: parsed payloads (header parsed once per distinct header), client states out of the stack,
the clip bound under float32 norms, and VPP's diagnostics from the spread its selection ranked."""

import math

import numpy as np
import pytest
import torch

from protofl.payload import Payload, PayloadError
from protofl.privacy import mechanisms as M
from protofl.training import unstack_params


def test_payloads_with_one_header_parse_to_their_own_arrays_and_metadata():
    first = Payload({"a": np.arange(4, dtype=np.int64), "b": np.ones((2, 3), np.float32)}, {"method": "x", "k": [1]})
    second = Payload(
        {"a": np.arange(4, 8, dtype=np.int64), "b": np.zeros((2, 3), np.float32)}, {"method": "x", "k": [1]}
    )
    got = [Payload.from_bytes(p.to_bytes()) for p in (first, second, first)]
    assert got[0]["a"].tolist() == [0, 1, 2, 3] and got[1]["a"].tolist() == [4, 5, 6, 7]
    assert got[2]["b"].sum() == 6 and got[1]["b"].sum() == 0
    got[0]["a"][0] = 99  # a parsed array is a private copy: the next parse of the same header is not touched
    assert Payload.from_bytes(first.to_bytes())["a"][0] == 0
    got[0].metadata["k"].append(2)  # nested metadata is parsed afresh for every payload
    assert dict(got[2].metadata) == {"method": "x", "k": [1]}
    assert got[0]["b"].dtype == np.float32 and got[0]["a"].flags.writeable


def test_a_bad_header_still_fails_after_a_good_one_of_the_same_shape_was_parsed():
    good = Payload({"a": np.arange(3, dtype=np.int64)}, {"method": "x"}).to_bytes()
    Payload.from_bytes(good)
    bad = good.replace(b'"int64"', b'"int66"')  # same length, not a sendable dtype
    with pytest.raises(PayloadError, match="int66"):
        Payload.from_bytes(bad)
    truncated = good[:-8]  # the header parses (cached), the array is short
    with pytest.raises(PayloadError, match="truncated"):
        Payload.from_bytes(truncated)
    long_metadata = Payload({"a": np.arange(2)}, {"method": "x", "note": "n" * 5000})  # past the cached size
    assert Payload.from_bytes(long_metadata.to_bytes()).metadata["note"] == "n" * 5000


def test_client_states_out_of_the_stack_are_rows_with_storage_of_their_own():
    stacked = {"w": torch.randn(4, 3, 2), "b": torch.randn(4, 3)}
    states = unstack_params(stacked)
    for c, state in enumerate(states):
        for name, value in state.items():
            assert torch.equal(value, stacked[name][c]) and value.shape == stacked[name].shape[1:]
            assert value.untyped_storage().nbytes() == value.numel() * value.element_size()  # not the whole stack
    states[1]["w"].zero_()
    assert not torch.equal(stacked["w"][1], states[1]["w"]) and torch.equal(states[2]["w"], stacked["w"][2])


@pytest.mark.parametrize("d", [3, 64, 1280])
def test_rows_clipped_by_float32_norms_stay_inside_the_bound(d):
    """Rows just above the bound (where float32 rounding of the norm could let a clipped row out) and far
    above it, clipped with the release's scales: every clipped row's exact (float64) norm is at most R."""
    g = torch.Generator().manual_seed(d)
    bound = 1.7
    directions = torch.randn(300, d, generator=g, dtype=torch.float64)
    directions /= directions.norm(dim=1, keepdim=True)
    radii = torch.cat(
        [bound * (1 + torch.logspace(-9, -3, 150, dtype=torch.float64)), torch.rand(150, generator=g) * 1e6]
    )
    z = (directions * radii[:, None]).float()[None]
    # every row a class of its own: the release's class sums are then the clipped rows themselves
    stack = M._Stack.of(z, torch.arange(300)[None], None, 300)
    clipped = stack.class_sums(M._clip_scale(bound, stack.row_squares, d))[0]
    assert np.linalg.norm(clipped, axis=1).max() <= bound
    assert np.linalg.norm(clipped, axis=1).min() > bound * (1 - 1e-4)  # clipped to the bound, not far inside it


def test_vpp_diagnostics_from_the_selections_spread_equal_the_recomputed_ones():
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 4, (6, 40), generator=g)
    z = torch.randn(6, 40, 16, generator=g) + y[..., None].float() * torch.linspace(0, 3, 16)
    weight = torch.ones(6, 40)
    weight[2, 30:] = 0
    settings = M.ReleaseSettings(4, 2.0, 1.0)
    releases = M.vpp_release_batch(
        z, y, weight, settings, [torch.Generator().manual_seed(k) for k in range(6)], 0.25, 50.0, 40.0
    )
    assert all(r.clean is not None for r in releases)
    chosen = [r.selected for r in releases]
    from_release = M.selection_diagnostics_batch(z, y, weight, chosen, [r.clean for r in releases])
    recomputed = M.selection_diagnostics_batch(z, y, weight, chosen)
    assert from_release == recomputed
    assert not any(math.isnan(v) for d in from_release for v in d.values())
    # a public selection keeps no spread: the diagnostics then read the features themselves
    public = M.vpp_release_batch(
        z, y, weight, settings, [torch.Generator().manual_seed(k) for k in range(6)], 0.25, 50.0, None, chosen[0]
    )
    assert all(r.clean is None for r in public)


def _clipped_class_sum(values: np.ndarray, bound: float) -> float:
    """The release's clipped class sum of one client's one-dimensional rows, all of class 0."""
    z = torch.from_numpy(values.astype(np.float32).reshape(1, -1, 1))
    stack = M._Stack.of(z, torch.zeros(1, len(values), dtype=torch.long), None, 1)
    return float(stack.class_sums(M._clip_scale(bound, stack.row_squares, 1))[0, 0, 0])


def test_one_row_more_moves_a_clipped_class_sum_by_at_most_the_bound():
    """Sensitivity of the sums as computed, not only of each row: with float32 additions the extra row
    shifts the rounding of the 3,000 additions after it, and the sums of these neighbours differ by up to
    1.0005 of the bound (seeds 1, 5 and 19 here); added in float64 they differ by the clipped row alone."""
    for seed in range(20):
        rows = np.random.default_rng(seed).uniform(0.5, 1.0, size=3000)
        with_extra = np.concatenate([[1.0], rows])  # the extra row first: every later addition is shifted
        gap = abs(_clipped_class_sum(with_extra, 1.0) - _clipped_class_sum(rows, 1.0))
        assert gap <= 1.0, (seed, gap)


def test_a_finite_row_too_large_for_float32_squares_is_clipped_in_its_own_direction():
    """A coordinate of 1e30 overflows a float32 square; the row is clipped to the bound along its own
    direction (not zeroed, which would drop its data), and a row holding NaN is a zero row."""
    z = torch.tensor([[[3e30, -4e30], [float("nan"), 1.0], [0.3, 0.4]]], dtype=torch.float32)
    y = torch.tensor([[0, 1, 2]])
    stack = M._Stack.of(z, y, None, 3)
    sums = stack.class_sums(M._clip_scale(2.0, stack.row_squares, 2))[0]
    assert np.allclose(sums[0], [1.2, -1.6], rtol=1e-5) and np.linalg.norm(sums[0]) <= 2.0
    assert np.array_equal(sums[1], [0.0, 0.0])
    assert np.allclose(sums[2], [0.3, 0.4], rtol=1e-6)


def test_clip_rows_keeps_every_row_inside_the_bound_in_float64():
    rows = torch.from_numpy(np.random.default_rng(0).normal(size=(20000, 64)) * 10)
    clipped = M.clip_rows(rows, 1.0)
    assert float(clipped.norm(dim=1).max()) <= 1.0
    inside = rows[:5] / 1e3
    assert torch.equal(M.clip_rows(inside, 1.0), inside)  # rows already inside are unchanged


@pytest.mark.parametrize("clients,classes", [(3, 5), (30, 10), (2, 40000)])  # K·C < 256, >= 256, >= 65536
def test_class_sums_scale_each_real_row_once_in_its_own_class(clients, classes):
    """The release's clipped class sums against a written-out loop: every real row, scaled by its own
    factor, added to its client's class; padding rows, rows of a negative label and an empty client in
    none. Labels in random order, so the rows' permutation into class order is exercised; the class-slot
    keys take each of numpy's integer widths (8, 16 and 32 bits)."""
    g = torch.Generator().manual_seed(clients)
    n, d = 40, 3
    z = torch.randn(clients, n, d, generator=g) * 5
    y = torch.randint(0, classes, (clients, n), generator=g)
    y[0, 3] = -1  # an unlabelled row
    weight = (torch.rand(clients, n, generator=g) > 0.2).float()
    weight[-1] = 0.0  # a client with no rows
    stack = M._Stack.of(z, y, weight, classes)
    scales = np.random.default_rng(clients).uniform(0.1, 1.0, size=(clients, n))
    expected = np.zeros((clients, classes, d))
    counts = np.zeros((clients, classes), dtype=np.int64)
    for k in range(clients):
        for i in range(n):
            if weight[k, i] > 0 and y[k, i] >= 0:
                expected[k, y[k, i]] += scales[k, i] * z[k, i].double().numpy()
                counts[k, y[k, i]] += 1
    np.testing.assert_allclose(stack.class_sums(scales), expected, rtol=1e-12, atol=1e-12)
    assert np.array_equal(stack.counts, counts)
    # the ANOVA's sums of squares see the same rows: an unlabelled or padding row is zero
    assert not stack.x[0, 3].any() and not stack.x[-1].any()
