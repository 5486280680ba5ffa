"""The DMoE image classifier: CNN stem -> L residual MoE layers -> LayerNorm -> linear head.

The coordinator runs the stem, every gate, the combine step and the head; the experts of
MoE layer l live on the K edge devices (device k hosts expert k of every layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..moe import MoELayer, RouterSpec
from ..utils import check_int
from .common import ModelConfig, ModelOutput, check_dataset_dims, layer_inputs

__all__ = ["CNNConfig", "DMoEClassifier"]


@dataclass(frozen=True)
class CNNConfig(ModelConfig):
    """``model=cnn`` (conf/model/cnn.yaml): the fields of ModelConfig and

    num_moe_layers  L residual MoE layers after the stem
    """

    d_model: int = 128
    num_moe_layers: int = 2

    def check_fields(self) -> None:
        check_int(self.num_moe_layers, "model.num_moe_layers", minimum=1)


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    # conv-BN-ReLU-maxpool, with the ReLU after the pooling: the same function (max-pooling
    # and ReLU commute, both being monotone) with 4x fewer elements to rectify.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.MaxPool2d(2),
        nn.ReLU(inplace=True),
    )


class DMoEClassifier(nn.Module):
    """Image classifier with L distributed MoE layers.

    in_channels, num_classes, image_size  from the dataset (image_size: H = W)
    config    a CNNConfig, or its fields as keyword arguments (d_model, num_experts,
              num_moe_layers, hidden_mult, link_dropout, combine, balance_on, channel_gate)

    Stem: two conv(3x3)-BN-ReLU-maxpool(2) blocks (32, 64 channels), flatten, linear to d_model.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, config: CNNConfig | None = None, **fields) -> None:
        super().__init__()
        config = config or CNNConfig(**fields)
        check_dataset_dims(in_channels, num_classes, image_size)
        config.check_image_size(image_size)
        self.config = config
        self.num_experts = config.num_experts
        self.num_moe_layers = config.num_moe_layers
        self.tokens_per_input = 1  # one routed input (frame) per image
        reduced = image_size // 4
        self.stem = nn.Sequential(
            _conv_block(in_channels, 32),
            _conv_block(32, 64),
            nn.Flatten(),
            nn.Linear(64 * reduced * reduced, config.d_model),
        )
        # channels_last convolutions run ~1.5x faster on CPU (oneDNN) than NCHW ones.
        self.stem.to(memory_format=torch.channels_last)
        self.moe_layers = nn.ModuleList(
            MoELayer(config.d_model, config.num_experts, **config.moe_kwargs()) for _ in range(config.num_moe_layers)
        )
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, num_classes)

    def forward(
        self,
        x: torch.Tensor,
        costs: list[torch.Tensor],
        specs: list[RouterSpec],
        generator: torch.Generator | None = None,
        delivered: list[torch.Tensor | None] | None = None,
    ) -> ModelOutput:
        """x [B, C, H, W]; costs: L float64 CPU tensors [B, K, N] (J, +inf = outage);
        specs: L RouterSpecs (one per layer); generator: for random policies; delivered: None
        (perfect CSI) or L bool tensors [B, K, N] (see MoELayer.forward)."""
        inputs = layer_inputs(x, costs, specs, delivered, self.num_moe_layers)
        h = self.stem(x.contiguous(memory_format=torch.channels_last))
        results = []
        for layer, (layer_costs, spec, layer_delivered) in zip(self.moe_layers, inputs, strict=True):
            results.append(layer(h, layer_costs, spec, generator=generator, delivered=layer_delivered))
            h = results[-1].out
        return ModelOutput.from_layers(self.head(self.norm(h)), results)


CNNConfig.classifier = DMoEClassifier
