"""Public low-dimensional bases for frozen-encoder embeddings.

:func:`public_basis` fits a principal-component basis of an encoder's embeddings of *public* images (no
client holds them) and returns it as a :class:`PublicBasis`: projecting an embedding onto its first
``dims`` components and dividing by each component's public standard deviation gives standardised
coordinates in which a generator or classifier can work with far fewer numbers than the encoder's
1280 dimensions. Everything is computed from the public images alone, so using it costs no privacy.

Public sources (:data:`PUBLIC_SOURCES`):

- ``photos``: random crops of the photos bundled with scikit-image and scikit-learn (greyscale and
  colour), the same crops :func:`protofl.data.public.public_embedding_range` uses;
- ``mnist``: MNIST training digits, greyscale 28x28 objects on a black background, closer to
  Fashion-MNIST's format. Not public for a run whose clients hold MNIST (``mnist`` itself, or
  ``digits-domains``, which has an MNIST domain): use ``photos`` there.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np

from protofl.data.dataset import cache_dir
from protofl.data.sources import save_npz_atomic

__all__ = ["PUBLIC_SOURCES", "PublicBasis", "basis_for_embeddings", "public_basis", "public_images"]

VERSION = 1


def _photo_images(count: int) -> np.ndarray:
    from protofl.data.public import public_photo_crops

    return public_photo_crops(count)


def _mnist_images(count: int) -> np.ndarray:
    from protofl.data.datasets import load_dataset

    train = load_dataset("mnist", progress=False).train
    pick = np.random.default_rng(0).choice(len(train.x), size=min(count, len(train.x)), replace=False)
    return np.asarray(train.x[np.sort(pick)], dtype=np.float32)


#: Public image sources by name: each returns ``count`` images ``(N, C, H, W)`` in [0, 1].
PUBLIC_SOURCES: dict[str, Callable[[int], np.ndarray]] = {"photos": _photo_images, "mnist": _mnist_images}


def public_images(source: str, count: int) -> np.ndarray:
    """``count`` images of the public ``source`` (see :data:`PUBLIC_SOURCES`)."""
    if source not in PUBLIC_SOURCES:
        raise ValueError(f"public source {source!r} is not one of {', '.join(PUBLIC_SOURCES)}")
    return PUBLIC_SOURCES[source](count)


@dataclasses.dataclass(frozen=True, eq=False)
class PublicBasis:
    """The first ``dims`` principal components of an encoder's embeddings of public images.

    ``mean`` (D,), ``components`` (dims, D, orthonormal rows) and ``scale`` (dims,: the public
    projection's standard deviation per component). ``explained_variance``: the share of the public
    embeddings' total variance the ``dims`` components hold."""

    source: str
    encoder: str
    mean: np.ndarray
    components: np.ndarray
    scale: np.ndarray
    explained_variance: float
    count: int

    def __post_init__(self) -> None:
        if self.components.ndim != 2 or self.components.shape[1] != len(self.mean):
            raise ValueError(f"components {self.components.shape} do not match a mean of {len(self.mean)} dims")
        if self.scale.shape != (len(self.components),) or not bool((self.scale > 0).all()):
            raise ValueError("scale must hold one positive standard deviation per component")

    @property
    def dims(self) -> int:
        return len(self.components)

    @property
    def input_dim(self) -> int:
        return len(self.mean)

    def project(self, x):
        """Standardised coordinates ``((x - mean) @ components.T) / scale`` of embeddings ``x`` (N, D)
        (a torch tensor in, a torch tensor out)."""
        import torch

        mean = torch.from_numpy(self.mean).to(x.device, x.dtype)
        comps = torch.from_numpy(self.components).to(x.device, x.dtype)
        return ((x - mean) @ comps.T) / torch.from_numpy(self.scale).to(x.device, x.dtype)

    def describe(self) -> dict[str, object]:
        """What summary.json reports of the basis."""
        return {
            "source": self.source,
            "encoder": self.encoder,
            "dims": self.dims,
            "explained_variance": round(float(self.explained_variance), 4),
            "public_images": self.count,
            "coordinates": "standardised (mean and std of the public projection)",
        }


def fit_basis(embeddings: np.ndarray, dims: int, source: str, encoder: str) -> PublicBasis:
    """The PCA basis of ``embeddings`` (N, D) at ``dims`` components (see :class:`PublicBasis`)."""
    x = np.asarray(embeddings, dtype=np.float64)
    if not 1 <= dims <= min(x.shape):
        raise ValueError(f"dims must be in [1, {min(x.shape)}] for {x.shape[0]} public embeddings, got {dims}")
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    var = s**2 / (len(x) - 1)
    return PublicBasis(
        source=source,
        encoder=encoder,
        mean=mean.astype(np.float32),
        components=vt[:dims].astype(np.float32),
        scale=np.sqrt(np.maximum(var[:dims], 1e-12)).astype(np.float32),
        explained_variance=float(var[:dims].sum() / var.sum()),
        count=len(x),
    )


@functools.lru_cache(maxsize=8)
def public_basis(source: str, encoder: str, dims: int, image_size: int = 32, count: int = 2048) -> PublicBasis:
    """The ``dims``-component basis of ``encoder``'s embeddings of ``count`` images of the public
    ``source`` at ``image_size`` (the public embeddings are cached on disk; the fit takes a second)."""
    from protofl.data.embeddings import ENCODERS, encode_images

    if source not in PUBLIC_SOURCES:
        raise ValueError(f"public source {source!r} is not one of {', '.join(PUBLIC_SOURCES)}")
    path = cache_dir() / "public" / f"embeddings-{source}-{encoder}-{image_size}-{count}-v{VERSION}.npz"
    if path.exists():
        with np.load(path) as f:
            emb = f["embeddings"]
    else:
        spec = ENCODERS[encoder]
        emb = encode_images(public_images(source, count), spec.build(), spec, image_size=image_size, progress=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_npz_atomic(path, {"embeddings": emb})
    return fit_basis(emb, dims, source, encoder)


def basis_for_embeddings(source: str, encoder: str, dims: int, image_size: int, data_dim: int) -> PublicBasis:
    """:func:`public_basis`, refused (a :class:`~protofl.config.ConfigError` naming ``method.encoder``)
    when the encoder's embeddings are not the data's."""
    from protofl.config import ConfigError

    basis = public_basis(source, encoder, dims, image_size)
    if basis.input_dim != data_dim:
        raise ConfigError(f"method.encoder: {encoder} gives {basis.input_dim}-d embeddings, the data has {data_dim}-d")
    return basis
