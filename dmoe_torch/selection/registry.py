"""One entry point for every routing policy: :func:`route`, and :func:`route_frames` for image frames.

The MoE layer calls ``route(policy, scores, costs, ...)`` with the gate's scores ``[B, K]``
and the channel's per-link costs ``[B, K, N]`` (joules, ``+inf`` = outage) for every policy,
so switching policy is a config change.  Both look the policy up in the policy table
(policies.py) and call its solver; this module also registers the built-in policies.

Subcarriers.  ``jesa`` and ``optimal`` choose a subcarrier per selected expert from the full
cost tensor.  The static policies use the plan a(k) = k mod N: ``des`` solves P1 on
``costs[b, k, k mod N]`` and the registry fills ``subcarrier`` with a(k) for the selected
experts.  The static plan gives distinct subcarriers only when N >= K, so static policies
raise a ValueError when N < K; with it every policy's result uses each subcarrier at most
once per input.

Devices.  Token routing runs on the scores' device.  The exact policies (des, jesa,
optimal) enumerate the candidate sets in torch (enumerate.py) where that is faster, as
``enumerable`` measured it: on an accelerator for k_max <= 3 (no host round trip), on the
CPU for des up to 92 candidate sets and for optimal (enumeration beats HiGHS by 100x).  On
the CPU with k_max <= 2, des runs ``des_small``: the same enumeration in one numba pass over
the rows, des_enumerate's answer bit for bit, and jesa its per-row kernel (small_sets.py).
Otherwise they run numba (des, jesa) or HiGHS (optimal) on the CPU and move the result back.
All paths are exact and agree (tests/selection/test_enumerate.py, test_jesa.py).
"""

from __future__ import annotations

import numpy as np
import torch

from . import baselines
from .common import Selection, empty_selection, is_real, validate_inputs
from .des import des_validated
from .enumerate import des_enumerate, enumerable, jesa_enumerate, optimal_enumerate
from .frame import FrameSelection, plan_from_owner, validate_frame_inputs
from .frame_baselines import frame_tokenwise, frame_topk_capacity, frame_topk_overrun
from .frame_jesa import frame_jesa
from .heuristics import greedy_select, lagrangian_select
from .jesa import jesa_validated
from .policies import POLICY_TABLE, RouteArgs, get_policy, register_policy
from .small_sets import SMALL_SET_SIZE, des_small

__all__ = ["route", "route_frames", "RESCUE_ROUNDS"]


def route(
    policy: str,
    scores: torch.Tensor,
    costs: torch.Tensor,
    *,
    gamma: float = 1.0,
    k: int = 2,
    k_min: int = 1,
    k_max: int | None = None,
    lam: float | None = None,
    failure_energy: float = 0.0,
    generator: torch.Generator | None = None,
    check_values: bool = True,
) -> Selection:
    """Run routing policy `policy` (a name of the policy table) on a batch.

    scores [B, K] gate probabilities (rows sum to 1); costs [B, K, N] link energies in J
    (+inf = outage), moved to scores' device.  gamma, k_min, k_max: the relevance target and
    cardinality bounds of the target-driven policies (des, jesa, optimal, greedy, lagrangian);
    k: the cardinality of topk / channel_topk / random_topk; lam: the multiplier [1/J] of
    lagrangian; failure_energy: J counted per failed attempt of a channel-unaware policy
    (P_ap * T_max); generator: CPU torch.Generator of random policies; check_values=False
    skips the value checks of scores and costs (they would wait for an accelerator; see
    ``validate_inputs``).  Returns a :class:`Selection` on scores' device.
    Raises ValueError naming the bad argument.
    """
    entry = get_policy(policy, frame="token")
    # Validate the shared arguments once, for every policy, so a bad config fails whatever
    # the policy; the solvers then run on the checked float64 tensors.
    s, c, gamma, k_min, k_max = validate_inputs(
        scores, costs, gamma, k_min, k_max, cost_ndim=3, keep_device=True, check_values=check_values
    )
    if entry.static_plan:
        baselines.check_static_plan(c)
    if entry.fixed_k:
        k = baselines.check_k(k, s.shape[1])
    if "lam" in entry.params:
        lam = check_lam(lam)
    if "generator" in entry.params:
        baselines.check_generator(generator)
    args = RouteArgs(
        gamma=gamma,
        k=k,
        k_min=k_min,
        k_max=k_max,
        lam=lam,
        failure_energy=baselines.check_failure_energy(failure_energy),
        generator=generator,
    )
    return entry.token_solver(s, c, args)


def check_lam(lam, key: str = "lam") -> float:
    """The Lagrange multiplier [1/J] as a float; ValueError naming ``key`` unless a finite real >= 0."""
    if not is_real(lam) or not np.isfinite(float(lam)) or float(lam) < 0:
        raise ValueError(f"{key} must be a finite float >= 0 (relevance per joule, 1/J), got {lam!r}")
    return float(lam)


# --------------------------------------------------------------------------------------
# built-in token solvers: (scores [B, K], costs [B, K, N], RouteArgs) -> Selection
# --------------------------------------------------------------------------------------
def _none(s: torch.Tensor, c: torch.Tensor, a: RouteArgs) -> Selection:
    """No expert, no transmission; like every baseline, violation = dropped."""
    selection = empty_selection(*s.shape, device=s.device)
    selection.dropped.fill_(True)
    selection.violation.fill_(True)
    return selection


def _on_host(solver, s: torch.Tensor, c: torch.Tensor, *args) -> Selection:
    """A numba / HiGHS solver on CPU copies of s and c, its Selection moved back to s's device."""
    return solver(s.cpu(), c.cpu(), *args).to(s.device)


def _des(s: torch.Tensor, c: torch.Tensor, a: RouteArgs) -> Selection:
    """DES (P1) on the static plan: costs c[b, k, k mod N], subcarrier a(k) for selected experts."""
    static = baselines.static_costs(c)
    if s.device.type == "cpu" and a.k_max <= SMALL_SET_SIZE:  # des_enumerate's answer, one numba pass
        return des_small(s, static, a.gamma, a.k_min, a.k_max, num_subcarriers=c.shape[2])
    if enumerable(s.shape[1], a.k_min, a.k_max, s.device, "des"):
        result = des_enumerate(s, static, a.gamma, a.k_min, a.k_max)
    else:
        result = _on_host(des_validated, s, static, a.gamma, a.k_min, a.k_max)
    result.subcarrier = baselines.static_plan_for(result.mask, c.shape[2])
    return result


def _jesa(s: torch.Tensor, c: torch.Tensor, a: RouteArgs) -> Selection:
    if enumerable(s.shape[1], a.k_min, min(a.k_max, c.shape[2]), s.device, "jesa"):
        return jesa_enumerate(s, c, a.gamma, a.k_min, a.k_max)
    return _on_host(jesa_validated, s, c, a.gamma, a.k_min, a.k_max)


def _optimal(s: torch.Tensor, c: torch.Tensor, a: RouteArgs) -> Selection:
    if enumerable(s.shape[1], a.k_min, min(a.k_max, c.shape[2]), s.device, "optimal"):
        return optimal_enumerate(s, c, a.gamma, a.k_min, a.k_max)
    from .exact import milp_p2  # scipy's MILP, only for large instances of the reference policy

    return _on_host(milp_p2, s, c, a.gamma, a.k_min, a.k_max)


# Price rounds jesa spends on the frames its heuristic left without a feasible plan (capacity
# binding): measured on the default checkpoint's frames at T_max = 0.5 ms, they raise the share
# of feasible frames solved from 64-73% to 87-93%; where capacity does not bind they never run.
RESCUE_ROUNDS = 8


def route_frames(
    policy: str,
    scores,
    costs,
    capacity,
    *,
    gamma: float = 1.0,
    k: int = 2,
    k_min: int = 1,
    k_max: int | None = None,
    lam: float | None = None,
    failure_energy: float = 0.0,
    price_rounds: int = 0,
    rescue_rounds: int = RESCUE_ROUNDS,
    reassign_rounds: int = 0,
) -> FrameSelection:
    """Route image frames: scores [F, T, K], costs [F, K, N] J, capacity [F, K, N] tokens.

    gamma / k_min / k_max: the targets of des, jesa_tokenwise, jesa and optimal; k: the
    cardinality of topk / topk_capacity; failure_energy: J per failed link of topk
    (P_ap T_max); price_rounds: Lagrangian rounds of jesa on every uncertified frame,
    rescue_rounds: on the frames left without a feasible plan only; reassign_rounds: sweeps of
    jesa's reassignment pass (0, the MoE layer's: token best responses only; 4: the full pass,
    within 0.005% of the optimum on random frames at 1.5-7x the time; -1: none; see
    ``frame_jesa``).  Raises ValueError naming the bad argument."""
    entry = get_policy(policy, frame="image")
    s, e, c, gamma, k_min, k_max = validate_frame_inputs(scores, costs, capacity, gamma, k_min, k_max)
    if entry.fixed_k:
        k = baselines.check_k(k, s.shape[2])
    if "lam" in entry.params:
        lam = check_lam(lam)
    args = RouteArgs(
        gamma=gamma,
        k=k,
        k_min=k_min,
        k_max=k_max,
        lam=lam,
        failure_energy=baselines.check_failure_energy(failure_energy),
        price_rounds=price_rounds,
        rescue_rounds=rescue_rounds,
        reassign_rounds=reassign_rounds,
    )
    return entry.frame_solver(s, e, c, args)


# --------------------------------------------------------------------------------------
# built-in frame solvers: (scores [F, T, K], costs [F, K, N], capacity [F, K, N], RouteArgs)
# --------------------------------------------------------------------------------------
def _frame_none(s, e, c, a: RouteArgs) -> FrameSelection:
    F = s.shape[0]
    plan = plan_from_owner(
        s, e, c, np.full((F, e.shape[2]), -1, dtype=np.int64), np.zeros(s.shape, dtype=np.bool_), a.gamma, a.k_min
    )
    plan.violation[:] = True
    plan.feasible[:] = False
    return plan


def _frame_optimal(s, e, c, a: RouteArgs) -> FrameSelection:
    from .exact import milp_p3  # scipy's MILP, only for the reference policy

    return milp_p3(s, e, c, a.gamma, a.k_min, a.k_max)


# --------------------------------------------------------------------------------------
# the built-in policies
# --------------------------------------------------------------------------------------
_TARGET = ("gamma", "k_min", "k_max")
_FIXED_K = ("k", "failure_energy")
_HEURISTIC_DEVICES = "any (k_max <= 3; larger sets assigned on the CPU)"
_EXACT_DEVICES = "any: torch enumeration on accelerators (k_max <= 3), the faster of it and numba / HiGHS on the CPU"
_BUILTINS = (
    dict(
        name="none",
        summary="no expert at all: the residual passes through (the floor of a curve)",
        token_solver=_none,
        frame_solver=_frame_none,
        subcarriers="none",
        channel_aware=False,
    ),
    dict(
        name="topk",
        summary="the k highest scores, channel-blind; links in outage fail",
        token_solver=lambda s, c, a: baselines.topk_validated(s, c, a.k, a.failure_energy),
        frame_solver=lambda s, e, c, a: frame_topk_overrun(s, e, c, a.k, a.failure_energy),
        params=_FIXED_K,
        subcarriers="static",
        channel_aware=False,
    ),
    dict(
        name="channel_topk",
        summary="the k cheapest reachable experts, relevance-blind",
        token_solver=lambda s, c, a: baselines.channel_topk_validated(s, c, a.k, a.failure_energy),
        params=_FIXED_K,
        subcarriers="static",
        channel_aware=True,
    ),
    dict(
        name="random_topk",
        summary="k experts drawn at random; links in outage fail",
        token_solver=lambda s, c, a: baselines.random_topk_validated(s, c, a.k, a.generator, a.failure_energy),
        params=(*_FIXED_K, "generator"),
        subcarriers="static",
        channel_aware=False,
    ),
    dict(
        name="dense",
        summary="every reachable expert (the dense mixture)",
        token_solver=lambda s, c, a: baselines.dense_validated(s, c, a.failure_energy),
        params=("failure_energy",),
        subcarriers="static",
        channel_aware=True,
    ),
    dict(
        name="des",
        summary="P1 optimum by DES: least energy reaching relevance gamma, static subcarriers",
        token_solver=_des,
        frame_solver=lambda s, e, c, a: frame_tokenwise(s, e, c, "des", a.gamma, a.k_min, a.k_max),
        params=_TARGET,
        subcarriers="static",
        channel_aware=True,
        certifies=True,
        devices=_EXACT_DEVICES,
    ),
    dict(
        name="jesa",
        summary="JESA: P2 by iterated DES and subcarrier assignment (image frames: the P3 solver)",
        token_solver=_jesa,
        frame_solver=lambda s, e, c, a: frame_jesa(
            s,
            e,
            c,
            a.gamma,
            a.k_min,
            a.k_max,
            price_rounds=a.price_rounds,
            rescue_rounds=a.rescue_rounds,
            reassign_rounds=a.reassign_rounds,
        ),
        params=_TARGET,
        subcarriers="joint",
        channel_aware=True,
        certifies=True,
        devices=_EXACT_DEVICES,
    ),
    dict(
        name="optimal",
        summary="exact P2 (image frames: exact P3 by MILP): the reference",
        token_solver=_optimal,
        frame_solver=_frame_optimal,
        params=_TARGET,
        subcarriers="joint",
        channel_aware=True,
        certifies=True,
        devices=_EXACT_DEVICES,
    ),
    dict(
        name="greedy",
        summary="experts by relevance per joule s/c* until gamma, then a min-cost assignment",
        token_solver=lambda s, c, a: greedy_select(s, c, a.gamma, a.k_min, a.k_max),
        params=_TARGET,
        subcarriers="joint",
        channel_aware=True,
        devices=_HEURISTIC_DEVICES,
    ),
    dict(
        name="lagrangian",
        summary="experts whose s - lam c* is positive (Lagrangian dual rule), then a min-cost assignment",
        token_solver=lambda s, c, a: lagrangian_select(s, c, a.lam, a.k_min, a.k_max),
        params=("lam", "k_min", "k_max"),
        subcarriers="joint",
        channel_aware=True,
        devices=_HEURISTIC_DEVICES,
    ),
    dict(
        name="topk_capacity",
        summary="top-k with Switch-style dropping at each device's capacity",
        frame_solver=lambda s, e, c, a: frame_topk_capacity(s, e, c, a.k),
        params=("k",),
        subcarriers="static",
        channel_aware=False,
        devices="CPU",
    ),
    dict(
        name="jesa_tokenwise",
        summary="token-frame JESA per token, truncated to capacity",
        frame_solver=lambda s, e, c, a: frame_tokenwise(s, e, c, "jesa", a.gamma, a.k_min, a.k_max),
        params=_TARGET,
        subcarriers="joint",
        channel_aware=True,
        certifies=True,
        devices="CPU",
    ),
)
for _record in _BUILTINS:
    if _record["name"] not in POLICY_TABLE:
        register_policy(**_record, _builtin=True)
