"""Threads of the numba row loops (DES, JESA, the channel kernels).

The row loop runs in parallel (numba ``prange`` over chunks of rows, each chunk with its own
scratch workspace).  Every row's result depends on that row alone, so the output is
bit-identical for any number of threads.  The thread count follows torch's intra-op setting
(``torch.get_num_threads()``, i.e. ``OMP_NUM_THREADS`` or ``torch.set_num_threads``), capped
at numba's pool size ``NUMBA_NUM_THREADS``; ``des_numpy(..., num_threads=n)`` overrides it
for one call (``solver_threads``).  So ``OMP_NUM_THREADS=1`` means one thread everywhere.
The caller's ``numba.get_num_threads()`` is restored after each call.
"""

from __future__ import annotations

import numba
import torch

# Row loops run in parallel over chunks of rows (see row_chunks).
CHUNKS_PER_THREAD = 4
MIN_CHUNK_ROWS = 64


def solver_threads(num_threads: int | None = None) -> int:
    """Threads the solvers' row loops use: num_threads, or torch.get_num_threads() when None
    (so OMP_NUM_THREADS / torch.set_num_threads govern both), capped at numba's pool size
    NUMBA_NUM_THREADS and at least 1."""
    wanted = torch.get_num_threads() if num_threads is None else int(num_threads)
    return max(1, min(wanted, numba.config.NUMBA_NUM_THREADS))


def row_chunks(rows: int, threads: int) -> int:
    """Chunks to split `rows` rows into: CHUNKS_PER_THREAD per thread (handed out one at a
    time, so a few per thread even out rows of unequal cost), at most one per MIN_CHUNK_ROWS
    rows, at least 1."""
    return max(1, min(threads * CHUNKS_PER_THREAD, rows // MIN_CHUNK_ROWS))


def run_parallel(kernel, num_threads: int | None, *args) -> None:
    """Call the parallel numba kernel(*args) on solver_threads(num_threads) threads, its prange
    iterations handed out one at a time; then restore the caller's numba settings.  (Both are
    set here, not inside the kernel: numba cannot cache a function using parallel_chunksize.)"""
    previous_threads = numba.get_num_threads()
    previous_chunksize = numba.get_parallel_chunksize()
    numba.set_num_threads(solver_threads(num_threads))
    numba.set_parallel_chunksize(1)
    try:
        kernel(*args)
    finally:
        numba.set_parallel_chunksize(previous_chunksize)
        numba.set_num_threads(previous_threads)
