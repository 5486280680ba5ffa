"""JESA: joint expert and subcarrier allocation (problem P2, docs/method.md sections 4 and 5).

Per row b (one input at one MoE layer), with scores s [K] and link costs e [K, N]
(joules, +inf = link in outage):

    minimise  sum_{k,n} e_{k,n} y_{k,n}
    s.t.      sum_n y_{k,n} = x_k,  sum_k y_{k,n} <= 1,
              sum_k s_k x_k >= gamma - RELEVANCE_TOL,  k_min <= sum_k x_k <= min(k_max, N),
              x, y binary, y_{k,n} = 0 where e_{k,n} = +inf.

Algorithm (docs/method.md proves the properties used here):

1. c*_k = min_n e_{k,n} (each expert on its own best subcarrier); x = DES(c*).  The P1
   optimum under c* is a lower bound on P2 (``lower_bound``).
2. If the selected experts' best subcarriers are distinct, pairing each with its best
   subcarrier is optimal for P2: stop, ``certified``.  This is the common case (a collision
   among m selected experts has probability <= m(m-1)/(2N)); it costs one DES solve.
3. Otherwise assign subcarriers to the selected experts by a minimum-cost assignment
   (Hungarian algorithm; an expert that cannot get a finite link marks the set infeasible),
   then repeat: each expert's cost becomes its cheapest subcarrier not used by the *other*
   selected experts' assignment (an expert left without a finite link gets +inf), rerun DES,
   reassign; stop when the energy no longer decreases (or equals the lower bound); keep the
   best.  The first candidate is "DES under c*, then min-cost assignment", so JESA is never
   worse than it.
4. If no candidate was feasible, or P1 under c* is infeasible, use the P2 fallback: the
   experts taken greedily by descending score (ties: lower c*, then lower index) as long as
   the chosen set still has a matching onto distinct finite-cost subcarriers, at most
   min(k_max, N) of them.  Matchable sets form a (transversal) matroid, so this greedy set has
   the maximum relevance any feasible P2 selection can reach: if it reaches gamma with at
   least k_min experts it is a feasible answer (violation False); otherwise P2 is infeasible
   and it is returned with violation=True, exactly like DES's P1 fallback.  No reachable
   expert at all: empty mask, energy 0, dropped=True, violation=True.

Per-row work runs in numba-compiled loops over the batch; DES runs batched through
``des_numpy`` (once for the whole batch, then once per iteration round on the rows still
improving), so there is no Python work per row; for k_max <= 2 (the MoE layer's sets) each
row runs steps 1-3 in one kernel call instead (small_sets.jesa_small_numpy, the same answer
on inputs without exact ties), and only the rows needing step 4 come back here.  The row
loops run in parallel over chunks of rows on as many threads as torch's intra-op setting (``torch.get_num_threads()``, capped at
``NUMBA_NUM_THREADS``; ``jesa_numpy(..., num_threads=n)`` overrides it), with results
bit-identical for any thread count: see "Threads" in des.py.  The numba code here
deliberately calls no jitted function of another module: numba's on-disk cache does not
notice when such a callee changes, and a stale cached JESA would silently run an old DES.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from numba import njit, prange

from .common import RELEVANCE_TOL, Selection, selection_from_arrays, validate_inputs
from .des import des_numpy
from .small_sets import ENERGY_RTOL, SMALL_SET_SIZE, des_small_numpy, jesa_small_numpy
from .threads import row_chunks, run_parallel, solver_threads

__all__ = ["jesa", "jesa_validated", "jesa_numpy", "JesaResult", "min_cost_assignment", "DEFAULT_MAX_ITERATIONS"]

# Upper limit on DES solves per row in the iterative phase (the energy strictly decreases
# every iteration, so the loop also ends on its own; the limit bounds the worst case).
DEFAULT_MAX_ITERATIONS = 16
# ENERGY_RTOL (small_sets.py): relative slack when comparing energies; an iteration must
# improve by more than it, and a result within it of the lower bound counts as optimal.


class JesaResult(NamedTuple):
    """JESA output on numpy arrays (B rows, K experts).

    mask bool[B,K]; subcarrier int64[B,K] (-1 where not selected); energy float64[B] J;
    violation, dropped, certified bool[B]; nodes int64[B] (DES nodes over all iterations; 0 for
    k_max <= 2, where DES enumerates: no search tree);
    lower_bound float64[B] J (P1 optimum under c*, nan where P1 under c* is infeasible);
    iterations int64[B] (DES solves: 1 when the first selection was certified, 0 when no
    expert is reachable).
    """

    mask: np.ndarray
    subcarrier: np.ndarray
    energy: np.ndarray
    violation: np.ndarray
    dropped: np.ndarray
    certified: np.ndarray
    nodes: np.ndarray
    lower_bound: np.ndarray
    iterations: np.ndarray


# --------------------------------------------------------------------------------------
# minimum-cost assignment (rectangular Hungarian algorithm, shortest augmenting paths)
# --------------------------------------------------------------------------------------
@njit(cache=True)
def _hungarian(cost, m, n, row_to_col):
    """Min-cost assignment of rows 0..m-1 of cost [>=m, n] (finite, m <= n) to distinct columns.

    Writes the column of each row into row_to_col[:m].  Potentials u (rows) and v (columns)
    keep every reduced cost cost[i, j] - u[i] - v[j] >= 0; each row is added by a Dijkstra-like
    search for the cheapest augmenting path in reduced costs.
    """
    u = np.zeros(m + 1)
    v = np.zeros(n + 1)
    owner = np.zeros(n + 1, np.int64)  # owner[j] = 1-based row matched to column j (0: free)
    came_from = np.zeros(n + 1, np.int64)
    min_reduced = np.empty(n + 1)
    done = np.empty(n + 1, np.bool_)
    for i in range(1, m + 1):
        owner[0] = i  # column 0 is a virtual start column holding the new row
        col = 0
        min_reduced[:] = np.inf
        done[:] = False
        while True:
            done[col] = True
            row = owner[col]
            delta = np.inf
            next_col = 0
            for j in range(1, n + 1):
                if not done[j]:
                    reduced = cost[row - 1, j - 1] - u[row] - v[j]
                    if reduced < min_reduced[j]:
                        min_reduced[j] = reduced
                        came_from[j] = col
                    if min_reduced[j] < delta:
                        delta = min_reduced[j]
                        next_col = j
            for j in range(n + 1):
                if done[j]:
                    u[owner[j]] += delta
                    v[j] -= delta
                else:
                    min_reduced[j] -= delta
            col = next_col
            if owner[col] == 0:
                break
        while col != 0:  # flip the augmenting path back to the start column
            prev = came_from[col]
            owner[col] = owner[prev]
            col = prev
    for j in range(1, n + 1):
        if owner[j] > 0:
            row_to_col[owner[j] - 1] = j - 1


@njit(cache=True)
def _assign_selected(e, mask, out_sub, work_cost, work_rows, work_cols):
    """Min-cost assignment of the selected experts of one row to distinct subcarriers.

    e [K, N] J (+inf outage), mask bool[K].  Links in outage get a big finite cost larger than
    any sum of finite ones, so the assignment first maximises the number of finite links, then
    minimises energy.  Writes out_sub[k] (the subcarrier, or -1 if not selected or left
    without a finite link) and returns the energy, +inf when some selected expert has no
    finite link.
    """
    K, N = e.shape
    m = 0
    largest = 0.0
    for k in range(K):
        out_sub[k] = -1
        if mask[k]:
            work_rows[m] = k
            m += 1
            for n in range(N):
                if e[k, n] < np.inf and e[k, n] > largest:
                    largest = e[k, n]
    if m == 0:
        return 0.0
    big = (m + 1) * largest if largest > 0.0 else 1.0
    for i in range(m):
        for n in range(N):
            value = e[work_rows[i], n]
            work_cost[i, n] = value if value < np.inf else big
    _hungarian(work_cost, m, N, work_cols)
    energy = 0.0
    for i in range(m):
        k = work_rows[i]
        n = work_cols[i]
        if e[k, n] < np.inf:
            out_sub[k] = n
            energy += e[k, n]
        else:
            energy = np.inf
    return energy


@njit(cache=True, parallel=True)
def _assignment_rows(e, mask, num_chunks, out_sub, out_energy):
    B, K, N = e.shape
    for chunk in prange(num_chunks):
        work_cost = np.empty((K, N))
        work_rows = np.empty(K, np.int64)
        work_cols = np.empty(K, np.int64)
        for b in range(chunk * B // num_chunks, (chunk + 1) * B // num_chunks):
            out_energy[b] = _assign_selected(e[b], mask[b], out_sub[b], work_cost, work_rows, work_cols)


def _assignment(e, mask, out_sub, out_energy, num_threads):
    """_assignment_rows on solver_threads(num_threads) threads."""
    chunks = row_chunks(e.shape[0], solver_threads(num_threads))
    run_parallel(_assignment_rows, num_threads, e, mask, chunks, out_sub, out_energy)


def min_cost_assignment(costs: np.ndarray, mask: np.ndarray, *, num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Min-cost assignment of each row's selected experts to distinct subcarriers.

    costs float64[B, K, N] J (+inf outage), mask bool[B, K] with at most N experts per row.
    Returns (subcarrier int64[B, K], -1 where not selected or no finite link could be given;
    energy float64[B] J, +inf where some selected expert got no finite link).
    num_threads: threads for the row loop (None: torch's setting, see the module docstring).
    """
    costs = np.ascontiguousarray(costs, dtype=np.float64)
    mask = np.ascontiguousarray(mask, dtype=np.bool_)
    B, K, N = costs.shape
    if (mask.sum(1) > N).any():
        raise ValueError(f"mask selects more than N={N} experts in some row")
    sub = np.full((B, K), -1, dtype=np.int64)
    energy = np.zeros(B)
    if B:
        _assignment(costs, mask, sub, energy, num_threads)
    return sub, energy


# --------------------------------------------------------------------------------------
# per-row pieces of JESA
# --------------------------------------------------------------------------------------
@njit(cache=True)
def _best_links(e, best_sub, best_cost):
    """Each expert's cheapest subcarrier (lowest index on ties) and its cost c*."""
    K, N = e.shape
    for k in range(K):
        arg = 0
        low = e[k, 0]
        for n in range(1, N):
            if e[k, n] < low:
                low = e[k, n]
                arg = n
        best_sub[k] = arg
        best_cost[k] = low


@njit(cache=True)
def _best_links_distinct(mask, best_sub, used):
    """True when the selected experts' best subcarriers are pairwise distinct."""
    used[:] = False
    for k in range(mask.shape[0]):
        if mask[k]:
            if used[best_sub[k]]:
                return False
            used[best_sub[k]] = True
    return True


@njit(cache=True)
def _updated_costs(e, sub, out_cost, used):
    """Each expert's cheapest subcarrier not used by the other selected experts' assignment.

    sub[k] >= 0 is expert k's assigned subcarrier (-1: not selected or no finite link).
    """
    K, N = e.shape
    used[:] = False
    for k in range(K):
        if sub[k] >= 0:
            used[sub[k]] = True
    for k in range(K):
        low = np.inf
        for n in range(N):
            if (not used[n] or n == sub[k]) and e[k, n] < low:
                low = e[k, n]
        out_cost[k] = low


@njit(cache=True)
def _augment(e, start, match_of_sub, sub_of_expert, visited, parent, queue):
    """Try to add expert `start` to a matching on finite links (BFS augmenting path)."""
    K, N = e.shape
    visited[:] = False
    queue[0] = start
    head = 0
    tail = 1
    free_sub = -1
    while head < tail and free_sub < 0:
        k = queue[head]
        head += 1
        for n in range(N):
            if e[k, n] < np.inf and not visited[n]:
                visited[n] = True
                parent[n] = k
                if match_of_sub[n] < 0:
                    free_sub = n
                    break
                queue[tail] = match_of_sub[n]
                tail += 1
    if free_sub < 0:
        return False
    n = free_sub
    while True:
        k = parent[n]
        previous = sub_of_expert[k]
        match_of_sub[n] = k
        sub_of_expert[k] = n
        if k == start:
            return True
        n = previous


@njit(cache=True)
def _max_relevance_set(s, e, best_cost, k_max, out_mask, match_of_sub, sub_of_expert, visited, parent, queue):
    """Greedy by descending score (ties: lower c*, lower index) over matchable sets, <= k_max experts.

    Matchable sets form a transversal matroid, so the result has the maximum relevance of any
    set of at most k_max experts with distinct finite-cost subcarriers.  Returns its size.
    """
    K = s.shape[0]
    by_cost = np.argsort(best_cost, kind="mergesort")
    neg_score = np.empty(K)
    for t in range(K):
        neg_score[t] = -s[by_cost[t]]
    order = by_cost[np.argsort(neg_score, kind="mergesort")]
    match_of_sub[:] = -1
    sub_of_expert[:] = -1
    out_mask[:] = False
    count = 0
    for t in range(K):
        if count == k_max:
            break
        k = order[t]
        if best_cost[k] < np.inf and _augment(e, k, match_of_sub, sub_of_expert, visited, parent, queue):
            out_mask[k] = True
            count += 1
    return count


@njit(cache=True, parallel=True)
def _best_links_rows(e_all, num_chunks, best_sub, best_cost):
    B = e_all.shape[0]
    for chunk in prange(num_chunks):
        for b in range(chunk * B // num_chunks, (chunk + 1) * B // num_chunks):
            _best_links(e_all[b], best_sub[b], best_cost[b])


@njit(cache=True, parallel=True)
def _first_pass(
    e_all, mask_all, violation, lower, best_sub, num_chunks, status, sub_out, energy_out, certified_out, dropped_out, iters_out
):
    """Rows whose DES(c*) selection uses distinct best links are final; writes a status per row.

    status 0: final.  1: P1 under c* feasible but best links collide (iterative phase).
    2: P1 under c* infeasible and the fallback's best links collide (P2 fallback).
    """
    B, K, N = e_all.shape
    for chunk in prange(num_chunks):
        used = np.empty(N, np.bool_)
        for b in range(chunk * B // num_chunks, (chunk + 1) * B // num_chunks):
            mask = mask_all[b]
            iters_out[b] = 1
            status[b] = 0
            if not _best_links_distinct(mask, best_sub[b], used):
                status[b] = 2 if violation[b] else 1
                continue
            count = 0
            for k in range(K):
                sub_out[b, k] = -1
                if mask[k]:
                    sub_out[b, k] = best_sub[b, k]
                    count += 1
            energy_out[b] = lower[b]  # DES's energy under c*: the sum of the best-link costs
            if violation[b]:
                dropped_out[b] = count == 0
                if count == 0:
                    iters_out[b] = 0
            else:
                certified_out[b] = True  # structural property: optimal for P2


@njit(cache=True, parallel=True)
def _updated_costs_rows(e_all, sub_all, num_chunks, out_cost):
    B, N = e_all.shape[0], e_all.shape[2]
    for chunk in prange(num_chunks):
        used = np.empty(N, np.bool_)
        for b in range(chunk * B // num_chunks, (chunk + 1) * B // num_chunks):
            _updated_costs(e_all[b], sub_all[b], out_cost[b], used)


@njit(cache=True, parallel=True)
def _fallback_rows(s_all, e_all, best_cost, k_max, k_min, threshold, num_chunks, mask_out, sub_out, energy_out, feasible_out):
    """P2 fallback per row: the maximum-relevance matchable set and its min-cost assignment.

    feasible_out[b]: the set reaches the relevance threshold with at least k_min experts.
    """
    B, K, N = e_all.shape
    for chunk in prange(num_chunks):
        work_cost = np.empty((K, N))
        work_rows = np.empty(K, np.int64)
        work_cols = np.empty(K, np.int64)
        match_of_sub = np.empty(N, np.int64)
        sub_of_expert = np.empty(K, np.int64)
        visited = np.empty(N, np.bool_)
        parent = np.empty(N, np.int64)
        queue = np.empty(K + 1, np.int64)
        for b in range(chunk * B // num_chunks, (chunk + 1) * B // num_chunks):
            count = _max_relevance_set(
                s_all[b], e_all[b], best_cost[b], k_max, mask_out[b], match_of_sub, sub_of_expert, visited, parent, queue
            )
            energy_out[b] = _assign_selected(e_all[b], mask_out[b], sub_out[b], work_cost, work_rows, work_cols)
            relevance = 0.0
            for k in range(K):
                if mask_out[b, k]:
                    relevance += s_all[b, k]
            feasible_out[b] = relevance >= threshold and count >= k_min


def _des(s, c, gamma, k_min, k_max, threads):
    """DES on float64 arrays s, c [R, K]: (mask, energy J, violation, nodes).  Sets of at most
    SMALL_SET_SIZE experts are enumerated (des_small_numpy: exact, no search tree, nodes 0;
    on one core 5-10x faster than the branch and bound at K = 8), larger ones use des_numpy."""
    if k_max <= SMALL_SET_SIZE:
        mask, energy, feasible = des_small_numpy(s, c, gamma - RELEVANCE_TOL, k_min, k_max, num_threads=threads)
        return mask, energy, ~feasible, np.zeros(mask.shape[0], dtype=np.int64)
    mask, energy, violation, _, nodes, _ = des_numpy(s, c, gamma, k_min, k_max, num_threads=threads)
    return mask, energy, violation, nodes


def _iterate(s, e, lower, mask, gamma, k_min, k_max, max_iterations, threads):
    """JESA's iterative phase on the rows given (all with a feasible P1 under c*).

    s [R, K], e [R, K, N], lower [R] (P1 optimum under c*), mask [R, K] (DES under c*).
    Returns (mask, subcarrier, energy (+inf: no feasible candidate found), nodes, iterations).
    Each round runs DES once on every still-active row (batched), so the Python work is per
    round, not per row.  threads: as solver_threads returns.
    """
    R, K = mask.shape
    sub = np.full((R, K), -1, dtype=np.int64)
    energy = np.zeros(R)
    _assignment(e, mask, sub, energy, threads)  # first candidate: DES under c*, then assignment
    nodes = np.zeros(R, dtype=np.int64)
    iterations = np.ones(R, dtype=np.int64)
    active = energy > lower * (1.0 + ENERGY_RTOL)  # rows at the bound are already optimal
    for _ in range(max_iterations - 1):
        rows = np.flatnonzero(active)
        if rows.size == 0:
            break
        e_rows = e[rows]
        costs_now = np.empty((rows.size, K))
        run_parallel(_updated_costs_rows, threads, e_rows, sub[rows], row_chunks(rows.size, threads), costs_now)
        new_mask, _, new_violation, new_nodes = _des(s[rows], costs_now, gamma, k_min, k_max, threads)
        nodes[rows] += new_nodes
        iterations[rows] += 1
        new_sub = np.full((rows.size, K), -1, dtype=np.int64)
        new_energy = np.zeros(rows.size)
        _assignment(e_rows, new_mask, new_sub, new_energy, threads)
        new_energy[new_violation] = np.inf
        improved = new_energy < energy[rows] * (1.0 - ENERGY_RTOL)
        better = rows[improved]
        mask[better] = new_mask[improved]
        sub[better] = new_sub[improved]
        energy[better] = new_energy[improved]
        active[rows[~improved]] = False
        active[better] = energy[better] > lower[better] * (1.0 + ENERGY_RTOL)
    return mask, sub, energy, nodes, iterations


def jesa_numpy(
    scores: np.ndarray,
    costs: np.ndarray,
    gamma: float,
    k_min: int,
    k_max: int,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
    *,
    num_threads: int | None = None,
) -> JesaResult:
    """JESA on float64 arrays scores [B, K], costs [B, K, N] (J, +inf outage); no validation.

    k_max is capped at N here (each selected expert needs its own subcarrier).
    num_threads: threads for the row loops (None: torch.get_num_threads(), see the module
    docstring); the results do not depend on it.
    """
    s = np.ascontiguousarray(scores, dtype=np.float64)
    e = np.ascontiguousarray(costs, dtype=np.float64)
    B, K, N = e.shape
    k_max = min(int(k_max), N)
    gamma = float(gamma)
    max_iterations = max(1, int(max_iterations))
    threads = solver_threads(num_threads)
    if B == 0:
        flags = np.zeros(0, dtype=np.bool_)
        counts = np.zeros(0, dtype=np.int64)
        return JesaResult(
            np.zeros((0, K), np.bool_), np.zeros((0, K), np.int64), np.zeros(0), flags, flags, flags, counts, np.zeros(0), counts
        )
    if k_max <= SMALL_SET_SIZE:  # the whole row in one numba call (small_sets.py)
        mask, sub, energy, _, violation, certified, iterations, fallback, dropped, lower_bound = jesa_small_numpy(
            s, e, gamma - RELEVANCE_TOL, k_min, k_max, max_iterations, num_threads=threads
        )
        nodes = np.zeros(B, dtype=np.int64)
    else:
        mask, sub, energy, lower, violation, certified, iterations, fallback, nodes = _steps(
            s, e, gamma, k_min, k_max, max_iterations, threads
        )
        dropped = violation & ~mask.any(1)  # the final rows' (fallback rows: below)
        lower_bound = np.where(violation, np.nan, lower)
    # (4) P2 fallback: maximum-relevance matchable set; feasible iff it meets gamma and k_min
    rows = np.flatnonzero(fallback)
    if rows.size:
        e_rows = e[rows]
        best_sub = np.empty((rows.size, K), dtype=np.int64)
        best_cost = np.empty((rows.size, K))
        run_parallel(_best_links_rows, threads, e_rows, row_chunks(rows.size, threads), best_sub, best_cost)
        f_mask = np.zeros((rows.size, K), dtype=np.bool_)
        f_sub = np.full((rows.size, K), -1, dtype=np.int64)
        f_energy = np.zeros(rows.size)
        f_feasible = np.zeros(rows.size, dtype=np.bool_)
        args = (s[rows], e_rows, best_cost, k_max, k_min, gamma - RELEVANCE_TOL, row_chunks(rows.size, threads))
        run_parallel(_fallback_rows, threads, *args, f_mask, f_sub, f_energy, f_feasible)
        mask[rows] = f_mask
        sub[rows] = f_sub
        empty = ~f_mask.any(1)
        energy[rows] = np.where(empty, 0.0, f_energy)
        # P1 under c* infeasible implies P2 infeasible, whatever the float sums say
        violation[rows] = violation[rows] | ~f_feasible
        dropped[rows] = empty
    return JesaResult(mask, sub, energy, violation, dropped, certified, nodes, lower_bound, iterations)


def _steps(s, e, gamma, k_min, k_max, max_iterations, threads):
    """JESA's steps (1)-(3) as batched passes (any k_max): (mask, sub, energy, lower (DES's
    energy under c*), violation, certified, iterations, fallback (rows needing step 4), nodes)."""
    B, K, N = e.shape
    sub = np.full((B, K), -1, dtype=np.int64)
    energy = np.zeros(B)
    certified = np.zeros(B, dtype=np.bool_)
    dropped = np.zeros(B, dtype=np.bool_)
    iterations = np.zeros(B, dtype=np.int64)
    # (1) c*, DES under c* for the whole batch
    best_sub = np.empty((B, K), dtype=np.int64)
    best_cost = np.empty((B, K))
    chunks = row_chunks(B, threads)
    run_parallel(_best_links_rows, threads, e, chunks, best_sub, best_cost)
    mask, lower, violation, nodes = _des(s, best_cost, gamma, k_min, k_max, threads)
    # (2) distinct best links: final (certified when feasible)
    status = np.empty(B, dtype=np.int64)
    args = (e, mask, violation, lower, best_sub, chunks, status, sub, energy, certified, dropped, iterations)
    run_parallel(_first_pass, threads, *args)
    # (3) iterative phase on the rows whose selected experts' best links collide
    fallback = status == 2
    rows = np.flatnonzero(status == 1)
    if rows.size:
        r_mask, r_sub, r_energy, r_nodes, r_iterations = _iterate(
            s[rows], e[rows], lower[rows], mask[rows], gamma, k_min, k_max, max_iterations, threads
        )
        found = np.isfinite(r_energy)
        done = rows[found]
        mask[done] = r_mask[found]
        sub[done] = r_sub[found]
        energy[done] = r_energy[found]
        certified[done] = r_energy[found] <= lower[done] * (1.0 + ENERGY_RTOL)
        nodes[rows] += r_nodes
        iterations[rows] = r_iterations
        fallback[rows[~found]] = True
    return mask, sub, energy, lower, violation, certified, iterations, fallback, nodes


def jesa(scores: torch.Tensor, costs: torch.Tensor, gamma: float, k_min: int = 1, k_max: int | None = None) -> Selection:
    """Joint expert and subcarrier allocation (P2) per row.

    scores [B, K] gate probabilities (rows sum to 1); costs [B, K, N] link energies in J
    (+inf = outage); gamma in (0, 1]; k_min <= k_max <= K (k_max is further capped at N).
    Returns a CPU Selection: mask, subcarrier (-1 where not selected), energy [J], violation,
    dropped, nodes (DES nodes over all iterations, 0 for k_max <= 2), lower_bound (P1 optimum under
    c*_k = min_n e_{k,n}; nan where that is infeasible), certified (provably optimal for
    P2), failed (all False).  Raises ValueError naming a bad argument.
    """
    s, c, gamma, k_min, k_max = validate_inputs(scores, costs, gamma, k_min, k_max, cost_ndim=3)
    return jesa_validated(s, c, gamma, k_min, k_max)


def jesa_validated(s: torch.Tensor, c: torch.Tensor, gamma: float, k_min: int, k_max: int) -> Selection:
    """:func:`jesa` on inputs already checked by ``validate_inputs`` (CPU float64, k_max resolved)."""
    r = jesa_numpy(s.numpy(), c.numpy(), gamma, k_min, k_max)
    return selection_from_arrays(
        r.mask, r.energy, r.violation, r.dropped, r.nodes, r.lower_bound, subcarrier=r.subcarrier, certified=r.certified
    )
