"""The classifiers and their model table: ``cnn`` (per-image MoE after a CNN stem), ``convmoe``
(token-level MoE on a CNN feature map) and ``vmoe`` (token-level MoE transformer).

:data:`MODELS` maps ``model.name`` to the model's config dataclass (its fields are the keys of
``conf/model/<name>.yaml``; ``config.build(...)`` makes the classifier).  Adding a model is
one file here, one entry below and one YAML file (docs/architecture.md, "How to add a model").
"""

from .cnn import CNNConfig, DMoEClassifier
from .common import ModelConfig, ModelOutput, ModelShape
from .convmoe import ConvMoEClassifier, ConvMoEConfig
from .vmoe import VMoEClassifier, VMoEConfig

MODELS: dict[str, type[ModelConfig]] = {"cnn": CNNConfig, "convmoe": ConvMoEConfig, "vmoe": VMoEConfig}

__all__ = [
    "MODELS",
    "ModelConfig",
    "ModelShape",
    "ModelOutput",
    "CNNConfig",
    "DMoEClassifier",
    "ConvMoEConfig",
    "ConvMoEClassifier",
    "VMoEConfig",
    "VMoEClassifier",
]
