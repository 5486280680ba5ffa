"""Token-level DMoE classifier on the positions of a convolutional feature map.

image [B, C, H, W] -> CNN stem (two conv-maxpool-BN-ReLU blocks) -> feature map
[B, d, H/4, W/4], whose (H/4)*(W/4) positions are the tokens (49 on 28x28 images) ->
``depth`` blocks, each a residual depthwise conv (spatial mixing, no channel mixing) then a
residual MoE layer routing every token -> LayerNorm -> mean over tokens -> linear head.

The experts are the only channel-mixing layers after the stem (the ConvMixer / ConvNeXt
split: depthwise convs mix positions, per-token MLPs mix channels), so bypassing them leaves
a linear read-out of spatially filtered stem features: the experts carry the computation.
Every token of every image is one input of the DMoE protocol: an MoE layer routes all B*T
tokens of the batch in one call, each on its own channel draw (frame id
``sample_id * T + token``, see ``tokens_per_input``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..moe import MoELayer, RouterSpec
from ..utils import ConfigError, check_int
from .common import ModelConfig, ModelOutput, ModelShape, check_dataset_dims, layer_inputs

__all__ = ["ConvMoEConfig", "ConvMoEClassifier"]


@dataclass(frozen=True)
class ConvMoEConfig(ModelConfig):
    """``model=convmoe`` (conf/model/convmoe.yaml): the fields of ModelConfig and

    depth        mixer blocks, each followed by an MoE layer (depth MoE layers)
    kernel_size  of the depthwise token-mixing convs (odd: a centred conv)
    """

    layers_key: ClassVar[str] = "model.depth"

    depth: int = 2
    kernel_size: int = 3

    def check_fields(self) -> None:
        check_int(self.depth, "model.depth", minimum=1)
        check_int(self.kernel_size, "model.kernel_size", minimum=1)
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"model.kernel_size={self.kernel_size}: must be odd (a centred depthwise conv)")

    @property
    def num_moe_layers(self) -> int:
        return self.depth

    def check_image_size(self, image_size: int, source: str = "") -> None:
        if image_size % 4:
            of = f" of {source}" if source else ""
            raise ConfigError(
                f"model.name=convmoe: the image size {image_size}{of} must be divisible by 4 (the stem's two 2x poolings)"
            )

    def shape(self, image_size: int | None) -> ModelShape:
        return ModelShape(
            self.num_experts,
            self.depth,
            self.d_model,
            self.hidden_mult,
            layers_key=self.layers_key,
            tokens_per_input=(image_size or 4) ** 2 // 16,
            block_params=self.depth * self.d_model * self.kernel_size**2,
            block_keys=("model.depth", "model.d_model", "model.kernel_size"),
        )


def _conv_pool_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    """3x3 conv (padding 1) -> 2x max-pool -> BatchNorm -> ReLU: [B, in, H, W] -> [B, out, H/2, W/2].
    Pooling before the normalisation runs BatchNorm and ReLU on 4x fewer elements (on CPU
    they cost more than the convolution itself at 28x28)."""
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class MixerBlock(nn.Module):
    """Residual depthwise conv (k x k, BatchNorm, GELU) over the feature map; the MoE layer
    that follows it is applied by :class:`ConvMoEClassifier` on the flattened tokens.
    x [B, d, h, w] -> [B, d, h, w]."""

    def __init__(self, d_model: int, kernel_size: int) -> None:
        super().__init__()
        self.mix = nn.Sequential(
            nn.Conv2d(d_model, d_model, kernel_size, padding=kernel_size // 2, groups=d_model, bias=False),
            nn.BatchNorm2d(d_model),
            nn.GELU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mix(x)


class ConvMoEClassifier(nn.Module):
    """Token-level DMoE classifier with a CNN stem.

    in_channels, num_classes, image_size  from the dataset (image_size: H = W, divisible by 4)
    config   a ConvMoEConfig, or its fields as keyword arguments (d_model: channels of the
             feature map = token width; depth, kernel_size and those of ModelConfig)
    """

    def __init__(
        self, in_channels: int, num_classes: int, image_size: int, config: ConvMoEConfig | None = None, **fields
    ) -> None:
        super().__init__()
        config = config or ConvMoEConfig(**fields)
        check_dataset_dims(in_channels, num_classes, image_size)
        config.check_image_size(image_size)
        self.config = config
        d_model = config.d_model
        self.num_experts = config.num_experts
        self.num_moe_layers = config.depth
        self.tokens_per_input = (image_size // 4) ** 2
        self.stem = nn.Sequential(*_conv_pool_block(in_channels, 32), *_conv_pool_block(32, d_model))
        self.mixers = nn.ModuleList(MixerBlock(d_model, config.kernel_size) for _ in range(config.depth))
        # channels_last convolutions run ~1.5x faster on CPU (oneDNN) than NCHW ones, and
        # make the [B, d, h, w] -> [B*h*w, d] token view a free reshape.
        self.stem.to(memory_format=torch.channels_last)
        self.mixers.to(memory_format=torch.channels_last)
        self.moe_layers = nn.ModuleList(MoELayer(d_model, config.num_experts, **config.moe_kwargs()) for _ in range(config.depth))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(
        self,
        x: torch.Tensor,
        costs: list[torch.Tensor],
        specs: list[RouterSpec],
        generator: torch.Generator | None = None,
        delivered: list[torch.Tensor | None] | None = None,
    ) -> ModelOutput:
        """x [B, C, H, W]; costs: one float64 CPU tensor [B*T, K, N] per MoE layer (J, +inf =
        outage), row b*T + t for token t (row-major position) of image b, or under image
        frames one ``moe.FrameLinks`` [B, K, N] per layer (the image's tokens share it); specs: one RouterSpec
        per MoE layer; delivered: None (perfect CSI) or one bool tensor [B*T, K, N] per MoE
        layer (see MoELayer.forward).  Selections in the output have B*T rows in that order."""
        inputs = layer_inputs(x, costs, specs, delivered, self.num_moe_layers)
        fmap = self.stem(x.contiguous(memory_format=torch.channels_last))
        B, d, h, w = fmap.shape
        results = []
        for mixer, moe, (layer_costs, spec, layer_delivered) in zip(self.mixers, self.moe_layers, inputs, strict=True):
            fmap = mixer(fmap)
            tokens = fmap.permute(0, 2, 3, 1).reshape(B * h * w, d)  # row b*T + t, t = i*w + j
            results.append(moe(tokens, layer_costs, spec, generator=generator, delivered=layer_delivered))
            fmap = results[-1].out.view(B, h, w, d).permute(0, 3, 1, 2)  # back to [B, d, h, w], channels_last
        pooled = self.norm(fmap.permute(0, 2, 3, 1).reshape(B, h * w, d)).mean(1)
        return ModelOutput.from_layers(self.head(pooled), results)


ConvMoEConfig.classifier = ConvMoEClassifier
