"""P3: the image frame, where the tokens of one image share the band (docs/method.md section 11).

One frame = (image, MoE layer).  Its T tokens see one channel: link energies e [K, N] (J per
token and link, downlink + uplink, +inf in outage) and link capacities c [K, N] (whole
tokens a link carries within T_max on both hops, 0 in outage).  The plan partitions the N
subcarriers among the devices (``owner`` [N], -1 idle) and chooses each token's experts;
device k's tokens fill its subcarriers, each (token, expert) pair on one subcarrier, at most
c[k, n] tokens on link (k, n).  Energy = sum over links of e[k, n] x tokens carried.

    minimise    sum_{k,n} e[k,n] w[k,n]
    subject to  sum_n w[k,n] = sum_t x[t,k],  0 <= w[k,n] <= c[k,n] z[k,n],  sum_k z[k,n] <= 1,
                sum_k s[t,k] x[t,k] >= gamma - RELEVANCE_TOL,  k_min <= sum_k x[t,k] <= k_max.

Shapes: F frames, T tokens per frame, K devices (experts), N subcarriers.  Every function is
batched over frames; the per-frame work runs in numba loops (no Python loop over frames).

This module is the frame's data model, what the other layers import: :class:`FrameSelection`,
:func:`validate_frame_inputs`, the links (:func:`link_capacity`,
:func:`static_owner`; the channel draws them in ``channel/links.py``),
:func:`plan_from_owner` (a plan from a partition and the wanted links)
and :func:`token_selection`, the plan as the token-level Selection the MoE layer consumes.
The policies on it:

* frame_jesa.py: :func:`frame_jesa`, the fast solver.
* frame_baselines.py: :func:`frame_topk_capacity`, :func:`frame_topk_overrun` and
  :func:`frame_tokenwise`, the baselines under the same frame model.
* frame_kernels.py: the numba kernels of the plan and of the solver (one module, see there).
* registry.py: :func:`route_frames`, one entry point for every frame policy; exact.py: the
  P3 references (brute force, MILP).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .common import RELEVANCE_TOL, check_bounds, check_gamma
from .frame_kernels import ENERGY_RTOL, _link_order, _place

__all__ = [
    "FrameLinks",
    "FrameSelection",
    "validate_frame_inputs",
    "link_capacity",
    "static_owner",
    "plan_from_owner",
    "token_selection",
]


@dataclass
class FrameLinks:
    """The links of image frames (channel.frame=image; docs/method.md section 11): one frame per
    (image, MoE layer), whose T tokens share its channel draw and its N subcarriers.

    costs     [F, K, N] float64 CPU  J per token on link (k, n), downlink + uplink (+inf = outage)
    capacity  [F, K, N] int64 CPU    whole tokens link (k, n) carries within T_max on both hops
    The MoE layer's rows are the F * T tokens, row f * T + t for token t of frame f.
    """

    costs: torch.Tensor
    capacity: torch.Tensor

    def __post_init__(self) -> None:
        if self.costs.dim() != 3 or self.capacity.shape != self.costs.shape:
            raise ValueError(
                f"FrameLinks: costs and capacity must both be [F, K, N], got "
                f"{tuple(self.costs.shape)} and {tuple(self.capacity.shape)}"
            )


@dataclass
class FrameSelection:
    """A plan for F frames of T tokens over K devices and N subcarriers (numpy arrays).

    mask          [F, T, K] bool    experts serving each token (links actually used)
    subcarrier    [F, T, K] int64   subcarrier of each used link, -1 elsewhere
    owner         [F, N]    int64   device owning each subcarrier, -1 idle
    token_energy  [F, T]    float64 J spent on each token (failed attempts included)
    energy        [F]       float64 J of the frame (sum of token_energy)
    violation     [F, T]    bool    token misses gamma or k_min (dropped tokens included)
    dropped       [F, T]    bool    token has no expert: passes the layer through the residual
    cut           [F, T, K] bool    links the policy wanted but did not send: no capacity left
    failed        [F, T, K] bool    links sent beyond capacity (capacity-ignoring baseline):
                                    the output is lost and P_ap T_max is spent
    overrun       [F]       bool    some device's planned hop time exceeds T_max
    lower_bound   [F]       float64 proven lower bound on the P3 optimum (nan: none / infeasible)
    certified     [F]       bool    energy proven optimal for P3 (feasible frames only)
    feasible      [F]       bool    no token is a violation
    """

    mask: np.ndarray
    subcarrier: np.ndarray
    owner: np.ndarray
    token_energy: np.ndarray
    energy: np.ndarray
    violation: np.ndarray
    dropped: np.ndarray
    cut: np.ndarray
    failed: np.ndarray
    overrun: np.ndarray
    lower_bound: np.ndarray
    certified: np.ndarray
    feasible: np.ndarray


def validate_frame_inputs(scores, costs, capacity, gamma, k_min, k_max):
    """Check and convert: scores [F, T, K] (rows sum to 1), costs [F, K, N] J (>= 0, +inf),
    capacity [F, K, N] integers >= 0, 0 exactly where the cost is +inf.  Tensors or arrays.

    Returns (s float64, e float64, c int64, gamma, k_min, k_max) with k_max resolved
    (None -> K) and capped at N.  Raises ValueError naming the bad argument.
    """
    s = np.ascontiguousarray(_numpy(scores), dtype=np.float64)
    e = np.ascontiguousarray(_numpy(costs), dtype=np.float64)
    raw_c = np.asarray(_numpy(capacity))
    if s.ndim != 3:
        raise ValueError(f"scores must be [F, T, K], got shape {s.shape}")
    if e.ndim != 3 or e.shape[:2] != (s.shape[0], s.shape[2]):
        raise ValueError(f"costs must be [F, K, N] with F, K of scores {s.shape}, got {e.shape}")
    if raw_c.shape != e.shape:
        raise ValueError(f"capacity shape {raw_c.shape} must equal costs shape {e.shape}")
    if not np.all(np.isfinite(s)) or (s < 0).any():
        raise ValueError("scores must be finite probabilities >= 0")
    if s.size and (np.abs(s.sum(2) - 1) > 1e-3).any():
        raise ValueError("scores rows must sum to 1 within 1e-3")
    if np.isnan(e).any() or (e < 0).any():
        raise ValueError("costs must be >= 0 or +inf (no NaN)")
    if raw_c.size and (raw_c != np.floor(raw_c)).any():
        raise ValueError("capacity must hold whole numbers of tokens")
    c = raw_c.astype(np.int64)
    if (c < 0).any():
        raise ValueError("capacity must be >= 0")
    if ((c > 0) != np.isfinite(e)).any():
        raise ValueError("capacity must be 0 exactly where costs are +inf (a link in outage carries nothing)")
    K, N = e.shape[1], e.shape[2]
    gamma = check_gamma(gamma)
    k_min, k_max = check_bounds(k_min, k_max, K)
    if N < k_min:
        raise ValueError(f"N={N} subcarriers is fewer than k_min={k_min}")
    return s, e, c, float(gamma), int(k_min), int(min(k_max, N))


def _numpy(x):
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def link_capacity(rate_dl, rate_ul, payload_bits: float, latency_s: float) -> np.ndarray:
    """Whole tokens a link carries within T_max on both hops: floor(T_max min(r_dl, r_ul) / S).

    rate_dl, rate_ul [..., K, N] bit/s; returns int64 of the same shape (0 in outage,
    i.e. where S / r > T_max on either hop)."""
    slowest = np.minimum(np.asarray(rate_dl, dtype=np.float64), np.asarray(rate_ul, dtype=np.float64))
    return np.floor(latency_s * slowest / payload_bits).astype(np.int64)


def static_owner(num_devices: int, num_subcarriers: int) -> np.ndarray:
    """The channel-unaware partition o(n) = n mod K, int64 [N] (with N >= K every device
    owns subcarrier k, as in the token frame's a(k) = k mod N)."""
    return np.arange(num_subcarriers, dtype=np.int64) % num_devices


def plan_from_owner(s, e, c, owner, want, gamma, k_min, *, lower_bound=None, failed_energy=None):
    """A FrameSelection from a partition and the wanted links (validated arrays).

    s [F, T, K], e / c [F, K, N], owner [F, N] int64, want [F, T, K] bool.  Links beyond a
    device's capacity are cut (``failed_energy`` None) or sent and failed at
    ``failed_energy`` J each (the capacity-ignoring baseline, ``overrun`` set).  violation:
    the token's used links miss gamma or k_min; lower_bound [F] (nan if None); certified:
    feasible frames whose energy is within ENERGY_RTOL of the bound."""
    F, T, K = s.shape
    order = _link_order(e)
    sub = np.full((F, T, K), -1, dtype=np.int64)
    tok_e = np.zeros((F, T))
    cut = np.zeros((F, T, K), dtype=np.bool_)
    want = np.ascontiguousarray(want, dtype=np.bool_)
    owner = np.ascontiguousarray(owner, dtype=np.int64)
    _place(e, c, order, owner, want, sub, tok_e, cut)
    failed = np.zeros_like(cut)
    if failed_energy is not None:
        failed, cut = cut, np.zeros_like(cut)
        tok_e = tok_e + failed_energy * failed.sum(2)
    mask = want & ~cut & ~failed
    rel = (s * mask).sum(2)
    cnt = mask.sum(2)
    violation = (rel < gamma - RELEVANCE_TOL) | (cnt < k_min)
    energy = tok_e.sum(1)
    bound = np.full(F, np.nan) if lower_bound is None else np.asarray(lower_bound, dtype=np.float64)
    feasible = ~violation.any(1)
    certified = feasible & np.isfinite(bound) & (energy <= bound * (1 + ENERGY_RTOL) + 1e-300)
    return FrameSelection(
        mask=mask,
        subcarrier=np.where(mask, sub, -1),
        owner=owner,
        token_energy=tok_e,
        energy=energy,
        violation=violation,
        dropped=cnt == 0,
        cut=cut,
        failed=failed,
        overrun=failed.any((1, 2)),
        lower_bound=bound,
        certified=certified,
        feasible=feasible,
    )


# --------------------------------------------------------------------------------------
# The token-level view the MoE layer consumes
# --------------------------------------------------------------------------------------
# route_frames, the one entry point for image frames, is in registry.py beside route(): it
# dispatches to frame_jesa.py, frame_baselines.py and the P3 references of exact.py, which
# import this module.


def token_selection(plan: FrameSelection):
    """The plan as a token-level :class:`Selection` of F * T rows (row f * T + t is token t
    of frame f), what the MoE layer's combine and metrics consume: mask = links sent (failed
    ones included, flagged in ``failed``), energy = per-token energy, certified = the
    frame's certificate, lower_bound nan (the bound is per frame: ``plan.lower_bound``)."""
    import torch

    from .common import empty_selection

    F, T, K = plan.mask.shape
    sel = empty_selection(F * T, K)
    sent = plan.mask | plan.failed
    sel.mask = torch.from_numpy(sent.reshape(F * T, K).copy())
    sub = np.where(plan.mask, plan.subcarrier, -1)
    sel.subcarrier = torch.from_numpy(sub.reshape(F * T, K).copy())
    sel.energy = torch.from_numpy(plan.token_energy.reshape(F * T).copy())
    sel.violation = torch.from_numpy(plan.violation.reshape(F * T).copy())
    sel.dropped = torch.from_numpy(plan.dropped.reshape(F * T).copy())
    sel.certified = torch.from_numpy(np.repeat(plan.certified, T))
    sel.failed = torch.from_numpy(plan.failed.reshape(F * T, K).copy())
    sel.frame_overrun = torch.from_numpy(np.repeat(plan.overrun | plan.failed.any((1, 2)), T))
    return sel
