"""One entry point for every routing policy: :func:`route`, and :func:`route_frames` for image frames.

The MoE layer calls ``route(policy, scores, costs, ...)`` with the gate's scores ``[B, K]``
and the channel's per-link costs ``[B, K, N]`` (joules, ``+inf`` = outage) for every policy,
so switching policy is a config change.

Subcarriers.  ``jesa`` and ``optimal`` choose a subcarrier per selected expert from the full
cost tensor.  The other policies use the static plan a(k) = k mod N: ``des`` solves P1 on
``costs[b, k, k mod N]`` and the registry fills ``subcarrier`` with a(k) for the selected
experts.  The static plan gives distinct subcarriers only when N >= K, so static policies
raise a ValueError when N < K; with it every policy's result uses each subcarrier at most
once per input.
"""
from __future__ import annotations

import numpy as np
import torch

from . import baselines
from .common import Selection, empty_selection, validate_inputs
from .des import des_validated
from .frame import FrameSelection, plan_from_owner, validate_frame_inputs
from .frame_baselines import frame_tokenwise, frame_topk_capacity, frame_topk_overrun
from .frame_jesa import frame_jesa
from .jesa import jesa_validated

# "none" bypasses every expert (the residual passes through, no transmission): the floor of
# an accuracy-vs-energy curve.
POLICIES = ("none", "topk", "channel_topk", "random_topk", "dense", "des", "jesa", "optimal")
STATIC_POLICIES = ("topk", "channel_topk", "random_topk", "dense", "des")
# Policies whose cardinality is the fixed `k` (the others use gamma, k_min, k_max or take all).
FIXED_K_POLICIES = ("topk", "channel_topk", "random_topk")
# Policies driven by the relevance target gamma with k_min / k_max (jesa_tokenwise: image frames only).
GAMMA_POLICIES = ("des", "jesa", "optimal", "jesa_tokenwise")

__all__ = ["POLICIES", "STATIC_POLICIES", "FIXED_K_POLICIES", "GAMMA_POLICIES", "FRAME_POLICIES", "FRAME_ONLY_POLICIES",
           "TOKEN_ONLY_POLICIES", "route", "route_frames"]


def route(
    policy: str,
    scores: torch.Tensor,
    costs: torch.Tensor,
    *,
    gamma: float = 1.0,
    k: int = 2,
    k_min: int = 1,
    k_max: int | None = None,
    failure_energy: float = 0.0,
    generator: torch.Generator | None = None,
) -> Selection:
    """Run routing policy `policy` on a batch.

    scores [B, K] gate probabilities (rows sum to 1); costs [B, K, N] link energies in J
    (+inf = outage).  gamma, k_min, k_max: the relevance target and cardinality bounds of
    des / jesa / optimal; k: the cardinality of topk / channel_topk / random_topk;
    failure_energy: J counted per failed attempt of a channel-unaware policy (P_ap * T_max);
    generator: torch.Generator for random_topk.  Returns a CPU :class:`Selection`.
    Raises ValueError naming the bad argument.
    """
    if policy in FRAME_ONLY_POLICIES:
        raise ValueError(f"policy={policy!r} exists only for image frames (channel.frame=image); with token "
                         f"frames use one of {', '.join(POLICIES)}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
    # Validate the shared arguments once, for every policy, so a bad config fails whatever
    # the policy; the policies below then run on the checked CPU float64 tensors.
    s, c, gamma, k_min, k_max = validate_inputs(scores, costs, gamma, k_min, k_max, cost_ndim=3)
    if policy in STATIC_POLICIES:
        baselines.check_static_plan(c)
    if policy in FIXED_K_POLICIES:
        k = baselines.check_k(k, s.shape[1])
    failure_energy = baselines.check_failure_energy(failure_energy)

    if policy == "none":  # no expert, no transmission; like every baseline, violation = dropped
        selection = empty_selection(*s.shape)
        selection.dropped.fill_(True)
        selection.violation.fill_(True)
        return selection
    if policy == "topk":
        return baselines.topk_validated(s, c, k, failure_energy)
    if policy == "channel_topk":
        return baselines.channel_topk_validated(s, c, k, failure_energy)
    if policy == "random_topk":
        return baselines.random_topk_validated(s, c, k, baselines.check_generator(generator), failure_energy)
    if policy == "dense":
        return baselines.dense_validated(s, c, failure_energy)
    if policy == "des":
        return _static_des(s, c, gamma, k_min, k_max)
    if policy == "jesa":
        return jesa_validated(s, c, gamma, k_min, k_max)
    # policy == "optimal": exact P2 by MILP; imported lazily (scipy.optimize.milp is only
    # needed for this reference policy).
    from .exact import milp_p2

    return milp_p2(s, c, gamma, k_min, k_max)


def _static_des(s: torch.Tensor, c: torch.Tensor, gamma: float, k_min: int, k_max: int) -> Selection:
    """DES (P1) on the static plan: costs c[b, k, k mod N], subcarrier a(k) for selected experts."""
    result = des_validated(s, baselines.static_costs(c), gamma, k_min, k_max)
    result.subcarrier = baselines.static_plan_for(result.mask, c.shape[2])
    return result


# Policies under channel.frame=image.  topk is channel-unaware as in the token frame: it
# ignores capacity, and its links beyond capacity fail (P_ap T_max each); topk_capacity is
# Switch-style dropping at the channel-set capacity; des and jesa_tokenwise solve P1 / P2
# token by token and are truncated to capacity; jesa is the P3 solver; optimal the P3 MILP.
FRAME_POLICIES = ("none", "topk", "topk_capacity", "des", "jesa_tokenwise", "jesa", "optimal")
# Frame policies that have no token-frame meaning, and token policies with no image-frame one.
FRAME_ONLY_POLICIES = tuple(p for p in FRAME_POLICIES if p not in POLICIES)
TOKEN_ONLY_POLICIES = tuple(p for p in POLICIES if p not in FRAME_POLICIES)


# Price rounds jesa spends on the frames its heuristic left without a feasible plan (capacity
# binding): measured on the default checkpoint's frames at T_max = 0.5 ms, they raise the share
# of feasible frames solved from 64-73% to 87-93%; where capacity does not bind they never run.
RESCUE_ROUNDS = 8


def route_frames(policy: str, scores, costs, capacity, *, gamma: float = 1.0, k: int = 2, k_min: int = 1,
                 k_max: int | None = None, failure_energy: float = 0.0, price_rounds: int = 0,
                 rescue_rounds: int = RESCUE_ROUNDS) -> FrameSelection:
    """Route image frames: scores [F, T, K], costs [F, K, N] J, capacity [F, K, N] tokens.

    gamma / k_min / k_max: the targets of des, jesa_tokenwise, jesa and optimal; k: the
    cardinality of topk / topk_capacity; failure_energy: J per failed link of topk
    (P_ap T_max); price_rounds: Lagrangian rounds of jesa on every uncertified frame,
    rescue_rounds: on the frames left without a feasible plan only (see ``frame_jesa``).
    Raises ValueError naming the bad argument."""
    if policy not in FRAME_POLICIES:
        raise ValueError(f"policy={policy!r} is not available with image frames; one of {', '.join(FRAME_POLICIES)}")
    s, e, c, gamma, k_min, k_max = validate_frame_inputs(scores, costs, capacity, gamma, k_min, k_max)
    K = s.shape[2]
    if policy in ("topk", "topk_capacity") and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= K):
        raise ValueError(f"k must be an int in [1, {K}], got {k!r}")
    if policy == "none":
        F, T, _ = s.shape
        plan = plan_from_owner(s, e, c, np.full((F, e.shape[2]), -1, dtype=np.int64), np.zeros(s.shape, dtype=np.bool_), gamma, k_min)
        plan.violation[:] = True
        plan.feasible[:] = False
        return plan
    if policy == "topk":
        return frame_topk_overrun(s, e, c, k, failure_energy)
    if policy == "topk_capacity":
        return frame_topk_capacity(s, e, c, k)
    if policy == "des":
        return frame_tokenwise(s, e, c, "des", gamma, k_min, k_max)
    if policy == "jesa_tokenwise":
        return frame_tokenwise(s, e, c, "jesa", gamma, k_min, k_max)
    if policy == "jesa":
        return frame_jesa(s, e, c, gamma, k_min, k_max, price_rounds=price_rounds, rescue_rounds=rescue_rounds)
    from .exact import milp_p3  # scipy's MILP, only for the reference policy

    return milp_p3(s, e, c, gamma, k_min, k_max)
