"""Baseline routing policies on the static subcarrier plan a(k) = k mod N.

Every function is batched and vectorised: scores ``[B, K]`` (rows sum to 1) and per-link
costs ``[B, K, N]`` (joules, ``+inf`` = link in outage) in, a :class:`Selection` out.
Expert k always transmits on its static subcarrier a(k) = k mod N, whose cost is
``costs[b, k, k mod N]``.  The static plan gives every expert its own subcarrier only when
N >= K, so these policies require N >= K (a ValueError otherwise); with N < K two experts
would share one subcarrier in the same frame, which the DMoE protocol does not allow.

Channel-unaware policies (``topk``, ``random_topk``) may select an expert whose static link
is in outage.  That attempt fails: ``failed[b, k]`` is set, the expert's contribution is
lost, and the energy ``failure_energy`` (P_ap * T_max, the downlink spent until the latency
budget ran out) is counted instead of the link energy.  ``dropped[b]`` is set when every
selected link failed (the layer then passes the input through unchanged).

These policies have no relevance target: ``violation`` equals ``dropped``, ``nodes`` is 0,
``lower_bound`` is nan and ``certified`` is False.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .common import Selection, is_int, is_real, validate_inputs
from .static_kernels import static_selection_numpy, topk_mask

__all__ = ["static_subcarriers", "static_costs", "topk", "channel_topk", "random_topk", "dense"]


def static_subcarriers(num_experts: int, num_subcarriers: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Static subcarrier plan a(k) = k mod N as an int64 tensor [K] on ``device`` (default CPU)."""
    return torch.arange(num_experts, dtype=torch.int64, device=device) % num_subcarriers


def static_plan_for(mask: torch.Tensor, num_subcarriers: int) -> torch.Tensor:
    """Subcarriers [B, K] of a static-plan selection: a(k) where mask [B, K] is set, else -1."""
    plan = static_subcarriers(mask.shape[1], num_subcarriers, mask.device).expand_as(mask)
    return torch.where(mask, plan, torch.full_like(plan, -1))


def static_costs(costs: torch.Tensor) -> torch.Tensor:
    """Costs [B, K, N] -> [B, K]: each expert's cost on its static subcarrier k mod N."""
    B, K, N = costs.shape
    if N >= K:  # a(k) = k: the diagonal, a view (a gather of 12,544 rows costs ~8 ms on a core)
        return costs.diagonal(dim1=1, dim2=2)
    plan = static_subcarriers(K, N, costs.device)
    return costs.gather(2, plan.view(1, K, 1).expand(B, K, 1)).squeeze(2)


def check_static_plan(costs: torch.Tensor) -> None:
    K, N = costs.shape[1], costs.shape[2]
    if N < K:
        raise ValueError(
            f"costs has N={N} subcarriers for K={K} experts: the static subcarrier plan "
            "a(k) = k mod N needs N >= K (use policy 'jesa' or 'optimal' when N < K)"
        )


def check_k(k, num_experts: int) -> int:
    if not is_int(k):
        raise ValueError(f"k must be an int, got {k!r}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be in [1, K={num_experts}], got {k}")
    return int(k)


def check_failure_energy(failure_energy) -> float:
    if not is_real(failure_energy):
        raise ValueError(f"failure_energy must be a float >= 0 (joules), got {failure_energy!r}")
    value = float(failure_energy)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"failure_energy must be a finite float >= 0 (joules), got {failure_energy!r}")
    return value


def check_generator(generator):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def _validate(scores: torch.Tensor, costs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s, c, _, _, _ = validate_inputs(scores, costs, 1.0, 1, None, cost_ndim=3)
    check_static_plan(c)
    return s, c


def _static_selection(mask: torch.Tensor, costs: torch.Tensor, failure_energy: float, most_selected: int) -> Selection:
    """Build the Selection of a static-plan policy from its mask [B, K] (at most
    ``most_selected`` experts per row) and costs [B, K, N]."""
    # On the CPU one numba pass instead of ~10 torch ops (static_kernels.py).  Only for at
    # most two links a row: a sum of two energies has one rounding, so the bits are torch's.
    if mask.device.type == "cpu" and most_selected <= 2:
        return _static_selection_cpu(mask, costs, failure_energy)
    return _static_selection_torch(mask, costs, failure_energy)


def _static_selection_cpu(mask: torch.Tensor, costs: torch.Tensor, failure_energy: float) -> Selection:
    B, N = mask.shape[0], costs.shape[2]
    subcarrier, failed, energy, dropped, overrun = static_selection_numpy(
        mask.numpy(), static_costs(costs).numpy(), failure_energy, N
    )
    return Selection(
        mask=mask,
        subcarrier=torch.from_numpy(subcarrier),
        energy=torch.from_numpy(energy),
        violation=torch.from_numpy(dropped.copy()),
        dropped=torch.from_numpy(dropped),
        nodes=torch.from_numpy(np.zeros(B, dtype=np.int64)),
        lower_bound=torch.from_numpy(np.full(B, np.nan)),
        certified=torch.from_numpy(np.zeros(B, dtype=np.bool_)),
        failed=torch.from_numpy(failed),
        frame_overrun=torch.from_numpy(overrun),
    )


def _static_selection_torch(mask: torch.Tensor, costs: torch.Tensor, failure_energy: float) -> Selection:
    B, K, N = costs.shape
    link_cost = static_costs(costs).contiguous()  # one copy: the ops below on the strided view cost 3x
    failed = mask & torch.isinf(link_cost)
    delivered = mask & ~failed
    energy = torch.where(delivered, link_cost, 0.0).sum(1)
    energy = energy + failure_energy * failed.sum(1).to(torch.float64)
    dropped = ~delivered.any(1)
    subcarrier = static_plan_for(mask, N)
    return Selection(
        mask=mask,
        subcarrier=subcarrier,
        energy=energy,
        violation=dropped.clone(),
        dropped=dropped,
        nodes=torch.zeros(B, dtype=torch.int64, device=mask.device),
        lower_bound=torch.full((B,), math.nan, dtype=torch.float64, device=mask.device),
        certified=torch.zeros(B, dtype=torch.bool, device=mask.device),
        failed=failed,
    )


def _mask_from_ranking(ranked_experts: torch.Tensor, count: int, num_experts: int) -> torch.Tensor:
    """Mask [B, K] with the first `count` experts of each row of ranked_experts [B, K]."""
    B = ranked_experts.shape[0]
    mask = torch.zeros(B, num_experts, dtype=torch.bool, device=ranked_experts.device)
    mask.scatter_(1, ranked_experts[:, :count], True)
    return mask


def topk(scores: torch.Tensor, costs: torch.Tensor, k: int, *, failure_energy: float = 0.0) -> Selection:
    """The k experts with the highest scores (ties: lower index first), channel-blind.

    scores [B, K]; costs [B, K, N] in J (+inf = outage).  Selected experts whose static link
    is in outage are marked ``failed`` and cost ``failure_energy`` J each.
    """
    s, c = _validate(scores, costs)
    return topk_validated(s, c, check_k(k, s.shape[1]), check_failure_energy(failure_energy))


def topk_validated(s: torch.Tensor, c: torch.Tensor, k: int, failure_energy: float) -> Selection:
    """:func:`topk` on checked inputs (float64 scores [B, K], costs [B, K, N] on one device, N >= K)."""
    if s.device.type == "cpu":
        return _static_selection(torch.from_numpy(topk_mask(s.numpy(), k)), c, failure_energy, k)
    return _static_selection(_mask_from_ranking(_top_scores(s, k), k, s.shape[1]), c, failure_energy, k)


# Up to this k, top-k takes k argmax passes (each ~0.4 ms at 12,544 x 8 on a core) instead of
# a stable sort (~1.5 ms); both rank ties to the lower index.
_ARGMAX_PASSES = 3


def _top_scores(s: torch.Tensor, k: int) -> torch.Tensor:
    """int64 [B, >= k]: each row's experts by descending score, ties to the lower index (the
    first k columns are what a stable descending sort gives)."""
    if k > _ARGMAX_PASSES:
        return torch.sort(s, dim=1, descending=True, stable=True).indices
    work = s.clone()
    picks = []
    for _ in range(k):  # argmax returns the first maximal index
        pick = work.argmax(1, keepdim=True)
        picks.append(pick)
        work.scatter_(1, pick, -math.inf)
    return torch.cat(picks, 1)


def channel_topk(scores: torch.Tensor, costs: torch.Tensor, k: int, *, failure_energy: float = 0.0) -> Selection:
    """The k cheapest reachable experts on their static subcarriers, relevance-blind.

    Rows with fewer than k reachable experts select all reachable ones; rows with none are
    dropped.  Ties in cost: lower index first.  Never selects a link in outage.
    """
    s, c = _validate(scores, costs)
    return channel_topk_validated(s, c, check_k(k, s.shape[1]), check_failure_energy(failure_energy))


def channel_topk_validated(s: torch.Tensor, c: torch.Tensor, k: int, failure_energy: float) -> Selection:
    """:func:`channel_topk` on checked inputs."""
    link_cost = static_costs(c)
    ranking = torch.sort(link_cost, dim=1, stable=True).indices
    mask = _mask_from_ranking(ranking, k, s.shape[1]) & torch.isfinite(link_cost)
    return _static_selection(mask, c, failure_energy, k)


def random_topk(
    scores: torch.Tensor,
    costs: torch.Tensor,
    k: int,
    generator: torch.Generator | None = None,
    *,
    failure_energy: float = 0.0,
) -> Selection:
    """k experts drawn uniformly without replacement per row, channel- and relevance-blind.

    generator: a CPU torch.Generator for reproducibility (None: torch's global generator).
    """
    s, c = _validate(scores, costs)
    k = check_k(k, s.shape[1])
    return random_topk_validated(s, c, k, check_generator(generator), check_failure_energy(failure_energy))


def random_topk_validated(
    s: torch.Tensor, c: torch.Tensor, k: int, generator: torch.Generator | None, failure_energy: float
) -> Selection:
    """:func:`random_topk` on checked inputs."""
    B, K = s.shape
    # Ranking i.i.d. uniform keys gives a uniformly random permutation per row.  The keys come
    # from the CPU generator on every device, so a seed gives the same experts everywhere.
    keys = torch.rand(B, K, generator=generator, dtype=torch.float64).to(s.device, non_blocking=True)
    ranking = torch.argsort(keys, dim=1)
    return _static_selection(_mask_from_ranking(ranking, k, K), c, failure_energy, k)


def dense(scores: torch.Tensor, costs: torch.Tensor, *, failure_energy: float = 0.0) -> Selection:
    """Every reachable expert on its static subcarrier (the dense mixture over the reachable set).

    Rows with no reachable expert are dropped.  Never selects a link in outage.
    """
    s, c = _validate(scores, costs)
    return dense_validated(s, c, check_failure_energy(failure_energy))


def dense_validated(s: torch.Tensor, c: torch.Tensor, failure_energy: float) -> Selection:
    """:func:`dense` on checked inputs."""
    return _static_selection(torch.isfinite(static_costs(c)), c, failure_energy, s.shape[1])
