"""Public reference data: statistics computed from material that holds no client's data.

:func:`public_embedding_range` gives a per-dimension range of a frozen encoder's embeddings, fit on
random crops of the photos bundled with scikit-image and scikit-learn (greyscale and colour, at the
encoder's input size). Methods that need to min-max normalise embeddings (FedHypeVAE) use it instead of
a range fit on private data; values outside it are clipped by the caller.
"""

from __future__ import annotations

import numpy as np

from protofl.data.dataset import cache_dir
from protofl.data.sources import save_npz_atomic

__all__ = ["public_embedding_range", "public_photo_crops"]

VERSION = 1


def public_photo_crops(count: int = 2048, size: int = 28, seed: int = 0) -> np.ndarray:
    """``(count, 3, size, size)`` float32 crops in [0, 1] of the bundled photos (half of them grey)."""
    from protofl.data.digits_domains import photo_bank

    bank = photo_bank()
    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, size, size), dtype=np.float32)
    for i in range(count):
        photo = bank[rng.integers(len(bank))]
        side = int(rng.integers(size, min(photo.shape[:2]) + 1))
        top = int(rng.integers(photo.shape[0] - side + 1))
        left = int(rng.integers(photo.shape[1] - side + 1))
        crop = photo[top : top + side, left : left + side]
        index = (np.arange(size) * side / size).astype(int)  # nearest-neighbour resize
        crop = crop[index][:, index].transpose(2, 0, 1)
        if i % 2:
            crop = np.repeat(crop.mean(0, keepdims=True), 3, axis=0)
        out[i] = crop
    return out


def public_embedding_range(encoder: str, image_size: int = 32, count: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension ``(low, high)`` of ``encoder``'s embeddings of the public photo crops, widened by 10 %
    of the span on each side (cached on disk)."""
    from protofl.data.embeddings import ENCODERS, encode_images

    path = cache_dir() / "public" / f"range-{encoder}-{image_size}-{count}-v{VERSION}.npz"
    if path.exists():
        with np.load(path) as f:
            return f["low"], f["high"]
    spec = ENCODERS[encoder]
    emb = encode_images(public_photo_crops(count), spec.build(), spec, image_size=image_size, progress=False)
    low, high = emb.min(0), emb.max(0)
    span = np.maximum(high - low, 1e-6)
    low, high = (low - 0.1 * span).astype(np.float32), (high + 0.1 * span).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_npz_atomic(path, {"low": low, "high": high})
    return low, high
