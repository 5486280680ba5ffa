"""Exact references: MILP (HiGHS) against brute force, for P1 and for P2."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmoe_torch.selection.common import RELEVANCE_TOL
from dmoe_torch.selection.exact import brute_force_p1, brute_force_p2, milp_p1, milp_p2, subset_count


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def p1_instances(seed: int, batch: int, num_experts: int, family: str):
    """Seeded scores [B, K] and costs [B, K] (J, +inf unreachable)."""
    rng = np.random.default_rng(seed)
    B, K = batch, num_experts
    scores = softmax(rng.normal(size=(B, K)) * rng.uniform(0.3, 3.0, size=(B, 1)))
    costs = 1e-5 * rng.lognormal(0.0, 1.0, size=(B, K))
    if family == "ties":
        scores = softmax(rng.integers(0, 3, size=(B, K)).astype(np.float64))
        costs = 1e-5 * rng.integers(1, 4, size=(B, K))
    elif family == "equal_scores":
        scores = np.full((B, K), 1.0 / K)
    elif family == "zero_scores":
        scores = np.where(rng.random((B, K)) < 0.4, 0.0, scores)
        scores[:, 0] += 0.1
        scores /= scores.sum(1, keepdims=True)
    elif family == "huge":
        costs *= 1e8
    elif family == "tiny":
        costs *= 1e-7
    elif family == "mixed":  # five decades within one row: HiGHS needs careful scaling
        costs = 10.0 ** rng.uniform(-8, -3, size=(B, K))
    costs = np.where(rng.random((B, K)) < 0.2, np.inf, costs)
    costs[0] = np.inf  # one row without any reachable expert
    return torch.from_numpy(scores), torch.from_numpy(costs)


def p2_instances(seed: int, batch: int, num_experts: int, num_subcarriers: int, outage: float = 0.3):
    """Seeded scores [B, K] and per-link costs [B, K, N] (J, +inf in outage)."""
    rng = np.random.default_rng(seed)
    B, K, N = batch, num_experts, num_subcarriers
    scores = softmax(rng.normal(size=(B, K)) * rng.uniform(0.3, 3.0, size=(B, 1)))
    mean = rng.lognormal(0.0, 0.5, size=(B, K, 1))  # per-device path loss
    costs = 1e-5 * mean / rng.exponential(size=(B, K, N)).clip(0.05)
    costs = np.where(rng.random((B, K, N)) < outage, np.inf, costs)
    costs[0] = np.inf
    return torch.from_numpy(scores), torch.from_numpy(costs)


def assert_same_optimum(result, reference, label):
    assert torch.equal(result.violation, reference.violation), label
    assert torch.equal(result.dropped, reference.dropped), label
    close = torch.isclose(result.energy, reference.energy, rtol=1e-9, atol=0.0)
    assert close.all(), f"{label}: rows {torch.nonzero(~close).flatten().tolist()[:10]} differ"


def assert_valid_p2(result, scores, costs, gamma, k_min, k_max):
    """Each selected expert has its own finite subcarrier; energy adds up; P2 holds on feasible rows."""
    mask, sub = result.mask, result.subcarrier
    B, K, N = costs.shape
    assert torch.equal(mask, sub >= 0)
    for b in range(B):
        chosen = torch.nonzero(mask[b]).flatten()
        links = sub[b, chosen]
        assert len(set(links.tolist())) == len(links), "a subcarrier serves two experts"
        link_costs = costs[b, chosen, links]
        assert torch.isfinite(link_costs).all()
        assert math.isclose(result.energy[b].item(), link_costs.sum().item(), rel_tol=1e-12, abs_tol=0.0)
        if not result.violation[b]:
            assert k_min <= len(chosen) <= k_max
            assert scores[b, chosen].sum().item() >= gamma - RELEVANCE_TOL - 1e-12
    assert torch.equal(result.certified, ~result.violation)
    assert torch.equal(result.dropped, ~mask.any(1))


@pytest.mark.parametrize("family", ["generic", "ties", "equal_scores", "zero_scores", "huge", "tiny", "mixed"])
def test_milp_p1_equals_brute_force(family):
    for case, (gamma, k_min, k_max) in enumerate([(0.3, 1, 2), (0.7, 1, 4), (1.0, 1, 8), (0.5, 3, 3), (0.9, 2, 5)]):
        scores, costs = p1_instances(case, 16, 8, family)
        result = milp_p1(scores, costs, gamma, k_min, k_max)
        reference = brute_force_p1(scores, costs, gamma, k_min, k_max)
        assert_same_optimum(result, reference, f"{family} gamma={gamma}")
        assert torch.equal(result.mask[result.violation], reference.mask[reference.violation])
        feasible = ~result.violation
        assert torch.equal(result.certified, feasible)
        assert torch.equal(result.lower_bound[feasible], result.energy[feasible])


def test_brute_force_p1_reports_subsets_and_refuses_huge_enumerations():
    scores, costs = p1_instances(0, 4, 10, "generic")
    result = brute_force_p1(scores, costs, 0.5, 2, 4)
    assert (result.nodes == math.comb(10, 2) + math.comb(10, 3) + math.comb(10, 4)).all()
    assert subset_count(10, 2, 4) == 45 + 120 + 210
    big_scores = torch.full((1, 64), 1.0 / 64, dtype=torch.float64)
    with pytest.raises(ValueError, match="brute_force_p1"):
        brute_force_p1(big_scores, torch.ones(1, 64, dtype=torch.float64), 0.5, 1, 32)


@pytest.mark.parametrize("outage", [0.0, 0.3, 0.6])
def test_milp_p2_equals_brute_force_p2(outage):
    for case, (gamma, k_min, k_max) in enumerate([(0.3, 1, 2), (0.7, 1, 3), (0.95, 2, 4), (0.5, 2, 2), (1.0, 1, 5)]):
        scores, costs = p2_instances(10 * case + int(outage * 10), 14, 5, 4, outage)
        result = milp_p2(scores, costs, gamma, k_min, k_max)
        reference = brute_force_p2(scores, costs, gamma, k_min, k_max)
        label = f"outage={outage} gamma={gamma} k=[{k_min},{k_max}]"
        assert_same_optimum(result, reference, label)
        assert_valid_p2(result, scores, costs, gamma, k_min, k_max)
        assert_valid_p2(reference, scores, costs, gamma, k_min, k_max)
        infeasible = result.violation
        assert torch.equal(result.mask[infeasible], reference.mask[infeasible]), label


def test_p1_on_best_subcarriers_lower_bounds_p2():
    # property (a) of docs/method.md section 5: P1 with c*_k = min_n e[k, n] <= P2
    scores, costs = p2_instances(99, 30, 6, 3, 0.2)
    for gamma in (0.4, 0.8):
        p2 = milp_p2(scores, costs, gamma, 1, 3)
        p1 = brute_force_p1(scores, costs.min(2).values, gamma, 1, 3)
        both = ~p2.violation & ~p1.violation
        assert both.any()
        assert (p1.energy[both] <= p2.energy[both] * (1 + 1e-12)).all()
        assert (p1.violation <= p2.violation).all()  # P2 infeasible wherever P1 is


def test_p2_fallback_assigns_subcarriers_and_drops_unassignable_experts():
    inf = math.inf
    scores = torch.tensor([[0.4, 0.35, 0.25]], dtype=torch.float64)
    # experts 0 and 1 can only use subcarrier 0: one of them cannot be served
    costs = torch.tensor([[[1.0, inf], [2.0, inf], [inf, 3.0]]], dtype=torch.float64)
    for solver in (milp_p2, brute_force_p2):
        result = solver(scores, costs, 1.0, 1, 3)  # relevance 1 needs all three: infeasible
        assert result.violation.item() and not result.dropped.item()
        assert result.mask[0].tolist() == [True, False, True]  # the cheaper of 0/1 keeps subcarrier 0
        assert result.subcarrier[0].tolist() == [0, -1, 1]
        assert result.energy.item() == 4.0
    none = milp_p2(scores, torch.full((1, 3, 2), inf, dtype=torch.float64), 0.5, 1, 2)
    assert none.dropped.item() and none.violation.item() and none.energy.item() == 0.0


def test_p2_subcarrier_conflict_is_resolved_optimally():
    # both experts have the same best subcarrier; the optimum gives one of them its second best
    scores = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    costs = torch.tensor([[[1.0, 5.0, 9.0], [1.0, 2.0, 9.0]]], dtype=torch.float64)
    for solver in (milp_p2, brute_force_p2):
        result = solver(scores, costs, 1.0, 1, 2)
        assert result.subcarrier[0].tolist() == [0, 1]
        assert result.energy.item() == 3.0 and not result.violation.item()


@pytest.mark.parametrize("solver", [milp_p2, brute_force_p2])
def test_p2_bad_inputs_name_the_argument(solver):
    scores = torch.full((2, 3), 1.0 / 3)
    with pytest.raises(ValueError, match="costs"):
        solver(scores, torch.ones(2, 3), 0.5, 1, 2)
    with pytest.raises(ValueError, match="gamma"):
        solver(scores, torch.ones(2, 3, 4), 1.2, 1, 2)
    with pytest.raises(ValueError, match="k_max"):
        solver(scores, torch.ones(2, 3, 4), 0.5, 1, 4)


@pytest.mark.parametrize("solver", [milp_p1, brute_force_p1])
def test_p1_bad_inputs_name_the_argument(solver):
    scores = torch.full((2, 3), 1.0 / 3)
    with pytest.raises(ValueError, match="costs"):
        solver(scores, torch.ones(2, 3, 4), 0.5, 1, 2)
    with pytest.raises(ValueError, match="k_min"):
        solver(scores, torch.ones(2, 3), 0.5, 0, 2)
