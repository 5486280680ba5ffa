"""JESA (P2) against exact references: brute force and scipy.optimize.milp (HiGHS).

Every instance family is seeded.  Checked on every row: the result is P2-feasible (each
selected expert on its own finite-cost subcarrier, cardinality and relevance unless
violation), violation agrees with the exact solver, energy >= exact optimum, energy <=
"DES under c*, then min-cost assignment", certified => energy == optimum, and
lower_bound <= optimum.
"""

from __future__ import annotations

import importlib
import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from dmoe_torch.channel import ChannelConfig, WirelessChannel
from dmoe_torch.selection import RELEVANCE_TOL, jesa
from dmoe_torch.selection.des import des_numpy
from dmoe_torch.selection.exact import brute_force_p2, milp_p2
from dmoe_torch.selection.jesa import JesaResult, jesa_numpy, min_cost_assignment

RTOL = 1e-9


# --------------------------------------------------------------------------------------
# instance generators
# --------------------------------------------------------------------------------------
def random_scores(rng: np.random.Generator, B: int, K: int) -> np.ndarray:
    """Rows of several kinds: skewed, tied, with zeros, one-hot, all equal."""
    rows = []
    for _ in range(B):
        kind = rng.integers(5)
        if kind == 0:
            row = rng.dirichlet(np.full(K, 0.5))
        elif kind == 1:
            row = rng.integers(1, 4, K).astype(np.float64)  # many exact ties
        elif kind == 2:
            row = rng.dirichlet(np.ones(K)) * (rng.random(K) < 0.5)
            if row.sum() == 0:
                row[rng.integers(K)] = 1.0
        elif kind == 3:
            row = np.zeros(K)
            row[rng.integers(K)] = 1.0
        else:
            row = np.ones(K)
        rows.append(row / row.sum())
    return np.array(rows)


def random_costs(rng: np.random.Generator, B: int, K: int, N: int) -> np.ndarray:
    """Link energies (J) with outages, ties, zeros, unreachable experts and unreachable rows."""
    costs = rng.exponential(1.0, (B, K, N)) * 1e-5
    tied = rng.random(B) < 0.3
    costs[tied] = rng.integers(1, 4, (int(tied.sum()), K, N)) * 1e-5
    costs[rng.random((B, K, N)) < 0.05] = 0.0  # free links
    outage_prob = rng.choice([0.0, 0.2, 0.6], size=(B, 1, 1))
    costs[rng.random((B, K, N)) < outage_prob] = np.inf
    costs[rng.random((B, K)) < 0.1] = np.inf  # expert unreachable on every subcarrier
    costs[rng.random(B) < 0.03] = np.inf  # nothing reachable: dropped
    return costs


def channel_instances(K: int, N: int, B: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores from a peaked softmax and costs from the project's channel model."""
    channel = WirelessChannel(ChannelConfig(num_subcarriers=N), num_devices=K, d_model=128, seed=seed)
    costs = channel.costs(torch.arange(B), layer=0, stream=0).numpy()
    logits = np.random.default_rng(seed).normal(0.0, 2.0, (B, K))
    scores = np.exp(logits - logits.max(1, keepdims=True))
    return scores / scores.sum(1, keepdims=True), costs


# --------------------------------------------------------------------------------------
# independent checks
# --------------------------------------------------------------------------------------
def assert_p2_feasible(sel, s, e, gamma, k_min, k_max):
    """The selection is a valid P2 answer (feasible unless flagged violation)."""
    B, K, N = e.shape
    mask = sel.mask.numpy()
    sub = sel.subcarrier.numpy()
    k_cap = min(k_max, N)
    assert sel.mask.shape == (B, K) and sel.subcarrier.shape == (B, K)
    assert sel.energy.dtype == torch.float64
    np.testing.assert_array_equal(sub < 0, ~mask)  # subcarrier exactly where selected
    assert not sel.failed.any()
    for b in range(B):
        chosen = np.flatnonzero(mask[b])
        links = sub[b, chosen]
        assert len(set(links.tolist())) == len(links), f"row {b}: a subcarrier is used twice"
        link_costs = e[b, chosen, links]
        assert np.isfinite(link_costs).all(), f"row {b}: a selected expert has no finite link"
        assert math.isclose(sel.energy[b].item(), float(link_costs.sum()), rel_tol=1e-12, abs_tol=0.0)
        assert len(chosen) <= k_cap
        if not sel.violation[b]:
            assert len(chosen) >= k_min
            assert s[b, chosen].sum() >= gamma - RELEVANCE_TOL
    np.testing.assert_array_equal(sel.dropped.numpy(), ~mask.any(1))
    assert not (sel.dropped & ~sel.violation).any()
    np.testing.assert_array_equal(sel.energy.numpy()[sel.dropped.numpy()], 0.0)


def matchable(e_row: np.ndarray, experts) -> bool:
    """Whether these experts can all get distinct finite-cost subcarriers."""
    experts = list(experts)
    if not experts:
        return True
    sub = e_row[experts]
    if len(experts) > sub.shape[1]:
        return False
    finite = np.isfinite(sub)
    rows, cols = linear_sum_assignment(np.where(finite, 0.0, 1.0))
    return bool(finite[rows, cols].all())


def des_then_assign(s, e, gamma, k_min, k_max):
    """Energy of 'DES under c*, then min-cost assignment' (scipy); nan where not P2-feasible."""
    B, K, N = e.shape
    mask, _, violation, _, _, _ = des_numpy(s, e.min(2), gamma, k_min, min(k_max, N))
    energy = np.full(B, np.nan)
    for b in np.flatnonzero(~violation):
        chosen = np.flatnonzero(mask[b])
        sub = e[b, chosen]
        finite = np.isfinite(sub)
        penalty = 1.0 + 2.0 * sub[finite].sum()
        rows, cols = linear_sum_assignment(np.where(finite, sub, penalty))
        if finite[rows, cols].all():
            energy[b] = sub[rows, cols].sum()
    return energy


def max_matchable_relevance(s_row, e_row, k_cap):
    """Brute force: the largest relevance of a matchable set of at most k_cap experts, and its size."""
    K = len(s_row)
    best, size = 0.0, 0
    for m in range(1, min(k_cap, K) + 1):
        for combo in itertools.combinations(range(K), m):
            if matchable(e_row, combo):
                relevance = s_row[list(combo)].sum()
                if relevance > best + 1e-15 or (abs(relevance - best) <= 1e-15 and m > size):
                    best, size = relevance, m
    return best, size


def check_against_reference(s, e, gamma, k_min, k_max, reference):
    """Run jesa and compare every row with the exact reference Selection `reference`."""
    B, K, N = e.shape
    k_max_arg = k_max
    k_max = K if k_max is None else k_max
    sel = jesa(torch.from_numpy(s), torch.from_numpy(e), gamma, k_min, k_max_arg)
    assert_p2_feasible(sel, s, e, gamma, k_min, k_max)
    np.testing.assert_array_equal(sel.violation.numpy(), reference.violation.numpy())
    feasible = ~reference.violation.numpy()
    optimum = reference.energy.numpy()
    energy = sel.energy.numpy()
    lower = sel.lower_bound.numpy()
    certified = sel.certified.numpy()
    assert np.all(energy[feasible] >= optimum[feasible] * (1 - RTOL))
    assert np.all(lower[feasible] <= optimum[feasible] * (1 + RTOL))
    assert np.all(lower[feasible] <= energy[feasible] * (1 + RTOL))
    np.testing.assert_allclose(energy[certified], optimum[certified], rtol=RTOL, atol=0.0)
    assert not (certified & ~feasible).any()
    baseline = des_then_assign(s, e, gamma, k_min, k_max)
    has_baseline = np.isfinite(baseline)
    assert np.all(energy[has_baseline] <= baseline[has_baseline] * (1 + RTOL))
    # infeasible rows: the fallback reaches the largest relevance any P2 selection can
    for b in np.flatnonzero(~feasible):
        chosen = sel.mask[b].numpy()
        best, size = max_matchable_relevance(s[b], e[b], min(k_max, N))
        assert s[b, chosen].sum() >= best - 1e-12
        assert chosen.sum() == size or math.isclose(s[b, chosen].sum(), best, abs_tol=1e-12)
        assert s[b, chosen].sum() >= s[b, reference.mask[b].numpy()].sum() - 1e-12
    return sel


# --------------------------------------------------------------------------------------
# against brute force, thousands of small instances
# --------------------------------------------------------------------------------------
SHAPES = [(3, 3), (4, 4), (5, 5), (3, 6), (4, 8), (3, 12), (5, 3), (4, 2)]
PARAMS = [(0.3, 1, None), (0.6, 1, 2), (0.8, 2, 3), (0.9, 1, None), (1.0, 1, None), (0.5, 2, 2), (0.7, 1, 1)]


@pytest.mark.parametrize("K,N", SHAPES)
def test_jesa_matches_brute_force(K, N):
    rng = np.random.default_rng(1000 * K + N)
    checked = 0
    for gamma, k_min, k_max in PARAMS:
        if k_min > N or (k_max or K) > K or (k_max is not None and k_max < k_min):
            continue
        s, e = random_scores(rng, 60, K), random_costs(rng, 60, K, N)
        reference = brute_force_p2(torch.from_numpy(s), torch.from_numpy(e), gamma, k_min, k_max)
        check_against_reference(s, e, gamma, k_min, k_max, reference)
        checked += 60
    assert checked >= 300


def test_jesa_collisions_exercise_the_iterative_phase():
    """Few subcarriers and many tied/best-shared links: the iterative phase and fallback run."""
    rng = np.random.default_rng(7)
    K, N, B = 5, 5, 400
    s = random_scores(rng, B, K)
    e = np.full((B, K, N), 5e-5) + rng.exponential(1e-6, (B, K, N))
    e[:, :, 0] = rng.exponential(1e-6, (B, K))  # every expert's best link is subcarrier 0
    e[rng.random((B, K, N)) < 0.3] = np.inf
    reference = brute_force_p2(torch.from_numpy(s), torch.from_numpy(e), 0.8, 1, None)
    sel = check_against_reference(s, e, 0.8, 1, None, reference)
    r = jesa_numpy(s, e, 0.8, 1, K)
    assert (r.iterations > 1).sum() > 50  # the iterative phase really ran
    first = des_then_assign(s, e, 0.8, 1, K)
    has_first = np.isfinite(first)
    assert (r.energy[has_first] < first[has_first] * (1 - 1e-9)).sum() >= 10  # ... and improved rows
    # JESA reaches the exact optimum on most of these adversarial rows
    feasible = ~reference.violation.numpy()
    hit = np.isclose(sel.energy.numpy(), reference.energy.numpy(), rtol=1e-9)[feasible]
    assert hit.mean() > 0.5


# --------------------------------------------------------------------------------------
# against the MILP, larger instances from the channel model
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("N", [4, 8, 16, 32])
def test_jesa_matches_milp_on_channel_instances(N):
    K, B = 8, 40
    s, e = channel_instances(K, N, B, seed=N)
    for gamma, k_min, k_max in [(0.5, 1, None), (0.9, 1, 4), (1.0, 2, None)]:
        reference = milp_p2(torch.from_numpy(s), torch.from_numpy(e), gamma, k_min, k_max)
        check_against_reference(s, e, gamma, k_min, k_max, reference)


def test_certified_share_grows_with_subcarriers():
    """Asymptotic optimality: collisions among the selected experts' best links become rare."""
    K, B = 8, 400
    shares = []
    for N in (8, 64):
        s, e = channel_instances(K, N, B, seed=3)
        shares.append(jesa_numpy(s, e, 0.9, 1, K).certified.mean())
    assert shares[1] > shares[0]
    assert shares[1] > 0.8


def test_distinct_best_links_are_used_as_is():
    """When the selected experts' best subcarriers are distinct, JESA pairs each with its best."""
    s, e = channel_instances(8, 64, 300, seed=11)
    r = jesa_numpy(s, e, 0.9, 1, 8)
    single = r.iterations == 1
    best = e.argmin(2)
    np.testing.assert_array_equal(
        r.subcarrier[single & ~r.violation][r.mask[single & ~r.violation]],
        best[single & ~r.violation][r.mask[single & ~r.violation]],
    )
    np.testing.assert_allclose(r.energy[r.certified], r.lower_bound[r.certified], rtol=1e-12)


# --------------------------------------------------------------------------------------
# edge cases
# --------------------------------------------------------------------------------------
def test_all_unreachable_rows_are_dropped():
    s = np.full((3, 4), 0.25)
    e = np.full((3, 4, 4), np.inf)
    e[1, 2, 3] = 1e-5
    sel = jesa(torch.from_numpy(s), torch.from_numpy(e), 0.5)
    assert sel.dropped.tolist() == [True, False, True]
    assert sel.violation.tolist() == [True, True, True]  # one expert of score 0.25 < 0.5
    assert sel.mask[1].tolist() == [False, False, True, False]
    assert sel.subcarrier[1, 2].item() == 3
    assert sel.energy.tolist() == [0.0, 1e-5, 0.0]
    assert math.isnan(sel.lower_bound[0].item())


def test_experts_sharing_one_reachable_subcarrier():
    """Two relevant experts reachable only on the same subcarrier cannot both be selected."""
    s = np.array([[0.45, 0.45, 0.1]])
    e = np.full((1, 3, 3), np.inf)
    e[0, 0, 1] = 1e-5
    e[0, 1, 1] = 2e-5
    e[0, 2, :] = [3e-5, 4e-5, 5e-5]
    # gamma 0.9 needs experts 0 and 1, which collide on subcarrier 1: P2 infeasible
    sel = jesa(torch.from_numpy(s), torch.from_numpy(e), 0.9)
    assert sel.violation.item() and not sel.dropped.item()
    assert sel.mask[0].tolist() == [True, False, True]  # max relevance 0.55 among matchable sets
    assert sel.subcarrier[0].tolist() == [1, -1, 0]
    # gamma 0.5 is reachable with {0, 2}: DES under c* picks {0, 1} (cheapest), collides,
    # and the iterative phase must find the feasible {0, 2}
    sel = jesa(torch.from_numpy(s), torch.from_numpy(e), 0.5)
    ref = brute_force_p2(torch.from_numpy(s), torch.from_numpy(e), 0.5)
    assert not sel.violation.item()
    assert math.isclose(sel.energy.item(), ref.energy.item(), rel_tol=1e-12)


def test_k_max_is_capped_at_the_number_of_subcarriers():
    rng = np.random.default_rng(5)
    K, N = 6, 3
    s = np.full((50, K), 1.0 / K)
    e = rng.exponential(1e-5, (50, K, N))
    sel = jesa(torch.from_numpy(s), torch.from_numpy(e), 1.0)
    assert (sel.mask.sum(1) == N).all()  # as many as there are subcarriers
    assert sel.violation.all()  # relevance 1 needs all 6 experts
    ref = brute_force_p2(torch.from_numpy(s), torch.from_numpy(e), 0.5)
    assert_p2_feasible(jesa(torch.from_numpy(s), torch.from_numpy(e), 0.5), s, e, 0.5, 1, K)
    assert not ref.violation.any()


def test_huge_and_tiny_costs():
    rng = np.random.default_rng(9)
    K, N, B = 4, 4, 200
    s = random_scores(rng, B, K)
    e = 10.0 ** rng.uniform(-12, 3, (B, K, N))
    reference = brute_force_p2(torch.from_numpy(s), torch.from_numpy(e), 0.7, 1, None)
    check_against_reference(s, e, 0.7, 1, None, reference)


def test_rows_are_independent_of_batch_order():
    rng = np.random.default_rng(2)
    s, e = random_scores(rng, 100, 6), random_costs(rng, 100, 6, 6)
    perm = rng.permutation(100)
    a = jesa(torch.from_numpy(s), torch.from_numpy(e), 0.8)
    b = jesa(torch.from_numpy(s[perm]), torch.from_numpy(e[perm]), 0.8)
    for name in ("mask", "subcarrier", "energy", "violation", "certified", "nodes"):
        assert torch.equal(getattr(a, name)[torch.from_numpy(perm)], getattr(b, name)), name


def test_float32_inputs_and_empty_batch():
    s = torch.softmax(torch.randn(4, 5, generator=torch.Generator().manual_seed(0)), 1)
    e = torch.rand(4, 5, 6, generator=torch.Generator().manual_seed(1)) * 1e-5
    sel = jesa(s, e, 0.7)
    assert sel.energy.dtype == torch.float64 and sel.mask.dtype == torch.bool
    assert_p2_feasible(sel, s.double().numpy(), e.double().numpy(), 0.7, 1, 5)
    empty = jesa(torch.zeros(0, 5), torch.zeros(0, 5, 6), 0.7)
    assert empty.mask.shape == (0, 5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(costs=torch.ones(2, 3)), "costs"),
        (dict(costs=torch.ones(2, 3, 1), k_min=2), "k_min"),
        (dict(gamma=0.0), "gamma"),
        (dict(gamma=1.5), "gamma"),
        (dict(k_max=4), "k_max"),
        (dict(k_min=3, k_max=2), "k_min"),
        (dict(costs=-torch.ones(2, 3, 4)), "costs"),
        (dict(scores=torch.ones(2, 3)), "scores"),
    ],
)
def test_jesa_rejects_bad_input(kwargs, match):
    args = dict(scores=torch.full((2, 3), 1 / 3), costs=torch.ones(2, 3, 4), gamma=0.5, k_min=1, k_max=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        jesa(args["scores"], args["costs"], args["gamma"], args["k_min"], args["k_max"])


# --------------------------------------------------------------------------------------
# sets of at most two experts: the per-row kernel (small_sets.py) against the batched steps
# --------------------------------------------------------------------------------------
def test_small_set_kernel_equals_the_batched_steps(monkeypatch):
    """For k_max <= 2 jesa_numpy runs each row in one kernel (jesa_small_numpy); on costs
    without exact ties it must give the batched steps' answer in every field (not nodes)."""
    jesa_module = importlib.import_module("dmoe_torch.selection.jesa")  # the package's `jesa` is the function
    rng = np.random.default_rng(12)
    iterated = fallback = uncertified = rows = 0
    for _ in range(150):
        K = int(rng.integers(1, 11))
        N = int(rng.integers(1, 9))
        k_max = int(rng.integers(1, min(K, 2) + 1))
        k_min = int(rng.integers(1, min(k_max, N) + 1))
        gamma = float(rng.choice([0.1, 0.3, 0.5, 0.7, 0.9, 1.0]))
        max_iterations = int(rng.choice([1, 2, 16]))
        s = random_scores(rng, 120, K)  # tied and zero scores included
        e = rng.lognormal(0.0, 1.0, (120, K, N)) * 1e-5
        if rng.random() < 0.5:  # every expert's best link on subcarrier 0: collisions
            e[:, :, 0] *= 1e-3
        e[rng.random((120, K, N)) < rng.choice([0.0, 0.2, 0.6])] = np.inf
        e[rng.random((120, K)) < 0.1] = np.inf
        small = jesa_numpy(s, e, gamma, k_min, k_max, max_iterations)
        monkeypatch.setattr(jesa_module, "SMALL_SET_SIZE", 0)  # the batched steps (and DES by branch and bound)
        batched = jesa_numpy(s, e, gamma, k_min, k_max, max_iterations)
        monkeypatch.undo()
        what = f"K={K} N={N} k={k_min}..{k_max} gamma={gamma} it={max_iterations}"
        for field in JesaResult._fields:
            if field != "nodes":
                np.testing.assert_array_equal(getattr(small, field), getattr(batched, field), err_msg=f"{what} {field}")
        rows += len(s)
        iterated += int((small.iterations > 1).sum())
        uncertified += int((~small.certified & ~small.violation).sum())
        fallback += int((small.violation & ~np.isnan(small.lower_bound)).sum())
    assert not np.any(small.nodes)
    # the iteration, its uncertified answers and the P2 fallback after a feasible P1 all ran
    assert rows == 18_000 and iterated > 500 and uncertified > 50 and fallback > 5


# --------------------------------------------------------------------------------------
# the assignment subproblem
# --------------------------------------------------------------------------------------
def test_min_cost_assignment_matches_scipy():
    rng = np.random.default_rng(4)
    for K, N in [(4, 4), (6, 9), (8, 8), (5, 20)]:
        e = rng.exponential(1.0, (300, K, N))
        e[rng.random((300, K, N)) < 0.3] = np.inf
        e[:100] = np.round(e[:100] * 2) / 2  # ties
        mask = rng.random((300, K)) < 0.6
        sub, energy = min_cost_assignment(e, mask)
        for b in range(300):
            chosen = np.flatnonzero(mask[b])
            if not matchable(e[b], chosen):
                assert energy[b] == np.inf
                continue
            rows, cols = linear_sum_assignment(np.where(np.isfinite(e[b, chosen]), e[b, chosen], 1e9))
            assert math.isclose(energy[b], e[b, chosen][rows, cols].sum(), rel_tol=1e-12)
            links = sub[b, chosen]
            assert len(set(links.tolist())) == len(chosen) and (links >= 0).all()
            assert math.isclose(energy[b], e[b, chosen, links].sum(), rel_tol=1e-12)
            assert (sub[b, ~mask[b]] == -1).all()
