"""DES (exact P1 solver) against brute force, the pure-Python reference and HiGHS."""

from __future__ import annotations

import math
from dataclasses import fields, replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from dmoe_torch.selection.common import RELEVANCE_TOL
from dmoe_torch.selection.des import des, des_numpy, des_solve_one
from dmoe_torch.selection.exact import brute_force_p1, des_reference, milp_p1

FAMILIES = ["generic", "ties", "zero_scores", "equal_scores", "huge", "tiny", "mixed", "zero_costs", "sparse_reach"]
GAMMAS = [0.1, 0.35, 0.6, 0.85, 0.97, 1.0]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def make_instances(seed: int, batch: int, num_experts: int, family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random P1 instances: scores [B, K] (rows sum to 1), costs [B, K] J (+inf unreachable)."""
    rng = np.random.default_rng(seed)
    B, K = batch, num_experts
    temperature = rng.uniform(0.3, 3.0, size=(B, 1))
    scores = softmax(rng.normal(size=(B, K)) * temperature)
    costs = 1e-5 * rng.lognormal(0.0, 1.0, size=(B, K))
    unreachable = rng.random((B, K)) < 0.15
    if family == "ties":
        scores = softmax(rng.integers(0, 3, size=(B, K)).astype(np.float64))
        costs = 1e-5 * rng.integers(1, 4, size=(B, K))
    elif family == "zero_scores":
        scores = np.where(rng.random((B, K)) < 0.4, 0.0, scores)
        scores[np.arange(B), rng.integers(0, K, B)] = 1.0  # keep every row non-zero
        scores /= scores.sum(1, keepdims=True)
    elif family == "equal_scores":
        scores = np.full((B, K), 1.0 / K)
    elif family == "huge":
        costs *= 1e8  # ~1e3 J
    elif family == "tiny":
        costs *= 1e-7  # ~1e-12 J
    elif family == "mixed":
        costs = 10.0 ** rng.uniform(-12, 3, size=(B, K))
    elif family == "zero_costs":
        costs = np.where(rng.random((B, K)) < 0.3, 0.0, costs)
    elif family == "sparse_reach":
        unreachable = rng.random((B, K)) < 0.7
    costs = np.where(unreachable, np.inf, costs)
    costs[: max(1, B // 20)] = np.inf  # a few rows with no reachable expert at all
    return torch.from_numpy(scores), torch.from_numpy(costs)


def assert_same_optimum(result, reference, label: str):
    """Same feasibility flags, same optimal energy (rel 1e-9), same fallback on infeasible rows."""
    assert torch.equal(result.violation, reference.violation), label
    assert torch.equal(result.dropped, reference.dropped), label
    close = torch.isclose(result.energy, reference.energy, rtol=1e-9, atol=0.0)
    assert close.all(), f"{label}: rows {torch.nonzero(~close).flatten().tolist()[:10]} differ"
    infeasible = result.violation
    assert torch.equal(result.mask[infeasible], reference.mask[infeasible]), label


def assert_valid(result, scores, costs, gamma, k_min, k_max):
    """Masks obey P1 on feasible rows; flags, energies and bounds are consistent."""
    s, c, mask = scores.double(), costs.double(), result.mask
    count = mask.sum(1)
    feasible = ~result.violation
    relevance = torch.where(mask, s, torch.zeros_like(s)).sum(1)
    assert not (mask & torch.isinf(c)).any(), "an unreachable expert was selected"
    assert ((count[feasible] >= k_min) & (count[feasible] <= k_max)).all()
    assert (relevance[feasible] >= gamma - RELEVANCE_TOL - 1e-12).all()
    assert (count <= k_max).all()
    assert torch.allclose(result.energy, torch.where(mask, c, torch.zeros_like(c)).sum(1), rtol=1e-12, atol=0.0)
    assert torch.equal(result.dropped, count == 0)
    assert (result.violation | ~result.dropped).all(), "a dropped row must also be a violation"
    assert torch.equal(result.certified, feasible)
    assert (result.subcarrier == -1).all() and not result.failed.any()
    assert torch.isnan(result.lower_bound[~feasible]).all()
    bound_ok = result.lower_bound[feasible] <= result.energy[feasible] * (1 + 1e-9) + 1e-300
    assert bound_ok.all(), "root bound above the optimum"
    assert (result.nodes[feasible] >= 1).all()


def result_slice(result, rows):
    """The rows `rows` of a Selection."""
    return replace(result, **{f.name: getattr(result, f.name)[rows] for f in fields(result)})


@pytest.mark.parametrize("family", FAMILIES)
def test_des_matches_brute_force_and_reference(family):
    K = 9
    checked = 0
    for case, (k_min, k_max) in enumerate([(1, 1), (1, 3), (2, 2), (2, 5), (3, 3), (1, K)]):
        for g, gamma in enumerate(GAMMAS):
            scores, costs = make_instances(1000 * case + g, 60, K, family)
            result = des(scores, costs, gamma, k_min, k_max)
            label = f"{family} gamma={gamma} k=[{k_min},{k_max}]"
            assert_valid(result, scores, costs, gamma, k_min, k_max)
            assert_same_optimum(result, brute_force_p1(scores, costs, gamma, k_min, k_max), label)
            head = slice(0, 15)  # the pure-Python reference is slow; a slice per case
            assert_same_optimum(result_slice(result, head), des_reference(scores[head], costs[head], gamma, k_min, k_max), label)
            checked += scores.shape[0]
    assert checked == 6 * len(GAMMAS) * 60


def test_des_matches_brute_force_when_cardinality_binds():
    # flat scores and gamma close to the best k_max-subset relevance: the LP without the
    # cardinality constraint is weak here, so this exercises the Lagrangian bound
    rng = np.random.default_rng(21)
    K = 14
    scores = torch.from_numpy(softmax(rng.normal(size=(80, K)) * 0.5))
    costs = torch.from_numpy(np.where(rng.random((80, K)) < 0.1, np.inf, 1e-5 * rng.lognormal(0, 1, (80, K))))
    reachable_scores = torch.where(torch.isinf(costs), 0.0, scores)
    for k_max in (2, 3, 5):
        best_relevance = reachable_scores.sort(1, descending=True).values[:, :k_max].sum(1)
        for k_min in (1, k_max):
            for q in (0.2, 0.5):
                gamma = float(best_relevance.quantile(q))
                result = des(scores, costs, gamma, k_min, k_max)
                assert_valid(result, scores, costs, gamma, k_min, k_max)
                assert_same_optimum(result, brute_force_p1(scores, costs, gamma, k_min, k_max), f"k_max={k_max} q={q}")
                assert (~result.violation).sum() >= 30
                assert (result.mask.sum(1)[~result.violation] == k_max).float().mean() > 0.5  # binding


@pytest.mark.parametrize("family", ["generic", "mixed", "zero_costs"])
def test_des_matches_milp_on_larger_instances(family):
    # K=40 exercises the dominance filter (k_max << K) and deeper trees; gamma near 1 with
    # k_max=K and costs over many decades is the regime that needs the exclusion-dominance
    # rule and the refined knapsack bound
    cases = [(0.5, 1, 4), (0.8, 2, 6), (0.3, 3, 3), (0.95, 1, 40), (0.9, 12, 40)]
    for seed, (gamma, k_min, k_max) in enumerate(cases):
        scores, costs = make_instances(50 + seed, 16, 40, family)
        result = des(scores, costs, gamma, k_min, k_max)
        assert_valid(result, scores, costs, gamma, k_min, k_max)
        assert_same_optimum(result, milp_p1(scores, costs, gamma, k_min, k_max), f"K=40 {family} gamma={gamma}")
        assert (~result.violation).sum() >= 2


def test_des_matches_milp_with_many_experts():
    # K=300, k_max=5: most experts are removed by the dominance filter
    rng = np.random.default_rng(7)
    scores = torch.from_numpy(softmax(rng.normal(size=(4, 300)) * 3.0))
    costs = torch.from_numpy(np.where(rng.random((4, 300)) < 0.05, np.inf, 1e-5 * rng.lognormal(0, 1, (4, 300))))
    result = des(scores, costs, 0.4, 1, 5)
    assert_valid(result, scores, costs, 0.4, 1, 5)
    assert_same_optimum(result, milp_p1(scores, costs, 0.4, 1, 5), "K=300")


def test_special_cases():
    inf = math.inf
    scores = torch.tensor(
        [
            [0.5, 0.3, 0.2, 0.0],  # gamma=1 needs all three non-zero experts
            [0.25, 0.25, 0.25, 0.25],  # all-equal scores, all-equal costs
            [0.4, 0.3, 0.2, 0.1],  # all unreachable
            [0.4, 0.3, 0.2, 0.1],  # only one reachable expert
            [0.7, 0.1, 0.1, 0.1],  # the relevant expert is unreachable
        ],
        dtype=torch.float64,
    )
    costs = torch.tensor(
        [
            [3.0, 1.0, 2.0, 0.0],
            [1.0, 1.0, 1.0, 1.0],
            [inf, inf, inf, inf],
            [inf, 5.0, inf, inf],
            [inf, 1.0, 2.0, 3.0],
        ],
        dtype=torch.float64,
    )
    result = des(scores, costs, 1.0, 1, 4)
    assert result.mask[0].tolist() == [True, True, True, False] or result.mask[0].tolist() == [True, True, True, True]
    assert result.energy[0].item() == 6.0 and not result.violation[0]
    assert result.mask[1].all() and result.energy[1].item() == 4.0
    assert result.dropped[2] and result.violation[2] and result.energy[2].item() == 0.0 and not result.mask[2].any()
    assert result.violation[3] and not result.dropped[3] and result.mask[3].tolist() == [False, True, False, False]
    assert result.violation[4] and result.energy[4].item() == 6.0  # fallback: every reachable one
    assert_same_optimum(result, brute_force_p1(scores, costs, 1.0, 1, 4), "special")

    # k_min larger than the number of reachable experts: infeasible, fallback = the reachable ones
    short = des(scores[3:4], costs[3:4], 0.1, 2, 3)
    assert short.violation.item() and short.mask[0].tolist() == [False, True, False, False]
    # k_min = k_max forces exactly that many experts even when one would reach gamma
    exact = des(scores[1:2], torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64), 0.2, 3, 3)
    assert exact.mask.sum().item() == 3 and exact.energy.item() == 6.0


def test_fallback_tie_breaks_on_cost_then_index():
    scores = torch.tensor([[0.3, 0.3, 0.3, 0.1]], dtype=torch.float64)
    costs = torch.tensor([[2.0, 1.0, 2.0, 1.0]], dtype=torch.float64)
    result = des(scores, costs, 1.0, 1, 2)  # max relevance 0.6 < 1: infeasible
    assert result.violation.item()
    assert result.mask[0].tolist() == [True, True, False, False]  # expert 1 (cheaper) then 0 (lower index)


def test_batch_rows_are_independent():
    # the solver reuses scratch space across rows: a row's answer must not depend on its neighbours
    scores, costs = make_instances(3, 80, 12, "generic")
    batch = des(scores, costs, 0.6, 1, 4)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(80))
    shuffled = des(scores[perm], costs[perm], 0.6, 1, 4)
    assert torch.equal(shuffled.mask, batch.mask[perm])
    assert torch.equal(shuffled.nodes, batch.nodes[perm])
    for b in (0, 7, 33, 79):
        alone = des(scores[b : b + 1], costs[b : b + 1], 0.6, 1, 4)
        assert torch.equal(alone.mask[0], batch.mask[b])


def test_float32_scores_and_numpy_entry_agree():
    scores, costs = make_instances(11, 50, 10, "generic")
    result64 = des(scores, costs, 0.7, 1, 3)
    result32 = des(scores.float(), costs, 0.7, 1, 3)
    assert_valid(result32, scores.float(), costs, 0.7, 1, 3)
    mask, energy, violation, dropped, nodes, bound = des_numpy(scores.numpy(), costs.numpy(), 0.7, 1, 3)
    assert np.array_equal(mask, result64.mask.numpy()) and np.array_equal(energy, result64.energy.numpy())
    assert np.array_equal(violation, result64.violation.numpy()) and np.array_equal(dropped, result64.dropped.numpy())
    assert np.array_equal(nodes, result64.nodes.numpy())
    assert np.array_equal(bound, result64.lower_bound.numpy(), equal_nan=True)


def test_rows_that_exhaust_the_node_budget_are_finished_exactly():
    # with a budget of 2 nodes most feasible rows stop early and are handed to HiGHS
    scores, costs = make_instances(77, 16, 40, "mixed")
    s, c = scores.numpy(), costs.numpy()
    full = des_numpy(s, c, 0.9, 1, 40)
    capped = des_numpy(s, c, 0.9, 1, 40, node_limit=2)
    stopped = ~capped[2] & (capped[4] == 2)
    assert stopped.sum() >= 3 and (full[4][stopped] > 2).all()
    assert np.array_equal(capped[2], full[2])
    assert np.allclose(capped[1], full[1], rtol=1e-9, atol=0.0)
    feasible = ~capped[2]
    assert (capped[5][feasible] <= capped[1][feasible] * (1 + 1e-9)).all()  # a valid bound
    assert (capped[5][stopped] >= full[5][stopped] * (1 - 1e-9)).all()  # no weaker than the root


@njit  # no cache: numba's cache would not notice edits to des_kernel.py, which this inlines
def _solve_rows_in_numba(scores, costs, gamma, k_min, k_max):
    B, K = scores.shape
    mask = np.zeros((B, K), dtype=np.bool_)
    energy = np.zeros(B)
    feasible = np.zeros(B, dtype=np.bool_)
    for b in range(B):
        e, ok, _, _ = des_solve_one(scores[b], costs[b], gamma, k_min, k_max, mask[b])
        energy[b] = e
        feasible[b] = ok
    return mask, energy, feasible


def test_des_solve_one_from_numba_code():
    scores, costs = make_instances(12, 40, 10, "sparse_reach")
    mask, energy, feasible = _solve_rows_in_numba(scores.numpy(), costs.numpy(), 0.5, 1, 3)
    result = des(scores, costs, 0.5, 1, 3)
    assert np.array_equal(mask, result.mask.numpy())
    assert np.array_equal(energy, result.energy.numpy())
    assert np.array_equal(feasible, ~result.violation.numpy())
    assert (~feasible).any() and feasible.any()


def test_root_bound_is_the_cardinality_lp_bound():
    # the reported root bound must be at least the plain fractional-knapsack bound and at most
    # the optimum; with k_max=1 the cardinality LP is tight enough to beat the knapsack bound
    scores = torch.tensor([[0.45, 0.45, 0.1]], dtype=torch.float64)
    costs = torch.tensor([[10.0, 10.0, 0.5]], dtype=torch.float64)
    result = des(scores, costs, 0.5, 1, 1)
    assert result.violation.item()  # one expert cannot reach 0.5
    result = des(scores, costs, 0.45, 1, 1)
    knapsack_bound = 0.5 + (0.45 - 0.1 - RELEVANCE_TOL) * 10.0 / 0.45  # ~8.28, ignores k_max
    assert result.energy.item() == 10.0  # one of the 0.45 experts
    assert knapsack_bound + 1.0 < result.lower_bound.item() <= 10.0 + 1e-12


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(scores=torch.ones(4) / 4), "scores"),
        (dict(costs=torch.ones(2, 4, 3)), "costs"),
        (dict(costs=torch.ones(2, 5)), "costs"),
        (dict(costs=torch.full((2, 4), -1.0)), "costs"),
        (dict(costs=torch.full((2, 4), math.nan)), "costs"),
        (dict(scores=torch.full((2, 4), 0.5)), "scores"),
        (dict(gamma=0.0), "gamma"),
        (dict(gamma=1.5), "gamma"),
        (dict(k_min=0), "k_min"),
        (dict(k_min=3, k_max=2), "k_min"),
        (dict(k_max=5), "k_max"),
        (dict(k_max=2.0), "k_max"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(kwargs, name):
    args = dict(scores=torch.ones(2, 4) / 4, costs=torch.ones(2, 4), gamma=0.5, k_min=1, k_max=None)
    args.update(kwargs)
    for solver in (des, des_reference):
        with pytest.raises(ValueError, match=name):
            solver(**args)


@st.composite
def p1_instance(draw):
    K = draw(st.integers(1, 7))
    weights = draw(st.lists(st.sampled_from([0.0, 0.0, 1.0, 1.0, 2.0, 0.5, 3.7, 10.0]), min_size=K, max_size=K))
    if sum(weights) == 0:
        weights[0] = 1.0
    scores = np.array(weights) / sum(weights)
    costs = np.array(draw(st.lists(st.sampled_from([0.0, 1e-12, 1e-5, 2e-5, 3e-5, 1.0, 1e3, math.inf]), min_size=K, max_size=K)))
    k_max = draw(st.integers(1, K))
    k_min = draw(st.integers(1, k_max))
    gamma = draw(st.sampled_from([0.05, 0.25, 0.5, 0.75, 0.9, 1.0]))
    return torch.from_numpy(scores[None]), torch.from_numpy(costs[None]), gamma, k_min, k_max


@settings(derandomize=True, max_examples=300, deadline=None)
@given(p1_instance())
def test_des_equals_brute_force_on_generated_instances(instance):
    scores, costs, gamma, k_min, k_max = instance
    result = des(scores, costs, gamma, k_min, k_max)
    assert_valid(result, scores, costs, gamma, k_min, k_max)
    assert_same_optimum(result, brute_force_p1(scores, costs, gamma, k_min, k_max), "hypothesis")
    assert_same_optimum(result, des_reference(scores, costs, gamma, k_min, k_max), "hypothesis")
