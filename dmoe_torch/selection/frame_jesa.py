"""The fast P3 solver :func:`frame_jesa` (docs/method.md section 11; the image frame is in frame.py).

Capacity-free DES selection (a lower bound, Proposition 2), a subcarrier partition for its
loads (two greedy constructions, then moves and swaps of subcarriers), a capacity repair
that moves tokens off full devices (single moves, then chains of moves; cuts a link only
when none keeps the token's target), then token moves and re-partitions while the energy
drops; optional price rounds (Proposition 3) tighten the bound and restart the heuristic
from the priced and the best-response selections; finally the reassignment pass: tokens'
best responses with idle subcarriers, and optionally sweeps of subcarrier moves and swaps
with the tokens re-optimised after each (the energy only drops).  The per-frame work is the
numba code of frame_kernels.py.
"""

from __future__ import annotations

import numpy as np

from .common import RELEVANCE_TOL
from .des import des_numpy
from .frame import FrameSelection, plan_from_owner, validate_frame_inputs
from .frame_kernels import ENERGY_RTOL, _link_order, _marginal_costs, _reassign_frames, _solve_frames

__all__ = ["frame_jesa"]

# The reassignment pass's chains of two partition changes and its rebuilds (O((N K)^2) tries
# and K rebuilds per sweep) run on frames with N K at most this.  Measured on random frames,
# one thread: about 0.5 ms per frame at N K = 16 (T = 8), 5 ms at 32 (T = 16), 300 ms at the
# model's 128 (T = 49, K = 8, N = 16).
DEEP_MAX_LINKS = 32


def capacity_free_selection(s, e, c, gamma, k_min, k_max):
    """Every token's P1 optimum under c*_k = min{e[k,n] : c[k,n] >= 1}, by batched DES.

    Returns (mask [F, T, K] bool, per-token energy [F, T], per-token violation [F, T],
    c* [F, K]).  The frame sum of the energies is LB0 (Proposition 2) where no token is a
    violation."""
    F, T, K = s.shape
    c_star = np.where(c > 0, e, np.inf).min(2) if e.shape[2] else np.full((F, K), np.inf)
    costs = np.broadcast_to(c_star[:, None, :], (F, T, K)).reshape(F * T, K)
    mask, energy, violation, _, _, _ = des_numpy(s.reshape(F * T, K), costs, gamma, k_min, k_max)
    return mask.reshape(F, T, K), energy.reshape(F, T), violation.reshape(F, T), c_star


def _price_rounds(s, e, c, gamma, k_min, k_max, c_star, upper, rounds):
    """Projected subgradient on L(mu) (Proposition 3), from mu = c*; yields per round
    (L(mu) [F] J, the tokens' DES selection under mu [F, T, K]).  upper [F] J sets the
    Polyak step (mu += step (upper - L) g / |g|^2, g_k = tokens wanting k - tokens the
    band part carries on k, step 1 shrinking by 0.7 per round).  One batched DES per round."""
    F, T, K = s.shape
    usable = np.isfinite(c_star)
    mu = np.where(usable, c_star, 0.0)
    step = 1.0
    links = np.where(c > 0, e, 0.0)
    for _ in range(rounds):
        flat = np.broadcast_to(np.where(usable, mu, np.inf)[:, None, :], (F, T, K)).reshape(F * T, K)
        mask, energy, _, _, _, _ = des_numpy(s.reshape(F * T, K), flat, gamma, k_min, k_max)
        mask = mask.reshape(F, T, K)
        gain = np.where(c > 0, c * (links - mu[:, :, None]), np.inf)  # [F, K, N]
        owner = gain.argmin(1)  # [F, N]
        value = np.take_along_axis(gain, owner[:, None, :], 1)[:, 0, :]
        taken = value < 0
        carried = np.zeros((F, K))
        cap = np.take_along_axis(c, owner[:, None, :], 1)[:, 0, :]
        frames = np.broadcast_to(np.arange(F)[:, None], owner.shape)
        np.add.at(carried, (frames[taken], owner[taken]), cap[taken])
        bound = energy.reshape(F, T).sum(1) + np.where(taken, value, 0.0).sum(1)
        yield bound, mask
        g = np.where(usable, mask.sum(1) - carried, 0.0)
        norm = (g * g).sum(1)
        size = np.where(norm > 0, step * np.maximum(upper - bound, 0.0) / np.maximum(norm, 1e-300), 0.0)
        mu = np.maximum(mu + size[:, None] * g, 0.0)
        step *= 0.7


def _heuristic(s, e, c, order, x_start, gamma, k_min, rounds, attempts):
    """Run the numba heuristic from the selection x_start [F, T, K]; returns a plan."""
    x = np.ascontiguousarray(x_start, dtype=np.bool_).copy()
    F = s.shape[0]
    owner = np.full((F, e.shape[2]), -1, dtype=np.int64)
    cut = np.zeros(x.shape, dtype=np.bool_)
    _solve_frames(s, e, c, order, x, gamma - RELEVANCE_TOL, k_min, int(rounds), int(attempts), owner, cut)
    plan = plan_from_owner(s, e, c, owner, x, gamma, k_min)
    plan.cut |= cut
    return plan


def _take_better(best: FrameSelection, other: FrameSelection, rows: np.ndarray) -> None:
    """Replace best's frames `rows` (indices) by other's [len(rows)] where other has fewer
    violation tokens, or as many and less energy."""
    v_best, v_other = best.violation[rows].sum(1), other.violation.sum(1)
    better = (v_other < v_best) | ((v_other == v_best) & (other.energy < best.energy[rows] * (1 - ENERGY_RTOL)))
    for name in (
        "mask",
        "subcarrier",
        "owner",
        "token_energy",
        "energy",
        "violation",
        "dropped",
        "cut",
        "failed",
        "overrun",
        "feasible",
    ):
        getattr(best, name)[rows[better]] = getattr(other, name)[better]


def _best_response(s, e, c, order, owner, mask, gamma, k_min, k_max):
    """Every token's P1 optimum (batched DES) on its link prices under the plan
    (:func:`_marginal_costs`); tokens whose prices leave no feasible set keep their links."""
    F, T, K = s.shape
    prices = np.empty((F, T, K))
    _marginal_costs(e, c, order, np.ascontiguousarray(owner), np.ascontiguousarray(mask), prices)
    new, _, bad, _, _, _ = des_numpy(s.reshape(F * T, K), prices.reshape(F * T, K), gamma, k_min, k_max)
    new = new.reshape(F, T, K)
    return np.where(bad.reshape(F, T)[:, :, None], mask, new)


def _reassign(s, e, c, order, plan, gamma, k_min, k_max, rounds, construct_rounds, construct_attempts):
    """The reassignment pass (:func:`_reassign_frames`) on every frame's plan, in place;
    a frame takes the new plan only where :func:`_take_better` prefers it, so the pass
    never adds a violation token nor raises the energy."""
    x = np.ascontiguousarray(plan.mask).copy()
    owner = np.ascontiguousarray(plan.owner).copy()
    deep = e.shape[1] * e.shape[2] <= DEEP_MAX_LINKS
    _reassign_frames(
        s,
        e,
        c,
        order,
        x,
        owner,
        gamma - RELEVANCE_TOL,
        k_min,
        k_max,
        int(rounds),
        deep,
        int(construct_rounds),
        int(construct_attempts),
    )
    new = plan_from_owner(s, e, c, owner, x, gamma, k_min)
    new.cut |= plan.cut & ~new.mask  # links the plan wanted and could not send stay counted
    _take_better(plan, new, np.arange(s.shape[0]))


def frame_jesa(
    scores,
    costs,
    capacity,
    gamma: float,
    k_min: int = 1,
    k_max: int | None = None,
    *,
    rounds: int = 4,
    attempts: int = 3,
    price_rounds: int = 0,
    rescue_rounds: int = 0,
    reassign_rounds: int = 0,
) -> FrameSelection:
    """Fast P3 solver.  scores [F, T, K], costs [F, K, N] J, capacity [F, K, N] tokens.

    Steps (docs/method.md section 11): DES per token under c* (capacity-free: lower bound
    LB0 and the wanted loads); a partition for those loads; the capacity repair (and up to
    `attempts` re-partitions while links had to be cut); then up to `rounds` alternations
    of token moves and partition moves while the energy decreases.  `price_rounds` > 0
    adds Lagrangian rounds (Proposition 3) on the frames not yet certified: each round
    prices the devices, runs DES once for those frames' tokens (a better bound) and the
    heuristic from that selection and from every token's best response to the current plan
    (DES on its link prices, :func:`_marginal_costs`): two new candidates per round; the
    plan with fewer violation tokens, then less energy, is kept.  `rescue_rounds` > 0 runs
    such rounds only on the frames left without a feasible plan whose every token can reach
    its target (where capacity binds; cheap where it does not, since no frame qualifies).
    Then the reassignment pass on every frame (:func:`_reassign_frames`), unless
    `reassign_rounds` is -1: every token's best response on the plan's link prices, an
    idle subcarrier included (the device joined takes it), with token moves, while a token
    switches; with `reassign_rounds` = n > 0, up to n sweeps of partition changes (a
    subcarrier to another device, idle or taken from its owner, or two owners swapped),
    each followed by the tokens' re-optimisation and kept when it lowers the energy, and on
    frames with N K <= DEEP_MAX_LINKS chains of two changes and rebuilds that close or open
    a device.  The pass keeps a frame's plan where it finds nothing better.
    Never exceeds a capacity; a frame is certified when its energy equals the bound."""
    if isinstance(reassign_rounds, bool) or not isinstance(reassign_rounds, (int, np.integer)) or reassign_rounds < -1:
        raise ValueError(f"reassign_rounds must be an int >= -1 (-1: no reassignment pass), got {reassign_rounds!r}")
    s, e, c, gamma, k_min, k_max = validate_frame_inputs(scores, costs, capacity, gamma, k_min, k_max)
    x0, tok_lb, tok_bad, c_star = capacity_free_selection(s, e, c, gamma, k_min, k_max)
    order = _link_order(e)
    plan = _heuristic(s, e, c, order, x0, gamma, k_min, rounds, attempts)
    reachable = ~tok_bad.any(1)
    bound = np.where(reachable, tok_lb.sum(1), np.nan)
    for count, only_without_plan in ((price_rounds, False), (rescue_rounds, True)):
        if count <= 0:
            continue
        # chosen after the previous pass: frames that price rounds already solved need no rescue
        unsolved = ~plan.feasible if only_without_plan else ~(plan.feasible & (plan.energy <= bound * (1 + ENERGY_RTOL)))
        rows = np.flatnonzero(reachable & unsolved)
        if rows.size:
            sub = (s[rows], e[rows], c[rows])
            upper = np.where(plan.feasible[rows], plan.energy[rows], 2 * bound[rows] + 1e-3)
            for lag, x_mu in _price_rounds(*sub, gamma, k_min, k_max, c_star[rows], upper, int(count)):
                bound[rows] = np.maximum(bound[rows], lag)
                _take_better(plan, _heuristic(*sub, order[rows], x_mu, gamma, k_min, rounds, attempts), rows)
                x_br = _best_response(*sub, order[rows], plan.owner[rows], plan.mask[rows], gamma, k_min, k_max)
                _take_better(plan, _heuristic(*sub, order[rows], x_br, gamma, k_min, rounds, attempts), rows)
    if reassign_rounds >= 0:
        _reassign(s, e, c, order, plan, gamma, k_min, k_max, reassign_rounds, rounds, attempts)
    plan.lower_bound = bound
    plan.certified = plan.feasible & np.isfinite(bound) & (plan.energy <= bound * (1 + ENERGY_RTOL) + 1e-300)
    return plan
