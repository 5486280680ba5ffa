"""Your own routing policy, registered from your own module, routing a model like a built-in one.

    python examples/custom_policy.py [--lam 5000] [--steps 40]

``register_policy`` adds a record to the policy table; from then on ``route``, ``RouterSpec``
and ``MoELayer`` accept its name (and a config does, once the module that registers it is
imported).  The policy here is a price rule on the static subcarrier plan: each token takes
every reachable expert whose score beats its energy price, ``s_k - lam * e_k > 0``, at least
its best such expert and at most ``k_max`` of them.  It is a pure, batched function of
tensors, so it runs on the scores' device like the built-in ones.  A tiny classifier is then
trained with it on a made-up task (is the mean of feature 0 positive?).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from dmoe_torch import ChannelConfig, MoELayer, RouterSpec, Selection, WirelessChannel, register_policy, route
from dmoe_torch.selection.baselines import static_costs, static_plan_for

B, D, K, N = 64, 32, 4, 8  # inputs per batch, width, experts (= devices), subcarriers


def price_rule(scores: torch.Tensor, costs: torch.Tensor, args) -> Selection:
    """scores [B, K], costs [B, K, N] J (float64, one device); args.lam [1/J], args.k_max."""
    link = static_costs(costs)  # [B, K]: each expert on its static subcarrier k mod N
    value = (scores - args.lam * link).masked_fill(torch.isinf(link), -torch.inf)
    ranked = value.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(ranked).scatter_(1, ranked, torch.arange(K, device=scores.device).expand_as(ranked))
    best = value.amax(1, keepdim=True)
    take = (rank < args.k_max) & torch.isfinite(value) & ((value > 0) | (value == best))
    energy = torch.where(take, link, torch.zeros_like(link)).sum(1)
    dropped = ~take.any(1)
    false = torch.zeros_like(dropped)
    return Selection(
        mask=take,
        subcarrier=static_plan_for(take, costs.shape[2]),
        energy=energy,
        violation=dropped,
        dropped=dropped,
        nodes=torch.zeros_like(energy, dtype=torch.int64),
        lower_bound=torch.full_like(energy, torch.nan),
        certified=false,
        failed=torch.zeros_like(take),
    )


register_policy(
    "price_rule",
    summary="every expert whose score beats lam times its energy (example)",
    token_solver=price_rule,
    params=("lam", "k_min", "k_max"),
    subcarriers="static",
    channel_aware=True,
)


class TinyClassifier(nn.Module):
    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features, D)
        self.moe = MoELayer(D, K, hidden_mult=2)
        self.head = nn.Linear(D, num_classes)

    def forward(self, x: torch.Tensor, costs: torch.Tensor, spec: RouterSpec):
        routed = self.moe(self.embed(x), costs, spec)
        return self.head(routed.out), routed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lam", type=float, default=5e3, help="price of energy, relevance per joule [1/J]")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.manual_seed(0)
    channel = WirelessChannel(ChannelConfig(num_subcarriers=N), num_devices=K, d_model=D, seed=0)

    # The policy through route(), next to top-2, on one batch of made-up scores.
    scores = torch.softmax(torch.randn(B, K), dim=1)
    costs = channel.costs(torch.arange(B), layer=0, stream=0)
    mine = route("price_rule", scores, costs, lam=args.lam, k_max=2)
    top2 = route("topk", scores, costs, k=2)
    print(
        f"price_rule: {mine.mask.sum(1).double().mean():.2f} experts/input, energy {mine.energy.mean() * 1e6:.2f} µJ; "
        f"topk@2: energy {top2.energy.mean() * 1e6:.2f} µJ"
    )

    data = torch.randn(1024, 6)
    labels = (data[:, 0] > 0).long()
    model = TinyClassifier(in_features=6, num_classes=2)
    spec = RouterSpec("price_rule", lam=args.lam, k_max=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(args.steps):
        ids = torch.randint(0, len(data), (B,))
        costs = channel.costs(ids, layer=0, stream=step + 1)  # a fresh channel draw per step
        logits, routed = model(data[ids], costs, spec)
        loss = F.cross_entropy(logits, labels[ids]) + 0.01 * routed.aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(
        f"trained with price_rule: experts/input {routed.metrics['experts_per_input'].item():.2f}, "
        f"energy {routed.metrics['energy_j'].item() * 1e6:.2f} µJ/input"
    )
    print(f"mean loss of the first 5 steps {first:.3f}, of the last 5 steps {last:.3f}")


if __name__ == "__main__":
    main()
