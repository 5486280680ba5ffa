"""The classifiers: ``cnn`` (per-image MoE after a CNN stem) and ``vmoe`` (token-level MoE transformer)."""

from .cnn import DMoEClassifier, ModelOutput

__all__ = ["DMoEClassifier", "ModelOutput"]
