"""Two classic heuristics for the energy-relevance trade-off: ``lagrangian`` and ``greedy``.

Both choose experts on c*_k = min_n e_{k,n} (each expert on its own cheapest subcarrier, as
JESA's first step does) and then give the chosen experts distinct subcarriers by a
maximum-cardinality, minimum-cost assignment (enumeration over each expert's cheapest links,
as enumerate.py); a chosen expert left without a finite link leaves the selection.  So they
are JESA's first step with DES replaced by a one-line rule, and the energy-accuracy frontier
(docs/method.md, "Is exactness worth it?") compares like with like.  Batched tensor algebra
on the scores' device, no host sync up to k_max = 3 (larger sets are assigned by the numba
Hungarian algorithm on the CPU).

lagrangian (the Lagrangian dual rule of P1, multiplier lam [1/J]):
    value v_k = s_k - lam * c*_k (unreachable: -inf); per input take the k_min experts of
    highest value, then every further one with v_k > 0, at most k_max (ties: lower index).
    Sweeping lam from 0 to large traces the convex hull of P1's relevance-energy curve.
    No relevance target: violation = dropped or fewer than k_min reachable experts.
greedy (the knapsack ratio rule, target gamma):
    reachable experts in order of s_k / c*_k (descending; c* = 0 first; ties: lower index)
    until the relevance reaches gamma - RELEVANCE_TOL or k_max experts are taken; then, if
    fewer than k_min, the cheapest (by c*) remaining reachable experts up to k_min.
    violation: the target or k_min is missed.

Both: energy = sum of the assigned links [J]; certified False; lower_bound nan; nodes 0.
"""

from __future__ import annotations

import math

import torch

from .common import RELEVANCE_TOL, Selection
from .enumerate import MAX_SET_SIZE, _assign_mask, _ranked_links, _selection
from .jesa import min_cost_assignment

__all__ = ["lagrangian_select", "greedy_select"]


def _ranks(keys: torch.Tensor, descending: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(position [B, K] int64 of each expert, the experts in that order [B, K]) when each row
    is sorted by keys (stable: ties by index)."""
    order = torch.sort(keys, dim=1, descending=descending, stable=True).indices
    positions = torch.arange(keys.shape[1], device=keys.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions), order


def _links(costs3: torch.Tensor, take: torch.Tensor, k_max: int) -> torch.Tensor:
    """Subcarriers [B, K] int64 of the chosen experts take [B, K] (at most k_max per row) by a
    maximum-cardinality, minimum-cost assignment; -1 where not chosen or left without a link.
    Enumeration on the device up to MAX_SET_SIZE experts, the numba Hungarian beyond."""
    if k_max <= MAX_SET_SIZE:
        rank_cost, rank_sub = _ranked_links(costs3, min(k_max, costs3.shape[2]))
        return _assign_mask(rank_cost, rank_sub, take, k_max)[0]
    subcarrier, _ = min_cost_assignment(costs3.cpu().numpy(), take.cpu().numpy())
    return torch.from_numpy(subcarrier).to(take.device)


def _assigned(
    scores: torch.Tensor, costs3: torch.Tensor, take: torch.Tensor, k_min: int, k_max: int, gamma: float | None
) -> Selection:
    """Give the chosen experts take [B, K] distinct subcarriers and build the Selection
    (violation: fewer than k_min experts, or relevance below gamma when gamma is set)."""
    subcarrier = _links(costs3, take, k_max)
    mask = take & (subcarrier >= 0)
    link = costs3.gather(2, subcarrier.clamp(min=0).unsqueeze(2)).squeeze(2)
    energy = torch.where(mask, link, torch.zeros_like(link)).sum(1)
    violation = mask.sum(1) < k_min  # dropped rows (no expert) included
    if gamma is not None:
        violation |= torch.where(mask, scores, 0.0).sum(1) < gamma - RELEVANCE_TOL
    return _selection(
        mask, torch.where(mask, subcarrier, -1), energy, violation, torch.full_like(energy, math.nan), torch.zeros_like(violation)
    )


def lagrangian_select(scores: torch.Tensor, costs3: torch.Tensor, lam: float, k_min: int, k_max: int) -> Selection:
    """The lagrangian policy.  scores [B, K] float64, costs3 [B, K, N] float64 J (+inf outage),
    lam >= 0 [1/J], 1 <= k_min <= k_max <= K (validated).  Returns a Selection on the device."""
    k_max = min(k_max, costs3.shape[2])
    best = costs3.amin(2)
    reachable = torch.isfinite(best)
    value = torch.where(reachable, scores - lam * torch.where(reachable, best, 0.0), -math.inf)
    rank, _ = _ranks(value, descending=True)
    take = reachable & (rank < k_max) & ((rank < k_min) | (value > 0))
    return _assigned(scores, costs3, take, k_min, k_max, None)


def greedy_select(scores: torch.Tensor, costs3: torch.Tensor, gamma: float, k_min: int, k_max: int) -> Selection:
    """The greedy policy.  scores [B, K] float64, costs3 [B, K, N] float64 J (+inf outage),
    gamma in (0, 1], 1 <= k_min <= k_max <= K (validated).  Returns a Selection on the device."""
    k_max = min(k_max, costs3.shape[2])
    best = costs3.amin(2)
    reachable = torch.isfinite(best)
    ratio = torch.where(best > 0, scores / best.clamp_min(torch.finfo(best.dtype).tiny), math.inf)
    ratio = torch.where(reachable, ratio, -1.0)  # unreachable experts come last (ratios are >= 0)
    rank, in_order = _ranks(ratio, descending=True)
    relevance = torch.where(reachable, scores, 0.0).gather(1, in_order).cumsum(1)  # [B, K] after i + 1 experts
    reached = relevance >= gamma - RELEVANCE_TOL
    # experts needed to reach gamma: the first position where it is reached, + 1 (K if never)
    needed = torch.where(reached.any(1), reached.to(torch.int64).argmax(1) + 1, scores.shape[1])
    count = torch.minimum(needed, torch.full_like(needed, k_max))
    take = reachable & (rank < count[:, None])
    # cheapest feasible completion up to k_min
    missing = (k_min - take.sum(1)).clamp(min=0)
    spare_cost = torch.where(reachable & ~take, best, math.inf)
    cheap_rank, _ = _ranks(spare_cost, descending=False)
    take = take | (reachable & ~take & (cheap_rank < missing[:, None]))
    return _assigned(scores, costs3, take, k_min, k_max, gamma)
