"""The numba kernels of the image frame (P3, docs/method.md section 11; the model is in frame.py).

Four kernels loop over a batch of frames: :func:`_place` sends the wanted links on a
partition (the core of :func:`frame.plan_from_owner`), :func:`_solve_frames` is the
heuristic of :func:`frame_jesa.frame_jesa` (partition search, capacity repair, token moves
and re-partitions: :func:`_construct` on each frame), :func:`_reassign_frames` its
reassignment pass (token best responses with idle subcarriers, subcarrier moves and swaps
with the tokens re-optimised, and on small frames chains of two moves and rebuilds) and
:func:`_marginal_costs` gives its best-response link prices.  The helpers work on one frame:
e [K, N] J, c [K, N] tokens, order [K, N] (each device's subcarriers by increasing cost,
:func:`_link_order`), owner [N].  They all call
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
    free = np.zeros(e.shape[1], dtype=np.bool_)
    _greedy_partition(e, c, loads, owner)
    _improve_partition(e, c, order, loads, owner, 20, free)
    _regret_partition(e, c, loads, spare)
    _improve_partition(e, c, order, loads, spare, 20, free)
    u0, c0 = _partition_value(e, c, order, owner, loads)
    u1, c1 = _partition_value(e, c, order, spare, loads)
    if _better(u1, c1, u0, c0):
        owner[:] = spare


@njit(cache=True)
def _improve_partition(e, c, order, loads, owner, max_passes, locked):
    """Local search on the partition for fixed loads: move one subcarrier to another device
    (or idle), or swap the owners of two; accept strict lexicographic improvements of
    (unplaced tokens, energy).  Subcarriers where locked [N] bool is set keep their owner.
    Edits owner in place."""
    K, N = e.shape
    for _ in range(max_passes):
        improved = False
        for n in range(N):
            if locked[n]:
                continue
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
                if locked[n1] or locked[n2] or a == b or (b >= 0 and c[b, n1] <= 0) or (a >= 0 and c[a, n2] <= 0):
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
def _construct(e, c, order, s, x, thr, k_min, rounds, attempts, usable, owner, cut_out, cw):
    """The fast P3 heuristic on one frame: x [T, K] enters as the wanted selection and
    leaves capacity-feasible; owner [N] and cut_out [T, K] (links cut for want of capacity)
    are written.  cw: scratch (:func:`_construct_workspace`).

    Partition for the wanted loads; repair; while links had to be cut (at most `attempts`
    times) re-partition for the repaired loads plus the cut demand and repair the wanted
    selection again, keeping the plan with the fewest cuts (then the lowest energy); then
    `rounds` of token moves and partition moves while the energy drops."""
    slot_cost, caps, loads, demand, cut_dev, seen, work_i, wanted, cut_x, best_x, best_owner, spare, free = cw
    T, K = x.shape
    wanted[:, :] = x
    _count_loads(x, demand)
    _initial_partition(e, c, order, demand, owner, spare)
    best_cuts, best = -1, math.inf
    for attempt in range(attempts + 1):
        if attempt > 0:
            _improve_partition(e, c, order, demand, owner, 20, free)
        x[:, :] = wanted
        _count_loads(x, loads)
        _slot_tables(e, c, order, owner, T, slot_cost, caps)
        cuts = _repair(x, s, thr, k_min, usable, loads, slot_cost, caps, cut_dev, cut_x, work_i, seen)
        energy = _frame_energy(e, c, order, owner, loads)
        if best_cuts < 0 or cuts < best_cuts or (cuts == best_cuts and energy < best):
            best_cuts, best = cuts, energy
            best_x[:, :] = x
            best_owner[:] = owner
            cut_out[:, :] = cut_x
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
        _improve_partition(e, c, order, loads, owner, 20, free)
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
def _construct_workspace(T, K, N):
    """Scratch arrays of :func:`_construct` for frames of T tokens, K devices, N subcarriers."""
    return (
        np.empty((K, max(T, 1))),
        np.empty(K, dtype=np.int64),
        np.empty(K, dtype=np.int64),
        np.empty(K, dtype=np.int64),
        np.empty(K, dtype=np.int64),
        np.empty(K, dtype=np.bool_),
        np.empty((6, K + T + 1), dtype=np.int64),
        np.empty((T, K), dtype=np.bool_),
        np.empty((T, K), dtype=np.bool_),
        np.empty((T, K), dtype=np.bool_),
        np.empty(N, dtype=np.int64),
        np.empty(N, dtype=np.int64),
        np.zeros(N, dtype=np.bool_),
    )


@njit(cache=True)
def _usable_devices(c, usable):
    """usable [K]: the devices with at least one link that carries a token."""
    for k in range(c.shape[0]):
        usable[k] = False
        for n in range(c.shape[1]):
            if c[k, n] > 0:
                usable[k] = True


@njit(cache=True)
def _solve_frames(s_all, e_all, c_all, order_all, x_all, thr, k_min, rounds, attempts, owner_all, cut_all):
    """The fast P3 heuristic (:func:`_construct`) on every frame.  x_all [F, T, K] enters as
    the capacity-free selection (DES under c*) and leaves capacity-feasible; owner_all
    [F, N] and cut_all [F, T, K] (links cut for want of capacity) are written."""
    F, T, K = x_all.shape
    cw = _construct_workspace(T, K, e_all.shape[2])
    usable = np.empty(K, dtype=np.bool_)
    for f in range(F):
        _usable_devices(c_all[f], usable)
        _construct(
            e_all[f],
            c_all[f],
            order_all[f],
            s_all[f],
            x_all[f],
            thr,
            k_min,
            rounds,
            attempts,
            usable,
            owner_all[f],
            cut_all[f],
            cw,
        )


# --------------------------------------------------------------------------------------
# The reassignment pass: subcarrier moves with token re-optimisation, token best responses
# --------------------------------------------------------------------------------------
@njit(cache=True)
def _best_set(s_t, price, thr, k_min, k_max, incumbent, cand, pick, rel_at, cost_at, out):
    """Exact P1 of one token on per-device prices: the cheapest set of experts with
    relevance >= thr and k_min..k_max members, if cheaper than `incumbent` J.

    s_t [K] scores, price [K] J (+inf: the device cannot take the token); out [K] bool is
    written only when a cheaper set exists.  Depth-first over the priced devices by
    increasing price: a branch stops when its cost reaches the best so far (every later
    device costs at least as much), when it meets the target (adding costs more) or when
    its remaining scores cannot reach thr.  cand / pick [K] int64, rel_at / cost_at [K]
    float64 are scratch.  Returns the cost found (or `incumbent` when none is cheaper)."""
    K = price.shape[0]
    m = 0
    for k in range(K):
        if price[k] < math.inf:
            cand[m] = k
            m += 1
    for i in range(1, m):  # insertion sort by price (K is small)
        k = cand[i]
        j = i - 1
        while j >= 0 and price[cand[j]] > price[k]:
            cand[j + 1] = cand[j]
            j -= 1
        cand[j + 1] = k
    best = incumbent
    best_depth = -1
    depth = 0
    pick[0] = -1
    while depth >= 0:
        j = pick[depth] + 1
        pick[depth] = j
        if j >= m:
            depth -= 1
            continue
        prev_cost = cost_at[depth - 1] if depth > 0 else 0.0
        prev_rel = rel_at[depth - 1] if depth > 0 else 0.0
        cost = prev_cost + price[cand[j]]
        if not cost < best * (1.0 - ENERGY_RTOL_NB):  # best may be +inf (a token missing its target)
            depth -= 1  # later devices at this depth cost at least as much
            continue
        rel = prev_rel + s_t[cand[j]]
        cost_at[depth] = cost
        rel_at[depth] = rel
        if depth + 1 >= k_min and rel >= thr:
            best = cost
            best_depth = depth
            for i in range(K):
                out[i] = False
            for i in range(depth + 1):
                out[cand[pick[i]]] = True
            depth -= 1  # siblings cost more; a superset too
            continue
        if depth + 1 >= k_max or m - j - 1 < k_min - depth - 1:
            continue
        rest = 0.0
        for i in range(j + 1, m):
            rest += s_t[cand[i]]
        if rel + rest < thr:
            continue
        depth += 1
        pick[depth] = j
    return best if best_depth >= 0 else incumbent


@njit(cache=True)
def _violations(x, s, thr, k_min):
    """Tokens of x [T, K] that miss thr or k_min."""
    count = 0
    for t in range(x.shape[0]):
        rel, cnt = _token_state(x, s, t)
        if rel < thr or cnt < k_min:
            count += 1
    return count


@njit(cache=True)
def _idle_prices(e, c, owner, idle_price, idle_sub):
    """Each device's cheapest idle usable subcarrier: idle_sub [K] (-1: none) and its link
    cost idle_price [K] J (+inf: none)."""
    K, N = e.shape
    for k in range(K):
        idle_price[k] = math.inf
        idle_sub[k] = -1
        for n in range(N):
            if owner[n] < 0 and c[k, n] > 0 and e[k, n] < idle_price[k]:
                idle_price[k], idle_sub[k] = e[k, n], n


@njit(cache=True)
def _token_prices(x, t, usable, loads, slot_cost, caps, idle_price, price):
    """Token t's link prices under the others' links, price [K] J: for a device it holds,
    the cost of the slot it would vacate; for another, the device's next free slot or, if
    cheaper, its cheapest idle subcarrier (+inf when it has neither).  Returns what the
    token's links cost at these prices (J)."""
    held = 0.0
    for k in range(x.shape[1]):
        if x[t, k]:
            price[k] = slot_cost[k, loads[k] - 1]
            held += price[k]
        else:
            price[k] = idle_price[k]
            if usable[k] and loads[k] < caps[k]:
                price[k] = min(price[k], slot_cost[k, loads[k]])
    return held


@njit(cache=True)
def _adopt(e, c, order, owner, x, t, new_set, loads, slot_cost, caps, idle_price, idle_sub, taken):
    """Token t switches to the experts new_set [K]; a device it joins whose cheapest idle
    subcarrier beats its next free slot (or that has no free slot) takes that subcarrier
    first.  Returns False, changing nothing, when a device it joins is left without a free
    slot (two of them priced the same idle subcarrier).  taken [K] int64 scratch."""
    T, K = x.shape
    count = 0
    for k in range(K):
        if not new_set[k] or x[t, k]:
            continue
        full = loads[k] >= caps[k]
        if idle_sub[k] >= 0 and (full or idle_price[k] < slot_cost[k, loads[k]]):
            owner[idle_sub[k]] = k
            taken[count] = idle_sub[k]
            count += 1
            _idle_prices(e, c, owner, idle_price, idle_sub)
        elif full:
            for i in range(count):
                owner[taken[i]] = -1
            _idle_prices(e, c, owner, idle_price, idle_sub)
            return False
    if count:
        _slot_tables(e, c, order, owner, T, slot_cost, caps)
    for k in range(K):
        if x[t, k] and not new_set[k]:
            loads[k] -= 1
        elif new_set[k] and not x[t, k]:
            loads[k] += 1
        x[t, k] = new_set[k]
    return True


@njit(cache=True)
def _best_responses(e, c, order, owner, x, s, thr, k_min, k_max, usable, loads, slot_cost, caps, ws):
    """Every token in turn switches to its exact P1 optimum (:func:`_best_set`) on its link
    prices under the others' links (:func:`_token_prices`, idle subcarriers included: the
    device joined takes one, :func:`_adopt`).  A token switches only to a strictly cheaper
    set, or, if it misses its target, to any set that meets it.  x, loads and owner (idle
    subcarriers only) are edited.  Returns whether any token switched."""
    work_i, work_f, new_set, idle_sub = ws[0], ws[1], ws[2], ws[6]
    T, K = x.shape
    price, idle_price = work_f[0], work_f[3]
    _idle_prices(e, c, owner, idle_price, idle_sub)
    switched = False
    for t in range(T):
        rel, cnt = _token_state(x, s, t)
        held = _token_prices(x, t, usable, loads, slot_cost, caps, idle_price, price)
        incumbent = held if rel >= thr and cnt >= k_min else math.inf
        found = _best_set(s[t], price, thr, k_min, k_max, incumbent, work_i[0], work_i[1], work_f[1], work_f[2], new_set)
        if found < incumbent and _adopt(e, c, order, owner, x, t, new_set, loads, slot_cost, caps, idle_price, idle_sub, ws[8]):
            switched = True
    return switched


@njit(cache=True)
def _reoptimise_tokens(e, c, order, owner, x, s, thr, k_min, k_max, usable, loads, slot_cost, caps, ws):
    """Token moves (:func:`_improve_tokens`) then best responses, while either changes x."""
    for _ in range(20):
        _improve_tokens(x, s, thr, k_min, usable, loads, slot_cost, caps, 20)
        if not _best_responses(e, c, order, owner, x, s, thr, k_min, k_max, usable, loads, slot_cost, caps, ws):
            return


@njit(cache=True)
def _evict(e, c, order, owner, x, s, thr, k_min, k_max, usable, loads, slot_cost, caps, ws, k):
    """Move tokens off device k until its load fits its capacity, the cheapest way out
    first: each token's best set without k (:func:`_best_set`, idle subcarriers included),
    priced against what its links on k's fellow devices cost now.  Returns False when no
    token on k has a way out that meets its target."""
    work_i, work_f, new_set, out_set, idle_sub = ws[0], ws[1], ws[2], ws[7], ws[6]
    T, K = x.shape
    price, idle_price = work_f[0], work_f[3]
    while loads[k] > caps[k]:
        _idle_prices(e, c, owner, idle_price, idle_sub)
        pick, cheapest = -1, math.inf
        for t in range(T):
            if not x[t, k]:
                continue
            _token_prices(x, t, usable, loads, slot_cost, caps, idle_price, price)
            rest = 0.0  # what its other links cost (k's own slot may lie beyond its capacity now)
            for j in range(K):
                if x[t, j] and j != k:
                    rest += price[j]
            price[k] = math.inf
            found = _best_set(s[t], price, thr, k_min, k_max, math.inf, work_i[0], work_i[1], work_f[1], work_f[2], new_set)
            if found - rest < cheapest:
                pick, cheapest = t, found - rest
                out_set[:] = new_set
        if pick < 0 or not _adopt(
            e, c, order, owner, x, np.int64(pick), out_set, loads, slot_cost, caps, idle_price, idle_sub, ws[8]
        ):
            return False
    return True


@njit(cache=True)
def _settle(e, c, order, owner, locked, repartition, x, s, thr, k_min, k_max, usable, loads, slot_cost, caps, ws):
    """The tokens after a partition change (the subcarriers marked in locked [N] keep their
    new owners).  A device now over capacity takes idle subcarriers (cheapest first: more
    slots never raise its energy); if one still is, after, when `repartition`, a
    re-partition of the other subcarriers for the loads, its tokens leave it the cheapest
    way out (:func:`_evict`), or else by the repair's single and chained moves.  Then token
    re-optimisation.  Returns 1 when settled, 0 when a link would have to be cut (the change
    is then to be undone), -1 when settled and no device was over capacity after the idle
    subcarriers (so `repartition` made no difference)."""
    work_i, cut_dev, cut_x, seen = ws[0], ws[3], ws[4], ws[5]
    T, K = x.shape
    N = e.shape[1]
    over = False
    for k in range(K):
        while loads[k] > caps[k]:
            pick, cheapest = -1, math.inf
            for n in range(N):
                if owner[n] < 0 and c[k, n] > 0 and e[k, n] < cheapest:
                    pick, cheapest = n, e[k, n]
            if pick < 0:
                over = True
                break
            owner[pick] = k
            _slot_tables(e, c, order, owner, T, slot_cost, caps)
    if over:
        if repartition:
            _improve_partition(e, c, order, loads, owner, 20, locked)
            _slot_tables(e, c, order, owner, T, slot_cost, caps)
        for k in range(K):
            if loads[k] > caps[k] and not _evict(
                e, c, order, owner, x, s, thr, k_min, k_max, usable, loads, slot_cost, caps, ws, k
            ):
                if _repair(x, s, thr, k_min, usable, loads, slot_cost, caps, cut_dev, cut_x, work_i, seen) > 0:
                    return 0
    _reoptimise_tokens(e, c, order, owner, x, s, thr, k_min, k_max, usable, loads, slot_cost, caps, ws)
    return 1 if over else -1


@njit(cache=True)
def _completions(x, s, thr, k_min, k_max, usable, loads, slot_cost, caps, ws, held, complete):
    """What a partition change can gain or lose, per token (the screen of :func:`_may_gain`).
    held [T] J: each token's cost at its prices (:func:`_token_prices`; 0 for a token
    missing its target, which is not screened).  complete [T, K] J: for a device d the token
    does not hold, the cheapest other experts completing a set that contains d (its exact P1
    with d's score given; 0 when d alone suffices, +inf when nothing completes it): moving
    onto new slots of d at price p saves at most held - p - complete; for a device k it
    holds, what leaving k costs it at least: its best set without k, minus what its other
    links cost (>= the slot it vacates on k, as its set is a best response).  Prices
    without idle subcarriers: the screen prices those itself."""
    work_i, work_f, scratch_set = ws[0], ws[1], ws[2]
    T, K = x.shape
    price, no_idle = work_f[0], work_f[4]
    no_idle[:] = math.inf
    for t in range(T):
        rel, cnt = _token_state(x, s, t)
        cost = _token_prices(x, t, usable, loads, slot_cost, caps, no_idle, price)
        feasible = rel >= thr and cnt >= k_min
        held[t] = cost if feasible else 0.0
        for d in range(K):
            complete[t, d] = math.inf if feasible or not x[t, d] else 0.0
            if not feasible:
                continue
            kept = price[d]
            price[d] = math.inf
            if x[t, d]:
                best = _best_set(
                    s[t], price, thr, k_min, k_max, math.inf, work_i[0], work_i[1], work_f[1], work_f[2], scratch_set
                )
                complete[t, d] = best - (cost - kept)
            elif thr - s[t, d] <= 0.0 and k_min <= 1:
                complete[t, d] = 0.0
            elif k_max > 1:
                complete[t, d] = _best_set(
                    s[t],
                    price,
                    thr - s[t, d],
                    max(k_min - 1, 1),
                    k_max - 1,
                    math.inf,
                    work_i[0],
                    work_i[1],
                    work_f[1],
                    work_f[2],
                    scratch_set,
                )
            price[d] = kept


@njit(cache=True)
def _slot_gain(held, complete, x, g, price, slots, h, shift, work):
    """Estimate of what tokens save by moving onto `slots` new slots of device g at `price`
    J each: the sum of the `slots` largest held - price - complete[:, g] above 0 over the
    tokens not on g, a token on device h paying `shift` J more for its slot there than
    before the change.  work [T] float64 scratch."""
    T = held.shape[0]
    for t in range(T):
        work[t] = 0.0
        if not x[t, g]:
            work[t] = held[t] - price - complete[t, g]
            if h >= 0 and x[t, h]:
                work[t] += shift
    total = 0.0
    for _ in range(min(slots, T)):
        best, pick = 0.0, -1
        for t in range(T):
            if work[t] > best:
                best, pick = work[t], t
        if pick < 0:
            break
        total += best
        work[pick] = 0.0
    return total


@njit(cache=True)
def _eviction_cost(held, complete, x, k, vacated, count, g, price, work):
    """Estimate of what `count` tokens pay to leave device k (its slot cost them `vacated`
    J): the sum of the `count` smallest, over the tokens on k, of their cheapest way out:
    complete[t, k], or onto the new slots of device g at `price` J (0 when neither exists:
    a chain of moves may still free them).  work [T] scratch."""
    T = x.shape[0]
    for t in range(T):
        work[t] = math.inf
        if x[t, k]:
            work[t] = complete[t, k]
            if g >= 0 and not x[t, g]:
                work[t] = min(work[t], price + complete[t, g] - (held[t] - vacated))
            if work[t] == math.inf:  # no single way out; a chain of moves may still free it
                work[t] = 0.0
    total = 0.0
    for _ in range(count):
        best, pick = math.inf, -1
        for t in range(T):
            if work[t] < best:
                best, pick = work[t], t
        if pick < 0:
            return math.inf
        total += best
        work[pick] = math.inf
    return total


@njit(cache=True)
def _may_gain(e, c, order, owner, loads, slot_cost, caps, held, complete, x, n, d, other, a, energy, work):
    """Screen for a partition change (n to d, from a; other >= 0: and `other` from d to a),
    one token move at a time: False when, for devices a and d, the change of their fill at
    fixed loads (tokens that no longer fit priced by :func:`_eviction_cost`) minus what
    tokens save moving onto the new slots (:func:`_slot_gain`) is not negative.  A screen,
    not a bound: chains of moves are not counted.  owner is left as it was."""
    gain_price = e[d, n]  # what a slot on the subcarrier d gains costs it, or a free one it had
    if loads[d] < caps[d]:
        gain_price = min(gain_price, slot_cost[d, loads[d]])
    back_price = math.inf
    if other >= 0:
        back_price = e[a, other]
        if loads[a] < caps[a]:
            back_price = min(back_price, slot_cost[a, loads[a]])
    before = 0.0
    for k in (a, d):
        if k >= 0:
            before += _fill(e, c, order, owner, k, loads[k])[0]
    owner[n] = d
    if other >= 0:
        owner[other] = a
    after, shift_a, shift_d = 0.0, 0.0, 0.0
    for k in (a, d):
        if k < 0 or loads[k] == 0:
            continue
        cost, unmet = _fill(e, c, order, owner, k, loads[k])
        after += cost
        vacated = slot_cost[k, loads[k] - 1]
        if unmet > 0:
            g, price = (d, gain_price) if k == a else (a, back_price)
            after += _eviction_cost(held, complete, x, k, vacated, unmet, g, price, work)
        else:  # its tokens now pay the new last slot: leaving saves that much more
            shift = cost - _fill(e, c, order, owner, k, loads[k] - 1)[0] - vacated
            if k == a:
                shift_a = shift
            else:
                shift_d = shift
    owner[n] = a
    if other >= 0:
        owner[other] = d
    gain = _slot_gain(held, complete, x, d, gain_price, c[d, n], a, shift_a, work)
    if other >= 0:
        gain += _slot_gain(held, complete, x, a, back_price, c[a, other], d, shift_d, work)
    return after - before - gain < -ENERGY_RTOL_NB * energy


@njit(cache=True)
def _try_change(
    e, c, order, owner, subs, devs, count, x, s, thr, k_min, k_max, usable, loads, slot_cost, caps, ws, rw, energy, violations
):
    """Give subcarrier subs[i] to device devs[i] for i < count, settle the tokens
    (:func:`_settle`, without and then with the re-partition) and keep the result when it
    has fewer violation tokens, or as many and strictly less energy; otherwise restore x,
    owner and loads.  Returns (kept, energy, violations) of the plan now held."""
    save_x, save_owner, save_loads, locked = rw[0], rw[1], rw[2], rw[6]
    T = x.shape[0]
    save_x[:, :] = x
    save_owner[:] = owner
    save_loads[:] = loads
    kept = False
    for repartition in (False, True):
        for i in range(count):
            owner[subs[i]] = devs[i]
            locked[subs[i]] = True
        _slot_tables(e, c, order, owner, T, slot_cost, caps)
        settled = _settle(e, c, order, owner, locked, repartition, x, s, thr, k_min, k_max, usable, loads, slot_cost, caps, ws)
        if settled != 0:
            trial_violations = _violations(x, s, thr, k_min)
            trial = _frame_energy(e, c, order, owner, loads)
            if trial_violations < violations or (trial_violations == violations and trial < energy * (1.0 - ENERGY_RTOL_NB)):
                kept, energy, violations = True, trial, trial_violations
                break
        x[:, :] = save_x
        owner[:] = save_owner
        loads[:] = save_loads
        _slot_tables(e, c, order, owner, T, slot_cost, caps)
        if settled < 0:
            break
    for i in range(count):
        locked[subs[i]] = False
    return kept, energy, violations


@njit(cache=True)
def _move_sweep(e, c, order, owner, x, s, thr, k_min, k_max, usable, loads, slot_cost, caps, ws, rw, energy, violations):
    """One sweep of single partition changes: every subcarrier n to every other device d
    (idle or taken from its owner) and every swap of two subcarriers' owners, each screened
    by :func:`_may_gain` and tried by :func:`_try_change`.  Returns (kept any, energy,
    violations)."""
    held, complete, gain_work, subs, devs = rw[3], rw[4], rw[5], rw[7], rw[8]
    K, N = e.shape
    kept_any = False
    for n in range(N):
        for other in range(-K, N):
            # other < 0: move n to device other + K; other > n: swap the owners of n and other
            a = owner[n]
            if other < 0:
                d = other + K
                if d == a or c[d, n] <= 0:
                    continue
            else:
                d = owner[other]
                if other <= n or a < 0 or d < 0 or a == d or c[d, n] <= 0 or c[a, other] <= 0:
                    continue
            if not _may_gain(e, c, order, owner, loads, slot_cost, caps, held, complete, x, n, d, other, a, energy, gain_work):
                continue
            subs[0], devs[0], subs[1], devs[1] = n, d, other, a
            kept, energy, violations = _try_change(
                e,
                c,
                order,
                owner,
                subs,
                devs,
                1 if other < 0 else 2,
                x,
                s,
                thr,
                k_min,
                k_max,
                usable,
                loads,
                slot_cost,
                caps,
                ws,
                rw,
                energy,
                violations,
            )
            if kept:
                kept_any = True
                _completions(x, s, thr, k_min, k_max, usable, loads, slot_cost, caps, ws, held, complete)
    return kept_any, energy, violations


@njit(cache=True)
def _double_moves(e, c, order, owner, x, s, thr, k_min, k_max, usable, loads, slot_cost, caps, ws, rw, energy, violations):
    """Chains of two partition changes, unscreened, up to the first one kept: n to d, then
    a subcarrier m to the device that lost n, or one of d's subcarriers to any device (a
    device that gains a subcarrier hands another on, or one that loses gets another
    back).  O((N K)^2) tries.  Returns (kept, energy, violations)."""
    subs, devs = rw[7], rw[8]
    K, N = e.shape
    pair = subs.shape[0]
    for n in range(N):
        for d in range(K):
            a = owner[n]
            if d == a or c[d, n] <= 0:
                continue
            for m in range(N):
                b = owner[m]
                if m == n or not (b == d or a >= 0):
                    continue
                for g in range(K):
                    if g == b or c[g, m] <= 0 or not (b == d or g == a):
                        continue
                    subs[0], devs[0], subs[1], devs[1] = n, d, m, g
                    kept, energy, violations = _try_change(
                        e,
                        c,
                        order,
                        owner,
                        subs,
                        devs,
                        pair,
                        x,
                        s,
                        thr,
                        k_min,
                        k_max,
                        usable,
                        loads,
                        slot_cost,
                        caps,
                        ws,
                        rw,
                        energy,
                        violations,
                    )
                    if kept:
                        return True, energy, violations
    return False, energy, violations


@njit(cache=True)
def _rebuilds(
    e, c, order, owner, x, s, thr, k_min, k_max, rounds, attempts, usable, loads, slot_cost, caps, ws, rw, cw, energy, violations
):
    """Restart moves, one per device k: closing a loaded k (its tokens re-solve without k
    at the capacity-free prices c*, rw[12]) or opening an unloaded usable k (a token moves
    onto k when its best set on the plan's prices, k at c*_k and a device without a free
    slot at its c* as if it got another subcarrier, contains k and is cheaper); the frame
    is then rebuilt from that selection (:func:`_construct`, then token re-optimisation)
    and kept when it has fewer violation tokens, or as many and strictly less energy.
    K rebuilds.  Returns (kept any, energy, violations)."""
    work_i, work_f, new_set = ws[0], ws[1], ws[2]
    trial_x, trial_owner, trial_cut, c_star = rw[9], rw[10], rw[11], rw[12]
    t_slot_cost, t_caps, t_loads = cw[0], cw[1], cw[2]
    T, K = x.shape
    price = work_f[0]
    kept_any = False
    for k in range(K):
        opening = loads[k] == 0
        if opening and not usable[k]:
            continue
        trial_x[:, :] = x
        ok = True
        for t in range(T):
            if opening:
                _token_prices(x, t, usable, loads, slot_cost, caps, c_star, price)
                incumbent = 0.0
                for j in range(K):
                    if x[t, j]:
                        incumbent += price[j]
                price[k] = c_star[k]
                found = _best_set(s[t], price, thr, k_min, k_max, incumbent, work_i[0], work_i[1], work_f[1], work_f[2], new_set)
                if found < incumbent and new_set[k]:
                    trial_x[t] = new_set
            elif trial_x[t, k]:
                price[:] = c_star
                price[k] = math.inf
                if (
                    _best_set(s[t], price, thr, k_min, k_max, math.inf, work_i[0], work_i[1], work_f[1], work_f[2], new_set)
                    == math.inf
                ):
                    ok = False
                    break
                trial_x[t] = new_set
        if not ok:
            continue
        _construct(e, c, order, s, trial_x, thr, k_min, rounds, attempts, usable, trial_owner, trial_cut, cw)
        _count_loads(trial_x, t_loads)
        _slot_tables(e, c, order, trial_owner, T, t_slot_cost, t_caps)
        _reoptimise_tokens(e, c, order, trial_owner, trial_x, s, thr, k_min, k_max, usable, t_loads, t_slot_cost, t_caps, ws)
        trial_violations = _violations(trial_x, s, thr, k_min)
        trial = _frame_energy(e, c, order, trial_owner, t_loads)
        if trial_violations < violations or (trial_violations == violations and trial < energy * (1.0 - ENERGY_RTOL_NB)):
            energy, violations, kept_any = trial, trial_violations, True
            x[:, :] = trial_x
            owner[:] = trial_owner
            _count_loads(x, loads)
            _slot_tables(e, c, order, owner, T, slot_cost, caps)
    return kept_any, energy, violations


@njit(cache=True)
def _reassign(
    e,
    c,
    order,
    owner,
    x,
    s,
    thr,
    k_min,
    k_max,
    rounds,
    deep,
    construct_rounds,
    construct_attempts,
    usable,
    loads,
    slot_cost,
    caps,
    ws,
    rw,
    cw,
):
    """The reassignment pass on one frame (x [T, K], owner [N] edited in place).

    Token re-optimisation on the plan (:func:`_reoptimise_tokens`: token moves and best
    responses, idle subcarriers included); then up to `rounds` sweeps while one keeps a
    change: single partition changes (:func:`_move_sweep`); where a sweep keeps none and
    `deep` is set, chains of two changes (:func:`_double_moves`), then restarts that close
    or open a device (:func:`_rebuilds`).  Without `deep`, a frame whose plan still has
    violation tokens gets no sweep (its repairs cost far more than the few tokens they
    save).  Every kept change has fewer violation tokens, or as many and strictly less
    energy."""
    T = x.shape[0]
    _count_loads(x, loads)
    _slot_tables(e, c, order, owner, T, slot_cost, caps)
    _reoptimise_tokens(e, c, order, owner, x, s, thr, k_min, k_max, usable, loads, slot_cost, caps, ws)
    if rounds <= 0:
        return
    held, complete = rw[3], rw[4]
    energy = _frame_energy(e, c, order, owner, loads)
    violations = _violations(x, s, thr, k_min)
    if violations > 0 and not deep:  # on large frames without a feasible plan the sweeps rarely help, at a high cost
        return
    _completions(x, s, thr, k_min, k_max, usable, loads, slot_cost, caps, ws, held, complete)
    for _ in range(rounds):
        kept, energy, violations = _move_sweep(
            e, c, order, owner, x, s, thr, k_min, k_max, usable, loads, slot_cost, caps, ws, rw, energy, violations
        )
        if not kept and deep:
            kept, energy, violations = _double_moves(
                e, c, order, owner, x, s, thr, k_min, k_max, usable, loads, slot_cost, caps, ws, rw, energy, violations
            )
            if not kept:
                kept, energy, violations = _rebuilds(
                    e,
                    c,
                    order,
                    owner,
                    x,
                    s,
                    thr,
                    k_min,
                    k_max,
                    construct_rounds,
                    construct_attempts,
                    usable,
                    loads,
                    slot_cost,
                    caps,
                    ws,
                    rw,
                    cw,
                    energy,
                    violations,
                )
            if kept:
                _completions(x, s, thr, k_min, k_max, usable, loads, slot_cost, caps, ws, held, complete)
        if not kept:
            return


@njit(cache=True)
def _reassign_workspace(T, K, N):
    """Scratch of the reassignment pass for frames of T tokens, K devices, N subcarriers.

    ws (token level): work_i [6, K + T + 1] int64 (the repair's and :func:`_best_set`'s),
    work_f [5, K] float64 (prices), new_set [K] bool, cut_dev [K] int64, cut_x [T, K] bool,
    seen [K] bool, idle_sub [K] int64, out_set [K] bool, taken [K] int64.
    rw (partition level): save_x [T, K], save_owner [N], save_loads [K], held [T],
    complete [T, K], gain_work [T], locked [N] bool, subs [2], devs [2], trial_x [T, K],
    trial_owner [N], trial_cut [T, K], c_star [K] float64."""
    ws = (
        np.empty((6, K + T + 1), dtype=np.int64),
        np.empty((5, K)),
        np.empty(K, dtype=np.bool_),
        np.empty(K, dtype=np.int64),
        np.empty((T, K), dtype=np.bool_),
        np.empty(K, dtype=np.bool_),
        np.empty(K, dtype=np.int64),
        np.empty(K, dtype=np.bool_),
        np.empty(K, dtype=np.int64),
    )
    rw = (
        np.empty((T, K), dtype=np.bool_),
        np.empty(N, dtype=np.int64),
        np.empty(K, dtype=np.int64),
        np.empty(T),
        np.empty((T, K)),
        np.empty(T),
        np.zeros(N, dtype=np.bool_),
        np.empty(2, dtype=np.int64),
        np.empty(2, dtype=np.int64),
        np.empty((T, K), dtype=np.bool_),
        np.empty(N, dtype=np.int64),
        np.empty((T, K), dtype=np.bool_),
        np.empty(K),
    )
    return ws, rw


@njit(cache=True)
def _reassign_frames(
    s_all, e_all, c_all, order_all, x_all, owner_all, thr, k_min, k_max, rounds, deep, construct_rounds, construct_attempts
):
    """:func:`_reassign` on every frame: x_all [F, T, K] (capacity-feasible selections) and
    owner_all [F, N] are edited in place; construct_rounds / construct_attempts: the
    heuristic's, for the rebuilds."""
    F, T, K = x_all.shape
    N = e_all.shape[2]
    slot_cost = np.empty((K, max(T, 1)))
    caps = np.empty(K, dtype=np.int64)
    loads = np.empty(K, dtype=np.int64)
    usable = np.empty(K, dtype=np.bool_)
    ws, rw = _reassign_workspace(T, K, N)
    cw = _construct_workspace(T, K, N)
    c_star = rw[12]
    for f in range(F):
        e, c = e_all[f], c_all[f]
        _usable_devices(c, usable)
        for k in range(K):
            c_star[k] = math.inf
            for n in range(N):
                if c[k, n] > 0:
                    c_star[k] = min(c_star[k], e[k, n])
        _reassign(
            e,
            c,
            order_all[f],
            owner_all[f],
            x_all[f],
            s_all[f],
            thr,
            k_min,
            k_max,
            rounds,
            deep,
            construct_rounds,
            construct_attempts,
            usable,
            loads,
            slot_cost,
            caps,
            ws,
            rw,
            cw,
        )


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
