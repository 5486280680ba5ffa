"""DES (P1) and JESA (P2) for sets of at most two experts, as numba row loops on the CPU.

DES.
``des_enumerate`` (enumerate.py) scores every candidate set with [B, C] tensor algebra; on
one CPU core each of its ~10 passes over the [B, C] tables costs 0.3-0.8 ms at the MoE
layer's size (12,544 rows, K = 8, C = 36).  For k_max <= 2 this kernel visits the same
candidate sets in the same order per row and keeps the same answer, in one pass and without
temporaries:

* candidate order: the single experts (when k_min = 1), then the pairs i < j
  lexicographically; the first cheapest set whose experts are all reachable (cost < +inf) and
  whose relevance s_i (+ s_j) reaches ``threshold`` wins (strict ``<``: the first minimum);
* energies and relevances are the same float64 sums (c_i + c_j: two terms, one rounding, so
  any summation order gives the same bits);
* infeasible rows: the min(k_max, #reachable) reachable experts first by (score desc, cost
  asc, index asc), ``_fallback_order``'s rule; energy the sum of their costs.

So ``des_small_numpy`` equals ``des_enumerate`` bit for bit (tests/selection/test_enumerate.py)
and is exact for P1 (ties broken by candidate order).  It has no search tree: nodes are 0.

JESA.  ``jesa_small_numpy`` runs jesa.py's algorithm (the same steps, rounds and stopping
rule) with the whole row in one kernel call instead of one batched pass per step and round:
c* and the best links, DES under c* (``_solve_row``), and on the rows whose two selected
experts share a best link the iteration, where the min-cost assignment of two experts is
``_assign_pair`` (exact: one of them keeps its best link in some optimal assignment) instead
of the Hungarian algorithm.  Rows that need JESA's P2 fallback are flagged for jesa.py.
On inputs without exact ties it gives jesa_numpy's general path's answer
(tests/selection/test_jesa.py); on ties the assignment may pick another optimal subcarrier.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from .common import RELEVANCE_TOL, Selection, selection_from_arrays
from .threads import row_chunks, run_parallel, solver_threads

__all__ = ["SMALL_SET_SIZE", "des_small", "des_small_numpy", "jesa_small_numpy"]

# Largest k_max these kernels handle (a pair's sum has one rounding whatever the order).
SMALL_SET_SIZE = 2
# JESA's relative energy slack (jesa.ENERGY_RTOL; jesa.py imports this module, a test keeps them equal).
ENERGY_RTOL = 1e-12


@njit(cache=True)
def _ahead(s, c, j, k):
    """True when expert j precedes expert k in the fallback order (reachable first; score
    desc, cost asc, index asc)."""
    key_j = s[j] if c[j] < np.inf else -1.0
    key_k = s[k] if c[k] < np.inf else -1.0
    if key_j != key_k:
        return key_j > key_k
    if c[j] != c[k]:
        return c[j] < c[k]
    return j < k


@njit(cache=True)
def _solve_row(s, c, threshold, k_min, k_max, out_mask, suffix):
    """One row: writes out_mask and returns (energy J, feasible); suffix: float64[K] scratch.

    A set with an unreachable expert costs +inf, never below ``best`` (+inf until a set is
    found), so the cost test alone excludes it; the strict ``<`` keeps the first minimum."""
    K = s.shape[0]
    best = np.inf
    first = -1
    second = -1
    if k_min == 1:
        for i in range(K):
            if c[i] < best and s[i] >= threshold:
                best, first = c[i], i
    if k_max >= 2:
        low = np.inf  # suffix[i]: the least cost of experts i + 1.. (skips i whose pairs cannot win)
        for i in range(K - 1, -1, -1):
            suffix[i] = low
            low = min(low, c[i])
        for i in range(K):
            ci = c[i]
            si = s[i]
            # fl(c_i + c_j) >= fl(c_i + suffix[i]) >= best: no pair of i is strictly cheaper
            if ci + suffix[i] < best:
                for j in range(i + 1, K):
                    energy = ci + c[j]
                    if energy < best and si + s[j] >= threshold:
                        best, first, second = energy, i, j
    found = first >= 0
    if not found:  # the fallback: the k_max reachable experts first in the fallback order
        for k in range(K):
            if c[k] < np.inf and (first < 0 or _ahead(s, c, k, first)):
                first = k
        if k_max >= 2 and first >= 0:
            for k in range(K):
                if k != first and c[k] < np.inf and (second < 0 or _ahead(s, c, k, second)):
                    second = k
    for k in range(K):
        out_mask[k] = False
    if first < 0:
        return 0.0, found
    if second >= 0 and second < first:
        first, second = second, first
    out_mask[first] = True
    energy = c[first]
    if second >= 0:
        out_mask[second] = True
        energy = energy + c[second]
    return energy, found


@njit(cache=True, parallel=True)
def _des_small_rows(scores, costs, threshold, k_min, k_max, num_subcarriers, num_chunks, out):
    """out: (mask, subcarrier, energy, violation, dropped, bound) of each row; subcarrier the
    static plan a(k) = k mod num_subcarriers where selected (-1 elsewhere, and everywhere
    when num_subcarriers is 0).  (Written here: numpy's mask.any(1) alone costs ~1 ms.)"""
    mask, subcarrier, energy, violation, dropped, bound = out
    B, K = scores.shape
    for chunk in prange(num_chunks):
        suffix = np.empty(K)
        for b in range(chunk * B // num_chunks, (chunk + 1) * B // num_chunks):
            energy[b], feasible = _solve_row(scores[b], costs[b], threshold, k_min, k_max, mask[b], suffix)
            violation[b] = not feasible
            bound[b] = energy[b] if feasible else np.nan
            selected = 0
            for k in range(K):
                subcarrier[b, k] = -1
                if mask[b, k]:
                    selected += 1
                    if num_subcarriers > 0:
                        subcarrier[b, k] = k % num_subcarriers
            dropped[b] = selected == 0


def _des_small_arrays(scores, costs, threshold, k_min, k_max, num_subcarriers, num_threads):
    if not 1 <= k_min <= k_max <= SMALL_SET_SIZE:
        raise ValueError(f"need 1 <= k_min <= k_max <= {SMALL_SET_SIZE}, got k_min={k_min}, k_max={k_max}")
    B, K = scores.shape
    out = (
        np.empty((B, K), dtype=np.bool_),  # the kernel writes every field of every row: no fill
        np.empty((B, K), dtype=np.int64),
        np.empty(B),
        np.empty(B, dtype=np.bool_),
        np.empty(B, dtype=np.bool_),
        np.empty(B),
    )
    if B:
        chunks = row_chunks(B, solver_threads(num_threads))
        args = (scores, costs, float(threshold), int(k_min), int(k_max), int(num_subcarriers), chunks, out)
        run_parallel(_des_small_rows, num_threads, *args)
    return out


def des_small_numpy(scores: np.ndarray, costs: np.ndarray, threshold: float, k_min: int, k_max: int, *, num_threads=None):
    """P1 with 1 <= k_min <= k_max <= 2 on float64 arrays scores [B, K], costs [B, K] (J,
    +inf unreachable; any strides); threshold = gamma - RELEVANCE_TOL.  No validation.

    Returns (mask bool[B, K], energy float64[B] J, feasible bool[B]), des_enumerate's answer
    (see the module docstring).  num_threads: as des_numpy's (results do not depend on it).
    """
    mask, _, energy, violation, _, _ = _des_small_arrays(scores, costs, threshold, k_min, k_max, 0, num_threads)
    return mask, energy, ~violation


def des_small(s: torch.Tensor, c: torch.Tensor, gamma: float, k_min: int, k_max: int, num_subcarriers: int = 0) -> Selection:
    """des_enumerate's Selection (P1; lower_bound = energy on feasible rows, nan elsewhere,
    certified = feasible, nodes 0) from the kernel: s float64 [B, K], c float64 [B, K] J (a
    strided view is fine) on the CPU, checked, 1 <= k_min <= k_max <= 2.  subcarrier: the
    static plan a(k) = k mod num_subcarriers of the selected experts (0: all -1)."""
    mask, subcarrier, energy, violation, dropped, bound = _des_small_arrays(
        s.numpy(), c.numpy(), gamma - RELEVANCE_TOL, k_min, k_max, num_subcarriers, None
    )
    nodes = np.zeros(mask.shape[0], dtype=np.int64)
    return selection_from_arrays(mask, energy, violation, dropped, nodes, bound, subcarrier=subcarrier)


# --------------------------------------------------------------------------------------
# JESA for k_max <= 2
# --------------------------------------------------------------------------------------
@njit(cache=True)
def _cheapest_link(e_k, skip):
    """The cheapest subcarrier of one expert's links e_k [N] other than ``skip`` (-1: none),
    lowest index on ties; -1 when every other link is in outage."""
    best = -1
    low = np.inf
    for n in range(e_k.shape[0]):
        if n != skip and e_k[n] < low:
            low = e_k[n]
            best = n
    return best


@njit(cache=True)
def _assign_pair(e, mask, out_sub):
    """Min-cost assignment of a row's (at most two) selected experts to distinct subcarriers.

    e [K, N] J (+inf outage), mask bool[K].  As jesa's Hungarian assignment: the most experts
    on finite links, then the least energy; writes out_sub (-1 where not selected or left
    without a finite link) and returns the energy, +inf when a selected expert has no finite
    link.  Two experts a < b: if their cheapest links differ that pairing is optimal;
    otherwise one of them keeps the shared link and the other takes its next cheapest (an
    exchange argument shows some optimal assignment has this form); on a tie a keeps it.
    """
    K = e.shape[0]
    a = -1
    b = -1
    for k in range(K):
        out_sub[k] = -1
        if mask[k]:
            if a < 0:
                a = k
            else:
                b = k
    if a < 0:
        return 0.0
    na = _cheapest_link(e[a], -1)
    if b < 0:
        if na < 0:
            return np.inf
        out_sub[a] = na
        return e[a, na]
    nb = _cheapest_link(e[b], -1)
    if na >= 0 and na == nb:  # a shared cheapest link: a keeps it, or b does
        keep_a = _cheapest_link(e[b], na)
        keep_b = _cheapest_link(e[a], nb)
        lost_a = 1 if keep_a < 0 else 0  # finite links lost by each option
        lost_b = 1 if keep_b < 0 else 0
        cost_a = e[a, na] + (e[b, keep_a] if keep_a >= 0 else 0.0)
        cost_b = e[b, nb] + (e[a, keep_b] if keep_b >= 0 else 0.0)
        if lost_b < lost_a or (lost_b == lost_a and cost_b < cost_a):
            na = keep_b
        else:
            nb = keep_a
    energy = 0.0
    if na >= 0:
        out_sub[a] = na
        energy += e[a, na]
    if nb >= 0:
        out_sub[b] = nb
        energy += e[b, nb]
    return energy if na >= 0 and nb >= 0 else np.inf


@njit(cache=True)
def _costs_beside(e, sub, out_cost, owner):
    """Each expert's cheapest link on a subcarrier the *other* selected experts' assignment
    sub [K] (-1: none) leaves free: JESA's updated costs c_k.  owner: int64[N] scratch."""
    K, N = e.shape
    owner[:] = -1
    for k in range(K):
        if sub[k] >= 0:
            owner[sub[k]] = k
    for k in range(K):
        low = np.inf
        for n in range(N):
            if e[k, n] < low and (owner[n] < 0 or owner[n] == k):
                low = e[k, n]
        out_cost[k] = low


@njit(cache=True)
def _jesa_iterate_row(s, e, lower, threshold, k_min, k_max, max_iterations, mask, sub, work, new_mask, new_sub, owner):
    """JESA's iterative phase on one row whose DES(c*) set ``mask`` has colliding best links.

    Rewrites mask / sub with the best candidate; returns (energy J, +inf when no candidate
    was feasible; DES solves).  Scratch: work float64[3, K] (costs, suffix), new_mask
    bool[K], new_sub int64[K], owner int64[N]."""
    energy = _assign_pair(e, mask, sub)
    solves = 1
    while solves < max_iterations and energy > lower * (1.0 + ENERGY_RTOL):
        _costs_beside(e, sub, work[0], owner)
        _, feasible = _solve_row(s, work[0], threshold, k_min, k_max, new_mask, work[1])
        solves += 1
        new_energy = _assign_pair(e, new_mask, new_sub) if feasible else np.inf
        if not new_energy < energy * (1.0 - ENERGY_RTOL):
            break
        energy = new_energy
        mask[:] = new_mask
        sub[:] = new_sub
    return energy, solves


@njit(cache=True, parallel=True)
def _jesa_small_rows(s_all, e_all, threshold, k_min, k_max, max_iterations, num_chunks, out):
    """JESA per row; out: (mask, sub, energy, lower, violation, certified, iterations, fallback,
    dropped, bound); lower is DES's energy under c*, bound the same but nan where infeasible."""
    mask_all, sub_all, energy_all, lower_all, violation_all, certified_all, iterations_all, fallback_all = out[:8]
    dropped_all, bound_all = out[8:]
    B, K, N = e_all.shape
    for chunk in prange(num_chunks):
        work = np.empty((3, K))
        used = np.empty(N, np.bool_)
        new_mask = np.empty(K, np.bool_)
        new_sub = np.empty(K, np.int64)
        owner = np.empty(N, np.int64)
        for b in range(chunk * B // num_chunks, (chunk + 1) * B // num_chunks):
            s, e, mask, sub = s_all[b], e_all[b], mask_all[b], sub_all[b]
            # c*: each expert's cheapest link energy.  Only the minimum here (a branch-free,
            # memory-bound pass over the row's [K, N] costs; tracking the argmin too doubled
            # it); the link itself is looked up below for the selected experts only.
            for k in range(K):
                low = e[k, 0]
                for n in range(1, N):
                    value = e[k, n]
                    low = value if value < low else low
                work[0, k] = low
            lower, feasible = _solve_row(s, work[0], threshold, k_min, k_max, mask, work[1])
            lower_all[b] = lower
            bound_all[b] = lower if feasible else np.nan
            violation_all[b] = not feasible
            iterations_all[b] = 1
            used[:] = False
            distinct = True
            selected = 0
            for k in range(K):
                sub[k] = -1
                if mask[k]:
                    best = 0  # its cheapest link, lowest index on ties (as jesa._best_links)
                    while e[k, best] != work[0, k]:
                        best += 1
                    distinct = distinct and not used[best]
                    used[best] = True
                    sub[k] = best
                    selected += 1
            dropped_all[b] = selected == 0
            if distinct:  # each selected expert on its own best link: optimal for P2
                energy_all[b] = lower
                certified_all[b] = feasible
                iterations_all[b] = 1 if selected else 0
            elif not feasible:
                fallback_all[b] = True
            else:
                scratch = (work, new_mask, new_sub, owner)
                energy, solves = _jesa_iterate_row(s, e, lower, threshold, k_min, k_max, max_iterations, mask, sub, *scratch)
                energy_all[b] = energy
                iterations_all[b] = solves
                certified_all[b] = energy <= lower * (1.0 + ENERGY_RTOL)
                fallback_all[b] = energy == np.inf


def jesa_small_numpy(
    scores: np.ndarray, costs: np.ndarray, threshold: float, k_min: int, k_max: int, max_iterations: int, *, num_threads=None
):
    """JESA's steps (1)-(3) for 1 <= k_min <= k_max <= 2 on float64 arrays scores [B, K] and
    C-contiguous costs [B, K, N] (J, +inf outage), k_max <= N; threshold = gamma - RELEVANCE_TOL.

    Returns (mask bool[B, K], subcarrier int64[B, K], energy float64[B] J, lower float64[B]
    (DES's energy under c*), violation, certified bool[B], iterations int64[B], fallback
    bool[B], dropped bool[B], lower_bound float64[B] (lower, nan where P1 under c* is
    infeasible)): rows with fallback set need JESA's P2 fallback (jesa.py), the others are final.
    """
    if not 1 <= k_min <= k_max <= SMALL_SET_SIZE:
        raise ValueError(f"need 1 <= k_min <= k_max <= {SMALL_SET_SIZE}, got k_min={k_min}, k_max={k_max}")
    B, K, _ = costs.shape
    out = (
        np.empty((B, K), dtype=np.bool_),  # mask and subcarrier: written on every row
        np.empty((B, K), dtype=np.int64),
        np.zeros(B),
        np.zeros(B),
        np.zeros(B, dtype=np.bool_),
        np.zeros(B, dtype=np.bool_),
        np.zeros(B, dtype=np.int64),
        np.zeros(B, dtype=np.bool_),
        np.zeros(B, dtype=np.bool_),
        np.zeros(B),
    )
    if B:
        chunks = row_chunks(B, solver_threads(num_threads))
        args = (scores, costs, float(threshold), int(k_min), int(k_max), int(max_iterations), chunks, out)
        run_parallel(_jesa_small_rows, num_threads, *args)
    return out
