"""Client models: a feature extractor producing a d-dimensional feature (the prototype space) and a
linear head. Nothing federated lives here."""

from protofl.models.nets import MODELS, EmbeddingAdapterNet, FeatureNet, LinearNet, SmallCNN, build_model

__all__ = ["MODELS", "EmbeddingAdapterNet", "FeatureNet", "LinearNet", "SmallCNN", "build_model"]
