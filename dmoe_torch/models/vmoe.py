"""V-MoE-style vision transformer whose MoE feed-forward blocks route every patch token.

image [B, C, H, W] -> (optional conv stem) -> patch embedding [B, T, d] + learned positions
(+ optional class token) -> ``depth`` pre-LayerNorm transformer blocks -> LayerNorm ->
mean over tokens (or the class token) -> linear head.

Every ``moe_every``-th block (blocks moe_every-1, 2 moe_every-1, ... counted from 0; V-MoE's
"every 2" puts MoE in blocks 1, 3, 5 of a depth-6 model) replaces its MLP by a
:class:`~dmoe_torch.moe.MoELayer` of K experts; the other blocks keep a dense MLP (the same
pre-LayerNorm MLP as an expert).  Every token of every image is one input of the DMoE
protocol: an MoE block routes all B*T tokens of the batch in one call, each on its own
channel draw (frame id ``sample_id * T + token``, see ``tokens_per_input``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..moe import Expert, MoELayer, RouterSpec
from ..utils import ConfigError, check_bool, check_int, check_str
from .common import ModelConfig, ModelOutput, ModelShape, check_dataset_dims, layer_inputs

__all__ = ["VMoEConfig", "VMoEClassifier", "STEMS"]

STEMS = ("conv", "conv2", "linear")


@dataclass(frozen=True)
class VMoEConfig(ModelConfig):
    """``model=vmoe`` (conf/model/vmoe.yaml): the fields of ModelConfig and

    depth        transformer blocks
    moe_every    every moe_every-th block is an MoE block (depth // moe_every of them)
    num_heads    attention heads (must divide d_model)
    patch_size   P: tokens = (image_size / P)^2 (+1 with a class token)
    class_token  prepend a learned class token and classify from it (else: mean of the tokens)
    stem         "conv": a 3x3 conv-BN-GELU layer (d_model / 2 channels) before the patch
                 embedding; "conv2": that layer, then a stride-2 3x3 conv-BN-GELU (d_model
                 channels), and patches of patch_size / 2 on the half-size map (the same tokens;
                 patch_size must be even); "linear": patch embedding of the raw pixels only
    """

    layers_key: ClassVar[str] = "model.depth"

    depth: int = 4
    moe_every: int = 2
    num_heads: int = 4
    patch_size: int = 4
    class_token: bool = False
    stem: str = "conv"

    def check_fields(self) -> None:
        depth = check_int(self.depth, "model.depth", minimum=1)
        why = f"at most model.depth={depth}, else no block is an MoE block"
        check_int(self.moe_every, "model.moe_every", minimum=1, maximum=depth, why=why)
        check_int(self.num_heads, "model.num_heads", minimum=1)
        if self.d_model % self.num_heads:
            raise ConfigError(f"model.num_heads={self.num_heads}: must divide model.d_model={self.d_model}")
        check_int(self.patch_size, "model.patch_size", minimum=1)
        check_bool(self.class_token, "model.class_token")
        if check_str(self.stem, "model.stem", choices=STEMS) == "conv2" and self.patch_size % 2:
            raise ConfigError(
                f"model.patch_size={self.patch_size}: must be even with model.stem=conv2 (its stride-2 conv halves the image)"
            )

    @property
    def num_moe_layers(self) -> int:
        return self.depth // self.moe_every

    def check_image_size(self, image_size: int, source: str = "") -> None:
        if image_size % self.patch_size:
            divisors = [p for p in range(1, image_size + 1) if image_size % p == 0]
            of = f" of {source}" if source else ""
            raise ConfigError(
                f"model.patch_size={self.patch_size}: must divide the image size {image_size}{of} "
                f"(one of {', '.join(map(str, divisors))})"
            )

    def tokens_per_input(self, image_size: int | None) -> int:
        return ((image_size or self.patch_size) // self.patch_size) ** 2 + int(self.class_token)

    def shape(self, image_size: int | None) -> ModelShape:
        d, L, tokens = self.d_model, self.num_moe_layers, self.tokens_per_input(image_size)
        # attention (4 d^2) in every block, a dense MLP in the blocks without experts
        return ModelShape(
            self.num_experts,
            L,
            d,
            self.hidden_mult,
            layers_key=self.layers_key,
            tokens_per_input=tokens,
            block_params=self.depth * 4 * d**2 + (self.depth - L) * 2 * self.hidden_mult * d**2,
            block_keys=("model.depth", "model.d_model"),
            blocks=self.depth,
            attention_per_block=self.num_heads * tokens**2,
        )


def _conv_bn_gelu(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    """3x3 conv (padding 1) -> BatchNorm -> GELU; [B, in, H, W] -> [B, out, H / stride, W / stride].
    Returned as a list so that the stem is one flat Sequential (parameter names stem.0, stem.1, ...)."""
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.GELU(),
    ]


class Attention(nn.Module):
    """Multi-head self-attention (fused scaled-dot-product kernel).  x [B, T, d] -> [B, T, d]."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN(x)), then the MLP part.

    The MLP part is residual in both kinds of block: ``x + f(x)`` with f a pre-LayerNorm MLP
    (:class:`~dmoe_torch.moe.Expert`) for dense blocks, and ``x + sum_k w_k f_k(x)`` over the
    routed experts for MoE blocks (the residual is added inside :class:`MoELayer`).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        hidden_mult: int,
        num_experts: int | None,
        link_dropout: float = 0.0,
        combine: str = "renormalized",
        balance_on: str = "selection",
        channel_gate: bool = False,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, num_heads)
        self.moe = (
            MoELayer(
                d_model, num_experts, hidden_mult, link_dropout, combine=combine, balance_on=balance_on, channel_gate=channel_gate
            )
            if num_experts
            else None
        )
        self.mlp = None if num_experts else Expert(d_model, hidden_mult)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x))
        if self.mlp is not None:
            x = x + self.mlp(x)
        return x


class VMoEClassifier(nn.Module):
    """Token-level DMoE classifier.

    in_channels, num_classes, image_size  from the dataset (image_size: H = W)
    config   a VMoEConfig, or its fields as keyword arguments (d_model: token width; depth,
             moe_every, num_heads, patch_size, class_token, stem and those of ModelConfig)
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, config: VMoEConfig | None = None, **fields) -> None:
        super().__init__()
        config = config or VMoEConfig(**fields)
        check_dataset_dims(in_channels, num_classes, image_size)
        config.check_image_size(image_size)
        self.config = config
        d_model, num_heads, patch_size, stem = config.d_model, config.num_heads, config.patch_size, config.stem
        depth, moe_every = config.depth, config.moe_every
        self.num_experts = config.num_experts
        self.moe_block_ids = [i for i in range(depth) if (i + 1) % moe_every == 0]
        self.num_moe_layers = len(self.moe_block_ids)
        self.tokens_per_input = config.tokens_per_input(image_size)

        embed_patch = patch_size
        if stem == "linear":
            width = in_channels
            self.stem = nn.Identity()
        else:
            width = max(d_model // 2, 8)
            layers = _conv_bn_gelu(in_channels, width, stride=1)
            if stem == "conv2":
                layers += _conv_bn_gelu(width, d_model, stride=2)
                width, embed_patch = d_model, patch_size // 2
            self.stem = nn.Sequential(*layers)
        self.patch_embed = nn.Conv2d(width, d_model, kernel_size=embed_patch, stride=embed_patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, d_model)) if config.class_token else None
        self.pos_embed = nn.Parameter(torch.randn(1, self.tokens_per_input, d_model) * 0.02)
        self.blocks = nn.ModuleList(
            Block(
                d_model,
                num_heads,
                config.hidden_mult,
                config.num_experts if i in self.moe_block_ids else None,
                config.link_dropout,
                config.combine,
                config.balance_on,
                config.channel_gate,
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [self.blocks[i].moe for i in self.moe_block_ids]

    def forward(
        self,
        x: torch.Tensor,
        costs: list[torch.Tensor],
        specs: list[RouterSpec],
        generator: torch.Generator | None = None,
        delivered: list[torch.Tensor | None] | None = None,
    ) -> ModelOutput:
        """x [B, C, H, W]; costs: one float64 CPU tensor [B*T, K, N] per MoE block (J, +inf =
        outage), row b*T + t for token t of image b; specs: one RouterSpec per MoE block;
        delivered: None (perfect CSI) or one bool tensor [B*T, K, N] per MoE block (see
        MoELayer.forward).  Selections in the output have B*T rows in the same order."""
        inputs = layer_inputs(x, costs, specs, delivered, self.num_moe_layers)
        tokens = self.patch_embed(self.stem(x)).flatten(2).transpose(1, 2)  # [B, T, d]
        if self.class_token is not None:
            tokens = torch.cat([self.class_token.expand(len(x), -1, -1), tokens], dim=1)
        h = tokens + self.pos_embed
        B, T, d = h.shape
        results = []
        for block in self.blocks:
            h = block(h)
            if block.moe is not None:
                layer_costs, spec, layer_delivered = inputs[len(results)]
                results.append(block.moe(h.reshape(B * T, d), layer_costs, spec, generator=generator, delivered=layer_delivered))
                h = results[-1].out.view(B, T, d)
        h = self.norm(h)
        pooled = h[:, 0] if self.class_token is not None else h.mean(1)
        return ModelOutput.from_layers(self.head(pooled), results)


VMoEConfig.classifier = VMoEClassifier
