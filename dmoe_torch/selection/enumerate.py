"""Exact small-k routing solvers by batched enumeration, on the tensors' own device.

What
----
``des_enumerate`` (P1, the ``des`` policy), ``optimal_enumerate`` (exact P2, the ``optimal``
policy) and ``jesa_enumerate`` (the paper's JESA on P2) for routers with few experts and
small sets (K <= 16, k_max <= 3): the same results as the numba solvers (``des_numpy``,
``jesa_numpy``) and the exact references (``exact.milp_p2`` / ``exact.brute_force_p2``),
computed by batched tensor algebra with no data-dependent control flow and no host sync, so
they run on CPU or CUDA alike and need no transfer of the router's scores.  ``enumerable``
says when the router should use them (``MAX_CANDIDATE_SETS`` on an accelerator,
``MAX_CANDIDATE_SETS_CPU`` per solver on the CPU, ``MAX_SET_SIZE``).

Why it is exact
---------------
* P1: every candidate set (``candidate_sets``: all sets of k_min..k_max experts, ordered by
  size, then lexicographically) is scored at once: relevance and energy are [B, C] matrix
  products, a set using an unreachable expert or missing gamma - RELEVANCE_TOL is
  discarded, the cheapest survivor wins.
* P2: for a fixed set S, an optimal assignment gives each selected expert one of its |S|
  cheapest subcarriers: if expert k sat elsewhere, at most |S| - 1 of its |S| cheapest
  subcarriers are taken by the others, so a free one, no dearer, can replace it.  The same
  swap keeps the number of finite links, so a maximum-cardinality, minimum-cost partial
  assignment also lives in those ranks.  So each expert keeps its R = min(k_max, N) cheapest
  subcarriers (repeated minima, ties to the lower index) and a set of size m enumerates the
  m^m rank tuples (1, 4, 27), keeping those with pairwise distinct, finite links.
  A partial assignment (fallbacks, JESA's assignment) enumerates (R + 1)^m option tuples
  (each slot: a rank or no link), at most 64.
* JESA: the iteration of jesa.py (DES under c*, min-cost assignment, updated costs, DES
  again while the energy drops by more than ENERGY_RTOL) is deterministic, so with an exact
  DES and an exact assignment it reproduces jesa_numpy wherever neither has a tie to break.
  Its P2 fallback (greedy maximum-relevance matchable set) runs as K fixed greedy steps,
  each testing "chosen + next expert" for a matching by the enumeration above.

Tie rules (where several answers are optimal; numba and HiGHS may pick another one)
--------------------------------------------------------------------------------------
* P1 / P2: the first optimal set in candidate order (size, then lexicographic), energies
  compared as computed in float64; within a P2 set, the first rank tuple in lexicographic
  order of the experts' ranks.
* Partial assignments: most finite links, then least energy, then the first option tuple
  (ranks 0..R-1 before "no link", lexicographic over the slots in ascending expert order).
* Fallback order (as des.py): descending score, then lower cost (c* for P2), then lower index.
With ties the energies of ``des_enumerate`` and ``optimal_enumerate`` still equal the
references' (the optimum is unique even when its argmin is not); JESA's may not, because a
different tie choice can start a different iteration path.

Outputs and semantics (P1/P2 details as des.py, jesa.py and exact.py)
-----------------------------------------------------------------------
Each function returns a :class:`Selection` on the input device: energy float64 [J] (sum of
the selected costs, summed in ascending expert order like the numba solvers), certified =
proven optimal for its problem, lower_bound = energy on feasible rows for P1 and P2 (the
optimum bounds itself; nan on infeasible rows) and, for JESA, the P1 optimum under c* (nan
where that is infeasible), nodes = 0 (no search tree), failed all False.  ``des_enumerate``
leaves subcarrier at -1 (the caller assigns static subcarriers).

Complexity
----------
Per row: P1 O(C K) work and [B, C] memory (C candidate sets); P2 exact O(C m^m) with
[B, C_m, m^m] temporaries per size m; JESA one P1 per round plus [B, 64] assignment tables.
Rows are processed in chunks of at most ``_CHUNK_ELEMENTS`` table entries (per device type),
a shape-only split that keeps memory bounded without reading any tensor value.

Host syncs
----------
None in the solvers on CUDA: no ``.item()``, ``.tolist()``, ``nonzero()`` or branching on
tensor values.  The constant tables (candidate sets, rank and option tuples) are built once
per (shape, device) and cached, so only the first call per device copies them there.  On the
CPU (where a "sync" is free) JESA's iteration rounds and its fallback run on the still
active rows only (``_active_rows``, the one place that reads tensor values); on other
devices every round runs on all rows and finished rows are frozen by ``torch.where``.  The
math is one code path either way; on the CPU compaction is 7-11x faster than freezing
(K=8, N=16, 12,544 rows: 53 vs 379 ms at k_max=2, 82 vs 936 ms at k_max=3).  Being
sync-free, the three solvers can be captured in a CUDA graph for fixed shapes (after one
eager call); replaying one removes the per-kernel launch cost that dominates JESA's fixed
rounds (benchmarks/bench_enumerate.py measures both).

Where it is used
----------------
The router (``registry.route``) is to call these where ``enumerable`` says so;
``benchmarks/bench_enumerate.py`` measures exactness (105,000 instances) and the crossover
against numba.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch

from .common import RELEVANCE_TOL, Selection
from .jesa import DEFAULT_MAX_ITERATIONS, ENERGY_RTOL

__all__ = [
    "MAX_CANDIDATE_SETS",
    "MAX_CANDIDATE_SETS_CPU",
    "MAX_SET_SIZE",
    "candidate_sets",
    "candidate_set_count",
    "enumerable",
    "des_enumerate",
    "optimal_enumerate",
    "jesa_enumerate",
]

# Enumeration is used up to this many candidate sets (sizes k_min..k_max of K experts), from
# benchmarks/bench_enumerate.py (12,544 rows; results/enumerate.json).  On an accelerator (an
# H200) every solver beat its alternative at every size measured, up to K=32, k_max=3 (5,488
# sets): DES 0.02-0.05x the time of numba (one CPU thread, copies there and back included),
# JESA 0.24-1.0x eagerly and 0.12-0.25x replayed from a CUDA graph.
MAX_CANDIDATE_SETS = 5_500
# On the CPU (one thread) the crossover depends on the solver (time of enumeration / numba):
# DES 0.54x at K=8, k_max=2 (36 sets), 0.89x at K=8, k_max=3 (92), 1.63x at K=16, k_max=2 (136);
# JESA 1.47x already at 36 sets (numba's iteration touches only the rows that collide);
# optimal against HiGHS (milp_p2): 0.002x at K=8, k_max=2 up to 0.04x at K=16, k_max=3 (696).
MAX_CANDIDATE_SETS_CPU = {"des": 92, "jesa": 0, "optimal": MAX_CANDIDATE_SETS}
# Largest set size enumerated: a P2 set of m experts enumerates m^m rank tuples and a partial
# assignment (R + 1)^m option tuples, 27 and 64 at m = 3.
MAX_SET_SIZE = 3
# Rows per chunk are chosen so that one chunk's largest table holds at most this many entries,
# bounding the memory of the [B, C] and [B, C, m^m] temporaries: 32 MiB of float64 on the CPU
# (cache-sized), 256 MiB on an accelerator (fewer, larger kernels).
_CHUNK_ELEMENTS = {"cpu": 1 << 22}
_CHUNK_ELEMENTS_ACCELERATOR = 1 << 25


# --------------------------------------------------------------------------------------
# constant tables, cached per (shape, device)
# --------------------------------------------------------------------------------------
def candidate_set_count(num_experts: int, k_min: int, k_max: int) -> int:
    """Number of sets of k_min..k_max experts out of num_experts (the rows of candidate_sets)."""
    return sum(math.comb(num_experts, m) for m in range(k_min, min(k_max, num_experts) + 1))


def enumerable(num_experts: int, k_min: int, k_max: int, device: torch.device | str | None = None, solver: str = "des") -> bool:
    """True when `solver` ("des", "jesa" or "optimal": des_enumerate, jesa_enumerate,
    optimal_enumerate) should route K=num_experts experts with k_min..k_max on `device`
    (None: the CPU), rather than numba (des, jesa) or HiGHS (optimal).

    Enumeration does O(C) work per row for C = candidate_set_count(K, k_min, k_max) sets,
    branch-and-bound far less on easy rows, so past some C the CPU solvers win: on the CPU at
    MAX_CANDIDATE_SETS_CPU[solver]; on an accelerator, where they would also cost a host sync
    and two copies, beyond the measured range (MAX_CANDIDATE_SETS).  k_max is further limited
    to MAX_SET_SIZE (the rank tuples of the P2 enumeration grow as k_max^k_max).
    """
    if solver not in MAX_CANDIDATE_SETS_CPU:
        raise ValueError(f"solver must be one of {sorted(MAX_CANDIDATE_SETS_CPU)}, got {solver!r}")
    on_cpu = device is None or torch.device(device).type == "cpu"
    limit = MAX_CANDIDATE_SETS_CPU[solver] if on_cpu else MAX_CANDIDATE_SETS
    return k_max <= MAX_SET_SIZE and candidate_set_count(num_experts, k_min, k_max) <= limit


def _check_sizes(num_experts: int, k_min: int, k_max: int) -> None:
    if not 1 <= k_min <= k_max:
        raise ValueError(f"need 1 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    if k_max > num_experts:
        raise ValueError(f"k_max ({k_max}) must be <= the number of experts ({num_experts})")


@functools.cache
def _sets_of_size(num_experts: int, size: int, device: torch.device) -> torch.Tensor:
    """Every set of `size` experts as ascending indices, lexicographic: int64 [C_size, size]."""
    rows = list(itertools.combinations(range(num_experts), size))
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), size).to(device)


@functools.cache
def _candidate_sets(num_experts: int, k_min: int, k_max: int, device: torch.device) -> torch.Tensor:
    blocks = []
    for size in range(k_min, k_max + 1):
        members = _sets_of_size(num_experts, size, torch.device("cpu"))
        block = torch.zeros(members.shape[0], num_experts, dtype=torch.bool)
        block.scatter_(1, members, True)
        blocks.append(block)
    return torch.cat(blocks).to(device)


def candidate_sets(num_experts: int, k_min: int, k_max: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Membership of every set of k_min..k_max experts: bool [C, K] on `device` (default CPU).

    Order: by size, then lexicographic in the ascending member indices ({0,1} < {0,2} <
    {1,2}).  Cached per (K, k_min, k_max, device): treat the result as read-only.
    """
    _check_sizes(num_experts, k_min, k_max)
    return _candidate_sets(num_experts, k_min, k_max, torch.device(device or "cpu"))


@functools.cache
def _membership_columns(num_experts: int, k_min: int, k_max: int, device: torch.device) -> torch.Tensor:
    """candidate_sets as a contiguous float64 [K, C] matrix (scores [B, K] @ it = relevance)."""
    return _candidate_sets(num_experts, k_min, k_max, device).T.to(torch.float64).contiguous()


@functools.cache
def _rank_tuples(size: int, device: torch.device) -> torch.Tensor:
    """Every tuple of ranks 0..size-1 for `size` slots, lexicographic: int64 [size^size, size]."""
    rows = list(itertools.product(range(size), repeat=size))
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), size).to(device)


@functools.cache
def _option_tuples(slots: int, ranks: int, device: torch.device) -> torch.Tensor:
    """Every option tuple of a partial assignment: int64 [(ranks + 1)^slots, slots], each entry
    a rank 0..ranks-1 or `ranks` for "no link"; lexicographic (ranks before "no link")."""
    rows = list(itertools.product(range(ranks + 1), repeat=slots))
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), slots).to(device)


def _joined(chunks: list[torch.Tensor]) -> torch.Tensor:
    """The row chunks' results as one tensor (no copy for a single chunk)."""
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def _row_chunks(rows: int, width: int, device: torch.device) -> list[slice]:
    """Row slices whose [rows, width] tables fit the chunk budget of `device` (shape only)."""
    budget = _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS_ACCELERATOR)
    step = max(1, budget // max(width, 1))
    return [slice(start, min(rows, start + step)) for start in range(0, rows, step)] or [slice(0, 0)]


# --------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------
def _sum_slots(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sum over slots [B, m] of the valid ones, left to right (the numba solvers' order)."""
    total = torch.zeros(values.shape[0], dtype=values.dtype, device=values.device)
    for j in range(values.shape[1]):
        total = total + torch.where(valid[:, j], values[:, j], torch.zeros_like(values[:, j]))
    return total


def _slots_from_mask(mask: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The selected experts of mask [B, K] in ascending order, padded with expert 0: (experts
    int64 [B, slots], valid bool [B, slots]); rows select at most `slots` experts."""
    B, K = mask.shape
    position = torch.where(mask, mask.to(torch.int64).cumsum(1) - 1, slots)  # slot of each selected expert
    experts = torch.zeros(B, slots + 1, dtype=torch.int64, device=mask.device)
    experts.scatter_(1, position, torch.arange(K, device=mask.device).expand(B, K))
    valid = torch.arange(slots, device=mask.device) < mask.sum(1, keepdim=True)
    return torch.where(valid, experts[:, :slots], 0), valid


def _mask_from_slots(experts: torch.Tensor, valid: torch.Tensor, num_experts: int) -> torch.Tensor:
    """bool [B, K] with the valid slots' experts set."""
    mask = torch.zeros(experts.shape[0], num_experts + 1, dtype=torch.bool, device=experts.device)
    mask.scatter_(1, torch.where(valid, experts, num_experts), True)
    return mask[:, :num_experts]


def _subcarrier_from_slots(experts: torch.Tensor, slot_sub: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 [B, K]: slot_sub [B, m] at each slot's expert where >= 0, -1 elsewhere."""
    sub = torch.full((experts.shape[0], num_experts + 1), -1, dtype=torch.int64, device=experts.device)
    sub.scatter_(1, torch.where(slot_sub >= 0, experts, num_experts), slot_sub)
    return sub[:, :num_experts]


def _fallback_order(scores: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
    """Experts by descending score, then lower cost, then lower index; unreachable (cost +inf)
    last.  scores, costs float64 [B, K] -> int64 [B, K] (a permutation per row).

    Each expert's place is the number of experts ahead of it (pairwise comparisons, [B, K, K]),
    cheaper than a sort for small K.
    """
    B, K = scores.shape
    key = torch.where(torch.isinf(costs), -1.0, scores)  # scores >= 0: unreachable experts last
    index = torch.arange(K, device=scores.device)
    ahead_of = (key[:, :, None] > key[:, None, :]) | (key[:, :, None] == key[:, None, :]) & (
        (costs[:, :, None] < costs[:, None, :]) | (costs[:, :, None] == costs[:, None, :]) & (index[:, None] < index[None, :])
    )  # [b, j, k]: expert j comes before expert k
    place = ahead_of.sum(1)
    return torch.empty_like(place).scatter_(1, place, index.expand(B, K))


def _top_score_slots(scores: torch.Tensor, costs: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The min(count, #reachable) reachable experts first in _fallback_order, as slots
    (experts int64 [B, count], valid bool [B, count]; slot order = fallback order)."""
    experts = _fallback_order(scores, costs)[:, :count]
    return experts, torch.isfinite(costs.gather(1, experts))


def _des_core(scores: torch.Tensor, costs: torch.Tensor, threshold: float, k_min: int, k_max: int, fallback: bool = True):
    """P1 on float64 scores, costs [B, K]; returns (mask bool [B, K], feasible bool [B]).

    Feasible rows: the first cheapest candidate set reaching `threshold`; others: the
    top-score fallback (an empty mask where no expert is reachable), or any set when
    `fallback` is False (for callers that discard infeasible rows).
    """
    B, K = scores.shape
    sets = _candidate_sets(K, k_min, k_max, scores.device)
    members = _membership_columns(K, k_min, k_max, scores.device)  # [K, C]
    reachable = torch.isfinite(costs)
    finite_costs = torch.where(reachable, costs, 0.0)
    # an unreachable expert's score becomes -(K + 1): every set holding it has relevance
    # below -K < threshold, while the other sets' relevance is computed unchanged
    reach_scores = torch.where(reachable, scores, -(K + 1.0))
    best_set, feasible = [], []
    for rows in _row_chunks(B, sets.shape[0], scores.device):
        allowed = reach_scores[rows] @ members >= threshold
        energy = torch.where(allowed, finite_costs[rows] @ members, math.inf)
        best_set.append(energy.argmin(1))  # first minimum: the first optimal set in candidate order
        feasible.append(allowed.any(1))
    best_set, feasible = _joined(best_set), _joined(feasible)
    if not fallback:
        return sets[best_set], feasible
    # the fallback order on the infeasible rows only where that needs no sync (the CPU: they
    # are usually few), on every row elsewhere
    rows = _active_rows(~feasible)
    fallback_experts, fallback_valid = _top_score_slots(_take(scores, rows), _take(costs, rows), k_max)
    fallback_mask = _mask_from_slots(fallback_experts, fallback_valid, K)
    return _merge(sets[best_set], rows, _take(~feasible, rows), fallback_mask), feasible


def _ranked_links(costs3: torch.Tensor, ranks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's `ranks` cheapest subcarriers (ties to the lower index): (cost float64
    [B, K, ranks] J, subcarrier int64 [B, K, ranks]).

    Repeated minima (``min`` returns the first minimal index) beat a full sort for ranks <= 3.
    Past an expert's last finite link the ranks hold +inf (their subcarrier is arbitrary and
    never used: every enumeration discards infinite links).
    """
    remaining = costs3.clone()
    values, indices = [], []
    for _ in range(ranks):
        value, index = remaining.min(2, keepdim=True)
        remaining.scatter_(2, index, math.inf)
        values.append(value)
        indices.append(index)
    return torch.cat(values, 2), torch.cat(indices, 2)


def _tuples(costs: list[torch.Tensor], subs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every tuple of one option per slot, by broadcasting (no gathers).

    costs[j] float64 [..., n] J and subs[j] int64 [..., n]: slot j's options (subcarrier < 0:
    no link, never colliding).  Returns (total float64 [..., n^m] J, allowed bool [..., n^m]:
    finite, pairwise distinct subcarriers), tuples in lexicographic order (itertools.product).
    """
    m = len(costs)
    lead = costs[0].shape[:-1]

    def on_axis(x: torch.Tensor, j: int) -> torch.Tensor:
        return x.view(*lead, *([1] * j), x.shape[-1], *([1] * (m - 1 - j)))

    total = on_axis(costs[0], 0)
    for j in range(1, m):
        total = total + on_axis(costs[j], j)
    allowed = torch.isfinite(total)
    for i, j in itertools.combinations(range(m), 2):
        sub_i = on_axis(subs[i], i)
        allowed = allowed & ((sub_i != on_axis(subs[j], j)) | (sub_i < 0))
    count = math.prod(c.shape[-1] for c in costs)
    return total.reshape(*lead, count), allowed.reshape(*lead, count)


def _assign_slots(rank_cost, rank_sub, experts, valid):
    """Maximum-cardinality, minimum-cost assignment of slot experts to distinct finite links.

    rank_cost float64 [B, K, R] J, rank_sub int64 [B, K, R] (each expert's R cheapest links);
    experts int64 [B, m], valid bool [B, m] (R >= the number of valid slots).  Returns
    (subcarrier int64 [B, m], -1 for no link; energy float64 [B] J of the links given;
    links int64 [B], how many slots got a finite link).
    """
    B, m = experts.shape
    R = rank_cost.shape[2]
    index = experts[:, :, None].expand(B, m, R)
    slot_cost = torch.where(valid[:, :, None], rank_cost.gather(1, index), math.inf)
    slot_sub = rank_sub.gather(1, index)
    # option R of every slot is "no link": cost 0, subcarrier -1
    slot_cost = torch.cat([slot_cost, slot_cost.new_zeros(B, m, 1)], 2)
    slot_sub = torch.cat([slot_sub, slot_sub.new_full((B, m, 1), -1)], 2)
    total, allowed = _tuples(list(slot_cost.unbind(1)), list(slot_sub.unbind(1)))  # [B, (R + 1)^m]
    options = _option_tuples(m, R, experts.device)  # [T, m], the same order
    links = (options < R).sum(1)  # [T]
    most = torch.where(allowed, links, -1).amax(1, keepdim=True)  # the "no link" tuple is always allowed
    best = torch.where(allowed & (links == most), total, math.inf).argmin(1, keepdim=True)
    chosen = options[best[:, 0]]  # [B, m]
    sub = torch.where(chosen < R, slot_sub.gather(2, chosen[:, :, None])[:, :, 0], -1)
    return sub, total.gather(1, best)[:, 0], most[:, 0]


def _selection(mask, subcarrier, energy, violation, lower_bound, certified) -> Selection:
    B, K = mask.shape
    return Selection(
        mask=mask,
        subcarrier=subcarrier,
        energy=energy,
        violation=violation,
        dropped=~mask.any(1),
        nodes=torch.zeros(B, dtype=torch.int64, device=mask.device),
        lower_bound=lower_bound,
        certified=certified,
        failed=torch.zeros(B, K, dtype=torch.bool, device=mask.device),
    )


def _check_set_size(k_max: int) -> None:
    if k_max > MAX_SET_SIZE:
        raise ValueError(f"k_max must be <= MAX_SET_SIZE={MAX_SET_SIZE} for the P2 enumeration, got {k_max}")


# --------------------------------------------------------------------------------------
# P1
# --------------------------------------------------------------------------------------
def des_enumerate(scores: torch.Tensor, costs: torch.Tensor, gamma: float, k_min: int, k_max: int) -> Selection:
    """Exact P1 (DES's problem and semantics, see des.py) by enumerating candidate sets.

    scores [B, K] float (rows sum to 1), costs [B, K] float J (+inf unreachable), gamma in
    (0, 1], 1 <= k_min <= k_max <= K: already validated (as by ``validate_inputs``), any
    float dtype (computed in float64), any device.  Returns a Selection on that device:
    subcarrier all -1, energy float64 [B] J, lower_bound = energy on feasible rows (nan
    elsewhere), certified = ~violation, nodes 0.
    """
    s = scores.to(torch.float64)
    c = costs.to(torch.float64)
    mask, feasible = _des_core(s, c, gamma - RELEVANCE_TOL, k_min, k_max)
    experts, valid = _slots_from_mask(mask, k_max)
    energy = _sum_slots(c.gather(1, experts), valid)
    subcarrier = torch.full_like(mask, -1, dtype=torch.int64)
    return _selection(mask, subcarrier, energy, ~feasible, torch.where(feasible, energy, math.nan), feasible)


# --------------------------------------------------------------------------------------
# P2, exact
# --------------------------------------------------------------------------------------
def _best_assignment_of_size(scores, rank_cost, rank_sub, threshold, size):
    """Cheapest set of `size` experts reaching `threshold` with its min-cost assignment.

    Returns (energy float64 [B] J, +inf where no set qualifies; experts int64 [B, size];
    subcarrier int64 [B, size]).  Ties: first set in lexicographic order, first rank tuple.
    """
    B, K, R = rank_cost.shape
    members = _sets_of_size(K, size, scores.device)  # [C, size]
    tuples = _rank_tuples(size, scores.device)  # [T, size], ranks < size <= R
    C, T = members.shape[0], tuples.shape[0]
    relevance = scores[:, members[:, 0]]
    for j in range(1, size):
        relevance = relevance + scores[:, members[:, j]]
    set_cost, set_tuple = [], []
    for rows in _row_chunks(B, C * T, scores.device):
        # slot j of every set: its member's `size` cheapest links, [rows, C, size]
        costs = [rank_cost[rows][:, members[:, j], :size] for j in range(size)]
        subs = [rank_sub[rows][:, members[:, j], :size] for j in range(size)]
        total, allowed = _tuples(costs, subs)  # [rows, C, T]
        total = torch.where(allowed, total, math.inf)
        best = total.argmin(2, keepdim=True)
        set_tuple.append(best[:, :, 0])
        set_cost.append(total.gather(2, best)[:, :, 0])
    set_tuple = _joined(set_tuple)
    set_cost = torch.where(relevance >= threshold, _joined(set_cost), math.inf)
    best_set = set_cost.argmin(1, keepdim=True)
    experts = members[best_set[:, 0]]  # [B, size]
    ranks = tuples[set_tuple.gather(1, best_set)[:, 0]]  # [B, size]
    subcarrier = rank_sub.gather(1, experts[:, :, None].expand(B, size, R)).gather(2, ranks[:, :, None])[:, :, 0]
    return set_cost.gather(1, best_set)[:, 0], experts, subcarrier


def optimal_enumerate(scores: torch.Tensor, costs3: torch.Tensor, gamma: float, k_min: int, k_max: int) -> Selection:
    """Exact P2 (the ``optimal`` policy; exact.milp_p2's semantics) by enumeration.

    scores [B, K] float (rows sum to 1), costs3 [B, K, N] float J (+inf outage), gamma in
    (0, 1], 1 <= k_min <= k_max <= min(K, MAX_SET_SIZE), k_min <= N: already validated, any
    float dtype, any device.  Sets hold k_min..min(k_max, N) experts.  Infeasible rows: the
    min(k_max, #reachable) reachable experts first by (score desc, best-link cost, index),
    given links by a maximum-cardinality, minimum-cost assignment; an expert left without a
    finite link leaves the mask.  Returns a Selection on the input device: subcarrier of
    each selected expert, lower_bound = energy on feasible rows (nan elsewhere), certified
    = ~violation, nodes 0.
    """
    _check_set_size(k_max)
    s = scores.to(torch.float64)
    e = costs3.to(torch.float64)
    B, K, N = e.shape
    ranks = min(k_max, N)
    rank_cost, rank_sub = _ranked_links(e, ranks)
    threshold = gamma - RELEVANCE_TOL
    # fallback first: rows with a feasible set overwrite it, first size first on equal energy
    experts, valid = _top_score_slots(s, rank_cost[:, :, 0], k_max)
    slot_sub, _, _ = _assign_slots(rank_cost, rank_sub, experts, valid)
    energy = torch.full((B,), math.inf, dtype=torch.float64, device=s.device)
    mask = _mask_from_slots(experts, slot_sub >= 0, K)
    subcarrier = _subcarrier_from_slots(experts, slot_sub, K)
    for size in range(k_min, ranks + 1):
        size_energy, size_experts, size_sub = _best_assignment_of_size(s, rank_cost, rank_sub, threshold, size)
        better = size_energy < energy
        energy = torch.where(better, size_energy, energy)
        size_valid = torch.ones_like(size_experts, dtype=torch.bool)
        mask = torch.where(better[:, None], _mask_from_slots(size_experts, size_valid, K), mask)
        subcarrier = torch.where(better[:, None], _subcarrier_from_slots(size_experts, size_sub, K), subcarrier)
    feasible = torch.isfinite(energy)
    experts, valid = _slots_from_mask(mask, min(k_max, K))
    energy = _sum_slots(e.gather(2, subcarrier.clamp(min=0)[:, :, None])[:, :, 0].gather(1, experts), valid)
    return _selection(mask, subcarrier, energy, ~feasible, torch.where(feasible, energy, math.nan), feasible)


# --------------------------------------------------------------------------------------
# JESA
# --------------------------------------------------------------------------------------
def _assign_mask(rank_cost, rank_sub, mask, slots):
    """jesa.py's assignment of a selection mask [B, K] (at most `slots` experts): subcarrier
    int64 [B, K] (-1: not selected or no finite link), energy float64 [B] J, +inf when some
    selected expert got no finite link."""
    experts, valid = _slots_from_mask(mask, slots)
    slot_sub, energy, links = _assign_slots(rank_cost, rank_sub, experts, valid)
    energy = torch.where(links == valid.sum(1), energy, math.inf)
    return _subcarrier_from_slots(experts, slot_sub, mask.shape[1]), energy


def _updated_costs(costs3: torch.Tensor, subcarrier: torch.Tensor) -> torch.Tensor:
    """Each expert's cheapest link not used by the other selected experts' assignment.

    costs3 float64 [B, K, N] J, subcarrier int64 [B, K] (-1: none) -> float64 [B, K] J.
    """
    B, K, N = costs3.shape
    used = torch.zeros(B, N + 1, dtype=torch.bool, device=costs3.device)
    used.scatter_(1, torch.where(subcarrier >= 0, subcarrier, N), True)
    own = torch.arange(N, device=costs3.device) == subcarrier[:, :, None]  # [B, K, N]
    allowed = ~used[:, None, :N] | own
    return torch.where(allowed, costs3, math.inf).amin(2)


def _jesa_round(s, e, rank_cost, rank_sub, subcarrier, threshold, k_min, k_max):
    """One JESA iteration on its rows: DES under the updated costs, then the assignment.

    Returns (mask bool [B, K], subcarrier int64 [B, K], energy float64 [B] J, +inf where DES
    was infeasible or the set has no matching)."""
    mask, feasible = _des_core(s, _updated_costs(e, subcarrier), threshold, k_min, k_max, fallback=False)
    subcarrier, energy = _assign_mask(rank_cost, rank_sub, mask, k_max)
    return mask, subcarrier, torch.where(feasible, energy, math.inf)


def _active_rows(active: torch.Tensor) -> torch.Tensor | None:
    """Indices of the active rows on the CPU, where reading a tensor costs nothing; None on
    other devices, where every row stays in the batch and finished rows are frozen by
    torch.where (no host sync).  The one place the solvers read tensor values."""
    if active.device.type != "cpu":
        return None
    return torch.nonzero(active).squeeze(1)


def _take(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """x's rows `rows` (all of x when None)."""
    return x if rows is None else x[rows]


def _merge(full: torch.Tensor, rows: torch.Tensor | None, keep: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """full with its rows `rows` (all when None) replaced by `new` where keep [R] is set."""
    part = torch.where(keep.view(-1, *([1] * (new.dim() - 1))), new, _take(full, rows))
    if rows is None:
        return part
    full = full.clone()
    full[rows] = part
    return full


def _iterate(s, e, rank_cost, rank_sub, lower, mask, threshold, k_min, k_max, rounds):
    """jesa.py's iterative phase on rows whose P1 under c* is feasible but whose best links
    collide: the min-cost assignment of DES(c*)'s set, then up to `rounds` rounds of
    (updated costs, DES, assignment), each kept when the energy drops by more than
    ENERGY_RTOL; a row stops when it does not, or when it reaches its lower bound.

    s [R, K], e [R, K, N], rank_cost / rank_sub [R, K, k_max], lower [R] J, mask [R, K].
    Returns (mask, subcarrier int64 [R, K], energy float64 [R] J, +inf: no feasible candidate).
    """
    subcarrier, energy = _assign_mask(rank_cost, rank_sub, mask, k_max)
    active = energy > lower * (1.0 + ENERGY_RTOL)  # rows at the bound are already optimal
    for _ in range(rounds):
        rows = _active_rows(active)
        if rows is not None and rows.numel() == 0:
            break
        new_mask, new_sub, new_energy = _jesa_round(
            _take(s, rows),
            _take(e, rows),
            _take(rank_cost, rows),
            _take(rank_sub, rows),
            _take(subcarrier, rows),
            threshold,
            k_min,
            k_max,
        )
        improved = _take(active, rows) & (new_energy < _take(energy, rows) * (1.0 - ENERGY_RTOL))
        mask = _merge(mask, rows, improved, new_mask)
        subcarrier = _merge(subcarrier, rows, improved, new_sub)
        energy = _merge(energy, rows, improved, new_energy)
        above_bound = _take(energy, rows) > _take(lower, rows) * (1.0 + ENERGY_RTOL)
        active = _merge(active, rows, torch.ones_like(improved), improved & above_bound)
    return mask, subcarrier, energy


def _greedy_matchable(s, rank_cost, rank_sub, best_cost, k_max):
    """jesa.py's P2 fallback set: experts by descending score (ties: lower c*, lower index),
    each kept when the kept ones plus it still have distinct finite links, at most k_max.

    Returns (mask bool [B, K], subcarrier int64 [B, K], energy float64 [B] J, links [B]).
    """
    B, K = s.shape
    order = _fallback_order(s, best_cost)
    chosen = torch.zeros(B, k_max, dtype=torch.int64, device=s.device)
    count = torch.zeros(B, dtype=torch.int64, device=s.device)
    slot = torch.arange(k_max, device=s.device)
    for t in range(K):
        expert = order[:, t]
        room = count < k_max
        trial = torch.where(slot == count.clamp(max=k_max - 1)[:, None], expert[:, None], chosen)
        _, _, links = _assign_slots(rank_cost, rank_sub, trial, slot <= count[:, None])
        keep = room & torch.isfinite(best_cost.gather(1, expert[:, None])[:, 0]) & (links == count + 1)
        chosen = torch.where(keep[:, None], trial, chosen)
        count = count + keep.to(torch.int64)
    mask = _mask_from_slots(chosen, slot < count[:, None], K)
    subcarrier, energy = _assign_mask(rank_cost, rank_sub, mask, k_max)
    return mask, subcarrier, energy, count


def jesa_enumerate(
    scores: torch.Tensor,
    costs3: torch.Tensor,
    gamma: float,
    k_min: int,
    k_max: int,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
) -> Selection:
    """The paper's JESA (jesa.py's steps, stopping rule and fallback) with enumeration inside.

    scores [B, K] float (rows sum to 1), costs3 [B, K, N] float J (+inf outage), gamma in
    (0, 1], 1 <= k_min <= k_max <= min(K, MAX_SET_SIZE), k_min <= N: already validated, any
    float dtype, any device; k_max is capped at N.  max_iterations: DES solves per row at most
    (>= 1).  Returns a Selection on the input device: subcarrier of each selected expert,
    lower_bound = P1 optimum under c* (nan where P1 under c* is infeasible), certified =
    provably optimal for P2, nodes 0.
    """
    _check_set_size(k_max)
    s = scores.to(torch.float64)
    e = costs3.to(torch.float64)
    B, K, N = e.shape
    k_max = min(k_max, N)
    threshold = gamma - RELEVANCE_TOL
    rank_cost, rank_sub = _ranked_links(e, k_max)
    best_cost, best_sub = rank_cost[:, :, 0], rank_sub[:, :, 0]

    # (1) DES under c*; its energy is the lower bound
    mask, feasible = _des_core(s, best_cost, threshold, k_min, k_max)
    experts, valid = _slots_from_mask(mask, k_max)
    lower = _sum_slots(best_cost.gather(1, experts), valid)
    # (2) distinct best links: final (optimal when feasible)
    on_best = torch.zeros(B, N, dtype=torch.int64, device=s.device).scatter_add_(1, best_sub, mask.to(torch.int64))
    collide = (on_best > 1).any(1)
    subcarrier = torch.where(mask, best_sub, -1)
    energy = lower
    certified = feasible & ~collide
    # (3) rows whose best links collide and P1 under c* is feasible: the iterative phase
    iterating = feasible & collide
    rows = _active_rows(iterating)
    i_mask, i_sub, i_energy = _iterate(
        _take(s, rows),
        _take(e, rows),
        _take(rank_cost, rows),
        _take(rank_sub, rows),
        _take(lower, rows),
        _take(mask, rows),
        threshold,
        k_min,
        k_max,
        max(1, max_iterations) - 1,
    )
    i_rows = _take(iterating, rows)
    i_found = i_rows & torch.isfinite(i_energy)  # otherwise the P2 fallback below
    i_certified = i_found & (i_energy <= _take(lower, rows) * (1.0 + ENERGY_RTOL))
    mask = _merge(mask, rows, i_found, i_mask)
    subcarrier = _merge(subcarrier, rows, i_found, i_sub)
    energy = _merge(energy, rows, i_found, i_energy)
    certified = _merge(certified, rows, i_rows, i_certified)
    # (4) P2 fallback: greedy maximum-relevance matchable set, feasible iff gamma and k_min met
    fallback = collide & ~_merge(feasible, rows, i_rows, i_found)
    rows = _active_rows(fallback)
    f_s = _take(s, rows)
    f_mask, f_sub, f_energy, f_count = _greedy_matchable(
        f_s, _take(rank_cost, rows), _take(rank_sub, rows), _take(best_cost, rows), k_max
    )
    f_experts, f_valid = _slots_from_mask(f_mask, k_max)
    f_feasible = (_sum_slots(f_s.gather(1, f_experts), f_valid) >= threshold) & (f_count >= k_min)
    f_rows = _take(fallback, rows)
    mask = _merge(mask, rows, f_rows, f_mask)
    subcarrier = _merge(subcarrier, rows, f_rows, f_sub)
    energy = _merge(energy, rows, f_rows, f_energy)
    # P1 under c* infeasible implies P2 infeasible (jesa.py); otherwise the fallback decides
    violation = _merge(~feasible, rows, f_rows, _take(~feasible, rows) | ~f_feasible)
    lower_bound = torch.where(feasible, lower, math.nan)
    return _selection(mask, subcarrier, energy, violation, lower_bound, certified)
