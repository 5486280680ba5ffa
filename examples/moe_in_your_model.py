"""The wireless-aware MoE layer inside your own nn.Module, trained for a few steps.

    python examples/moe_in_your_model.py [--policy des|jesa|topk] [--steps 40]

A tiny transformer classifier whose block has its MLP replaced by ``MoELayer``: K experts
on K edge devices, each token routed by JESA (or DES, or top-k) on the energies of a
``WirelessChannel``.  ``MoELayer.forward(h [R, d], costs [R, K, N] J, spec)`` takes one row
per routed frame (here: a token), adds the residual itself (``out = h + sum_k w_k f_k(h)``)
and returns the load-balancing loss, the Selection and per-batch metrics (``energy_j`` per
token, ``experts_per_input``, ``outage_rate``, ...).  The task is made up: is the mean of
feature 0 over a sequence's tokens positive?
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from dmoe_torch import ChannelConfig, MoELayer, RouterSpec, WirelessChannel

B, T, D, K = 32, 8, 32, 4  # sequences per batch, tokens per sequence, width, experts


class MoEBlock(nn.Module):
    """Pre-LayerNorm attention, then the MoE layer in place of the MLP (it adds the residual)."""

    def __init__(self, d_model: int, num_heads: int, num_experts: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.moe = MoELayer(d_model, num_experts, hidden_mult=2)

    def forward(self, x: torch.Tensor, costs: torch.Tensor, spec: RouterSpec):
        """x [B, T, d]; costs [B*T, K, N] J (one row per token).  Returns (x, MoEOutput)."""
        h = self.norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        routed = self.moe(x.reshape(-1, x.shape[-1]), costs, spec)
        return routed.out.reshape(x.shape), routed


class TinyClassifier(nn.Module):
    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features, D)
        self.block = MoEBlock(D, num_heads=4, num_experts=K)
        self.head = nn.Linear(D, num_classes)

    def forward(self, tokens: torch.Tensor, costs: torch.Tensor, spec: RouterSpec):
        x, routed = self.block(self.embed(tokens), costs, spec)
        return self.head(x.mean(1)), routed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="jesa", choices=("des", "jesa", "topk"))
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.manual_seed(0)

    data = torch.randn(512, T, 6)
    labels = (data[:, :, 0].mean(1) > 0).long()
    model = TinyClassifier(in_features=6, num_classes=2)
    channel = WirelessChannel(ChannelConfig(num_subcarriers=8), num_devices=K, d_model=D, seed=0)
    spec = RouterSpec(args.policy, gamma=0.6, k=2, failure_energy=channel.failure_energy_j)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    losses = []
    for step in range(args.steps):
        ids = torch.randint(0, len(data), (B,))
        # Frame id of token t of sequence i: i * T + t; a fresh channel draw (stream) per step.
        frames = (ids[:, None] * T + torch.arange(T)).flatten()
        costs = channel.costs(frames, layer=0, stream=step)  # [B*T, K, N] J
        logits, routed = model(data[ids], costs, spec)
        loss = F.cross_entropy(logits, labels[ids]) + 0.01 * routed.aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            m = routed.metrics
            print(
                f"step {step:3d}: loss {loss.item():.3f}, energy {m['energy_j'].item() * 1e6:.2f} µJ/token, "
                f"experts/token {m['experts_per_input'].item():.2f}, outage {m['outage_rate'].item():.3f}"
            )
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"mean loss of the first 5 steps {first:.3f}, of the last 5 steps {last:.3f}")


if __name__ == "__main__":
    main()
