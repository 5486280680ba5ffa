"""P1 by enumeration for sets of at most two experts, as one numba row loop on the CPU.

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
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from .common import RELEVANCE_TOL, Selection, selection_from_arrays
from .threads import row_chunks, run_parallel, solver_threads

__all__ = ["SMALL_SET_SIZE", "des_small", "des_small_numpy"]

# Largest k_max this kernel handles (a pair's sum has one rounding whatever the order).
SMALL_SET_SIZE = 2


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
def _des_small_rows(scores, costs, threshold, k_min, k_max, num_chunks, mask, energy, feasible):
    B = scores.shape[0]
    for chunk in prange(num_chunks):
        suffix = np.empty(scores.shape[1])
        for b in range(chunk * B // num_chunks, (chunk + 1) * B // num_chunks):
            energy[b], feasible[b] = _solve_row(scores[b], costs[b], threshold, k_min, k_max, mask[b], suffix)


def des_small_numpy(scores: np.ndarray, costs: np.ndarray, threshold: float, k_min: int, k_max: int, *, num_threads=None):
    """P1 with 1 <= k_min <= k_max <= 2 on float64 arrays scores [B, K], costs [B, K] (J,
    +inf unreachable; any strides); threshold = gamma - RELEVANCE_TOL.  No validation.

    Returns (mask bool[B, K], energy float64[B] J, feasible bool[B]), des_enumerate's answer
    (see the module docstring).  num_threads: as des_numpy's (results do not depend on it).
    """
    if not 1 <= k_min <= k_max <= SMALL_SET_SIZE:
        raise ValueError(f"need 1 <= k_min <= k_max <= {SMALL_SET_SIZE}, got k_min={k_min}, k_max={k_max}")
    B, K = scores.shape
    mask = np.zeros((B, K), dtype=np.bool_)
    energy = np.zeros(B)
    feasible = np.zeros(B, dtype=np.bool_)
    if B:
        chunks = row_chunks(B, solver_threads(num_threads))
        run_parallel(
            _des_small_rows, num_threads, scores, costs, float(threshold), int(k_min), int(k_max), chunks, mask, energy, feasible
        )
    return mask, energy, feasible


def des_small(s: torch.Tensor, c: torch.Tensor, gamma: float, k_min: int, k_max: int) -> Selection:
    """des_enumerate's Selection (P1; subcarrier all -1, lower_bound = energy on feasible rows,
    nan elsewhere, certified = feasible, nodes 0) from the kernel: s float64 [B, K], c float64
    [B, K] J (a strided view is fine) on the CPU, checked, 1 <= k_min <= k_max <= 2."""
    mask, energy, feasible = des_small_numpy(s.numpy(), c.numpy(), gamma - RELEVANCE_TOL, k_min, k_max)
    violation = ~feasible
    bound = np.where(feasible, energy, np.nan)
    return selection_from_arrays(mask, energy, violation, ~mask.any(1), np.zeros(mask.shape[0], dtype=np.int64), bound)
