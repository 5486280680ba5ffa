"""scipy's MILP (HiGHS) set up for exact answers, and one P1 instance solved with it.

Shared by DES (:mod:`.des`, for the rare rows that exhaust its node budget) and the exact
references (:mod:`.exact`); scipy.optimize is imported on the first solve.
"""

from __future__ import annotations

import warnings

import numpy as np

from .common import RELEVANCE_TOL

# HiGHS defaults (absolute gap 1e-6, feasibility 1e-6/1e-7) are coarse next to energies of
# ~1e-5 J and the 1e-6 relevance tolerance, so the references ask for exact optimality.
_HIGHS_OPTIONS = dict(mip_rel_gap=0.0, mip_abs_gap=0.0)
# HiGHS accepts constraint violations up to ~1e-6 (absolute); the relevance row is scaled up
# so that this slack is ~1e-10 in score units, far inside RELEVANCE_TOL.  (Tightening HiGHS's
# own feasibility tolerances instead made it return wrong optima.)
_RELEVANCE_ROW_SCALE = 1e4


def solve_milp(objective, A, lower, upper):
    """Binary program min objective @ y s.t. lower <= A y <= upper; returns y (bool) or None."""
    # HiGHS's tolerances are absolute (~1e-7 .. 1e-6): in joules (~1e-5) every energy
    # would look alike, and scaled by the largest cost a cheap optimum would still drown.
    # Scaled by the smallest non-zero cost, every non-zero coefficient is >= 1.
    from scipy.optimize import Bounds, LinearConstraint, milp

    positive = objective[objective > 0]
    scale = positive.min() if positive.size else 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # HiGHS options passed through verbatim
        res = milp(
            objective / scale,
            integrality=np.ones(objective.size),
            bounds=Bounds(0.0, 1.0),
            constraints=[LinearConstraint(A, lower, upper)],
            options=dict(_HIGHS_OPTIONS),
        )
    if res.status == 2 or res.x is None:  # infeasible
        return None
    if res.status != 0:
        raise RuntimeError(f"HiGHS failed: {res.message}")
    return res.x > 0.5


def milp_p1_row(s: np.ndarray, c: np.ndarray, gamma: float, k_min: int, k_max: int):
    """One P1 instance by HiGHS: s, c float64 [K]; returns the optimal mask bool [K], or None
    when no allowed set reaches gamma.  No validation (DES calls it for rows that exhaust
    its node budget)."""
    reach = np.flatnonzero(np.isfinite(c))
    if reach.size < k_min:
        return None
    R = _RELEVANCE_ROW_SCALE
    A = np.vstack([R * s[reach], np.ones(reach.size)])
    x = solve_milp(c[reach], A, np.array([R * (gamma - RELEVANCE_TOL), k_min]), np.array([np.inf, k_max]))
    if x is None:
        return None
    mask = np.zeros(c.shape[0], dtype=np.bool_)
    mask[reach[x]] = True
    return mask
