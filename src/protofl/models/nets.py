"""Small networks for 2-core CPUs.

Every model is a :class:`FeatureNet`: ``features(x)`` gives the d-dimensional representation that
prototype methods average per class, ``head`` maps it to class logits, ``forward`` returns both.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from protofl.config import ModelConfig
from protofl.stacked import stackable


class FeatureNet(nn.Module):
    """A feature extractor followed by a linear head."""

    feature_dim: int
    head: nn.Linear

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @stackable
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.features(x)
        return z, self.head(z)


class SmallCNN(FeatureNet):
    """Two 3x3 conv blocks (16 and 32 channels, each ReLU + 2x2 max-pool), a linear layer to
    ``feature_dim`` with ReLU, and a linear head. Sized for 28x28 images on two CPU cores
    (about 0.2M parameters at d=128); any image side divisible by 4 works."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, feature_dim: int = 128):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"SmallCNN needs an image side divisible by 4, got {image_size}")
        self.feature_dim = feature_dim
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(32 * (image_size // 4) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(self.conv(x).flatten(1)))


class EmbeddingAdapterNet(FeatureNet):
    """On frozen-encoder embeddings: a residual bottleneck adapter ``e + B relu(A e)`` (B starts at
    zero, so the adapter starts as the identity), an MLP ``D -> hidden -> feature_dim`` with ReLU, and a
    linear head."""

    def __init__(
        self, input_dim: int, num_classes: int, feature_dim: int = 128, hidden_dim: int = 256, adapter_rank: int = 32
    ):
        super().__init__()
        self.feature_dim = feature_dim
        self.adapter_down = nn.Linear(input_dim, adapter_rank)
        self.adapter_up = nn.Linear(adapter_rank, input_dim)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.mlp = nn.Sequential(
            nn.Linear(input_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, feature_dim), nn.ReLU()
        )
        self.head = nn.Linear(feature_dim, num_classes)

    @stackable
    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.adapter_up(torch.relu(self.adapter_down(x)))
        return self.mlp(x)


class LinearNet(FeatureNet):
    """Features = the input vector as it is (flattened; e.g. frozen public-encoder embeddings from
    ``data.features``), head = one linear layer. No client trains the feature map, which is what
    ``privacy.sensitivity = "fixed-features"`` needs."""

    def __init__(self, input_dim: int, num_classes: int):
        super().__init__()
        self.feature_dim = input_dim
        self.head = nn.Linear(input_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def _cnn(config: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> FeatureNet:
    if len(input_shape) != 3:
        raise ValueError(f"model.name 'cnn' needs image inputs (C, H, W), got inputs of shape {input_shape}")
    channels, height, width = input_shape
    if height != width:
        raise ValueError(f"square images expected, got {height}x{width}")
    return SmallCNN(channels, height, num_classes, config.feature_dim)


def _adapter(config: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> FeatureNet:
    if len(input_shape) != 1:
        raise ValueError(f"model.name 'adapter' needs embedding inputs (D,), got inputs of shape {input_shape}")
    return EmbeddingAdapterNet(input_shape[0], num_classes, config.feature_dim, config.hidden_dim)


def _linear(config: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> FeatureNet:
    return LinearNet(math.prod(input_shape), num_classes)


def _auto(config: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> FeatureNet:
    builder = {3: _cnn, 1: _adapter}.get(len(input_shape))
    if builder is None:
        raise ValueError(f"no model for inputs of shape {input_shape}")
    return builder(config, input_shape, num_classes)


#: ``model.name`` -> builder ``(config, input_shape, num_classes) -> FeatureNet``; whether each trains its
#: features is :data:`protofl.config.MODEL_TRAINS_FEATURES`.
MODELS = {"auto": _auto, "cnn": _cnn, "adapter": _adapter, "linear": _linear}


def build_model(config: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> FeatureNet:
    """The model ``config.name`` names: ``auto`` builds a CNN for image inputs ``(C, H, W)`` and an
    adapter net for embedding inputs ``(D,)``."""
    return MODELS[config.name](config, input_shape, num_classes)
