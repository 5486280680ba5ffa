"""The DMoE image classifier: CNN stem -> L residual MoE layers -> LayerNorm -> linear head.

The coordinator runs the stem, every gate, the combine step and the head; the experts of
MoE layer l live on the K edge devices (device k hosts expert k of every layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..moe import MoELayer, RouterSpec, check_positive_int
from ..selection import Selection

__all__ = ["DMoEClassifier", "ModelOutput"]


@dataclass
class ModelOutput:
    """Result of :meth:`DMoEClassifier.forward`.

    logits         [B, num_classes]
    aux_loss       scalar, mean over layers of the load-balancing loss (1.0 = balanced)
    layer_metrics  L metric dicts of the MoE layers (per-batch means, see moe.METRIC_WEIGHTS)
    selections     L Selections (CPU)
    z_loss         scalar, mean over layers of the router z-loss (None: the model computes none;
                   train.z_loss_coef > 0 then fails)
    energy_loss    scalar, sum over layers of the channel-aware gates' expected link cost
                   (moe.expected_link_cost); None without model.channel_gate
    """

    logits: torch.Tensor
    aux_loss: torch.Tensor
    layer_metrics: list[dict[str, torch.Tensor]]
    selections: list[Selection]
    z_loss: torch.Tensor | None = None
    energy_loss: torch.Tensor | None = None

    @classmethod
    def from_layers(cls, logits: torch.Tensor, results: list) -> ModelOutput:
        """The output of a model whose MoE layers returned ``results`` (MoEOutputs, in order)."""
        return cls(
            logits=logits,
            aux_loss=torch.stack([r.aux_loss for r in results]).mean(),
            layer_metrics=[r.metrics for r in results],
            selections=[r.selection for r in results],
            z_loss=torch.stack([r.z_loss for r in results]).mean(),
            energy_loss=(
                torch.stack([r.energy_loss for r in results]).sum() if all(r.energy_loss is not None for r in results) else None
            ),
        )


def check_routing_inputs(x: torch.Tensor, costs: list, specs: list, num_layers: int) -> None:
    """Raise ValueError unless there is one cost tensor and one RouterSpec per MoE layer and
    ``x`` is an image batch [B, C, H, W]."""
    if len(costs) != num_layers:
        raise ValueError(f"costs must hold one tensor per MoE layer ({num_layers}), got {len(costs)}")
    if len(specs) != num_layers:
        raise ValueError(f"specs must hold one RouterSpec per MoE layer ({num_layers}), got {len(specs)}")
    if x.dim() != 4:
        raise ValueError(f"x must be an image batch [B, C, H, W], got {tuple(x.shape)}")


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
    d_model         width of the hidden state sent to the experts
    num_experts     K experts per layer (one per edge device)
    num_moe_layers  L
    hidden_mult     expert hidden width = hidden_mult * d_model
    link_dropout    training-time link dropout of every MoE layer (see MoELayer)
    combine         combine rule of every MoE layer (moe.COMBINE_RULES, see MoELayer)
    balance_on      what the load-balancing loss counts (moe.BALANCE_ON, see MoELayer)
    channel_gate    the learned channel-aware gate in every MoE layer (see MoELayer)

    Stem: two conv(3x3)-BN-ReLU-maxpool(2) blocks (32, 64 channels), flatten, linear to d_model.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        d_model: int = 128,
        num_experts: int = 8,
        num_moe_layers: int = 2,
        hidden_mult: int = 2,
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
            ("model.num_moe_layers", num_moe_layers),
        ):
            check_positive_int(key, value)
        if image_size < 4:
            raise ValueError(f"model.image_size must be >= 4 (two 2x poolings), got {image_size}")
        self.num_experts = num_experts
        self.num_moe_layers = num_moe_layers
        self.tokens_per_input = 1  # one routed input (frame) per image
        reduced = image_size // 4
        self.stem = nn.Sequential(
            _conv_block(in_channels, 32),
            _conv_block(32, 64),
            nn.Flatten(),
            nn.Linear(64 * reduced * reduced, d_model),
        )
        # channels_last convolutions run ~1.5x faster on CPU (oneDNN) than NCHW ones.
        self.stem.to(memory_format=torch.channels_last)
        self.moe_layers = nn.ModuleList(
            MoELayer(
                d_model, num_experts, hidden_mult, link_dropout, combine=combine, balance_on=balance_on, channel_gate=channel_gate
            )
            for _ in range(num_moe_layers)
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
        """x [B, C, H, W]; costs: L float64 CPU tensors [B, K, N] (J, +inf = outage);
        specs: L RouterSpecs (one per layer); generator: for random policies; delivered: None
        (perfect CSI) or L bool tensors [B, K, N] (see MoELayer.forward)."""
        check_routing_inputs(x, costs, specs, self.num_moe_layers)
        h = self.stem(x.contiguous(memory_format=torch.channels_last))
        results = []
        for layer, layer_costs, spec, layer_delivered in zip(
            self.moe_layers, costs, specs, delivered or [None] * len(costs), strict=True
        ):
            results.append(layer(h, layer_costs, spec, generator=generator, delivered=layer_delivered))
            h = results[-1].out
        return ModelOutput.from_layers(self.head(self.norm(h)), results)
