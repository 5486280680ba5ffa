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

import torch
from torch import nn

from ..moe import Expert, MoELayer, RouterSpec, check_positive_int
from .cnn import ModelOutput, check_routing_inputs

__all__ = ["VMoEClassifier", "STEMS"]

STEMS = ("conv", "conv2", "linear")


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
    d_model      token width (the hidden state sent to an expert)
    num_experts  K experts per MoE block (device k hosts expert k of every block)
    depth        transformer blocks
    moe_every    every moe_every-th block is an MoE block (depth // moe_every of them)
    num_heads    attention heads (must divide d_model)
    patch_size   P: tokens = (image_size / P)^2 (+1 with a class token)
    hidden_mult  MLP / expert hidden width = hidden_mult * d_model
    class_token  prepend a learned class token and classify from it (else: mean of the tokens)
    link_dropout training-time link dropout of every MoE block (see MoELayer)
    combine      combine rule of every MoE block (moe.COMBINE_RULES, see MoELayer)
    balance_on   what the load-balancing loss counts (moe.BALANCE_ON, see MoELayer)
    channel_gate the learned channel-aware gate in every MoE layer (see MoELayer)
    stem         "conv": a 3x3 conv-BN-GELU layer (d_model / 2 channels) before the patch
                 embedding; "conv2": that layer, then a stride-2 3x3 conv-BN-GELU (d_model
                 channels), and patches of patch_size / 2 on the half-size map (the same tokens;
                 patch_size must be even); "linear": patch embedding of the raw pixels only
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        d_model: int = 64,
        num_experts: int = 8,
        depth: int = 4,
        moe_every: int = 2,
        num_heads: int = 4,
        patch_size: int = 4,
        hidden_mult: int = 2,
        class_token: bool = False,
        stem: str = "conv",
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
            ("model.moe_every", moe_every),
            ("model.num_heads", num_heads),
            ("model.patch_size", patch_size),
            ("model.hidden_mult", hidden_mult),
        ):
            check_positive_int(key, value)
        if image_size % patch_size:
            raise ValueError(f"model.patch_size={patch_size} must divide the image size {image_size}")
        if moe_every > depth:
            raise ValueError(f"model.moe_every={moe_every} must be <= model.depth={depth} (else no block is an MoE block)")
        if d_model % num_heads:
            raise ValueError(f"model.d_model={d_model} must be divisible by model.num_heads={num_heads}")
        if stem not in STEMS:
            raise ValueError(f"model.stem={stem!r} must be one of {', '.join(STEMS)}")
        if stem == "conv2" and patch_size % 2:
            raise ValueError(
                f"model.patch_size={patch_size} must be even with model.stem=conv2 (its stride-2 conv halves the image)"
            )
        self.num_experts = num_experts
        self.moe_block_ids = [i for i in range(depth) if (i + 1) % moe_every == 0]
        self.num_moe_layers = len(self.moe_block_ids)
        num_patches = (image_size // patch_size) ** 2
        self.tokens_per_input = num_patches + int(class_token)

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
        self.class_token = nn.Parameter(torch.zeros(1, 1, d_model)) if class_token else None
        self.pos_embed = nn.Parameter(torch.randn(1, self.tokens_per_input, d_model) * 0.02)
        self.blocks = nn.ModuleList(
            Block(
                d_model,
                num_heads,
                hidden_mult,
                num_experts if i in self.moe_block_ids else None,
                link_dropout,
                combine,
                balance_on,
                channel_gate,
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
        L = self.num_moe_layers
        check_routing_inputs(x, costs, specs, L)
        tokens = self.patch_embed(self.stem(x)).flatten(2).transpose(1, 2)  # [B, T, d]
        if self.class_token is not None:
            tokens = torch.cat([self.class_token.expand(len(x), -1, -1), tokens], dim=1)
        h = tokens + self.pos_embed
        B, T, d = h.shape
        results = []
        delivered = delivered or [None] * L
        for block in self.blocks:
            h = block(h)
            if block.moe is not None:
                index = len(results)
                results.append(
                    block.moe(h.reshape(B * T, d), costs[index], specs[index], generator=generator, delivered=delivered[index])
                )
                h = results[-1].out.view(B, T, d)
        h = self.norm(h)
        pooled = h[:, 0] if self.class_token is not None else h.mean(1)
        return ModelOutput.from_layers(self.head(pooled), results)
