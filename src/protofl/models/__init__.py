"""Client models: a feature extractor producing a d-dimensional feature (the prototype space) and a
linear head. Nothing federated lives here."""

from protofl.models.nets import EmbeddingAdapterNet, FeatureNet, SmallCNN, build_model

__all__ = ["EmbeddingAdapterNet", "FeatureNet", "SmallCNN", "build_model"]
