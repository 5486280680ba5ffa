"""Exact references for P1 (expert selection) and P2 (joint expert + subcarrier allocation).

These are slow, obviously-correct solvers for tests, benchmarks and the ``optimal`` policy:

* :func:`des_reference` is DES's branch-and-bound in plain Python, one row at a time.
* :func:`brute_force_p1` enumerates every expert subset (small K).
* :func:`milp_p1` solves P1 per instance with ``scipy.optimize.milp`` (HiGHS).
* :func:`brute_force_p2` enumerates every subset and every injective subcarrier assignment.
* :func:`milp_p2` solves P2 per instance with HiGHS; the ``optimal`` policy calls it.

All take scores [B, K] (rows sum to 1) and costs in joules (+inf = unreachable link),
[B, K] for P1 and [B, K, N] for P2, and return a :class:`Selection`.  Feasible rows are
certified optimal (lower_bound = energy).  Infeasible rows follow DES's semantics: the
min(k_max, #reachable) reachable experts with the highest scores (ties: lower cost, then
lower index; for P2 the cost is the expert's best subcarrier) with violation=True.  For P2
those fallback experts then get subcarriers by a maximum-cardinality, minimum-cost
assignment; a fallback expert left without a finite link is dropped from the mask.  Rows
without any reachable expert: empty mask, energy 0, dropped=True, violation=True.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, linear_sum_assignment, milp

from .common import RELEVANCE_TOL, Selection, empty_selection, result_arrays, selection_from_arrays, validate_inputs
from .milp import _HIGHS_OPTIONS, _RELEVANCE_ROW_SCALE, milp_p1_row, solve_milp

__all__ = [
    "des_reference",
    "brute_force_p1",
    "milp_p1",
    "milp_p1_row",
    "brute_force_p2",
    "milp_p2",
    "subset_count",
    "brute_force_p3",
    "milp_p3",
]

# Brute force refuses more subsets than this per instance.
_MAX_SUBSETS = 2_000_000


def subset_count(num_experts: int, k_min: int, k_max: int) -> int:
    """Number of subsets of size k_min..k_max out of num_experts (what brute force enumerates)."""
    return sum(math.comb(num_experts, m) for m in range(k_min, min(k_max, num_experts) + 1))


def _fallback(s: np.ndarray, c_best: np.ndarray, k_max: int) -> np.ndarray:
    """Indices of the min(k_max, #reachable) reachable experts with the highest scores.

    s [K], c_best [K] (J, +inf unreachable); ties: lower cost, then lower index.
    """
    reach = np.flatnonzero(np.isfinite(c_best))
    ranked = sorted(reach.tolist(), key=lambda k: (-s[k], c_best[k], k))
    return np.asarray(ranked[: min(k_max, len(ranked))], dtype=np.int64)


def _selection(mask, energy, feasible, nodes, subcarrier=None) -> Selection:
    B, K = mask.shape
    sel = empty_selection(B, K)
    sel.mask = torch.from_numpy(mask)
    sel.energy = torch.from_numpy(energy)
    sel.violation = torch.from_numpy(~feasible)
    sel.dropped = torch.from_numpy(~mask.any(1))
    sel.nodes = torch.from_numpy(nodes)
    sel.lower_bound = torch.from_numpy(np.where(feasible, energy, np.nan))
    sel.certified = torch.from_numpy(feasible.copy())
    if subcarrier is not None:
        sel.subcarrier = torch.from_numpy(subcarrier)
    return sel


# --------------------------------------------------------------------------------------
# P1
# --------------------------------------------------------------------------------------
def brute_force_p1(scores, costs, gamma: float, k_min: int = 1, k_max: int | None = None) -> Selection:
    """Exact P1 by enumerating all subsets of size k_min..k_max (vectorised over the batch).

    scores [B, K], costs [B, K] J.  nodes = subsets enumerated per row.  Small K only.
    """
    s, c, gamma, k_min, k_max = validate_inputs(scores, costs, gamma, k_min, k_max, cost_ndim=2)
    s, c = s.numpy(), c.numpy()
    B, K = s.shape
    n_subsets = subset_count(K, k_min, k_max)
    if n_subsets > _MAX_SUBSETS:
        raise ValueError(f"brute_force_p1: K={K}, k_max={k_max} gives {n_subsets} subsets; too many to enumerate")
    subsets = np.zeros((n_subsets, K))
    row = 0
    for m in range(k_min, k_max + 1):
        for combo in itertools.combinations(range(K), m):
            subsets[row, list(combo)] = 1.0
            row += 1
    reach = np.isfinite(c)
    thr = gamma - RELEVANCE_TOL
    mask = np.zeros((B, K), dtype=np.bool_)
    energy = np.zeros(B)
    feasible = np.zeros(B, dtype=np.bool_)
    chunk = max(1, 4_000_000 // max(n_subsets, 1))  # bound the [chunk, n_subsets] temporaries
    for lo in range(0, B, chunk):
        hi = min(B, lo + chunk)
        relevance = s[lo:hi] @ subsets.T
        total = np.where(reach[lo:hi], c[lo:hi], 0.0) @ subsets.T
        uses_unreachable = (~reach[lo:hi]).astype(np.float64) @ subsets.T > 0
        total[uses_unreachable | (relevance < thr)] = np.inf
        best = np.argmin(total, axis=1)
        ok = np.isfinite(total[np.arange(hi - lo), best])
        feasible[lo:hi] = ok
        mask[lo:hi][ok] = subsets[best[ok]] > 0
    for b in np.flatnonzero(~feasible):
        mask[b, _fallback(s[b], c[b], k_max)] = True
    energy = np.where(mask, c, 0.0).sum(1)
    return _selection(mask, energy, feasible, np.full(B, n_subsets, dtype=np.int64))


def milp_p1(scores, costs, gamma: float, k_min: int = 1, k_max: int | None = None) -> Selection:
    """Exact P1 per instance by scipy.optimize.milp (HiGHS). scores [B, K], costs [B, K] J."""
    s, c, gamma, k_min, k_max = validate_inputs(scores, costs, gamma, k_min, k_max, cost_ndim=2)
    s, c = s.numpy(), c.numpy()
    B, K = s.shape
    mask = np.zeros((B, K), dtype=np.bool_)
    feasible = np.zeros(B, dtype=np.bool_)
    for b in range(B):
        chosen = milp_p1_row(s[b], c[b], gamma, k_min, k_max)
        if chosen is not None:
            feasible[b] = True
            mask[b] = chosen
        else:
            mask[b, _fallback(s[b], c[b], k_max)] = True
    energy = np.where(mask, c, 0.0).sum(1)
    return _selection(mask, energy, feasible, np.zeros(B, dtype=np.int64))


# --------------------------------------------------------------------------------------
# P2
# --------------------------------------------------------------------------------------
def _fallback_p2(s, e, k_max):
    """Fallback experts and their subcarriers (max-cardinality, min-cost assignment); e [K, N]."""
    experts = _fallback(s, e.min(1), k_max)
    assignment = {}
    if experts.size:
        sub = e[experts]
        finite = np.isfinite(sub)
        # a penalty larger than any sum of finite costs makes the assignment maximise the
        # number of finite links first, then minimise their cost
        penalty = 1.0 + 2.0 * sub[finite].sum()
        rows, cols = linear_sum_assignment(np.where(finite, sub, penalty))
        for r, n in zip(rows, cols, strict=True):
            if finite[r, n]:
                assignment[int(experts[r])] = int(n)
    return assignment


def _p2_result(s, e, B, K, assignments, feasible, nodes):
    mask = np.zeros((B, K), dtype=np.bool_)
    subcarrier = np.full((B, K), -1, dtype=np.int64)
    energy = np.zeros(B)
    for b, assignment in enumerate(assignments):
        for k, n in sorted(assignment.items()):
            mask[b, k] = True
            subcarrier[b, k] = n
            energy[b] += e[b, k, n]
    return _selection(mask, energy, feasible, nodes, subcarrier)


def brute_force_p2(scores, costs, gamma: float, k_min: int = 1, k_max: int | None = None) -> Selection:
    """Exact P2 by enumerating subsets and all their injective subcarrier assignments.

    scores [B, K], costs [B, K, N] J.  Tiny instances only (K, N <= ~6).
    nodes = (subset, assignment) pairs enumerated per row.
    """
    s, e, gamma, k_min, k_max = validate_inputs(scores, costs, gamma, k_min, k_max, cost_ndim=3)
    s, e = s.numpy(), e.numpy()
    B, K, N = e.shape
    thr = gamma - RELEVANCE_TOL
    sizes = range(k_min, min(k_max, N) + 1)
    perms = {m: np.array(list(itertools.permutations(range(N), m)), dtype=np.int64).reshape(-1, m) for m in sizes}
    work = sum(math.comb(K, m) * len(perms[m]) for m in sizes)
    if work > _MAX_SUBSETS:
        raise ValueError(f"brute_force_p2: K={K}, N={N}, k_max={k_max} gives {work} assignments; too many")
    assignments, feasible = [], np.zeros(B, dtype=np.bool_)
    for b in range(B):
        best, best_assignment = math.inf, None
        for m in sizes:
            for combo in itertools.combinations(range(K), m):
                experts = list(combo)
                if s[b, experts].sum() < thr:
                    continue
                totals = e[b, experts][np.arange(m), perms[m]].sum(1)  # [n_perms]
                j = int(np.argmin(totals))
                if totals[j] < best:
                    best = totals[j]
                    best_assignment = {k: int(n) for k, n in zip(experts, perms[m][j], strict=True)}
        feasible[b] = best_assignment is not None
        assignments.append(best_assignment if feasible[b] else _fallback_p2(s[b], e[b], k_max))
    return _p2_result(s, e, B, K, assignments, feasible, np.full(B, work, dtype=np.int64))


def milp_p2(scores, costs, gamma: float, k_min: int = 1, k_max: int | None = None) -> Selection:
    """Exact P2 per instance by scipy.optimize.milp (HiGHS).

    scores [B, K], costs [B, K, N] J (+inf = link in outage, fixed to 0).  Variables
    y[k, n] in {0, 1} for finite links; x_k = sum_n y[k, n] <= 1; each subcarrier serves at
    most one expert; relevance and cardinality as in P1.  Fills ``subcarrier``.
    """
    s, e, gamma, k_min, k_max = validate_inputs(scores, costs, gamma, k_min, k_max, cost_ndim=3)
    s, e = s.numpy(), e.numpy()
    B, K, N = e.shape
    thr = gamma - RELEVANCE_TOL
    assignments, feasible = [], np.zeros(B, dtype=np.bool_)
    for b in range(B):
        ks, ns = np.nonzero(np.isfinite(e[b]))
        assignment = None
        if ks.size and np.unique(ks).size >= k_min:
            V = ks.size
            cols = np.arange(V)
            expert_rows = np.zeros((K, V))
            expert_rows[ks, cols] = 1.0
            subcarrier_rows = np.zeros((N, V))
            subcarrier_rows[ns, cols] = 1.0
            R = _RELEVANCE_ROW_SCALE
            A = np.vstack([expert_rows, subcarrier_rows, R * s[b, ks][None, :], np.ones((1, V))])
            lower = np.concatenate([np.zeros(K + N), [R * thr, k_min]])
            upper = np.concatenate([np.ones(K + N), [np.inf, k_max]])
            y = solve_milp(e[b, ks, ns], A, lower, upper)
            if y is not None:
                assignment = {int(k): int(n) for k, n in zip(ks[y], ns[y], strict=True)}
        feasible[b] = assignment is not None
        assignments.append(assignment if feasible[b] else _fallback_p2(s[b], e[b], k_max))
    return _p2_result(s, e, B, K, assignments, feasible, np.zeros(B, dtype=np.int64))


# --------------------------------------------------------------------------------------
# DES in plain Python: the branch-and-bound of docs/method.md section 3, as a specification
# --------------------------------------------------------------------------------------
def _des_reference_row(s, c, gamma, k_min, k_max):
    """One row of the reference B&B; returns (chosen list, feasible, nodes, root bound)."""
    thr = gamma - RELEVANCE_TOL
    reach = [k for k in range(len(s)) if math.isfinite(c[k])]
    if not reach:
        return [], False, 0, math.nan
    fallback = _fallback(np.asarray(s), np.asarray(c), k_max).tolist()
    if len(reach) < k_min or sum(s[k] for k in fallback) < thr:
        return fallback, False, 0, math.nan
    order = sorted(reach, key=lambda k: (c[k] / s[k] if s[k] > 0 else math.inf, c[k], k))

    def lp_bound(start, need):
        """Linear relaxation of the remaining covering knapsack (greedy fractional fill)."""
        total, got = 0.0, 0.0
        for k in order[start:]:
            if s[k] <= 0:
                break
            if got + s[k] >= need:
                return total + (need - got) * c[k] / s[k]
            got += s[k]
            total += c[k]
        return math.inf

    # greedy incumbent in ratio order, then the (feasible) top-score fallback set
    greedy, got = [], 0.0
    for k in order:
        if got >= thr or len(greedy) == k_max:
            break
        greedy.append(k)
        got += s[k]
    for k in sorted(set(reach) - set(greedy), key=lambda k: (c[k], k)):
        if len(greedy) >= k_min:
            break
        greedy.append(k)
    incumbent = [fallback, sum(c[k] for k in fallback)]
    if got >= thr and k_min <= len(greedy) <= k_max and sum(c[k] for k in greedy) < incumbent[1]:
        incumbent = [greedy, sum(c[k] for k in greedy)]
    nodes = 0

    def dfs(pos, chosen, acc_s, acc_c):
        nonlocal nodes
        nodes += 1
        if acc_c >= incumbent[1]:
            return
        if acc_s >= thr and len(chosen) >= k_min:
            incumbent[0], incumbent[1] = list(chosen), acc_c
            return
        if len(chosen) == k_max or pos == len(order) or len(order) - pos < k_min - len(chosen):
            return
        if acc_s < thr and acc_c + lp_bound(pos, thr - acc_s) >= incumbent[1]:
            return
        k = order[pos]
        chosen.append(k)
        dfs(pos + 1, chosen, acc_s + s[k], acc_c + c[k])
        chosen.pop()
        dfs(pos + 1, chosen, acc_s, acc_c)

    dfs(0, [], 0.0, 0.0)
    return incumbent[0], True, nodes, lp_bound(0, thr)


def des_reference(scores: torch.Tensor, costs: torch.Tensor, gamma: float, k_min: int = 1, k_max: int | None = None) -> Selection:
    """Pure-Python DES (docs/method.md section 3: ratio order, greedy incumbent, DFS include /
    exclude, LP-relaxation bound) with the same signature and semantics as
    :func:`~dmoe_torch.selection.des.des`; a readable specification for the tests.

    Recursive, one row at a time: for tests and small K (recursion depth grows with K).
    """
    s, c, gamma, k_min, k_max = validate_inputs(scores, costs, gamma, k_min, k_max, cost_ndim=2)
    B, K = s.shape
    s_rows, c_rows = s.tolist(), c.tolist()
    mask, energy, violation, dropped, nodes, bound = result_arrays(B, K)
    for b in range(B):
        chosen, feasible, nd, lb = _des_reference_row(s_rows[b], c_rows[b], gamma, k_min, k_max)
        mask[b, chosen] = True
        energy[b] = float(np.sum(c[b].numpy()[mask[b]]))
        violation[b] = not feasible
        dropped[b] = not chosen
        nodes[b] = nd
        if feasible:
            bound[b] = lb
    return selection_from_arrays(mask, energy, violation, dropped, nodes, bound)


# --------------------------------------------------------------------------------------
# P3: the image frame (docs/method.md section 11); results are frame.FrameSelection
# --------------------------------------------------------------------------------------
# Brute force refuses frames with more partitions than this ((K + 1)^N).
_MAX_PARTITIONS = 20_000


def _p3_result(s, e, c, gamma, k_min, masks, owners, optimal, bounds):
    """FrameSelection of the references: feasible frames get their plan (certified when
    proven optimal); infeasible ones (mask None) an empty plan, every token a violation."""
    from .frame import plan_from_owner

    F, T, K = s.shape
    want = np.zeros((F, T, K), dtype=np.bool_)
    owner = np.full((F, e.shape[2]), -1, dtype=np.int64)
    for f, (mask, own) in enumerate(zip(masks, owners, strict=True)):
        if mask is not None:
            want[f], owner[f] = mask, own
    plan = plan_from_owner(s, e, c, owner, want, gamma, k_min)
    found = np.array([m is not None for m in masks], dtype=np.bool_)
    plan.lower_bound = np.where(found & optimal, plan.energy, np.where(found, bounds, np.nan))
    plan.certified = found & optimal & plan.feasible
    return plan


def _device_fill_table(e_k, c_k, owned, T):
    """Energy of 0..T tokens on one device owning the subcarriers `owned` (bool [N]),
    cheapest slots first; +inf beyond its capacity.  float64 [T + 1]."""
    slots = np.repeat(e_k[owned], np.minimum(c_k[owned], T))
    slots = np.sort(slots)[:T]
    table = np.full(T + 1, np.inf)
    table[: slots.size + 1] = np.concatenate([[0.0], np.cumsum(slots)])
    return table


def _p3_brute_frame(s, e, c, thr, k_min, k_max):
    """One frame by enumeration: every token's allowed expert sets give the reachable device
    load vectors (with one witness selection each); every partition of the subcarriers
    gives each device's cheapest-first energy per load; the best (partition, load) pair
    is optimal because the energy depends on the selection only through the loads.
    Returns (mask [T, K], owner [N]) or None when P3 is infeasible."""
    T, K = s.shape
    N = e.shape[1]
    usable = np.flatnonzero((c > 0).any(1))
    token_sets = []
    for t in range(T):
        sets = [
            combo
            for m in range(k_min, k_max + 1)
            for combo in itertools.combinations(usable.tolist(), m)
            if s[t, list(combo)].sum() >= thr
        ]
        if not sets:
            return None
        token_sets.append(sets)
    witness = {(0,) * K: ()}
    for sets in token_sets:
        grown = {}
        for load, chosen in witness.items():
            for combo in sets:
                new = list(load)
                for k in combo:
                    new[k] += 1
                grown.setdefault(tuple(new), chosen + (combo,))
        witness = grown
    loads = np.array(list(witness.keys()), dtype=np.int64)  # [M, K]
    best, best_owner, best_load = np.inf, None, None
    for owner in itertools.product(range(-1, K), repeat=N):
        owner = np.array(owner, dtype=np.int64)
        table = np.stack([_device_fill_table(e[k], c[k], owner == k, T) for k in range(K)])  # [K, T+1]
        totals = table[np.arange(K), loads].sum(1)
        j = int(np.argmin(totals))
        if totals[j] < best:
            best, best_owner, best_load = totals[j], owner, tuple(loads[j])
    if best_owner is None:
        return None
    mask = np.zeros((T, K), dtype=np.bool_)
    for t, combo in enumerate(witness[best_load]):
        mask[t, list(combo)] = True
    return mask, best_owner


def brute_force_p3(scores, costs, capacity, gamma: float, k_min: int = 1, k_max: int | None = None):
    """Exact P3 by enumeration, for tiny frames (T, K, N <= ~4).

    scores [F, T, K], costs [F, K, N] J, capacity [F, K, N] tokens per link.  Returns a
    frame.FrameSelection: feasible frames certified optimal (lower_bound = energy),
    infeasible frames an empty plan with every token a violation."""
    from .frame import validate_frame_inputs

    s, e, c, gamma, k_min, k_max = validate_frame_inputs(scores, costs, capacity, gamma, k_min, k_max)
    F, T, K = s.shape
    if (K + 1) ** e.shape[2] > _MAX_PARTITIONS:
        raise ValueError(f"brute_force_p3: K={K}, N={e.shape[2]} gives {(K + 1) ** e.shape[2]} partitions; too many")
    found = [_p3_brute_frame(s[f], e[f], c[f], gamma - RELEVANCE_TOL, k_min, k_max) for f in range(F)]
    masks = [None if r is None else r[0] for r in found]
    owners = [None if r is None else r[1] for r in found]
    return _p3_result(s, e, c, gamma, k_min, masks, owners, np.ones(F, dtype=np.bool_), np.full(F, np.nan))


def _p3_milp_frame(s, e, c, thr, k_min, k_max, time_limit):
    """One frame of P3 by HiGHS.  Variables x[t,k], z[k,n] binary and w[k,n] integer
    (tokens on link k,n); the rate-capacity coupling is linear: w <= c z, one owner per
    subcarrier, sum_n w[k,n] = sum_t x[t,k].  Returns (mask [T,K], owner [N], proven
    optimal, dual bound J) or None when infeasible (proven)."""
    T, K = s.shape
    N = e.shape[1]
    usable = (c > 0).any(1)
    if usable.sum() < k_min:
        return None
    nx, nl = T * K, K * N
    V = nx + 2 * nl
    x_col = np.arange(nx).reshape(T, K)
    z_col = nx + np.arange(nl).reshape(K, N)
    w_col = nx + nl + np.arange(nl).reshape(K, N)
    link_cost = np.where(c > 0, e, 0.0)
    objective = np.zeros(V)
    objective[w_col.ravel()] = link_cost.ravel()
    positive = link_cost[link_cost > 0]
    scale = positive.min() if positive.size else 1.0
    upper_bound = np.zeros(V)
    upper_bound[x_col.ravel()] = np.repeat(usable[None, :], T, 0).ravel()
    upper_bound[z_col.ravel()] = (c > 0).ravel()
    upper_bound[w_col.ravel()] = c.ravel()
    R = _RELEVANCE_ROW_SCALE
    rows, lo, hi = [], [], []

    def row(cols, vals, low, high):
        r = np.zeros(V)
        r[cols] = vals
        rows.append(r)
        lo.append(low)
        hi.append(high)

    for t in range(T):
        row(x_col[t], R * s[t], R * thr, np.inf)
        row(x_col[t], 1.0, k_min, k_max)
    for k in range(K):
        row(np.concatenate([x_col[:, k], w_col[k]]), np.concatenate([np.ones(T), -np.ones(N)]), 0.0, 0.0)
        for n in range(N):
            row([w_col[k, n], z_col[k, n]], [1.0, -float(c[k, n])], -np.inf, 0.0)
    for n in range(N):
        row(z_col[:, n], 1.0, -np.inf, 1.0)
    options = dict(_HIGHS_OPTIONS)
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = milp(
            objective / scale,
            integrality=np.ones(V),
            bounds=Bounds(np.zeros(V), upper_bound),
            constraints=[LinearConstraint(np.array(rows), np.array(lo), np.array(hi))],
            options=options,
        )
    if res.status == 2:
        return None
    bound = getattr(res, "mip_dual_bound", None)
    bound = np.nan if bound is None else bound * scale
    if res.x is None and res.status == 1:  # time limit before any plan: feasibility unknown
        return "unknown", (0.0 if np.isnan(bound) else bound)
    if res.status not in (0, 1) or res.x is None:
        raise RuntimeError(f"HiGHS failed: {res.message}")
    mask = res.x[x_col] > 0.5
    z = res.x[z_col] > 0.5
    owner = np.where(z.any(0), z.argmax(0), -1).astype(np.int64)
    return mask, owner, res.status == 0, bound


def milp_p3(scores, costs, capacity, gamma: float, k_min: int = 1, k_max: int | None = None, *, time_limit: float | None = None):
    """Exact P3 per frame by scipy.optimize.milp (HiGHS); see :func:`_p3_milp_frame`.

    scores [F, T, K], costs [F, K, N] J, capacity [F, K, N] tokens per link.  Returns a
    frame.FrameSelection; feasible frames solved to optimality are certified (lower_bound
    = energy); with `time_limit` (s per frame) a frame HiGHS did not finish keeps its
    incumbent, certified False, lower_bound HiGHS's dual bound.  Infeasible frames: an
    empty plan with every token a violation; lower_bound nan when HiGHS proved the frame
    infeasible, its (finite) dual bound when the time limit came before any plan (feasibility
    unknown)."""
    from .frame import validate_frame_inputs

    s, e, c, gamma, k_min, k_max = validate_frame_inputs(scores, costs, capacity, gamma, k_min, k_max)
    F = s.shape[0]
    raw = [_p3_milp_frame(s[f], e[f], c[f], gamma - RELEVANCE_TOL, k_min, k_max, time_limit) for f in range(F)]
    unknown = np.array([r is not None and len(r) == 2 for r in raw], dtype=np.bool_)
    found = [None if u else r for r, u in zip(raw, unknown, strict=True)]
    masks = [None if r is None else r[0] for r in found]
    owners = [None if r is None else r[1] for r in found]
    optimal = np.array([r is not None and r[2] for r in found], dtype=np.bool_)
    bounds = np.array([np.nan if r is None else r[3] for r in found])
    plan = _p3_result(s, e, c, gamma, k_min, masks, owners, optimal, bounds)
    plan.lower_bound[unknown] = [r[1] for r, u in zip(raw, unknown, strict=True) if u]
    return plan
