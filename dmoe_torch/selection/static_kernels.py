"""The static-plan policies' Selection on the CPU, as numba row loops.

On one CPU core every torch op over the MoE layer's [12,544, 8] tables costs 0.1-1 ms (a
``torch.where`` with a broadcast plan ~1 ms, an argmax ~0.5 ms, each fresh output a round of
page faults), and a static-plan Selection took ~10 of them.  These kernels write the same
fields in one pass over the rows, into numpy arrays the Selection then shares:

* ``topk_mask``: the k highest scores per row, ties to the lower index (what a stable
  descending sort keeps);
* ``static_selection_numpy``: from a mask [B, K] and the static link costs [B, K] (expert k
  on subcarrier a(k) = k mod N): subcarrier, failed (selected links in outage), energy (the
  delivered links' costs + failure_energy per failed link), dropped (no delivered link) and
  frame_overrun (a failed link), as baselines._static_selection computes them in torch
  (tests/selection/test_policies.py compares them; the energy bit for bit where a row
  selects at most two experts, the only case the router uses this kernel for).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .threads import row_chunks, run_parallel, solver_threads

__all__ = ["topk_mask", "static_selection_numpy"]


@njit(cache=True, parallel=True)
def _topk_rows(scores, k, num_chunks, mask):
    B, K = scores.shape
    for chunk in prange(num_chunks):
        for b in range(chunk * B // num_chunks, (chunk + 1) * B // num_chunks):
            for j in range(K):  # j is kept iff fewer than k experts rank ahead of it
                score = scores[b, j]
                ahead = 0
                for i in range(K):  # branch-free: on random scores a branch mispredicts half the time
                    other = scores[b, i]
                    ahead += (other > score) | ((other == score) & (i < j))
                mask[b, j] = ahead < k


def topk_mask(scores: np.ndarray, k: int, *, num_threads=None) -> np.ndarray:
    """bool[B, K]: the k highest of float scores [B, K] per row (ties: lower index first), 1 <= k <= K."""
    B, K = scores.shape
    mask = np.zeros((B, K), dtype=np.bool_)
    if B:
        run_parallel(_topk_rows, num_threads, scores, int(k), row_chunks(B, solver_threads(num_threads)), mask)
    return mask


@njit(cache=True, parallel=True)
def _static_rows(mask, link_cost, failure_energy, num_subcarriers, num_chunks, out):
    subcarrier, failed, energy, dropped, frame_overrun = out
    B, K = mask.shape
    plan = np.arange(K) % num_subcarriers  # once: an integer division per element costs ~1 ms here
    for chunk in prange(num_chunks):
        for b in range(chunk * B // num_chunks, (chunk + 1) * B // num_chunks):
            delivered = 0.0
            failures = 0
            carried = False
            for k in range(K):
                subcarrier[b, k] = -1
                failed[b, k] = False
                if mask[b, k]:
                    subcarrier[b, k] = plan[k]
                    if link_cost[b, k] == np.inf:
                        failed[b, k] = True
                        failures += 1
                    else:
                        delivered += link_cost[b, k]
                        carried = True
            energy[b] = delivered + failure_energy * failures
            dropped[b] = not carried
            frame_overrun[b] = failures > 0


def static_selection_numpy(
    mask: np.ndarray, link_cost: np.ndarray, failure_energy: float, num_subcarriers: int, *, num_threads=None
):
    """The static-plan fields of a selection mask bool[B, K] with link costs float64[B, K] J
    (+inf outage; any strides): (subcarrier int64[B, K], failed bool[B, K], energy
    float64[B] J, dropped bool[B], frame_overrun bool[B])."""
    B, K = mask.shape
    out = (
        np.empty((B, K), dtype=np.int64),
        np.empty((B, K), dtype=np.bool_),
        np.empty(B),
        np.empty(B, dtype=np.bool_),
        np.empty(B, dtype=np.bool_),
    )
    if B:
        chunks = row_chunks(B, solver_threads(num_threads))
        run_parallel(_static_rows, num_threads, mask, link_cost, float(failure_energy), int(num_subcarriers), chunks, out)
    return out
