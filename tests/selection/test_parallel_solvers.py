"""DES and JESA give bit-identical results on 1 and 2 threads, and follow torch's thread count.

numba's thread pool has NUMBA_NUM_THREADS threads, fixed at import, and the project runs its
tests with NUMBA_NUM_THREADS=1, so the 2-thread runs happen in a child process started with
NUMBA_NUM_THREADS=2 (this file run as a script); the parent compares its arrays.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numba
import numpy as np
import torch

from dmoe_torch.selection.des import des_numpy
from dmoe_torch.selection.jesa import jesa_numpy, min_cost_assignment
from dmoe_torch.selection.threads import run_parallel, solver_threads

# (gamma, k_min, k_max): easy, tight, often infeasible (gamma 1 with at most 2 experts)
SETTINGS = [(0.5, 1, 8), (0.9, 2, 4), (1.0, 1, 2)]
DES_FIELDS = ("mask", "energy", "violation", "dropped", "nodes", "bound")


def instances(rows: int, K: int, N: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """scores [rows, K] and link costs [rows, K, N] J with exact ties (scores and costs on a
    coarse grid), zero scores, links in outage and rows with no reachable expert."""
    rng = np.random.default_rng(seed)
    scores = np.round(rng.dirichlet(np.full(K, 0.5), size=rows), 2)
    scores[rng.random((rows, K)) < 0.1] = 0.0
    costs = np.round(rng.exponential(size=(rows, K, N)), 1) * 1e-3
    costs[rng.random((rows, K, N)) < 0.2] = np.inf
    costs[rng.random(rows) < 0.02] = np.inf  # nothing reachable
    return scores, costs


def solve_all(num_threads: int | None) -> dict[str, np.ndarray]:
    """Every DES / JESA / assignment output over SETTINGS, as one flat dict of arrays."""
    out = {}
    scores, costs = instances(3000, 8, 16, seed=0)
    static = costs[:, np.arange(8), np.arange(8)]  # expert k on subcarrier k
    for i, (gamma, k_min, k_max) in enumerate(SETTINGS):
        for name, value in zip(DES_FIELDS, des_numpy(scores, static, gamma, k_min, k_max, num_threads=num_threads), strict=True):
            out[f"des{i}.{name}"] = value
    # N=4 < K: best links collide often, so JESA's iterative phase and P2 fallback run too
    scores, costs = instances(3000, 8, 4, seed=1)
    for i, (gamma, k_min, k_max) in enumerate(SETTINGS):
        result = jesa_numpy(scores, costs, gamma, k_min, k_max, num_threads=num_threads)
        for name, value in result._asdict().items():
            out[f"jesa{i}.{name}"] = value
    out["assign.sub"], out["assign.energy"] = min_cost_assignment(costs, out["jesa0.mask"], num_threads=num_threads)
    return out


@numba.njit(parallel=True)
def _probe(out):
    for i in numba.prange(out.shape[0]):
        out[i] = numba.get_num_threads()


def threads_seen() -> int:
    """The numba thread count a kernel launched through run_parallel (default threads) sees."""
    out = np.zeros(4, dtype=np.int64)
    run_parallel(_probe, None, out)
    return int(out.max())


def child(path: str) -> None:
    """Runs with NUMBA_NUM_THREADS=2: 1- and 2-thread results, and the default thread count."""
    assert numba.config.NUMBA_NUM_THREADS == 2
    arrays = {f"one/{k}": v for k, v in solve_all(1).items()}
    arrays.update({f"two/{k}": v for k, v in solve_all(2).items()})
    torch.set_num_threads(1)
    seen_one = threads_seen()
    torch.set_num_threads(2)
    seen_two = threads_seen()
    numba.set_num_threads(1)
    arrays.update({f"default/{k}": v for k, v in solve_all(None).items()})  # torch's 2 threads
    arrays["restored"] = np.array(numba.get_num_threads())  # the caller's setting survives
    arrays["seen"] = np.array([seen_one, seen_two])
    np.savez(path, **arrays)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def test_one_and_two_threads_give_identical_results(tmp_path):
    path = tmp_path / "results.npz"
    env = dict(os.environ, NUMBA_NUM_THREADS="2", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, __file__, str(path)], env=env, check=True, timeout=600)
    got = np.load(path)
    here = solve_all(None)  # this process, whatever its pool size
    assert list(got["seen"]) == [1, 2]  # run_parallel follows torch.get_num_threads()
    assert int(got["restored"]) == 1
    for key, value in here.items():
        for run in ("one", "two", "default"):
            assert same_bits(got[f"{run}/{key}"], value), f"{run}/{key} differs"
    # the instances reach the cases they are meant to cover
    for i in range(len(SETTINGS)):
        assert here[f"des{i}.dropped"].any() and here[f"jesa{i}.dropped"].any()
    assert (here["des0.nodes"] > 1).any() and (here["des1.nodes"] > 1).any()
    assert (here["des2.violation"] & ~here["des2.dropped"]).any() and not here["des0.violation"].all()
    assert (here["jesa1.iterations"] > 1).any() and (here["jesa2.violation"] & ~here["jesa2.dropped"]).any()
    assert (here["jesa0.mask"].sum(1) > 1).any() and np.isfinite(here["assign.energy"]).any()


def test_thread_count_follows_torch_and_caps_at_the_pool():
    pool = numba.config.NUMBA_NUM_THREADS
    assert solver_threads(1) == 1
    assert solver_threads(pool + 5) == pool
    assert solver_threads(0) == 1
    assert solver_threads(None) == min(torch.get_num_threads(), pool)


if __name__ == "__main__":
    child(sys.argv[1])
