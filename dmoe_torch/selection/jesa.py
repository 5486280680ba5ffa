"""JESA: joint expert and subcarrier allocation (problem P2 of DESIGN.md section 4).

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

Everything per row runs in one numba-compiled loop (no Python per row).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from numba import njit

from .common import RELEVANCE_TOL, Selection, empty_selection, validate_inputs
from .des import des_solve_one

__all__ = ["jesa", "jesa_numpy", "JesaResult", "min_cost_assignment", "DEFAULT_MAX_ITERATIONS"]

# Upper limit on DES solves per row in the iterative phase (the energy strictly decreases
# every iteration, so the loop also ends on its own; the limit bounds the worst case).
DEFAULT_MAX_ITERATIONS = 16
# Relative slack when comparing energies: an iteration must improve by more than this, and a
# result within it of the lower bound counts as optimal.
ENERGY_RTOL = 1e-12


class JesaResult(NamedTuple):
    """JESA output on numpy arrays (B rows, K experts).

    mask bool[B,K]; subcarrier int64[B,K] (-1 where not selected); energy float64[B] J;
    violation, dropped, certified bool[B]; nodes int64[B] (DES nodes over all iterations);
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


@njit(cache=True)
def _assignment_rows(e, mask, out_sub, out_energy):
    K, N = e.shape[1], e.shape[2]
    work_cost = np.empty((K, N))
    work_rows = np.empty(K, np.int64)
    work_cols = np.empty(K, np.int64)
    for b in range(e.shape[0]):
        out_energy[b] = _assign_selected(e[b], mask[b], out_sub[b], work_cost, work_rows, work_cols)


def min_cost_assignment(costs: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Min-cost assignment of each row's selected experts to distinct subcarriers.

    costs float64[B, K, N] J (+inf outage), mask bool[B, K] with at most N experts per row.
    Returns (subcarrier int64[B, K], -1 where not selected or no finite link could be given;
    energy float64[B] J, +inf where some selected expert got no finite link).
    """
    costs = np.ascontiguousarray(costs, dtype=np.float64)
    mask = np.ascontiguousarray(mask, dtype=np.bool_)
    B, K, N = costs.shape
    if (mask.sum(1) > N).any():
        raise ValueError(f"mask selects more than N={N} experts in some row")
    sub = np.full((B, K), -1, dtype=np.int64)
    energy = np.zeros(B)
    if B:
        _assignment_rows(costs, mask, sub, energy)
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


@njit(cache=True)
def _jesa_rows(
    s_all, e_all, gamma, k_min, k_max, max_iterations,
    mask_out, sub_out, energy_out, violation_out, dropped_out, certified_out, nodes_out, bound_out, iters_out,
):
    B, K, N = e_all.shape
    thr = gamma - RELEVANCE_TOL
    best_sub = np.empty(K, np.int64)
    best_cost = np.empty(K)
    costs_now = np.empty(K)
    cand_mask = np.empty(K, np.bool_)
    cand_sub = np.empty(K, np.int64)
    cur_sub = np.empty(K, np.int64)
    used = np.empty(N, np.bool_)
    work_cost = np.empty((K, N))
    work_rows = np.empty(K, np.int64)
    work_cols = np.empty(K, np.int64)
    match_of_sub = np.empty(N, np.int64)
    sub_of_expert = np.empty(K, np.int64)
    parent = np.empty(N, np.int64)
    queue = np.empty(K + 1, np.int64)
    for b in range(B):
        s = s_all[b]
        e = e_all[b]
        mask = mask_out[b]
        sub = sub_out[b]
        _best_links(e, best_sub, best_cost)
        lower, feasible, nodes, _root = des_solve_one(s, best_cost, gamma, k_min, k_max, mask)
        nodes_out[b] = nodes
        iters_out[b] = 1
        distinct = _best_links_distinct(mask, best_sub, used)
        p1_infeasible = not feasible
        if p1_infeasible:
            # P1 under c* is infeasible, hence so is P2 (its feasible sets are a subset).
            violation_out[b] = True
            bound_out[b] = np.nan
            if distinct:  # DES's fallback (top scores) is matchable on the best links
                count = 0
                for k in range(K):
                    sub[k] = -1
                    if mask[k]:
                        sub[k] = best_sub[k]
                        count += 1
                dropped_out[b] = count == 0
                if count == 0:
                    iters_out[b] = 0
                energy_out[b] = lower
                continue
        else:
            bound_out[b] = lower
            if distinct:  # structural property: optimal for P2
                for k in range(K):
                    sub[k] = best_sub[k] if mask[k] else -1
                energy_out[b] = lower
                certified_out[b] = True
                continue
            # iterative phase; the first candidate is "DES under c*, then min-cost assignment"
            best_energy = _assign_selected(e, mask, sub, work_cost, work_rows, work_cols)
            cur_sub[:] = sub
            for _ in range(max_iterations - 1):
                if best_energy <= lower * (1.0 + ENERGY_RTOL):
                    break  # reached the lower bound: nothing can improve it
                _updated_costs(e, cur_sub, costs_now, used)
                _e, ok, nd, _r = des_solve_one(s, costs_now, gamma, k_min, k_max, cand_mask)
                nodes_out[b] += nd
                iters_out[b] += 1
                if not ok:
                    break
                energy = _assign_selected(e, cand_mask, cand_sub, work_cost, work_rows, work_cols)
                if not energy < best_energy * (1.0 - ENERGY_RTOL):
                    break
                best_energy = energy
                mask[:] = cand_mask
                sub[:] = cand_sub
                cur_sub[:] = cand_sub
            if best_energy < np.inf:
                energy_out[b] = best_energy
                certified_out[b] = True
                continue
        # P2 fallback: maximum-relevance matchable set; feasible iff it meets gamma and k_min.
        count = _max_relevance_set(
            s, e, best_cost, k_max, mask, match_of_sub, sub_of_expert, used, parent, queue
        )
        energy_out[b] = _assign_selected(e, mask, sub, work_cost, work_rows, work_cols)
        relevance = 0.0
        for k in range(K):
            if mask[k]:
                relevance += s[k]
        violation_out[b] = p1_infeasible or not (relevance >= thr and count >= k_min)
        dropped_out[b] = count == 0
        if count == 0:
            energy_out[b] = 0.0


def jesa_numpy(
    scores: np.ndarray,
    costs: np.ndarray,
    gamma: float,
    k_min: int,
    k_max: int,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
) -> JesaResult:
    """JESA on float64 arrays scores [B, K], costs [B, K, N] (J, +inf outage); no validation.

    k_max is capped at N here (each selected expert needs its own subcarrier).
    """
    scores = np.ascontiguousarray(scores, dtype=np.float64)
    costs = np.ascontiguousarray(costs, dtype=np.float64)
    B, K, N = costs.shape
    k_max = min(int(k_max), N)
    result = JesaResult(
        mask=np.zeros((B, K), dtype=np.bool_),
        subcarrier=np.full((B, K), -1, dtype=np.int64),
        energy=np.zeros(B),
        violation=np.zeros(B, dtype=np.bool_),
        dropped=np.zeros(B, dtype=np.bool_),
        certified=np.zeros(B, dtype=np.bool_),
        nodes=np.zeros(B, dtype=np.int64),
        lower_bound=np.full(B, np.nan),
        iterations=np.zeros(B, dtype=np.int64),
    )
    if B:
        _jesa_rows(
            scores, costs, float(gamma), int(k_min), k_max, max(1, int(max_iterations)),
            result.mask, result.subcarrier, result.energy, result.violation, result.dropped,
            result.certified, result.nodes, result.lower_bound, result.iterations,
        )
    return result


def jesa(
    scores: torch.Tensor, costs: torch.Tensor, gamma: float, k_min: int = 1, k_max: int | None = None
) -> Selection:
    """Joint expert and subcarrier allocation (P2) per row.

    scores [B, K] gate probabilities (rows sum to 1); costs [B, K, N] link energies in J
    (+inf = outage); gamma in (0, 1]; k_min <= k_max <= K (k_max is further capped at N).
    Returns a CPU Selection: mask, subcarrier (-1 where not selected), energy [J], violation,
    dropped, nodes (DES nodes over all iterations), lower_bound (P1 optimum under
    c*_k = min_n e_{k,n}; nan where that is infeasible), certified (provably optimal for
    P2), failed (all False).  Raises ValueError naming a bad argument.
    """
    s, c, gamma, k_min, k_max = validate_inputs(scores, costs, gamma, k_min, k_max, cost_ndim=3)
    B, K = s.shape
    if B == 0:
        return empty_selection(0, K)
    r = jesa_numpy(s.numpy(), c.numpy(), gamma, k_min, k_max)
    sel = empty_selection(B, K)
    sel.mask = torch.from_numpy(r.mask)
    sel.subcarrier = torch.from_numpy(r.subcarrier)
    sel.energy = torch.from_numpy(r.energy)
    sel.violation = torch.from_numpy(r.violation)
    sel.dropped = torch.from_numpy(r.dropped)
    sel.nodes = torch.from_numpy(r.nodes)
    sel.lower_bound = torch.from_numpy(r.lower_bound)
    sel.certified = torch.from_numpy(r.certified)
    return sel
