"""The numba kernel of DES (problem P1; the API is :mod:`dmoe_torch.selection.des`).

``des_solve_one(s, c, gamma, k_min, k_max, out_mask) -> (energy, feasible, nodes, bound)``
    numba-jitted, one instance, callable from other ``@njit`` code (or from Python).
    s, c: float64[K] (C-contiguous); out_mask: bool[K], overwritten with the selection;
    gamma is the raw importance factor (RELEVANCE_TOL is applied inside).
    feasible=True: out_mask is optimal, bound is the root relaxation bound.
    feasible=False: out_mask holds the fallback and bound is nan; an all-False out_mask
    then means no expert is reachable (dropped, energy 0).
    nodes == DES_NODE_LIMIT: the search budget ran out (far-from-router instances only, see
    DES_NODE_LIMIT); out_mask is the best set found (feasible, maybe not optimal) and bound
    the best proven lower bound.  des/des_numpy finish such rows with HiGHS.
    Note: numba's on-disk cache does not track callees, so an ``@njit(cache=True)`` caller
    keeps a stale copy of DES after this file changes; clear its cache (or skip cache=True).

Algorithm (numba, one row at a time, no Python per row)
-------------------------------------------------------
1. drop unreachable experts; the top-k_max scores decide feasibility (and are the fallback);
2. k_max-dominance filter: an expert with at least k_max cheaper-or-equal experts of
   higher-or-equal score is never needed (K=1024, k_max=8 keeps about 50 of 1024);
3. order the survivors by cost per relevance c/s;
4. depth-first include/exclude search.  At every node: an exact completion when the k_min
   cheapest remaining experts already reach gamma; a feasibility prune from the best
   remaining scores; the Dantzig (fractional knapsack) bound refined Martello-Toth style by
   branching on its critical item; and, when the knapsack LP breaks the cardinality limits,
   the Lagrangian bound of the cardinality-constrained LP.  Leaving an expert out forbids
   every later expert it dominates (exclusion dominance), which the bounds respect.
   The incumbent starts as the top-score set and improves with every completion the bounds
   produce (top-score, cheapest, Lagrangian sets).
The proofs of the filter, the dominance rule and the bounds are in comments next to the code.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .common import RELEVANCE_TOL

__all__ = ["DES_NODE_LIMIT", "des_solve_one"]


# --------------------------------------------------------------------------------------
# numba solver
# --------------------------------------------------------------------------------------
# (The steps are listed in the module docstring; why each one is exact follows.)
#
# Why the dominance filter is exact: order the items by (cost asc, index asc).  If at least
# k_max items precede item k with score >= s_k, then among the optimal sets take one with the
# smallest sum of positions; if it held k, one of those k_max predecessors is missing (the
# set has at most k_max - 1 other items), and swapping k for it keeps the count, does not
# lower the relevance, does not raise the cost and lowers the position sum: contradiction.
# So some optimal set avoids every filtered item.
#
# Why the Lagrangian bound is valid for every lam >= 0: for the residual problem (need g
# more relevance, between m_min and m more items), relaxing the relevance constraint gives
#     L(lam) = lam * g + min_{m_min <= |X| <= m} sum_{k in X} (c_k - lam s_k)
#            <= cost of any feasible X,
# and the inner minimum is exact (the m_min smallest values of c - lam s, then further
# negative ones up to m).  max_lam L(lam) equals the LP relaxation with the cardinality
# constraints; it is found by Kelley's cutting planes in one dimension, but exactness never
# depends on reaching it: any lam gives a valid bound.

_SMALL_M = 16  # above this many free slots the Lagrangian sorts instead of inserting
_ROOT_ITERATIONS = 60  # Kelley steps at the root (reports the LP bound)
_NODE_ITERATIONS = 8  # Kelley steps at other nodes (any lam is valid; these only prune)
# Safety valve: P1 is NP-hard and some far-from-MoE instances (hundreds of experts, k_max or
# k_min in the tens or hundreds, costs spread over many decades) defeat the bounds.  After
# DES_NODE_LIMIT nodes, or _WORK_PER_NODE * DES_NODE_LIMIT items scanned by node evaluations
# (about a second), the search stops with its best set and the best proven bound and reports
# nodes = DES_NODE_LIMIT; des/des_numpy then solve that row with HiGHS.  Router-sized
# problems stay orders of magnitude below (K=1024, k_max=8: at most a few hundred nodes).
DES_NODE_LIMIT = 2_000_000
_WORK_PER_NODE = 32


@njit(cache=True)
def _insert_by_score(buf, length, cap, k, s, c):
    """Insert item k into buf[:length], kept sorted by (score desc, cost asc, insertion order),
    holding at most cap items.  Returns the new length."""
    if length == cap:
        last = buf[length - 1]
        if not (s[k] > s[last] or (s[k] == s[last] and c[k] < c[last])):
            return length
        length -= 1
    p = length
    while p > 0:
        j = buf[p - 1]
        if s[k] > s[j] or (s[k] == s[j] and c[k] < c[j]):
            buf[p] = j
            p -= 1
        else:
            break
    buf[p] = k
    return length + 1


@njit(cache=True)
def _insert_by_cost(buf, length, cap, k, s, c):
    """Like _insert_by_score with the order (cost asc, score desc, insertion order)."""
    if cap == 0:
        return 0
    if length == cap:
        last = buf[length - 1]
        if not (c[k] < c[last] or (c[k] == c[last] and s[k] > s[last])):
            return length
        length -= 1
    p = length
    while p > 0:
        j = buf[p - 1]
        if c[k] < c[j] or (c[k] == c[j] and s[k] > s[j]):
            buf[p] = j
            p -= 1
        else:
            break
    buf[p] = k
    return length + 1


@njit(cache=True)
def _suffix_select(ws, wc, pos, n, m, by_score, out):
    """Positions of the m best items of positions pos..n-1 (by score or by cost) into out."""
    length = np.int64(0)
    for t in range(pos, n):
        if by_score:
            length = _insert_by_score(out, length, m, t, ws, wc)
        else:
            length = _insert_by_cost(out, length, m, t, ws, wc)
    return length


@njit(cache=True)
def _lagrangian(ws, wc, forbid, pos, n, lam, g, m, m_min, xbuf, xval, scratch_v, scratch_t):
    """L(lam) over the allowed positions pos..n-1; returns (L, cost of X, score of X, |X|),
    X in xbuf.  Fewer than m_min allowed items: L is still a valid bound for what remains
    (none of it is feasible), X is then short and must not be used as a solution."""
    if m > _SMALL_M:
        return _lagrangian_large(ws, wc, forbid, pos, n, lam, g, m, m_min, xbuf, scratch_v, scratch_t)
    length = np.int64(0)
    for t in range(pos, n):
        if forbid[t] > 0:
            continue
        v = wc[t] - lam * ws[t]
        if length == m:
            if v >= xval[m - 1]:
                continue
            length -= 1
        p = length
        while p > 0 and xval[p - 1] > v:
            xval[p] = xval[p - 1]
            xbuf[p] = xbuf[p - 1]
            p -= 1
        xval[p] = v
        xbuf[p] = t
        length += 1
    size = np.int64(0)
    for q in range(length):
        if q >= m_min and xval[q] >= 0.0:
            break
        size += 1
    return _lagrangian_value(ws, wc, xbuf, size, lam, g)


@njit(cache=True)
def _lagrangian_value(ws, wc, xbuf, size, lam, g):
    cost = 0.0
    score = 0.0
    for q in range(size):
        cost += wc[xbuf[q]]
        score += ws[xbuf[q]]
    # L = lam g + sum_X (c - lam s) = cost + lam (g - score), less a bound on its rounding
    # error: for a large lam the two terms cancel and the error can exceed tiny energies
    value = cost + lam * (g - score)
    value -= 1e-14 * (cost + lam * (abs(g) + score))
    return value, cost, score, size


@njit(cache=True)
def _lagrangian_large(ws, wc, forbid, pos, n, lam, g, m, m_min, xbuf, scratch_v, scratch_t):
    """_lagrangian for large m (k_max in the tens or more), O(n log n) instead of O(n m):
    usually X is simply every negative c - lam s, otherwise sort."""
    allowed = 0
    negative = 0
    for t in range(pos, n):
        if forbid[t] > 0:
            continue
        v = wc[t] - lam * ws[t]
        scratch_v[t] = v
        scratch_t[allowed] = t
        allowed += 1
        if v < 0.0:
            negative += 1
    size = negative if negative > m_min else m_min
    if size > m:
        size = m
    if size > allowed:
        size = allowed
    if size == negative:
        q = 0
        for i in range(allowed):
            if scratch_v[scratch_t[i]] < 0.0:
                xbuf[q] = scratch_t[i]
                q += 1
    else:
        _sort_items(scratch_t, allowed, scratch_v, scratch_v)
        for q in range(size):
            xbuf[q] = scratch_t[q]
    return _lagrangian_value(ws, wc, xbuf, size, lam, g)


@njit(cache=True)
def _fill(ws, wc, ratio, forbid, pos, n, g, skip):
    """Greedy fractional fill of a need g > 0 over the allowed positions pos..n-1 other than
    skip, in ratio order.  Returns (cost, critical position or -1 if g is out of reach,
    whole items used, fraction of the critical item)."""
    got = 0.0
    total = 0.0
    used = 0
    for t in range(pos, n):
        if ws[t] <= 0.0:
            break  # zero scores sort last and add no relevance
        if forbid[t] > 0 or t == skip:
            continue
        if got + ws[t] >= g:
            partial = g - got
            return total + partial * ratio[t], t, used, partial / ws[t]
        got += ws[t]
        total += wc[t]
        used += 1
    return np.inf, -1, used, 0.0


@njit(cache=True)
def _dantzig(ws, wc, ratio, forbid, pos, n, g):
    """LP (fractional knapsack) bound over positions pos..n-1 for a need g > 0, and the
    Martello-Toth refinement that branches on the critical item: every integer solution
    either leaves it out (fill on without it) or takes it whole (fill g - its score with the
    others), so the smaller of those two LP values is a bound too, and >= the LP.

    Returns (LP bound, refined bound, lam, size): lam is the critical ratio (the LP
    multiplier), size the sum of the LP solution's x.  Sums are taken directly, not from
    prefix sums, whose differences carry an absolute error relative to the whole prefix.
    """
    lp, critical, used, fraction = _fill(ws, wc, ratio, forbid, pos, n, g, -1)
    if critical < 0:
        return np.inf, np.inf, np.inf, 0.0
    without, _, _, _ = _fill(ws, wc, ratio, forbid, pos, n, g, critical)
    rest = g - ws[critical]
    with_it = wc[critical]
    if rest > 0.0:
        more, _, _, _ = _fill(ws, wc, ratio, forbid, pos, n, rest, critical)
        with_it += more
    refined = without if without < with_it else with_it
    if refined < lp:
        refined = lp
    return lp, refined, ratio[critical], used + fraction


@njit(cache=True)
def _before(a, b, primary, secondary):
    """Item a precedes item b in the order (primary, secondary, index) ascending."""
    if primary[a] != primary[b]:
        return primary[a] < primary[b]
    if secondary[a] != secondary[b]:
        return secondary[a] < secondary[b]
    return a < b


@njit(cache=True)
def _sort_items(items, n, primary, secondary):
    """Sort items[:n] in place by (primary[k], secondary[k], k) ascending.

    The key is a total order, so an unstable sort is fine: insertion sort for short lists,
    heapsort otherwise (numba's own np.argsort/np.sort would add seconds of compile time).
    """
    if n <= 32:
        for i in range(1, n):
            k = items[i]
            p = i
            while p > 0 and _before(k, items[p - 1], primary, secondary):
                items[p] = items[p - 1]
                p -= 1
            items[p] = k
        return
    # heapsort with a max-heap on the same order
    for start in range(n // 2 - 1, -1, -1):
        _sift_down(items, start, n, primary, secondary)
    for end in range(n - 1, 0, -1):
        k = items[0]
        items[0] = items[end]
        items[end] = k
        _sift_down(items, 0, end, primary, secondary)


@njit(cache=True)
def _sift_down(items, root, end, primary, secondary):
    while True:
        child = 2 * root + 1
        if child >= end:
            return
        if child + 1 < end and _before(items[child], items[child + 1], primary, secondary):
            child += 1
        if _before(items[root], items[child], primary, secondary):
            k = items[root]
            items[root] = items[child]
            items[child] = k
            root = child
        else:
            return


@njit(cache=True)
def _take(buffer, offset, size):
    """The next `size` entries of a scratch buffer: (view, offset after it)."""
    return buffer[offset : offset + size], offset + size


@njit(cache=True)
def _workspace(K, k_min, k_max):
    """Scratch arrays for _solve (reused across the rows of a batch): (ints, floats)."""
    ints = 5 * (k_max + 1) + (k_min + 1) + 5 * K + 3 * (K + 2) + k_max
    floats = 2 * (k_max + 1) + 5 * K + 2 * (K + 1) * (k_max + 1) + 2 * (K + 1) * (k_min + 1) + 3 * (K + 2)
    return np.empty(ints, np.int64), np.empty(floats)


@njit(cache=True)
def _solve(s, c, gamma, k_min, k_max, out_mask, iw, fw, node_limit):
    """Core of des_solve_one with scratch arrays from _workspace; returns
    (energy, feasible, nodes, root bound)."""
    K = s.shape[0]
    for k in range(K):
        out_mask[k] = False
    thr = gamma - RELEVANCE_TOL
    # carve the scratch arrays
    io = 0
    top, io = _take(iw, io, k_max + 1)
    tbuf, io = _take(iw, io, k_max + 1)
    xbuf, io = _take(iw, io, k_max + 1)
    sel, io = _take(iw, io, k_max + 1)
    best_items, io = _take(iw, io, k_max + 1)
    cbuf, io = _take(iw, io, k_min + 1)
    reach, io = _take(iw, io, K)
    keep, io = _take(iw, io, K)
    order, io = _take(iw, io, K)
    st_pos, io = _take(iw, io, K + 2)
    st_cnt, io = _take(iw, io, K + 2)
    st_stage, io = _take(iw, io, K + 2)
    forbid, io = _take(iw, io, K)
    scratch_t, io = _take(iw, io, K)
    path = iw[io : io + k_max]
    fo = 0
    best_scores, fo = _take(fw, fo, k_max + 1)
    xval, fo = _take(fw, fo, k_max + 1)
    item_ratio, fo = _take(fw, fo, K)
    ws, fo = _take(fw, fo, K)
    wc, fo = _take(fw, fo, K)
    ratio, fo = _take(fw, fo, K)
    scratch_v, fo = _take(fw, fo, K)
    st_s, fo = _take(fw, fo, K + 2)
    st_c, fo = _take(fw, fo, K + 2)
    st_bound, fo = _take(fw, fo, K + 2)

    # (1)-(2) reachable experts, the top-k_max by score (the fallback), feasibility
    n_reach = np.int64(0)
    n_top = np.int64(0)
    for k in range(K):
        if c[k] < np.inf:
            reach[n_reach] = k
            n_reach += 1
            n_top = _insert_by_score(top, n_top, k_max, k, s, c)
    if n_reach == 0:
        return 0.0, False, 0, np.nan
    top_score = 0.0
    top_cost = 0.0
    for t in range(n_top):
        top_score += s[top[t]]
        top_cost += c[top[t]]
    if n_reach < k_min or top_score < thr:
        for t in range(n_top):
            out_mask[top[t]] = True
        return top_cost, False, 0, np.nan

    # (3) dominance filter over the reachable experts in (cost asc, index asc) order
    _sort_items(reach, n_reach, c, c)
    n_best = 0  # best_scores[:n_best]: the k_max highest scores seen so far, descending
    n = np.int64(0)
    for t in range(n_reach):
        k = reach[t]
        v = s[k]
        if n_best < k_max or best_scores[n_best - 1] < v:
            keep[n] = k
            n += 1
            if n_best == k_max:
                n_best -= 1
            p = n_best
            while p > 0 and best_scores[p - 1] < v:
                best_scores[p] = best_scores[p - 1]
                p -= 1
            best_scores[p] = v
            n_best += 1
    # back to index order (ties in the ratio order below then rank by index): mark and scan
    for t in range(n):
        out_mask[keep[t]] = True
    n = np.int64(0)
    for k in range(K):
        if out_mask[k]:
            out_mask[k] = False
            keep[n] = k
            n += 1

    # (4) ratio order (zero scores last; ties by cost then index), copied contiguously
    for t in range(n):
        k = keep[t]
        item_ratio[k] = c[k] / s[k] if s[k] > 0.0 else np.inf
        order[t] = k
    _sort_items(order, n, item_ratio, c)
    for t in range(n):
        k = order[t]
        ws[t] = s[k]
        wc[t] = c[k]
        ratio[t] = item_ratio[k]

    # suffix tables: score and cost of the top-m by score and the m cheapest of positions t..
    size_top = (n + 1) * (k_max + 1)
    size_cheap = (n + 1) * (k_min + 1)
    flat, fo = _take(fw, fo, size_top)
    top_s = flat.reshape((n + 1, k_max + 1))
    flat, fo = _take(fw, fo, size_top)
    top_c = flat.reshape((n + 1, k_max + 1))
    flat, fo = _take(fw, fo, size_cheap)
    cheap_s = flat.reshape((n + 1, k_min + 1))
    cheap_c = fw[fo : fo + size_cheap].reshape((n + 1, k_min + 1))
    n_tbuf = np.int64(0)
    n_cbuf = np.int64(0)
    top_s[n, 0] = 0.0
    top_c[n, 0] = 0.0
    cheap_s[n, 0] = 0.0
    cheap_c[n, 0] = 0.0
    for t in range(n - 1, -1, -1):
        n_tbuf = _insert_by_score(tbuf, n_tbuf, k_max, t, ws, wc)
        n_cbuf = _insert_by_cost(cbuf, n_cbuf, k_min, t, ws, wc)
        top_s[t, 0] = 0.0
        top_c[t, 0] = 0.0
        cheap_s[t, 0] = 0.0
        cheap_c[t, 0] = 0.0
        for q in range(n_tbuf):
            top_s[t, q + 1] = top_s[t, q] + ws[tbuf[q]]
            top_c[t, q + 1] = top_c[t, q] + wc[tbuf[q]]
        for q in range(n_cbuf):
            cheap_s[t, q + 1] = cheap_s[t, q] + ws[cbuf[q]]
            cheap_c[t, q + 1] = cheap_c[t, q] + wc[cbuf[q]]

    # incumbent: the (feasible) top-score set
    best = top_cost
    best_len = n_top
    for t in range(n_top):
        best_items[t] = top[t]

    # (5) DFS over the ratio order, written as an explicit stack of frames (position,
    # #chosen, relevance, cost, bound, stage).  Stage 0 evaluates the node and descends into
    # "include order[pos]"; stage 1 then excludes it and descends; stage 2 undoes the
    # exclusion.  Excluding an item forbids every later item it dominates (cost >= and
    # score <=): some optimal set never holds an item while leaving out an earlier one that
    # dominates it (swap them: same count, no less relevance, no more cost), so the search
    # may skip such sets, and the bounds skip forbidden items.
    for t in range(n):
        forbid[t] = 0
    st_pos[0] = 0
    st_cnt[0] = 0
    st_stage[0] = 0
    st_s[0] = 0.0
    st_c[0] = 0.0
    st_bound[0] = 0.0
    sp = 1
    nodes = np.int64(0)
    work = np.int64(0)  # items scanned by the node evaluations, for the budget
    root_bound = 0.0  # costs are >= 0; replaced by the relaxation bound at the root
    while sp > 0:
        f = sp - 1
        pos = st_pos[f]
        stage = st_stage[f]
        if stage == 2:
            for t in range(pos + 1, n):
                if wc[t] >= wc[pos] and ws[t] <= ws[pos]:
                    forbid[t] -= 1
            sp -= 1
            continue
        cnt = st_cnt[f]
        acc_s = st_s[f]
        acc_c = st_c[f]
        bound = st_bound[f]
        if stage == 1:
            if bound >= best:
                sp -= 1
                continue
            for t in range(pos + 1, n):
                if wc[t] >= wc[pos] and ws[t] <= ws[pos]:
                    forbid[t] += 1
            st_stage[f] = 2
            st_pos[sp] = pos + 1
            st_cnt[sp] = cnt
            st_stage[sp] = 0
            st_s[sp] = acc_s
            st_c[sp] = acc_c
            st_bound[sp] = bound
            sp += 1
            continue

        # stage 0: evaluate the node
        is_root = nodes == 0
        if nodes >= node_limit or work >= _WORK_PER_NODE * node_limit:
            # stop: the open frames hold every unexplored subtree, with valid bounds
            root_bound = best
            for q in range(sp):
                if st_stage[q] < 2 and st_bound[q] < root_bound:
                    root_bound = st_bound[q]
            nodes = node_limit
            break
        nodes += 1
        work += n - pos
        if bound >= best or acc_c >= best:
            sp -= 1
            continue
        m = k_max - cnt
        m_min = k_min - cnt if k_min > cnt else 0
        rem = n - pos
        g = thr - acc_s
        if rem < m_min:
            sp -= 1
            continue
        # the m_min cheapest remaining items already reach the target: exact completion
        # (optimal over all completions, forbidden items included, so the node is closed)
        if cheap_s[pos, m_min] >= g:
            if is_root:
                root_bound = cheap_c[pos, m_min]
            if acc_c + cheap_c[pos, m_min] < best:
                best = acc_c + cheap_c[pos, m_min]
                size = _suffix_select(ws, wc, pos, n, m_min, False, sel)
                for t in range(cnt):
                    best_items[t] = path[t]
                for t in range(size):
                    best_items[cnt + t] = order[sel[t]]
                best_len = cnt + size
            sp -= 1
            continue
        if m == 0 or rem == 0:
            sp -= 1
            continue
        m_top = m if m < rem else rem
        if top_s[pos, m_top] < g:
            sp -= 1
            continue  # even the highest remaining scores cannot reach the target
        if acc_c + top_c[pos, m_top] < best:  # the top-score completion is feasible
            best = acc_c + top_c[pos, m_top]
            size = _suffix_select(ws, wc, pos, n, m_top, True, sel)
            for t in range(cnt):
                best_items[t] = path[t]
            for t in range(size):
                best_items[cnt + t] = order[sel[t]]
            best_len = cnt + size
        dantzig, refined, lam, lp_size = _dantzig(ws, wc, ratio, forbid, pos, n, g)
        if acc_c + refined > bound:
            bound = acc_c + refined
        # the Dantzig solution is also optimal for the LP with cardinality constraints unless
        # it uses more than m or fewer than m_min items; only then can Lagrange do better
        if bound < best and (lp_size > m + 1e-9 or lp_size < m_min - 1e-9):
            # Kelley's cutting planes on the concave L(lam): lines through a point below
            # (relevance short of g) and one above (relevance reached)
            lo_c = cheap_c[pos, m_min]
            lo_s = cheap_s[pos, m_min]
            hi_c = top_c[pos, m_top]
            hi_s = top_s[pos, m_top]
            limit = np.inf if is_root else best
            iterations = _ROOT_ITERATIONS if is_root else _NODE_ITERATIONS
            for _ in range(iterations):
                if not (lam >= 0.0 and lam < np.inf):
                    break
                value, x_c, x_s, x_size = _lagrangian(ws, wc, forbid, pos, n, lam, g, m, m_min, xbuf, xval, scratch_v, scratch_t)
                if acc_c + value > bound:
                    bound = acc_c + value
                if bound >= limit:
                    break
                if x_s >= g:
                    model = lo_c + lam * (g - lo_s)
                    if acc_c + x_c < best and x_size >= m_min:  # X(lam) is a feasible completion
                        best = acc_c + x_c
                        for t in range(cnt):
                            best_items[t] = path[t]
                        for t in range(x_size):
                            best_items[cnt + t] = order[xbuf[t]]
                        best_len = cnt + x_size
                        if not is_root:
                            limit = best
                        if bound >= limit:
                            break
                    hi_c = x_c
                    hi_s = x_s
                else:
                    model = hi_c + lam * (g - hi_s)
                    lo_c = x_c
                    lo_s = x_s
                if value >= model - 1e-12 * (abs(model) + abs(value)):
                    break  # the cutting-plane model is tight: lam maximises L
                if hi_s <= lo_s:
                    break
                lam = (hi_c - lo_c) / (hi_s - lo_s)
        if is_root:
            root_bound = bound
        if bound >= best:
            sp -= 1
            continue
        st_bound[f] = bound
        if forbid[pos] > 0:
            # order[pos] is forbidden: only "exclude" remains, and the items it dominates
            # are already forbidden by whatever dominates it; reuse the frame
            st_pos[f] = pos + 1
            continue
        # descend into "include order[pos]"; this frame resumes at stage 1 afterwards
        st_stage[f] = 1
        path[cnt] = order[pos]
        st_pos[sp] = pos + 1
        st_cnt[sp] = cnt + 1
        st_stage[sp] = 0
        st_s[sp] = acc_s + ws[pos]
        st_c[sp] = acc_c + wc[pos]
        st_bound[sp] = bound
        sp += 1

    energy = 0.0
    for t in range(best_len):
        out_mask[best_items[t]] = True
    for k in range(K):
        if out_mask[k]:
            energy += c[k]
    return energy, True, nodes, root_bound


@njit(cache=True)
def des_solve_one(s, c, gamma, k_min, k_max, out_mask):
    """Solve one P1 instance exactly; see the module docstring for the contract."""
    iw, fw = _workspace(s.shape[0], k_min, k_max)
    return _solve(s, c, gamma, k_min, k_max, out_mask, iw, fw, DES_NODE_LIMIT)


@njit(cache=True, parallel=True)
def _des_rows(scores, costs, gamma, k_min, k_max, node_limit, num_chunks, mask, energy, violation, dropped, nodes, bound):
    """_solve on every row, rows split into num_chunks contiguous chunks run in parallel.

    Each chunk has its own workspace and every row's result depends on that row alone
    (_solve initialises whatever it reads), so the output is the same for any number of
    chunks and threads.
    """
    B, K = scores.shape
    for chunk in prange(num_chunks):
        iw, fw = _workspace(K, k_min, k_max)
        for b in range(chunk * B // num_chunks, (chunk + 1) * B // num_chunks):
            e, feasible, nd, lb = _solve(scores[b], costs[b], gamma, k_min, k_max, mask[b], iw, fw, node_limit)
            energy[b] = e
            violation[b] = not feasible
            nodes[b] = nd
            bound[b] = lb
            any_selected = False
            for k in range(K):
                if mask[b, k]:
                    any_selected = True
                    break
            dropped[b] = not any_selected
