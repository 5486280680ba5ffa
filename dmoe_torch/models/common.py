"""What every model shares: its config's common fields (:class:`ModelConfig`), the shape the
memory estimate reads (:class:`ModelShape`), the output type (:class:`ModelOutput`) and the
per-MoE-layer routing inputs (:func:`layer_inputs`).

A model is one file in this folder holding its classifier and its config dataclass (a
subclass of ModelConfig: its fields are the keys of ``conf/model/<name>.yaml`` besides
``name``, its ``__post_init__`` their checks), and one entry in :data:`dmoe_torch.models.MODELS`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import nn

from ..moe import BALANCE_ON, COMBINE_RULES, check_link_dropout
from ..selection import Selection
from ..utils import ConfigError, check_bool, check_int, check_str

__all__ = ["ModelConfig", "ModelShape", "ModelOutput", "check_routing_inputs", "layer_inputs"]


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs of a model, besides its expert layers: the routed tokens
    per image, lower bounds on its other weights and on the attention scores it keeps, and
    the keys that size them."""

    num_experts: int
    num_moe_layers: int
    d_model: int
    hidden_mult: int
    layers_key: str = "model.num_moe_layers"  # the key that sets num_moe_layers
    tokens_per_input: int = 1
    block_params: int = 0  # weights besides the experts (attention, depthwise convs, dense MLPs)
    block_keys: tuple[str, ...] = ()
    blocks: int = 0  # blocks that each keep attention_per_block scores per image
    attention_per_block: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """The ``model.*`` keys every model has; a model's config subclasses it with its own fields
    (a subclass may redeclare a field to change its default), checks them in
    :meth:`check_fields` and says how many MoE layers it has (``num_moe_layers``, a field or a
    property).  Raises ConfigError naming ``model.<field>`` on a bad value.

    d_model       width of the hidden state sent to the experts
    num_experts   K experts per MoE layer (device k hosts expert k of every layer)
    hidden_mult   expert hidden width = hidden_mult * d_model
    link_dropout  training-time link dropout of every MoE layer (see moe.MoELayer)
    combine       combine rule of every MoE layer (moe.COMBINE_RULES)
    balance_on    what the load-balancing loss counts (moe.BALANCE_ON)
    channel_gate  the learned channel-aware gate in every MoE layer
    """

    # The classifier the config builds; set by each subclass.
    classifier: ClassVar[type[nn.Module]]
    # The key that sets the number of MoE layers (named by memory messages).
    layers_key: ClassVar[str] = "model.num_moe_layers"

    d_model: int = 64
    num_experts: int = 8
    hidden_mult: int = 2
    link_dropout: float = 0.0
    combine: str = "renormalized"
    balance_on: str = "selection"
    channel_gate: bool = False

    def __post_init__(self) -> None:
        check_int(self.num_experts, "model.num_experts", minimum=1)
        check_int(self.d_model, "model.d_model", minimum=1)
        check_int(self.hidden_mult, "model.hidden_mult", minimum=1)
        check_link_dropout(self.link_dropout)  # the MoE layer's rule
        check_str(self.combine, "model.combine", choices=COMBINE_RULES)
        check_str(self.balance_on, "model.balance_on", choices=BALANCE_ON)
        check_bool(self.channel_gate, "model.channel_gate")
        self.check_fields()

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The keys of ``conf/model/<name>.yaml``: ``name`` and the fields."""
        return ("name", *(f.name for f in fields(cls)))

    def check_fields(self) -> None:
        """The checks of the subclass's own fields (ConfigError naming the key)."""

    def check_image_size(self, image_size: int, source: str = "") -> None:
        """ConfigError unless the model takes images of side ``image_size`` (``source``, such as
        ``"data.name=mnist"``, says where the size comes from)."""
        if image_size < 4:
            raise ConfigError(f"model.image_size={image_size}: must be >= 4 (the stem's two 2x poolings)")

    def shape(self, image_size: int | None) -> ModelShape:
        """What the memory estimate reads of this model on images of side ``image_size``
        (None: unknown, a lower bound)."""
        return ModelShape(self.num_experts, self.num_moe_layers, self.d_model, self.hidden_mult, self.layers_key)

    def moe_kwargs(self) -> dict:
        """The keyword arguments of every ``MoELayer`` besides d_model and num_experts."""
        return dict(
            hidden_mult=self.hidden_mult,
            link_dropout=self.link_dropout,
            combine=self.combine,
            balance_on=self.balance_on,
            channel_gate=self.channel_gate,
        )

    def build(self, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
        """The classifier this config describes, for a dataset's channels, classes and image side."""
        return self.classifier(in_channels, num_classes, image_size, config=self)


def check_dataset_dims(in_channels: int, num_classes: int, image_size: int) -> None:
    """ConfigError unless a dataset's channels, classes and image side are integers >= 1."""
    for key, value in (("model.in_channels", in_channels), ("model.num_classes", num_classes), ("model.image_size", image_size)):
        check_int(value, key, minimum=1)


@dataclass
class ModelOutput:
    """Result of a classifier's forward pass.

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


def layer_inputs(x: torch.Tensor, costs: list, specs: list, delivered: list | None, num_layers: int) -> list[tuple]:
    """The routing inputs of each MoE layer, in order: ``(costs, spec, delivered)`` per layer
    (delivered None: perfect CSI), after :func:`check_routing_inputs`."""
    check_routing_inputs(x, costs, specs, num_layers)
    return list(zip(costs, specs, delivered or [None] * num_layers, strict=True))
