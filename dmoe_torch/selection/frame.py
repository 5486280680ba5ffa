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

* :func:`frame_jesa`, the fast solver: capacity-free DES selection (a lower bound,
  Proposition 2), a subcarrier partition for its loads (two greedy constructions, then
  moves and swaps of subcarriers), a capacity repair that moves tokens off full devices
  (single moves, then chains of moves; cuts a link only when none keeps the token's
  target), then token moves and re-partitions while the energy drops; optional price
  rounds (Proposition 3) tighten the bound and restart the heuristic from the priced and
  the best-response selections.
* :func:`route_frames`, one entry point for every frame policy, and :func:`token_selection`,
  the plan as the token-level Selection the MoE layer consumes.
* baselines under the same frame model: :func:`frame_topk_capacity` (Switch-style dropping),
  :func:`frame_topk_overrun` (capacity ignored: links beyond it fail at P_ap T_max each) and
  :func:`frame_tokenwise` (des / jesa token by token, then truncated to capacity).

The numba code here calls no jitted function of another module (see jesa.py: numba's
on-disk cache would not notice a changed callee).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from .common import RELEVANCE_TOL
from .des import des_numpy

__all__ = [
    "FrameSelection",
    "validate_frame_inputs",
    "link_capacity",
    "frame_links",
    "static_owner",
    "plan_from_owner",
    "frame_jesa",
    "frame_topk_capacity",
    "frame_topk_overrun",
    "frame_tokenwise",
    "token_selection",
]

# Relative slack when comparing energies (as in jesa.py).
ENERGY_RTOL = 1e-12
ENERGY_RTOL_NB = ENERGY_RTOL  # the same constant, as a numba global


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
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 < float(gamma) <= 1.0:
        raise ValueError(f"gamma must be a float in (0, 1], got {gamma!r}")
    k_max = K if k_max is None else k_max
    for name, value in (("k_min", k_min), ("k_max", k_max)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if not 1 <= k_min <= k_max <= K:
        raise ValueError(f"need 1 <= k_min ({k_min}) <= k_max ({k_max}) <= K ({K})")
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


def frame_links(channel, frame_ids, layer: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    """Link energies and capacities of image frames on the true channel (perfect CSI).

    channel: a ``WirelessChannel``; frame_ids [F] int64 (one id per (image, layer) frame:
    all its tokens share that draw).  Returns costs [F, K, N] J (``channel.costs``) and
    capacity [F, K, N] int64 = floor(T_max min(r_dl, r_ul) / S), 0 exactly where the cost
    is +inf and at least 1 where it is finite (the same outage rule)."""
    cfg = channel.cfg
    power = np.asarray(channel.power_gains(frame_ids, layer, stream), dtype=np.float64)
    costs = channel.costs(frame_ids, layer, stream).numpy()
    snr = power * channel.mean_gain.numpy()[None, :, None] / cfg.noise_power_w
    rate_dl = cfg.subcarrier_bandwidth_hz * np.log2(1.0 + cfg.ap_power_w * snr)
    rate_ul = cfg.subcarrier_bandwidth_hz * np.log2(1.0 + cfg.device_power_w * snr)
    capacity = link_capacity(rate_dl, rate_ul, channel.payload_bits, cfg.latency_budget_s)
    finite = np.isfinite(costs)
    return costs, np.where(finite, np.maximum(capacity, 1), 0).astype(np.int64)


def static_owner(num_devices: int, num_subcarriers: int) -> np.ndarray:
    """The channel-unaware partition o(n) = n mod K, int64 [N] (with N >= K every device
    owns subcarrier k, as in the token frame's a(k) = k mod N)."""
    return np.arange(num_subcarriers, dtype=np.int64) % num_devices


def _link_order(e: np.ndarray) -> np.ndarray:
    """Subcarriers of every device by increasing cost (outage last), int64 [F, K, N]."""
    return np.argsort(e, axis=2, kind="stable").astype(np.int64)


# --------------------------------------------------------------------------------------
# numba kernels on one frame: e [K, N], c [K, N], order [K, N], owner [N]
# --------------------------------------------------------------------------------------
@njit(cache=True)
def _device_slots(e, c, order, owner, k, limit, slot_sub, slot_cost):
    """Device k's first `limit` token slots, cheapest first, on its own subcarriers; writes
    slot_sub / slot_cost [limit] and returns how many exist."""
    count = 0
    for i in range(order.shape[1]):
        if count >= limit:
            break
        n = order[k, i]
        if owner[n] != k or c[k, n] <= 0:
            continue
        take = min(c[k, n], limit - count)
        for _ in range(take):
            slot_sub[count] = n
            slot_cost[count] = e[k, n]
            count += 1
    return count


@njit(cache=True)
def _fill(e, c, order, owner, k, load):
    """(energy J, tokens without a slot) of `load` tokens on device k, cheapest slots first."""
    left = load
    cost = 0.0
    for i in range(order.shape[1]):
        if left <= 0:
            break
        n = order[k, i]
        if owner[n] != k or c[k, n] <= 0:
            continue
        take = min(c[k, n], left)
        cost += take * e[k, n]
        left -= take
    return cost, left


@njit(cache=True)
def _better(unmet_a, cost_a, unmet_b, cost_b):
    """(unmet_a, cost_a) lexicographically better than (unmet_b, cost_b), with slack."""
    if unmet_a != unmet_b:
        return unmet_a < unmet_b
    return cost_a < cost_b - ENERGY_RTOL_NB * max(abs(cost_b), 1e-300)


@njit(cache=True)
def _pair_value(e, c, order, owner, loads, a, b):
    """Unmet tokens and energy of devices a and b (either may be -1) under `owner`."""
    unmet = 0
    cost = 0.0
    if a >= 0:
        ca, ua = _fill(e, c, order, owner, a, loads[a])
        cost += ca
        unmet += ua
    if b >= 0 and b != a:
        cb, ub = _fill(e, c, order, owner, b, loads[b])
        cost += cb
        unmet += ub
    return unmet, cost


@njit(cache=True)
def _greedy_partition(e, c, loads, owner):
    """Cheapest-link-first partition for device loads [K]: repeatedly give the cheapest free
    usable subcarrier to a device that still has unplaced tokens.  Writes owner [N]."""
    K, N = e.shape
    need = loads.copy()
    for n in range(N):
        owner[n] = -1
    while True:
        best_k, best_n, best = -1, -1, math.inf
        for k in range(K):
            if need[k] <= 0:
                continue
            for n in range(N):
                if owner[n] < 0 and c[k, n] > 0 and e[k, n] < best:
                    best, best_k, best_n = e[k, n], k, n
        if best_k < 0:
            return
        owner[best_n] = best_k
        need[best_k] -= min(need[best_k], c[best_k, best_n])


@njit(cache=True)
def _regret_partition(e, c, loads, owner):
    """Most-constrained-first partition for device loads [K]: among the devices that still
    have unplaced tokens, the one that would lose most by not getting its cheapest free
    usable subcarrier (second-cheapest minus cheapest; +inf when it has one option left)
    takes it.  Writes owner [N]."""
    K, N = e.shape
    need = loads.copy()
    for n in range(N):
        owner[n] = -1
    while True:
        pick_k, pick_n, pick_regret, pick_cost = -1, -1, -1.0, math.inf
        for k in range(K):
            if need[k] <= 0:
                continue
            b1, b2, n1 = math.inf, math.inf, -1
            for n in range(N):
                if owner[n] >= 0 or c[k, n] <= 0:
                    continue
                if e[k, n] < b1:
                    b1, b2, n1 = e[k, n], b1, n
                elif e[k, n] < b2:
                    b2 = e[k, n]
            if n1 < 0:
                continue
            regret = b2 - b1
            if regret > pick_regret or (regret == pick_regret and b1 < pick_cost):
                pick_k, pick_n, pick_regret, pick_cost = k, n1, regret, b1
        if pick_k < 0:
            return
        owner[pick_n] = pick_k
        need[pick_k] -= min(need[pick_k], c[pick_k, pick_n])


@njit(cache=True)
def _partition_value(e, c, order, owner, loads):
    unmet = 0
    cost = 0.0
    for k in range(e.shape[0]):
        ck, uk = _fill(e, c, order, owner, k, loads[k])
        cost += ck
        unmet += uk
    return unmet, cost


@njit(cache=True)
def _initial_partition(e, c, order, loads, owner, spare):
    """The better (fewer unplaced tokens, then less energy) of the cheapest-link-first and
    the most-constrained-first partitions, each after the local search."""
    _greedy_partition(e, c, loads, owner)
    _improve_partition(e, c, order, loads, owner, 20)
    _regret_partition(e, c, loads, spare)
    _improve_partition(e, c, order, loads, spare, 20)
    u0, c0 = _partition_value(e, c, order, owner, loads)
    u1, c1 = _partition_value(e, c, order, spare, loads)
    if _better(u1, c1, u0, c0):
        owner[:] = spare


@njit(cache=True)
def _improve_partition(e, c, order, loads, owner, max_passes):
    """Local search on the partition for fixed loads: move one subcarrier to another device
    (or idle), or swap the owners of two; accept strict lexicographic improvements of
    (unplaced tokens, energy).  Edits owner in place."""
    K, N = e.shape
    for _ in range(max_passes):
        improved = False
        for n in range(N):
            a = owner[n]
            for b in range(-1, K):
                if b == a or (b >= 0 and c[b, n] <= 0):
                    continue
                u0, c0 = _pair_value(e, c, order, owner, loads, a, b)
                owner[n] = b
                u1, c1 = _pair_value(e, c, order, owner, loads, a, b)
                if _better(u1, c1, u0, c0):
                    a = b
                    improved = True
                else:
                    owner[n] = a
        for n1 in range(N):
            for n2 in range(n1 + 1, N):
                a, b = owner[n1], owner[n2]
                if a == b or (b >= 0 and c[b, n1] <= 0) or (a >= 0 and c[a, n2] <= 0):
                    continue
                u0, c0 = _pair_value(e, c, order, owner, loads, a, b)
                owner[n1], owner[n2] = b, a
                u1, c1 = _pair_value(e, c, order, owner, loads, a, b)
                if _better(u1, c1, u0, c0):
                    improved = True
                else:
                    owner[n1], owner[n2] = a, b
        if not improved:
            return


@njit(cache=True)
def _slot_tables(e, c, order, owner, T, slot_cost, caps):
    """slot_cost [K, T] (cost of each device's i-th cheapest slot, +inf beyond capacity) and
    caps [K] (slots, at most T)."""
    K = e.shape[0]
    subs = np.empty(T, dtype=np.int64)
    for k in range(K):
        for i in range(T):
            slot_cost[k, i] = math.inf
        caps[k] = _device_slots(e, c, order, owner, k, T, subs, slot_cost[k])


@njit(cache=True)
def _token_state(x, s, t):
    """(relevance, number of experts) of token t under mask x [T, K]."""
    rel = 0.0
    cnt = 0
    for k in range(x.shape[1]):
        if x[t, k]:
            rel += s[t, k]
            cnt += 1
    return rel, cnt


@njit(cache=True)
def _undo(x, moved_tok, moved_from, moved_to, count):
    for i in range(count - 1, -1, -1):
        if moved_to[i] >= 0:
            x[moved_tok[i], moved_to[i]] = False
        x[moved_tok[i], moved_from[i]] = True


@njit(cache=True)
def _augment(x, s, thr, k_min, usable, loads, caps, start, work_i, seen):
    """Free one token slot of the over-full device `start` by a chain of moves (breadth-first
    over devices): token t1 shifts its link start -> d1, t2 shifts d1 -> d2, ..., ending at
    a device with a free slot or at a token that can drop its link.  A move may not lower a
    token below its target (nor below its own relevance if already under it).  The chain is
    applied and re-checked move by move (a token met twice is undone); returns success."""
    T, K = x.shape
    prev_dev, prev_tok, queue = work_i[0], work_i[1], work_i[2]
    moved_tok, moved_from, moved_to = work_i[3], work_i[4], work_i[5]
    for k in range(K):
        seen[k] = False
        prev_dev[k] = -1
        prev_tok[k] = -1
    head, tail = 0, 1
    queue[0] = start
    seen[start] = True
    end_dev, drop_tok = -1, -1
    while head < tail and end_dev < 0:
        a = queue[head]
        head += 1
        for t in range(T):
            if not x[t, a]:
                continue
            rel, cnt = _token_state(x, s, t)
            floor = min(thr, rel)
            if a != start and rel - s[t, a] >= thr and cnt - 1 >= k_min:
                end_dev, drop_tok = a, t
                break
            for b in range(K):
                if seen[b] or x[t, b] or not usable[b] or rel - s[t, a] + s[t, b] < floor:
                    continue
                seen[b] = True
                prev_dev[b], prev_tok[b] = a, t
                if loads[b] < caps[b]:
                    end_dev = b
                    break
                queue[tail] = b
                tail += 1
            if end_dev >= 0:
                break
    if end_dev < 0:
        return False
    count = 0
    if drop_tok >= 0:
        moved_tok[0], moved_from[0], moved_to[0] = drop_tok, end_dev, -1
        count = 1
    b = end_dev
    while b != start:
        moved_tok[count], moved_from[count], moved_to[count] = prev_tok[b], prev_dev[b], b
        count += 1
        b = prev_dev[b]
    for i in range(count):
        t, a, b = moved_tok[i], moved_from[i], moved_to[i]
        rel, cnt = _token_state(x, s, t)
        ok = x[t, a] and (b < 0 or not x[t, b])
        if ok and b < 0:
            ok = rel - s[t, a] >= thr and cnt - 1 >= k_min
        elif ok:
            ok = rel - s[t, a] + s[t, b] >= min(thr, rel)
        if not ok:
            _undo(x, moved_tok, moved_from, moved_to, i)
            return False
        x[t, a] = False
        if b >= 0:
            x[t, b] = True
    loads[start] -= 1
    if drop_tok < 0:
        loads[end_dev] += 1
    return True


@njit(cache=True)
def _repair(x, s, thr, k_min, usable, loads, slot_cost, caps, cut_dev, cut_x, work_i, seen):
    """Make the loads fit the capacities.  While a device is over capacity: take the
    cheapest single move among its tokens that keeps the token's target (drop the link if
    the token still meets gamma and k_min, or move it to a device with a free slot, at that
    slot's cost); else a chain of moves (:func:`_augment`); else cut the link of the token
    with the smallest score on it.  x [T, K] bool and loads [K] are edited; cut_dev [K]
    counts the cut links per device, cut_x [T, K] marks them.  Returns the number of cuts."""
    T, K = x.shape
    cuts = 0
    cut_x[:, :] = False
    for k in range(K):
        cut_dev[k] = 0
    for k in range(K):
        while loads[k] > caps[k]:
            best_t, best_j, best = -1, -1, math.inf
            for t in range(T):
                if not x[t, k]:
                    continue
                rel, cnt = _token_state(x, s, t)
                if rel >= thr and rel - s[t, k] >= thr and cnt - 1 >= k_min and 0.0 < best:
                    best, best_t, best_j = 0.0, t, -1
                for j in range(K):
                    if x[t, j] or not usable[j] or loads[j] >= caps[j]:
                        continue
                    if rel - s[t, k] + s[t, j] >= thr and slot_cost[j, loads[j]] < best:
                        best, best_t, best_j = slot_cost[j, loads[j]], t, j
            if best_t < 0 and _augment(x, s, thr, k_min, usable, loads, caps, k, work_i, seen):
                continue
            if best_t < 0:  # no move keeps a target: cut the weakest link
                weakest = math.inf
                for t in range(T):
                    if x[t, k] and s[t, k] < weakest:
                        weakest, best_t = s[t, k], t
                cuts += 1
                cut_dev[k] += 1
                cut_x[best_t, k] = True
            x[best_t, k] = False
            loads[k] -= 1
            if best_j >= 0:
                x[best_t, best_j] = True
                loads[best_j] += 1
    return cuts


@njit(cache=True)
def _improve_tokens(x, s, thr, k_min, usable, loads, slot_cost, caps, max_passes):
    """Token moves for a fixed partition: drop a link or move it to another device when that
    lowers the energy (marginal slot costs) and keeps the token's target and k_min / k_max."""
    T, K = x.shape
    for _ in range(max_passes):
        improved = False
        for t in range(T):
            for k in range(K):
                if not x[t, k]:
                    continue
                rel, cnt = _token_state(x, s, t)
                if rel < thr:  # a violation token keeps what it has
                    break
                saved = slot_cost[k, loads[k] - 1]
                best_j, best = -2, -ENERGY_RTOL_NB * saved
                if rel - s[t, k] >= thr and cnt - 1 >= k_min:
                    best_j, best = -1, -saved
                for j in range(K):
                    if x[t, j] or not usable[j] or loads[j] >= caps[j]:
                        continue
                    delta = slot_cost[j, loads[j]] - saved
                    if rel - s[t, k] + s[t, j] >= thr and delta < best:
                        best_j, best = j, delta
                if best_j == -2:
                    continue
                x[t, k] = False
                loads[k] -= 1
                if best_j >= 0:
                    x[t, best_j] = True
                    loads[best_j] += 1
                improved = True
        if not improved:
            return


@njit(cache=True)
def _frame_energy(e, c, order, owner, loads):
    total = 0.0
    for k in range(e.shape[0]):
        cost, _ = _fill(e, c, order, owner, k, loads[k])
        total += cost
    return total


@njit(cache=True)
def _count_loads(x, loads):
    T, K = x.shape
    for k in range(K):
        loads[k] = 0
        for t in range(T):
            loads[k] += x[t, k]


@njit(cache=True)
def _solve_frames(s_all, e_all, c_all, order_all, x_all, thr, k_min, rounds, attempts, owner_all, cut_all):
    """The fast P3 heuristic on every frame.  x_all [F, T, K] enters as the capacity-free
    selection (DES under c*) and leaves capacity-feasible; owner_all [F, N] and cut_all
    [F, T, K] (links cut for want of capacity) are written.

    Per frame: partition for the wanted loads; repair; while links had to be cut (at most
    `attempts` times) re-partition for the repaired loads plus the cut demand and repair
    the wanted selection again, keeping the plan with the fewest cuts (then the lowest
    energy); then `rounds` of token moves and partition moves while the energy drops."""
    F, T, K = x_all.shape
    N = e_all.shape[2]
    slot_cost = np.empty((K, max(T, 1)))
    caps = np.empty(K, dtype=np.int64)
    loads = np.empty(K, dtype=np.int64)
    demand = np.empty(K, dtype=np.int64)
    cut_dev = np.empty(K, dtype=np.int64)
    usable = np.empty(K, dtype=np.bool_)
    seen = np.empty(K, dtype=np.bool_)
    work_i = np.empty((6, K + T + 1), dtype=np.int64)
    wanted = np.empty((T, K), dtype=np.bool_)
    cut_x = np.empty((T, K), dtype=np.bool_)
    best_x = np.empty((T, K), dtype=np.bool_)
    best_owner = np.empty(N, dtype=np.int64)
    spare = np.empty(N, dtype=np.int64)
    for f in range(F):
        e, c, order, x, owner = e_all[f], c_all[f], order_all[f], x_all[f], owner_all[f]
        s = s_all[f]
        for k in range(K):
            usable[k] = False
            for n in range(N):
                if c[k, n] > 0:
                    usable[k] = True
        wanted[:, :] = x
        _count_loads(x, demand)
        _initial_partition(e, c, order, demand, owner, spare)
        best_cuts, best = -1, math.inf
        for attempt in range(attempts + 1):
            if attempt > 0:
                _improve_partition(e, c, order, demand, owner, 20)
            x[:, :] = wanted
            _count_loads(x, loads)
            _slot_tables(e, c, order, owner, T, slot_cost, caps)
            cuts = _repair(x, s, thr, k_min, usable, loads, slot_cost, caps, cut_dev, cut_x, work_i, seen)
            energy = _frame_energy(e, c, order, owner, loads)
            if best_cuts < 0 or cuts < best_cuts or (cuts == best_cuts and energy < best):
                best_cuts, best = cuts, energy
                best_x[:, :] = x
                best_owner[:] = owner
                cut_all[f] = cut_x
            if cuts == 0:
                break
            for k in range(K):
                demand[k] = loads[k] + cut_dev[k]
        x[:, :] = best_x
        owner[:] = best_owner
        _count_loads(x, loads)
        _slot_tables(e, c, order, owner, T, slot_cost, caps)
        for _ in range(rounds):
            _improve_tokens(x, s, thr, k_min, usable, loads, slot_cost, caps, 20)
            _improve_partition(e, c, order, loads, owner, 20)
            _slot_tables(e, c, order, owner, T, slot_cost, caps)
            energy = _frame_energy(e, c, order, owner, loads)
            if not energy < best - ENERGY_RTOL_NB * best:
                break
            best = energy
            best_x[:, :] = x
            best_owner[:] = owner
        x[:, :] = best_x
        owner[:] = best_owner


@njit(cache=True)
def _marginal_costs(e_all, c_all, order_all, owner_all, x_all, out):
    """Per-token link prices under a plan, out [F, T, K]: for a link the token holds, the
    cost of the device's last used slot (what leaving saves); otherwise the cost of the
    device's next free slot (+inf if the device is full).  DES on these prices is every
    token's best response to the others' links."""
    F, T, K = x_all.shape
    subs = np.empty(T + 1, dtype=np.int64)
    costs = np.empty(T + 1)
    for f in range(F):
        for k in range(K):
            count = _device_slots(e_all[f], c_all[f], order_all[f], owner_all[f], k, T + 1, subs, costs)
            load = 0
            for t in range(T):
                load += x_all[f, t, k]
            held = costs[load - 1] if load > 0 else math.inf
            free = costs[load] if load < count else math.inf
            for t in range(T):
                out[f, t, k] = held if x_all[f, t, k] else free


@njit(cache=True)
def _place(e_all, c_all, order_all, owner_all, want_all, sub_all, tok_e_all, cut_all):
    """Send each frame's wanted links on the owner partition: device k's tokens in token
    order take its slots cheapest first; links beyond its capacity are cut.
    want [F, T, K] bool in; sub [F, T, K] (-1), token energy [F, T], cut [F, T, K] out."""
    F, T, K = want_all.shape
    subs = np.empty(max(T, 1), dtype=np.int64)
    costs = np.empty(max(T, 1))
    for f in range(F):
        for k in range(K):
            count = _device_slots(e_all[f], c_all[f], order_all[f], owner_all[f], k, T, subs, costs)
            used = 0
            for t in range(T):
                if not want_all[f, t, k]:
                    continue
                if used < count:
                    sub_all[f, t, k] = subs[used]
                    tok_e_all[f, t] += costs[used]
                    used += 1
                else:
                    cut_all[f, t, k] = True


# --------------------------------------------------------------------------------------
# Python entry points
# --------------------------------------------------------------------------------------
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
        mask=mask, subcarrier=np.where(mask, sub, -1), owner=owner, token_energy=tok_e, energy=energy,
        violation=violation, dropped=cnt == 0, cut=cut, failed=failed, overrun=failed.any((1, 2)),
        lower_bound=bound, certified=certified, feasible=feasible,
    )


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
    for name in ("mask", "subcarrier", "owner", "token_energy", "energy", "violation", "dropped", "cut", "failed", "overrun", "feasible"):
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


def frame_jesa(scores, costs, capacity, gamma: float, k_min: int = 1, k_max: int | None = None, *,
               rounds: int = 4, attempts: int = 3, price_rounds: int = 0) -> FrameSelection:
    """Fast P3 solver.  scores [F, T, K], costs [F, K, N] J, capacity [F, K, N] tokens.

    Steps (docs/method.md section 11): DES per token under c* (capacity-free: lower bound
    LB0 and the wanted loads); a partition for those loads; the capacity repair (and up to
    `attempts` re-partitions while links had to be cut); then up to `rounds` alternations
    of token moves and partition moves while the energy decreases.  `price_rounds` > 0
    adds Lagrangian rounds (Proposition 3) on the frames not yet certified: each round
    prices the devices, runs DES once for those frames' tokens (a better bound) and the
    heuristic from that selection and from every token's best response to the current plan
    (DES on its link prices, :func:`_marginal_costs`): two new candidates per round; the
    plan with fewer violation tokens, then less energy, is kept.  Never exceeds a capacity; a frame is certified when its
    energy equals the bound."""
    s, e, c, gamma, k_min, k_max = validate_frame_inputs(scores, costs, capacity, gamma, k_min, k_max)
    x0, tok_lb, tok_bad, c_star = capacity_free_selection(s, e, c, gamma, k_min, k_max)
    order = _link_order(e)
    plan = _heuristic(s, e, c, order, x0, gamma, k_min, rounds, attempts)
    reachable = ~tok_bad.any(1)
    bound = np.where(reachable, tok_lb.sum(1), np.nan)
    if price_rounds > 0:
        rows = np.flatnonzero(reachable & ~(plan.feasible & (plan.energy <= bound * (1 + ENERGY_RTOL))))
        if rows.size:
            sub = (s[rows], e[rows], c[rows])
            upper = np.where(plan.feasible[rows], plan.energy[rows], 2 * bound[rows] + 1e-3)
            for lag, x_mu in _price_rounds(*sub, gamma, k_min, k_max, c_star[rows], upper, int(price_rounds)):
                bound[rows] = np.maximum(bound[rows], lag)
                _take_better(plan, _heuristic(*sub, order[rows], x_mu, gamma, k_min, rounds, attempts), rows)
                x_br = _best_response(*sub, order[rows], plan.owner[rows], plan.mask[rows], gamma, k_min, k_max)
                _take_better(plan, _heuristic(*sub, order[rows], x_br, gamma, k_min, rounds, attempts), rows)
    plan.lower_bound = bound
    plan.certified = plan.feasible & np.isfinite(bound) & (plan.energy <= bound * (1 + ENERGY_RTOL) + 1e-300)
    return plan


def _topk_mask(s: np.ndarray, k: int) -> np.ndarray:
    """The k highest scores of every token (ties: lower index), bool [F, T, K]."""
    ranked = np.argsort(-s, axis=2, kind="stable")[:, :, :k]
    mask = np.zeros(s.shape, dtype=np.bool_)
    np.put_along_axis(mask, ranked, True, axis=2)
    return mask


def frame_topk_capacity(scores, costs, capacity, k: int) -> FrameSelection:
    """Switch-style top-k: every token asks its k best-scored experts; the static partition
    n mod K gives each device its capacity; tokens beyond it (in token order) lose that
    link (``cut``; a token left with no expert is ``dropped``).  violation = dropped."""
    s, e, c, _, _, _ = validate_frame_inputs(scores, costs, capacity, 1.0, 1, None)
    owner = np.broadcast_to(static_owner(s.shape[2], e.shape[2]), (s.shape[0], e.shape[2]))
    result = plan_from_owner(s, e, c, owner, _topk_mask(s, k), 1.0, 1)
    result.violation = result.dropped.copy()
    result.feasible = ~result.violation.any(1)
    return result


def frame_topk_overrun(scores, costs, capacity, k: int, failure_energy: float) -> FrameSelection:
    """Top-k ignoring capacity: every wanted link is sent on the static partition; those
    beyond a device's capacity (in token order; all of them on a device whose links are in
    outage) miss T_max: ``failed``, output lost, ``failure_energy`` J each (P_ap T_max), and
    the frame is an ``overrun``.  violation = dropped."""
    s, e, c, _, _, _ = validate_frame_inputs(scores, costs, capacity, 1.0, 1, None)
    owner = np.broadcast_to(static_owner(s.shape[2], e.shape[2]), (s.shape[0], e.shape[2]))
    result = plan_from_owner(s, e, c, owner, _topk_mask(s, k), 1.0, 1, failed_energy=float(failure_energy))
    result.violation = result.dropped.copy()
    result.feasible = ~result.violation.any(1)
    return result


def frame_tokenwise(scores, costs, capacity, policy: str, gamma: float, k_min: int = 1,
                    k_max: int | None = None) -> FrameSelection:
    """des or jesa token by token, each token as if it had the band alone, then truncated.

    des: P1 per token on the static partition (device k's cheapest own subcarrier), sent on
    that partition.  jesa: P2 per token on the frame's costs; each subcarrier goes to the
    device the most tokens put on it (ties: lower index).  Then device k's tokens, in token
    order, fill its subcarriers; links beyond its capacity are ``cut``; violation: the
    token's remaining links miss gamma or k_min."""
    s, e, c, gamma, k_min, k_max = validate_frame_inputs(scores, costs, capacity, gamma, k_min, k_max)
    F, T, K = s.shape
    N = e.shape[2]
    if policy == "des":
        owner = np.broadcast_to(static_owner(K, N), (F, N)).copy()
        own = owner[:, None, :] == np.arange(K)[None, :, None]  # [F, K, N]
        c_static = np.where(own & (c > 0), e, np.inf).min(2)
        flat = np.broadcast_to(c_static[:, None, :], (F, T, K)).reshape(F * T, K)
        want = des_numpy(s.reshape(F * T, K), flat, gamma, k_min, k_max)[0].reshape(F, T, K)
    elif policy == "jesa":
        from .jesa import jesa_numpy

        flat_e = np.broadcast_to(e[:, None], (F, T, K, N)).reshape(F * T, K, N)
        out = jesa_numpy(s.reshape(F * T, K), np.ascontiguousarray(flat_e), gamma, k_min, k_max)
        want = out.mask.reshape(F, T, K)
        sub = out.subcarrier.reshape(F, T, K)
        votes = np.zeros((F, N, K), dtype=np.int64)
        f_idx, t_idx, k_idx = np.nonzero(want & (sub >= 0))
        np.add.at(votes, (f_idx, sub[f_idx, t_idx, k_idx], k_idx), 1)
        owner = np.where(votes.max(2) > 0, votes.argmax(2), -1).astype(np.int64)
    else:
        raise ValueError(f"policy must be 'des' or 'jesa', got {policy!r}")
    return plan_from_owner(s, e, c, owner, want, gamma, k_min)


# --------------------------------------------------------------------------------------
# One entry point for image frames, and the token-level view the MoE layer consumes
# --------------------------------------------------------------------------------------
# route_frames, the one entry point for image frames, is in registry.py beside route(): it
# dispatches to the solvers here and to the P3 references of exact.py, which import this module.


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
