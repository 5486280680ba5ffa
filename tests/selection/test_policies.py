"""Baseline policies and the policy registry (`route`)."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch

from dmoe_torch.selection import POLICIES, Selection, channel_topk, dense, des, jesa, random_topk, route, topk
from dmoe_torch.selection.baselines import _static_selection_cpu, _static_selection_torch, static_costs
from dmoe_torch.selection.exact import milp_p2
from dmoe_torch.selection.static_kernels import topk_mask

FAILURE_J = 2e-4  # P_ap * T_max with the default 0.2 W and 1 ms


def instance(B=64, K=8, N=16, seed=0, outage=0.15):
    g = torch.Generator().manual_seed(seed)
    scores = torch.softmax(2.0 * torch.randn(B, K, generator=g), 1)
    costs = torch.rand(B, K, N, generator=g, dtype=torch.float64) * 1e-4 + 1e-6
    costs[torch.rand(B, K, N, generator=g) < outage] = math.inf
    return scores, costs


def static_cost_by_hand(costs):
    B, K, N = costs.shape
    return torch.stack([costs[:, k, k % N] for k in range(K)], dim=1)


def expected_energy(mask, costs):
    """Energy by hand: link energy of delivered links plus FAILURE_J per failed attempt."""
    link = static_cost_by_hand(costs)
    total = torch.zeros(mask.shape[0], dtype=torch.float64)
    for b in range(mask.shape[0]):
        for k in torch.nonzero(mask[b]).flatten().tolist():
            total[b] += FAILURE_J if math.isinf(link[b, k]) else link[b, k]
    return total


# --------------------------------------------------------------------------------------
# every policy
# --------------------------------------------------------------------------------------
def test_policy_names():
    assert POLICIES == ("none", "topk", "channel_topk", "random_topk", "dense", "des", "jesa", "optimal", "greedy", "lagrangian")


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_returns_a_consistent_selection(policy):
    B, K, N = 24, 6, 8
    scores, costs = instance(B, K, N, seed=1)
    sel = route(
        policy, scores, costs, gamma=0.8, k=2, lam=3e4, failure_energy=FAILURE_J, generator=torch.Generator().manual_seed(0)
    )
    assert isinstance(sel, Selection)
    assert sel.mask.shape == (B, K) and sel.mask.dtype == torch.bool
    assert sel.subcarrier.shape == (B, K) and sel.subcarrier.dtype == torch.int64
    assert sel.failed.shape == (B, K) and sel.failed.dtype == torch.bool
    for name in ("energy", "lower_bound"):
        assert getattr(sel, name).shape == (B,) and getattr(sel, name).dtype == torch.float64
    for name in ("violation", "dropped", "certified"):
        assert getattr(sel, name).shape == (B,) and getattr(sel, name).dtype == torch.bool
    assert torch.equal(sel.subcarrier >= 0, sel.mask)
    assert not (sel.failed & ~sel.mask).any()
    assert (sel.energy >= 0).all() and torch.isfinite(sel.energy).all()
    assert not (sel.dropped & ~sel.violation).any()
    for b in range(B):  # with N >= K no policy uses a subcarrier twice
        links = sel.subcarrier[b][sel.mask[b]].tolist()
        assert len(links) == len(set(links))
        delivered = sel.mask[b] & ~sel.failed[b]
        link_costs = costs[b, delivered.nonzero().flatten(), sel.subcarrier[b][delivered]]
        assert torch.isfinite(link_costs).all()
        expected = link_costs.sum().item() + FAILURE_J * sel.failed[b].sum().item()
        assert math.isclose(sel.energy[b].item(), expected, rel_tol=1e-12, abs_tol=1e-300)


# --------------------------------------------------------------------------------------
# baselines
# --------------------------------------------------------------------------------------
def test_static_costs_use_subcarrier_k_mod_n():
    _, costs = instance(4, 5, 7, seed=2)
    assert torch.equal(static_costs(costs), static_cost_by_hand(costs))


def test_topk_selects_the_highest_scores_and_accounts_failures():
    scores, costs = instance(200, 8, 8, seed=3, outage=0.3)
    sel = topk(scores, costs, 3, failure_energy=FAILURE_J)
    assert (sel.mask.sum(1) == 3).all()
    for b in range(200):
        chosen = set(torch.nonzero(sel.mask[b]).flatten().tolist())
        threshold = sorted(scores[b].tolist(), reverse=True)[2]
        assert all(scores[b, k] >= threshold for k in chosen)
    link = static_cost_by_hand(costs)
    assert torch.equal(sel.failed, sel.mask & torch.isinf(link))
    assert sel.failed.any()  # the test exercises failures
    torch.testing.assert_close(sel.energy, expected_energy(sel.mask, costs), rtol=1e-12, atol=0)
    assert torch.equal(sel.dropped, (sel.mask & ~sel.failed).sum(1) == 0)
    assert torch.equal(sel.violation, sel.dropped)
    assert (sel.subcarrier[sel.mask] == torch.arange(8).expand(200, 8)[sel.mask]).all()


def test_failure_accounting_by_hand():
    scores = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    costs = torch.full((2, 4, 4), 1e-5, dtype=torch.float64)
    costs[0, 0, 0] = math.inf  # expert 0's static link (subcarrier 0) in outage
    costs[0, 1, 3] = math.inf  # not its static link: irrelevant
    costs[1, 3, 3] = math.inf
    costs[1, 2, 2] = math.inf
    sel = topk(scores, costs, 2, failure_energy=3e-4)
    assert sel.mask.tolist() == [[True, True, False, False], [False, False, True, True]]
    assert sel.failed.tolist() == [[True, False, False, False], [False, False, True, True]]
    assert sel.energy.tolist() == [3e-4 + 1e-5, 6e-4]
    assert sel.dropped.tolist() == [False, True]
    assert sel.subcarrier.tolist() == [[0, 1, -1, -1], [-1, -1, 2, 3]]


def test_topk_ties_prefer_lower_index():
    scores = torch.full((1, 4), 0.25)
    sel = topk(scores, torch.ones(1, 4, 4, dtype=torch.float64), 2)
    assert sel.mask.tolist() == [[True, True, False, False]]


def test_channel_topk_picks_the_cheapest_reachable_experts():
    scores, costs = instance(300, 8, 8, seed=4, outage=0.4)
    sel = channel_topk(scores, costs, 3, failure_energy=FAILURE_J)
    link = static_cost_by_hand(costs)
    assert not sel.failed.any()
    reachable = torch.isfinite(link).sum(1)
    assert torch.equal(sel.mask.sum(1), reachable.clamp(max=3))
    assert (reachable < 3).any()  # the test covers rows with fewer than k reachable experts
    for b in range(300):
        chosen = link[b][sel.mask[b]]
        others = link[b][~sel.mask[b]]
        if len(chosen) and len(others):
            assert chosen.max() <= others.min()
    torch.testing.assert_close(sel.energy, expected_energy(sel.mask, costs), rtol=1e-12, atol=0)
    assert torch.equal(sel.dropped, reachable == 0)


def test_topk_with_all_experts_equals_dense_on_perfect_channels():
    scores, costs = instance(50, 6, 6, seed=5, outage=0.0)
    a = topk(scores, costs, 6)
    b = dense(scores, costs)
    assert a.mask.all() and torch.equal(a.mask, b.mask)
    assert torch.equal(a.subcarrier, b.subcarrier)
    torch.testing.assert_close(a.energy, b.energy, rtol=0, atol=0)
    torch.testing.assert_close(a.energy, static_cost_by_hand(costs).sum(1), rtol=1e-12, atol=0)


def test_dense_selects_exactly_the_reachable_experts():
    scores, costs = instance(100, 8, 12, seed=6, outage=0.5)
    sel = dense(scores, costs, failure_energy=FAILURE_J)
    link = static_cost_by_hand(costs)
    assert torch.equal(sel.mask, torch.isfinite(link))
    assert not sel.failed.any()
    torch.testing.assert_close(sel.energy, torch.where(sel.mask, link, 0.0).sum(1), rtol=1e-12, atol=0)


def test_random_topk_is_reproducible_and_uniform():
    scores, costs = instance(4000, 8, 8, seed=7, outage=0.2)
    a = random_topk(scores, costs, 2, torch.Generator().manual_seed(42), failure_energy=FAILURE_J)
    b = random_topk(scores, costs, 2, torch.Generator().manual_seed(42), failure_energy=FAILURE_J)
    c = random_topk(scores, costs, 2, torch.Generator().manual_seed(43), failure_energy=FAILURE_J)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.energy, b.energy)
    assert not torch.equal(a.mask, c.mask)
    assert (a.mask.sum(1) == 2).all()
    # each expert is chosen with probability k/K = 1/4; binomial std over 4000 rows ~ 27
    counts = a.mask.sum(0).double()
    assert ((counts - 1000).abs() < 6 * math.sqrt(4000 * 0.25 * 0.75)).all()
    torch.testing.assert_close(a.energy, expected_energy(a.mask, costs), rtol=1e-12, atol=0)
    assert torch.equal(a.failed, a.mask & torch.isinf(static_cost_by_hand(costs)))


@pytest.mark.parametrize("fn", [topk, channel_topk])
def test_fixed_k_baselines_reject_bad_k(fn):
    scores, costs = instance(2, 4, 4)
    with pytest.raises(ValueError, match="k must be in"):
        fn(scores, costs, 5)
    with pytest.raises(ValueError, match="k must be in"):
        fn(scores, costs, 0)
    with pytest.raises(ValueError, match="k must be an int"):
        fn(scores, costs, 2.0)


def test_static_baselines_need_a_subcarrier_per_expert():
    scores, costs = instance(2, 8, 4)
    with pytest.raises(ValueError, match="N >= K"):
        dense(scores, costs)


# --------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------
def test_route_des_uses_static_subcarriers():
    scores, costs = instance(100, 8, 10, seed=8)
    sel = route("des", scores, costs, gamma=0.7, k_min=1, k_max=4)
    ref = des(scores, static_cost_by_hand(costs), 0.7, 1, 4)
    assert torch.equal(sel.mask, ref.mask)
    torch.testing.assert_close(sel.energy, ref.energy, rtol=0, atol=0)
    plan = torch.arange(8).expand(100, 8)
    assert torch.equal(sel.subcarrier, torch.where(sel.mask, plan, -1))


def test_route_jesa_and_optimal_use_every_subcarrier():
    scores, costs = instance(40, 6, 12, seed=9)
    a = route("jesa", scores, costs, gamma=0.9, k_max=3)
    b = jesa(scores, costs, 0.9, 1, 3)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.subcarrier, b.subcarrier)
    c = route("optimal", scores, costs, gamma=0.9, k_max=3)
    d = milp_p2(scores, costs, 0.9, 1, 3)
    assert torch.equal(c.violation, d.violation)
    torch.testing.assert_close(c.energy, d.energy, rtol=1e-12, atol=0)
    feasible = ~c.violation
    assert (a.energy[feasible] >= c.energy[feasible] * (1 - 1e-9)).all()
    # the joint allocation beats the static plan's optimum (des) or equals it
    s = route("des", scores, costs, gamma=0.9, k_max=3)
    both = feasible & ~s.violation
    assert (c.energy[both] <= s.energy[both] * (1 + 1e-12)).all()


def test_route_passes_generator_and_failure_energy():
    scores, costs = instance(50, 8, 8, seed=10, outage=0.5)
    a = route("random_topk", scores, costs, k=3, failure_energy=FAILURE_J, generator=torch.Generator().manual_seed(1))
    b = random_topk(scores, costs, 3, torch.Generator().manual_seed(1), failure_energy=FAILURE_J)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.energy, b.energy)
    assert a.failed.any()


@pytest.mark.parametrize(
    "policy, kwargs, match",
    [
        (
            "nope",
            {},
            r"policy must be one of none, topk, channel_topk, random_topk, dense, des, jesa, optimal, greedy, "
            r"lagrangian; got 'nope'",
        ),
        ("topk", dict(k=9), "k must be in"),
        ("channel_topk", dict(k=0), "k must be in"),
        ("topk", dict(gamma=0.0), "gamma"),
        ("jesa", dict(k_min=3, k_max=2), "k_min"),
        ("des", dict(k_max=9), "k_max"),
        ("topk", dict(failure_energy=-1.0), "failure_energy"),
        ("random_topk", dict(generator=1), "generator"),
    ],
)
def test_route_rejects_bad_arguments(policy, kwargs, match):
    scores, costs = instance(3, 8, 8)
    with pytest.raises(ValueError, match=match):
        route(policy, scores, costs, **kwargs)


def test_route_static_policies_reject_fewer_subcarriers_than_experts():
    scores, costs = instance(3, 8, 4)
    for policy in ("topk", "channel_topk", "random_topk", "dense", "des"):
        with pytest.raises(ValueError, match="N >= K"):
            route(policy, scores, costs)
    sel = route("jesa", scores, costs, gamma=0.5)  # joint allocation handles N < K
    assert (sel.mask.sum(1) <= 4).all()


def test_fixed_k_is_ignored_by_target_policies():
    """k only matters for topk-like policies: jesa with K=1 works with the default k=2."""
    scores = torch.ones(2, 1)
    costs = torch.full((2, 1, 2), 1e-5, dtype=torch.float64)
    sel = route("jesa", scores, costs, gamma=1.0)
    assert sel.mask.all() and not sel.violation.any()


# --------------------------------------------------------------------------------------
# the CPU kernels of the static-plan policies (static_kernels.py) against the torch path
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_cpu_topk_mask_keeps_what_a_stable_descending_sort_keeps(seed):
    g = torch.Generator().manual_seed(seed)
    K = 1 + seed
    scores = torch.softmax(2.0 * torch.randn(500, K, generator=g, dtype=torch.float64), 1)
    scores[::3] = torch.randint(0, 3, (len(scores[::3]), K), generator=g).double()  # exact ties, zeros
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    for k in range(1, K + 1):
        expected = torch.zeros(500, K, dtype=torch.bool).scatter_(1, order[:, :k], True)
        assert torch.equal(torch.from_numpy(topk_mask(scores.numpy(), k)), expected), f"K={K} k={k}"


@pytest.mark.parametrize("K,N", [(8, 16), (8, 8), (5, 7), (1, 1)])
def test_cpu_static_selection_equals_the_torch_path(K, N):
    scores, costs = instance(400, K, N, seed=K + N, outage=0.3)
    costs[::7] = math.inf  # whole rows in outage: every attempt fails
    masks = [torch.from_numpy(topk_mask(scores.double().numpy(), k)) for k in range(1, K + 1)]
    masks.append(torch.isfinite(static_costs(costs)))  # dense
    masks.append(torch.zeros(400, K, dtype=torch.bool))  # nothing selected
    failed = dropped = 0
    for mask in masks:
        cpu = _static_selection_cpu(mask, costs, FAILURE_J)
        reference = _static_selection_torch(mask, costs, FAILURE_J)
        for field in fields(Selection):
            got, want = getattr(cpu, field.name), getattr(reference, field.name)
            assert got.dtype == want.dtype and got.shape == want.shape, field.name
            if field.name == "energy" and mask.sum(1).max() > 2:  # another summation order (the
                torch.testing.assert_close(got, want, rtol=1e-13, atol=0.0)  # router keeps torch's there)
            elif field.name == "lower_bound":
                assert got.isnan().all() and want.isnan().all()
            else:
                assert torch.equal(got, want), field.name
        failed += int(cpu.failed.sum())
        dropped += int(cpu.dropped[mask.any(1)].sum())
    assert failed > 0 and dropped > 0  # links in outage and rows with nothing delivered were covered
