"""Seeds derived from integers: the one function every part of protofl draws its per-round, per-client
and per-method randomness from, so that a run is the same in any process and on any engine.

A client's privacy-protecting draws may instead come from a secret of its own (``privacy.noise =
secret``): 32 bytes from the operating system's CSPRNG (:func:`new_secret`), from which each round's seed
is derived with HMAC-SHA256 (:func:`secret_seed`); whoever lacks the secret cannot replay them.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import numpy as np

#: Bytes of a client's noise secret.
SECRET_BYTES = 32


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and platforms."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int(state.view(np.uint64)[0] >> 1)


def new_secret() -> bytes:
    """A fresh noise secret: :data:`SECRET_BYTES` bytes from the operating system's CSPRNG."""
    return secrets.token_bytes(SECRET_BYTES)


def secret_seed(secret: bytes, *parts: int) -> int:
    """A 63-bit seed from ``secret`` and integers: HMAC-SHA256 of the integers (each as 8 signed big-endian
    bytes) under ``secret``. Without the secret, the seed of one ``parts`` says nothing of another's."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a noise secret is {SECRET_BYTES} bytes, got {len(secret)}")
    message = b"protofl-noise" + b"".join(int(p).to_bytes(8, "big", signed=True) for p in parts)
    return int.from_bytes(hmac.new(secret, message, hashlib.sha256).digest()[:8], "big") >> 1
