"""The policy table: one record per policy, register_policy, and the two heuristics (greedy, lagrangian)."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dmoe_torch.moe import MoELayer, RouterSpec
from dmoe_torch.selection import POLICY_TABLE, RELEVANCE_TOL, Selection, get_policy, policy_names, register_policy, route
from dmoe_torch.selection.enumerate import optimal_enumerate
from dmoe_torch.selection.heuristics import greedy_select, lagrangian_select
from dmoe_torch.selection.policies import policy_table_markdown

REPO = Path(__file__).resolve().parents[2]


def instance(seed: int, B: int = 64, K: int = 8, N: int = 16, outage: float = 0.1, ties: bool = False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K, generator=g) * 2
    if ties:
        logits = logits.round()
    scores = torch.softmax(logits, 1).double()
    costs = torch.rand(B, K, N, generator=g, dtype=torch.float64) * 1e-5
    if ties:
        costs = (costs * 1e6).round() / 1e6
    costs[torch.rand(B, K, N, generator=g) < outage] = math.inf
    return scores, costs


def check_valid(sel: Selection, costs: torch.Tensor) -> None:
    """Distinct finite subcarriers per row, -1 off the mask, energy = sum of the selected links."""
    assert ((sel.subcarrier >= 0) == sel.mask).all()
    for b in range(sel.mask.shape[0]):
        subs = sel.subcarrier[b][sel.mask[b]].tolist()
        assert len(subs) == len(set(subs))
        experts = sel.mask[b].nonzero().squeeze(1)
        link = costs[b, experts, sel.subcarrier[b, experts]]
        ok = ~sel.failed[b, experts]
        assert torch.isfinite(link[ok]).all()
        assert math.isclose(float(link[ok].sum()), float(sel.energy[b]), rel_tol=1e-12, abs_tol=0.0) or sel.failed[b].any()


# ---------------------------------------------------------------------------------------------
# the table


def test_every_policy_has_a_record_with_its_facts():
    builtin = {
        "none",
        "topk",
        "channel_topk",
        "random_topk",
        "dense",
        "des",
        "jesa",
        "optimal",
        "greedy",
        "lagrangian",
        "topk_capacity",
        "jesa_tokenwise",
    }
    assert builtin <= set(POLICY_TABLE)
    assert [n for n in policy_names("token") if n in builtin] == [
        "none",
        "topk",
        "channel_topk",
        "random_topk",
        "dense",
        "des",
        "jesa",
        "optimal",
        "greedy",
        "lagrangian",
    ]
    assert set(policy_names("image")) >= {"none", "topk", "topk_capacity", "des", "jesa_tokenwise", "jesa", "optimal"}
    assert {n for n, p in POLICY_TABLE.items() if p.fixed_k} >= {"topk", "channel_topk", "random_topk", "topk_capacity"}
    assert {n for n, p in POLICY_TABLE.items() if p.certifies} == {"des", "jesa", "optimal", "jesa_tokenwise"}
    assert {n for n, p in POLICY_TABLE.items() if p.plans_for_outage and p.builtin} == {
        "des",
        "jesa",
        "optimal",
        "greedy",
        "lagrangian",
        "jesa_tokenwise",
    }


@pytest.mark.parametrize("name", [n for n in policy_names("token") if POLICY_TABLE[n].builtin])
def test_every_token_policy_routes_a_valid_selection(name):
    scores, costs = instance(1)
    params = dict(k=2, gamma=0.5, k_min=1, k_max=2, lam=3e4, failure_energy=1e-4, generator=torch.Generator().manual_seed(0))
    sel = route(name, scores, costs, **params)
    assert sel.mask.shape == scores.shape and sel.energy.dtype == torch.float64
    if name != "dense":
        assert (sel.mask.sum(1) <= 2).all()
    check_valid(sel, costs)


def test_the_docs_policy_table_is_the_table():
    """docs/method.md's policy table is policy_table_markdown(): the table is its one source."""
    text = (REPO / "docs" / "method.md").read_text()
    assert policy_table_markdown() in text


def test_unknown_and_frame_only_names_fail_with_the_allowed_names():
    scores, costs = instance(2, B=4)
    with pytest.raises(ValueError, match=r"policy must be one of none, topk, .*; got 'nope'"):
        route("nope", scores, costs)
    with pytest.raises(ValueError, match="exists only for image frames"):
        route("topk_capacity", scores, costs)
    with pytest.raises(ValueError, match="router.policy must be one of"):
        RouterSpec("nope")
    with pytest.raises(ValueError, match="router.lam must be a finite float >= 0"):
        RouterSpec("lagrangian")
    with pytest.raises(ValueError, match="lam must be a finite float >= 0"):
        route("lagrangian", scores, costs, lam=-1.0)


def test_numpy_numbers_are_accepted_where_python_numbers_are():
    scores, costs = instance(3, B=8)
    a = route("des", scores, costs, gamma=np.float32(0.5), k_max=np.int64(2))
    b = route("des", scores, costs, gamma=0.5, k_max=2)
    assert torch.equal(a.mask, b.mask)
    RouterSpec("jesa", gamma=np.float64(0.5), k_min=np.int32(1))


# ---------------------------------------------------------------------------------------------
# register_policy


def cheapest_one(scores, costs, args):
    """A user policy: each row's single cheapest reachable expert on its static subcarrier."""
    link = costs.diagonal(dim1=1, dim2=2)
    best = link.argmin(1, keepdim=True)
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, best, True) & torch.isfinite(link)
    energy = torch.where(mask, link, torch.zeros_like(link)).sum(1)
    dropped = ~mask.any(1)
    return Selection(
        mask=mask,
        subcarrier=torch.where(mask, torch.arange(scores.shape[1]).expand_as(mask), -1),
        energy=energy,
        violation=dropped,
        dropped=dropped,
        nodes=torch.zeros_like(energy, dtype=torch.int64),
        lower_bound=torch.full_like(energy, math.nan),
        certified=torch.zeros_like(dropped),
        failed=torch.zeros_like(mask),
    )


@pytest.fixture
def user_policy():
    record = register_policy(
        "test_cheapest_one", summary="one cheapest expert (test)", token_solver=cheapest_one, subcarriers="static"
    )
    yield record
    del POLICY_TABLE["test_cheapest_one"]


def test_a_registered_policy_routes_through_route_the_layer_and_the_config(user_policy):
    from hydra import compose, initialize_config_dir

    from dmoe_torch.config import validate_train_config

    scores, costs = instance(4)
    sel = route("test_cheapest_one", scores, costs)
    link = costs.diagonal(dim1=1, dim2=2)
    assert torch.equal(sel.energy, link.min(1).values.nan_to_num(posinf=0.0))
    layer = MoELayer(8, 8)
    out = layer(torch.randn(64, 8), costs, RouterSpec("test_cheapest_one"))
    assert float(out.metrics["experts_per_input"]) <= 1.0
    out.out.sum().backward()  # the gate learns through the combine weights as with a built-in policy
    assert layer.gate.weight.grad is not None
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=tiny", "router.policy=test_cheapest_one"])
    validate_train_config(cfg)


def test_register_policy_refuses_taken_names_and_bad_records(user_policy):
    with pytest.raises(ValueError, match="'des' is already registered"):
        register_policy("des", summary="x", token_solver=cheapest_one)
    with pytest.raises(ValueError, match="replace=True"):
        register_policy("test_cheapest_one", summary="x", token_solver=cheapest_one)
    register_policy("test_cheapest_one", summary="again", token_solver=cheapest_one, replace=True)
    assert get_policy("test_cheapest_one").summary == "again"
    with pytest.raises(ValueError, match="unknown parameter"):
        register_policy("test_bad", summary="x", token_solver=cheapest_one, params=("gama",))
    with pytest.raises(ValueError, match="needs a token_solver or a frame_solver"):
        register_policy("test_bad", summary="x")
    assert "test_bad" not in POLICY_TABLE


# ---------------------------------------------------------------------------------------------
# greedy and lagrangian against plain-Python references


def greedy_reference(s, c_star, gamma, k_min, k_max):
    """The greedy rule one row at a time (returns the chosen experts before the assignment)."""
    reach = [k for k in range(len(s)) if math.isfinite(c_star[k])]
    ratio = {k: (math.inf if c_star[k] == 0 else s[k] / c_star[k]) for k in reach}
    chosen, total = [], 0.0
    for k in sorted(reach, key=lambda k: (-ratio[k], k)):
        if total >= gamma - RELEVANCE_TOL or len(chosen) == k_max:
            break
        chosen.append(k)
        total += s[k]
    for k in sorted((k for k in reach if k not in chosen), key=lambda k: (c_star[k], k)):
        if len(chosen) >= k_min:
            break
        chosen.append(k)
    return set(chosen)


def lagrangian_reference(s, c_star, lam, k_min, k_max):
    """The best set of k_min..k_max reachable experts for sum(s - lam c*), by enumeration."""
    reach = [k for k in range(len(s)) if math.isfinite(c_star[k])]
    best, best_value = set(), -math.inf
    for m in range(min(k_min, len(reach)), min(k_max, len(reach)) + 1):
        for subset in itertools.combinations(reach, m):
            value = sum(s[k] - lam * c_star[k] for k in subset)
            if value > best_value + 1e-15:
                best, best_value = set(subset), value
    return best, best_value


@pytest.mark.parametrize("seed", range(6))
def test_greedy_and_lagrangian_follow_their_rules(seed):
    scores, costs = instance(seed, B=200, K=6, N=24, outage=0.2)
    c_star = costs.amin(2)
    for k_min, k_max, gamma, lam in ((1, 2, 0.5, 2e4), (2, 3, 0.8, 1e5), (1, 3, 0.3, 0.0)):
        g = greedy_select(scores, costs, gamma, k_min, k_max)
        lg = lagrangian_select(scores, costs, lam, k_min, k_max)
        check_valid(g, costs)
        check_valid(lg, costs)
        for b in range(scores.shape[0]):
            s, c = scores[b].tolist(), c_star[b].tolist()
            want = greedy_reference(s, c, gamma, k_min, k_max)
            got = set(g.mask[b].nonzero().squeeze(1).tolist())
            assert got <= want  # an expert may leave only when the assignment finds it no link
            if got == want:
                relevance = sum(s[k] for k in got)
                assert bool(g.violation[b]) == (relevance < gamma - RELEVANCE_TOL or len(got) < k_min)
            best, value = lagrangian_reference(s, c, lam, k_min, k_max)
            got = set(lg.mask[b].nonzero().squeeze(1).tolist())
            assert got <= best or math.isclose(sum(s[k] - lam * c[k] for k in got), value, rel_tol=1e-9)


def test_greedy_never_beats_the_p2_optimum_it_approximates():
    """At the same target, greedy's energy is >= the exact P2 optimum on every row both solve."""
    scores, costs = instance(11, B=500, K=8, N=16, outage=0.15, ties=True)
    for gamma in (0.25, 0.5, 0.9):
        g = greedy_select(scores, costs, gamma, 1, 2)
        opt = optimal_enumerate(scores, costs, gamma, 1, 2)
        both = ~g.violation & ~opt.violation
        assert both.any()
        assert (g.energy[both] >= opt.energy[both] * (1 - 1e-12)).all()
        assert not (opt.violation & ~g.violation).any()  # greedy cannot meet a target P2 cannot


def test_lagrangian_with_zero_price_takes_the_top_scores():
    scores, costs = instance(12, B=100, outage=0.0)
    sel = lagrangian_select(scores, costs, 0.0, 1, 2)
    top2 = torch.zeros_like(sel.mask).scatter_(1, scores.topk(2, dim=1).indices, True)
    assert torch.equal(sel.mask, top2)


def test_help_texts_name_every_policy():
    for name in ("train", "evaluate"):
        text = (REPO / "conf" / "hydra" / "help" / f"{name}.yaml").read_text()
        for policy in (n for n, p in POLICY_TABLE.items() if p.builtin and (name == "train" or p.token_solver)):
            assert re.search(rf"\b{policy}\b", text), (name, policy)


def test_route_frames_passes_the_reassignment_sweeps_to_jesa():
    """The issue's frame: 3 tokens, K = N = 2; without the pass subcarrier 0 stays idle (15e-5 J),
    with it the optimum (11e-5 J) is found; more sweeps never cost more energy."""
    from dmoe_torch.selection import route_frames

    scores = np.full((1, 3, 2), 0.5)
    costs = np.array([[[1.0, np.inf], [np.inf, 5.0]]]) * 1e-5
    capacity = np.array([[[1, 0], [0, 3]]])
    energy = {
        r: float(route_frames("jesa", scores, costs, capacity, gamma=0.15, k_min=1, reassign_rounds=r).energy[0])
        for r in (-1, 0, 4)
    }
    assert math.isclose(energy[-1], 15e-5) and math.isclose(energy[0], 11e-5) and math.isclose(energy[4], 11e-5)
    with pytest.raises(ValueError):
        route_frames("jesa", scores, costs, capacity, gamma=0.15, reassign_rounds=-2)
