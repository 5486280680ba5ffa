"""dmoe-torch: wireless-aware distributed Mixture-of-Experts (DMoE) in PyTorch."""
import os

import numba

# The solvers and channel kernels run numba's parallel loops.  numba's default OpenMP layer
# shares the OpenMP runtime with torch and resets torch's thread count when its pool starts
# (OMP_NUM_THREADS=1 would become the CPU count), which changes results and oversubscribes
# cores; the workqueue layer keeps its own threads.  A user's NUMBA_THREADING_LAYER wins.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

__version__ = "0.1.0"
