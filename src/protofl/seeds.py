"""Seeds derived from integers: the one function every part of protofl draws its per-round, per-client
and per-method randomness from, so that a run is the same in any process and on any engine."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and platforms."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int(state.view(np.uint64)[0] >> 1)
