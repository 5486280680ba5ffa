"""DES: exact expert selection (problem P1, docs/method.md sections 2 and 3) by branch-and-bound.

Per row b (one input at one MoE layer), with scores s [K] and costs c [K] (J, +inf = unreachable):

    minimise  sum_k c_k x_k   s.t.  sum_k s_k x_k >= gamma - RELEVANCE_TOL,
              k_min <= sum_k x_k <= k_max,  x binary,  x_k = 0 where c_k = +inf.

Infeasible rows (no allowed set reaches gamma, including fewer than k_min reachable
experts) get the fallback: the min(k_max, #reachable) reachable experts with the highest
scores (ties: lower cost, then lower index), violation=True.  Rows with no reachable expert
get an empty mask, energy 0, dropped=True, violation=True.

Entry points
------------
``des(scores, costs, gamma, k_min=1, k_max=None) -> Selection``
    Batched torch API (validated).  scores [B, K] float32/64, costs [B, K] J (static
    subcarriers).  energy = sum of the selected costs (float64), nodes = B&B nodes per row,
    lower_bound = the root relaxation bound (nan on infeasible rows), certified = feasible,
    subcarrier all -1 (the registry fills static subcarriers), failed all False.
``des_numpy(scores, costs, gamma, k_min, k_max) -> (mask, energy, violation, dropped, nodes, root_bound)``
    The same on float64 numpy arrays [B, K], without validation, for callers in loops
    (JESA): bool[B,K], float64[B], bool[B], bool[B], int64[B], float64[B].

The branch and bound itself is ``des_kernel.py``; its threads, ``threads.py``.
"""

from __future__ import annotations

import numpy as np
import torch

from .common import Selection, result_arrays, selection_from_arrays, validate_inputs
from .des_kernel import DES_NODE_LIMIT, _des_rows, des_solve_one
from .threads import row_chunks, run_parallel, solver_threads

__all__ = ["des", "des_validated", "des_numpy", "des_solve_one"]


def des_numpy(
    scores: np.ndarray,
    costs: np.ndarray,
    gamma: float,
    k_min: int,
    k_max: int,
    *,
    node_limit: int = DES_NODE_LIMIT,
    num_threads: int | None = None,
):
    """DES on float64 arrays scores [B, K], costs [B, K] (J, +inf unreachable); no validation.

    Returns (mask bool[B,K], energy float64[B] J, violation bool[B], dropped bool[B],
    nodes int64[B], root_bound float64[B] J, nan on infeasible rows).  A row whose search
    reaches node_limit nodes is finished by HiGHS (see DES_NODE_LIMIT); its nodes entry is
    then node_limit and its bound the best one proven when the search stopped.
    num_threads: threads for the row loop (None: torch.get_num_threads(), see solver_threads);
    the results do not depend on it.
    """
    scores = np.ascontiguousarray(scores, dtype=np.float64)
    costs = np.ascontiguousarray(costs, dtype=np.float64)
    B, K = scores.shape
    k_max = K if k_max is None else k_max
    mask, energy, violation, dropped, nodes, bound = result_arrays(B, K)
    if B:
        chunks = row_chunks(B, solver_threads(num_threads))
        args = (
            scores,
            costs,
            float(gamma),
            int(k_min),
            int(k_max),
            int(node_limit),
            chunks,
            mask,
            energy,
            violation,
            dropped,
            nodes,
            bound,
        )
        run_parallel(_des_rows, num_threads, *args)
    unfinished = np.flatnonzero(~violation & (nodes >= node_limit))
    if unfinished.size:
        from .milp import milp_p1_row  # imports scipy; only ever needed for such rows

        for b in unfinished:
            chosen = milp_p1_row(scores[b], costs[b], gamma, k_min, k_max)
            if chosen is not None and costs[b, chosen].sum() < energy[b]:
                mask[b] = chosen
                energy[b] = costs[b, chosen].sum()
    return mask, energy, violation, dropped, nodes, bound


def des(scores: torch.Tensor, costs: torch.Tensor, gamma: float, k_min: int = 1, k_max: int | None = None) -> Selection:
    """Exact P1 per row. scores [B, K] (rows sum to 1), costs [B, K] J (+inf unreachable).

    Returns a Selection (subcarrier all -1: the caller assigns static subcarriers).
    """
    s, c, gamma, k_min, k_max = validate_inputs(scores, costs, gamma, k_min, k_max, cost_ndim=2)
    return des_validated(s, c, gamma, k_min, k_max)


def des_validated(s: torch.Tensor, c: torch.Tensor, gamma: float, k_min: int, k_max: int) -> Selection:
    """:func:`des` on inputs already checked by ``validate_inputs`` (CPU float64, k_max resolved)."""
    return selection_from_arrays(*des_numpy(s.numpy(), c.numpy(), gamma, k_min, k_max))
