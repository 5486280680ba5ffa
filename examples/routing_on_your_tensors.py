"""DES, JESA and the baselines on your own scores and energies (no model, no channel).

    python examples/routing_on_your_tensors.py

Inputs of every policy: ``scores`` [B, K], the gate's probabilities (rows sum to 1), and
``costs`` [B, K, N], the energy in joules of sending input b to expert k on subcarrier n
(``+inf``: the link is in outage).  Each returns a ``Selection`` of the batch:

    mask [B, K] bool         the experts chosen for each input
    subcarrier [B, K] int64  the subcarrier of each chosen expert (-1 where not chosen)
    energy [B] float64       joules spent on the chosen links
    violation [B] bool       gamma was out of reach with k_max reachable experts (fallback used)
    dropped [B] bool         no expert reachable: the input passes the layer unchanged
    certified [B] bool       the choice is proven optimal (des: P1, jesa: P2)
    nodes, lower_bound [B]   branch-and-bound nodes explored and the proven energy bound
    failed [B, K] bool       chosen links in outage (channel-unaware baselines only)

des solves P1: the cheapest expert set whose scores reach gamma, each expert on its fixed
subcarrier k mod N; jesa solves P2: the experts *and* distinct subcarriers together.
"""

from __future__ import annotations

import torch

from dmoe_torch import Selection, des, jesa, milp_p2, route

B, K, N = 6, 5, 8  # inputs, experts, subcarriers
GAMMA = 0.7  # importance factor: the chosen experts' scores must sum to at least this


def make_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [B, K] (softmax of random logits); costs [B, K, N] in J, a few links in outage."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.softmax(2 * torch.randn(B, K, generator=generator), dim=1)
    costs = 1e-6 * torch.rand(B, K, N, generator=generator, dtype=torch.float64) * torch.arange(1, K + 1)[:, None]
    costs[torch.rand(B, K, N, generator=generator) < 0.1] = torch.inf
    return scores, costs


def describe(name: str, sel: Selection, scores: torch.Tensor) -> None:
    """One line per input: chosen experts (expert@subcarrier), their score mass, energy."""
    print(
        f"{name}: energy {sel.energy.sum().item() * 1e6:.3f} µJ for the batch, "
        f"certified {int(sel.certified.sum())}/{B}, violations {int(sel.violation.sum())}"
    )
    for b in range(B):
        chosen = [f"{k}@{int(sel.subcarrier[b, k])}" for k in range(K) if sel.mask[b, k]]
        mass = scores[b][sel.mask[b]].sum().item()
        print(
            f"  input {b}: experts {' '.join(chosen) or '-'}  score mass {mass:.2f}  energy {sel.energy[b].item() * 1e6:.3f} µJ"
        )


def feasible(sel: Selection, scores: torch.Tensor, costs: torch.Tensor, gamma: float | None) -> bool:
    """Every row: energy = sum of its chosen links' costs, distinct subcarriers, and (for the
    gamma policies) score mass >= gamma unless the row is a violation."""
    for b in range(B):
        experts = sel.mask[b].nonzero().flatten()
        subcarriers = sel.subcarrier[b, experts]
        if len(set(subcarriers.tolist())) != len(experts):
            return False
        link_energy = costs[b, experts, subcarriers].sum().item()
        if not sel.failed[b].any() and abs(link_energy - sel.energy[b].item()) > 1e-12:
            return False
        if gamma is not None and not sel.violation[b] and scores[b, experts].sum() < gamma - 1e-6:
            return False
    return True


def main() -> None:
    scores, costs = make_inputs()
    # The functions themselves: des takes the costs of the fixed plan [B, K]; jesa all of [B, K, N].
    static = costs[:, torch.arange(K), torch.arange(K) % N]
    p1 = des(scores, static, gamma=GAMMA)
    print(f"des (direct call, fixed plan): energy {p1.energy.sum().item() * 1e6:.3f} µJ")
    # route(): the one entry point the MoE layer uses, for every policy, on costs [B, K, N].
    selections = {
        "des": route("des", scores, costs, gamma=GAMMA),
        "jesa": jesa(scores, costs, gamma=GAMMA),
        "topk@2": route("topk", scores, costs, k=2, failure_energy=2e-4),
        "channel_topk@2": route("channel_topk", scores, costs, k=2),
        "optimal (MILP)": milp_p2(scores, costs, gamma=GAMMA),
    }
    for name, sel in selections.items():
        describe(name, sel, scores)
    gamma_policies = ("des", "jesa", "optimal (MILP)")
    ok = all(feasible(sel, scores, costs, GAMMA if name in gamma_policies else None) for name, sel in selections.items())
    print(f"all selections feasible: {ok}")
    energy = {name: sel.energy.sum().item() for name, sel in selections.items()}
    # JESA may use any free subcarrier, so it never needs more than DES's fixed plan, and it
    # matches the MILP optimum of P2.
    print(f"jesa <= des: {energy['jesa'] <= energy['des'] + 1e-12}")
    print(f"jesa == optimal: {abs(energy['jesa'] - energy['optimal (MILP)']) <= 1e-9 * energy['jesa']}")


if __name__ == "__main__":
    main()
