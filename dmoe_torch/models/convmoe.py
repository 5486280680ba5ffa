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

import torch
from torch import nn

from ..moe import MoELayer, RouterSpec, check_positive_int
from .cnn import ModelOutput, check_routing_inputs

__all__ = ["ConvMoEClassifier"]


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
    d_model      channels of the feature map = token width (the hidden state sent to an expert)
    num_experts  K experts per MoE layer (device k hosts expert k of every layer)
    depth        mixer blocks, each followed by an MoE layer (depth MoE layers)
    hidden_mult  expert hidden width = hidden_mult * d_model
    kernel_size  of the depthwise token-mixing convs (odd)
    link_dropout training-time link dropout of every MoE layer (see MoELayer)
    combine, balance_on  the MoE layers' combine rule and load-balancing mask (see MoELayer)
    channel_gate the learned channel-aware gate in every MoE layer (see MoELayer)
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        d_model: int = 64,
        num_experts: int = 8,
        depth: int = 2,
        hidden_mult: int = 2,
        kernel_size: int = 3,
        link_dropout: float = 0.0,
        combine: str = "renormalized",
        balance_on: str = "selection",
        channel_gate: bool = False,
    ) -> None:
        super().__init__()
        for key, value in (
            ("model.in_channels", in_channels),
            ("model.num_classes", num_classes),
            ("model.image_size", image_size),
            ("model.d_model", d_model),
            ("model.num_experts", num_experts),
            ("model.depth", depth),
            ("model.hidden_mult", hidden_mult),
            ("model.kernel_size", kernel_size),
        ):
            check_positive_int(key, value)
        if image_size % 4:
            raise ValueError(f"model.image_size={image_size} must be divisible by 4 (two 2x poolings)")
        if kernel_size % 2 == 0:
            raise ValueError(f"model.kernel_size={kernel_size} must be odd (a centred depthwise conv)")
        self.num_experts = num_experts
        self.num_moe_layers = depth
        self.tokens_per_input = (image_size // 4) ** 2
        self.stem = nn.Sequential(*_conv_pool_block(in_channels, 32), *_conv_pool_block(32, d_model))
        self.mixers = nn.ModuleList(MixerBlock(d_model, kernel_size) for _ in range(depth))
        # channels_last convolutions run ~1.5x faster on CPU (oneDNN) than NCHW ones, and
        # make the [B, d, h, w] -> [B*h*w, d] token view a free reshape.
        self.stem.to(memory_format=torch.channels_last)
        self.mixers.to(memory_format=torch.channels_last)
        self.moe_layers = nn.ModuleList(
            MoELayer(
                d_model, num_experts, hidden_mult, link_dropout, combine=combine, balance_on=balance_on, channel_gate=channel_gate
            )
            for _ in range(depth)
        )
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
        check_routing_inputs(x, costs, specs, self.num_moe_layers)
        fmap = self.stem(x.contiguous(memory_format=torch.channels_last))
        B, d, h, w = fmap.shape
        results = []
        for mixer, moe, layer_costs, spec, layer_delivered in zip(
            self.mixers, self.moe_layers, costs, specs, delivered or [None] * len(costs), strict=True
        ):
            fmap = mixer(fmap)
            tokens = fmap.permute(0, 2, 3, 1).reshape(B * h * w, d)  # row b*T + t, t = i*w + j
            results.append(moe(tokens, layer_costs, spec, generator=generator, delivered=layer_delivered))
            fmap = results[-1].out.view(B, h, w, d).permute(0, 3, 1, 2)  # back to [B, d, h, w], channels_last
        pooled = self.norm(fmap.permute(0, 2, 3, 1).reshape(B, h * w, d)).mean(1)
        return ModelOutput.from_layers(self.head(pooled), results)
