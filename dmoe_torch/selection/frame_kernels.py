"""The numba kernels of the image frame (P3, docs/method.md section 11; the model is in frame.py).

Three kernels loop over a batch of frames: :func:`_place` sends the wanted links on a
partition (the core of :func:`frame.plan_from_owner`), :func:`_solve_frames` is the
heuristic of :func:`frame_jesa.frame_jesa` (partition search, capacity repair, token moves
and re-partitions) and :func:`_marginal_costs` gives its best-response link prices.  The
helpers work on one frame: e [K, N] J, c [K, N] tokens, order [K, N] (each device's
subcarriers by increasing cost, :func:`_link_order`), owner [N].  They all call
:func:`_device_slots` or one another, hence one module: the numba code here calls no jitted
function of another module (see jesa.py: numba's on-disk cache would not notice a changed
callee).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

# Relative slack when comparing energies (as in jesa.py); frame.py and frame_jesa.py use it too.
ENERGY_RTOL = 1e-12
ENERGY_RTOL_NB = ENERGY_RTOL  # the same constant, as a numba global


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
