import numpy as np
import pytest

from protofl.payload import ArraySpec, Payload, PayloadError, PayloadSpec, validate


def make_payload():
    return Payload(
        {
            "classes": np.array([0, 3, 7], dtype=np.int64),
            "prototypes": np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32),
            "counts": np.array([4, 1, 9], dtype=np.int64),
            "scalar": np.array(2.5, dtype=np.float64),
            "empty": np.zeros((0, 5), dtype=np.float32),
        },
        {"method": "fedproto", "round": 3, "note": "ü"},
    )


SPEC = PayloadSpec(
    "fedproto",
    {
        "classes": ArraySpec((None,), "int64", class_bound=10, unique=True),
        "prototypes": ArraySpec((None, 5)),
        "counts": ArraySpec((None,), "int64", minimum=1),
    },
    same_length=("classes", "prototypes", "counts"),
)


def test_round_trip_preserves_names_dtypes_shapes_values_and_metadata():
    p = make_payload()
    q = Payload.from_bytes(p.to_bytes())
    assert list(q.arrays) == list(p.arrays)
    for name in p.arrays:
        assert q[name].dtype == p[name].dtype
        assert q[name].shape == p[name].shape
        np.testing.assert_array_equal(q[name], p[name])
    assert dict(q.metadata) == dict(p.metadata)


def test_byte_count_is_header_plus_raw_arrays():
    p = make_payload()
    raw = sum(a.nbytes for a in p.arrays.values())
    assert raw < len(p.to_bytes()) < raw + 400


@pytest.mark.parametrize("cut", [0, 3, 7, 20, -1])
def test_truncated_or_garbage_bytes_are_rejected(cut):
    data = make_payload().to_bytes()
    with pytest.raises(PayloadError):
        Payload.from_bytes(data[:cut])


def test_trailing_bytes_are_rejected():
    with pytest.raises(PayloadError, match="trailing"):
        Payload.from_bytes(make_payload().to_bytes() + b"x")


def test_object_arrays_cannot_be_sent():
    with pytest.raises(PayloadError, match="not sendable"):
        Payload({"x": np.array([object()])})


def _fedproto(**arrays):
    base = {"classes": np.array([1, 2]), "prototypes": np.ones((2, 5), np.float32), "counts": np.array([3, 4])}
    base.update(arrays)
    return Payload(base, {"method": "fedproto"})


def test_validate_accepts_a_good_payload():
    validate(_fedproto(), SPEC)


@pytest.mark.parametrize(
    "payload, message",
    [
        (_fedproto(prototypes=np.full((2, 5), np.nan, np.float32)), "NaN"),
        (_fedproto(prototypes=np.ones((2, 4), np.float32)), "shape"),
        (_fedproto(classes=np.array([1, 12])), "class ids"),
        (_fedproto(classes=np.array([2, 2])), "duplicate"),
        (_fedproto(counts=np.array([1, 2, 3])), "same length"),
        (_fedproto(classes=np.array([1.0, 2.0])), "dtype float64 is not int64"),
        (_fedproto(prototypes=np.ones((2, 5), np.float64)), "dtype float64 is not float32"),
        (_fedproto(counts=np.array([0, 4])), "must be >= 1"),
        (Payload({"classes": np.array([1])}, {"method": "fedproto"}), "missing"),
        (Payload({**_fedproto().arrays, "extra": np.zeros(1)}, {"method": "fedproto"}), "unexpected"),
        (Payload(dict(_fedproto().arrays), {"method": "fedavg"}), "method"),
    ],
)
def test_validate_rejects_malformed_payloads(payload, message):
    with pytest.raises(PayloadError, match=message):
        validate(Payload.from_bytes(payload.to_bytes()), SPEC)


@pytest.mark.parametrize(
    "header",
    [
        b'{"metadata": [], "arrays": []}',
        b'{"metadata": {}, "arrays": [["a", "float32", [4611686018427387904, 4]]]}',
        b'{"metadata": {}, "arrays": [["a", "float32", [1]], ["a", "float32", [1]]]}',
        b'{"metadata": {}, "arrays": [["a", "object", [1]]]}',
        b'{"metadata": {}, "arrays": [["a", "float32", [-1]]]}',
        b'{"metadata": {}, "arrays": [["a", "float32"]]}',
        b"not json",
    ],
)
def test_hostile_headers_raise_payload_error_only(header):
    import struct

    data = b"PFL1" + struct.pack("<I", len(header)) + header + b"\0" * 8
    with pytest.raises(PayloadError):
        Payload.from_bytes(data)
