"""Enumeration solvers (selection/enumerate.py) against numba DES / JESA and the exact P2 references.

Instances are seeded.  "Tie-free" families draw continuous costs (lognormal), so every
optimum is unique and masks, subcarriers and flags must equal the reference's; they still
hold zero scores, tied scores, outages (single links, whole experts, whole rows),
unreachable gamma and k_min above the reachable experts.  "Tie" families repeat small
integer costs: DES and the exact P2 must still reach the same energy, violation and
dropped (the optimum is unique even when its argmin is not); JESA may legitimately take
another path there, so it is checked for validity against the exact optimum instead.
The 100,000-instance run is benchmarks/bench_enumerate.py (and the DMOE_SLOW=1 test below).
"""

from __future__ import annotations

import ast
import inspect
import itertools
import math
import os
import re

import numpy as np
import pytest
import torch

from dmoe_torch.selection import RELEVANCE_TOL, registry, route
from dmoe_torch.selection import enumerate as enum
from dmoe_torch.selection.des import des_numpy
from dmoe_torch.selection.enumerate import (
    MAX_CANDIDATE_SETS,
    MAX_CANDIDATE_SETS_CPU,
    MAX_SET_SIZE,
    candidate_set_count,
    candidate_sets,
    des_enumerate,
    enumerable,
    jesa_enumerate,
    optimal_enumerate,
)
from dmoe_torch.selection.exact import brute_force_p2, milp_p2
from dmoe_torch.selection.jesa import jesa_numpy
from dmoe_torch.selection.small_sets import SMALL_SET_SIZE, des_small

RTOL = 1e-9
GAMMAS = (0.05, 0.3, 0.5, 0.7, 0.9, 1.0)


# --------------------------------------------------------------------------------------
# instances
# --------------------------------------------------------------------------------------
def make_scores(rng: np.random.Generator, B: int, K: int, tied: bool) -> np.ndarray:
    """Rows [B, K] summing to 1: continuous, with zeros, one-hot; tied: small integers."""
    if tied:
        rows = rng.integers(0, 4, (B, K)).astype(np.float64)
        rows[rows.sum(1) == 0, 0] = 1.0
    else:
        rows = rng.dirichlet(np.full(K, 0.6), B)
        rows[rng.random((B, K)) < 0.15] = 0.0  # zero scores (ties among them)
        one_hot = rng.random(B) < 0.05
        rows[one_hot] = np.eye(K)[rng.integers(K, size=one_hot.sum())]
        rows[rows.sum(1) == 0, 0] = 1.0
    return rows / rows.sum(1, keepdims=True)


def make_costs(rng: np.random.Generator, shape: tuple[int, ...], tied: bool, outage: float) -> np.ndarray:
    """Costs [B, K] or [B, K, N] in J: lognormal or small integers; +inf links, experts, rows."""
    costs = rng.integers(1, 4, shape).astype(np.float64) if tied else rng.lognormal(0.0, 1.0, shape)
    costs[rng.random(shape) < outage] = np.inf
    B, K = shape[:2]
    dead_expert = rng.random((B, K)) < outage / 2  # a whole expert unreachable
    costs[dead_expert] = np.inf
    costs[rng.random(B) < 0.03] = np.inf  # a whole row unreachable: dropped
    return costs


def configs(rng: np.random.Generator, count: int, max_k: int, max_n: int):
    """(K, N, k_min, k_max, gamma) draws covering N < K, N < k_max, k_min == k_max."""
    for _ in range(count):
        K = int(rng.integers(1, max_k + 1))
        k_max = int(rng.integers(1, min(K, MAX_SET_SIZE) + 1))
        k_min = int(rng.integers(1, k_max + 1))
        N = int(rng.integers(k_min, max_n + 1))
        yield K, N, k_min, k_max, float(rng.choice(GAMMAS))


def tensors(*arrays):
    return [torch.from_numpy(a) for a in arrays]


def assert_energy(actual: torch.Tensor, expected, what: str) -> None:
    actual = actual.numpy()
    expected = np.asarray(expected)
    same = np.isclose(actual, expected, rtol=RTOL, atol=0.0) | (np.isinf(actual) & np.isinf(expected))
    assert same.all(), f"{what}: energy differs in rows {np.flatnonzero(~same)[:10]}"


def assert_same(actual: torch.Tensor, expected, what: str) -> None:
    actual = actual.numpy()
    expected = np.asarray(expected)
    differ = actual != expected
    if differ.ndim > 1:
        differ = differ.any(axis=tuple(range(1, differ.ndim)))
    assert not differ.any(), f"{what} differs in rows {np.flatnonzero(differ)[:10]}"


def assert_bound(actual: torch.Tensor, expected, what: str) -> None:
    actual = actual.numpy()
    expected = np.asarray(expected)
    assert (np.isnan(actual) == np.isnan(expected)).all(), f"{what}: nan pattern differs"
    finite = ~np.isnan(expected)
    assert np.allclose(actual[finite], expected[finite], rtol=RTOL, atol=0.0), what


# --------------------------------------------------------------------------------------
# candidate sets and the enumerable rule
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("K, k_min, k_max", [(1, 1, 1), (5, 1, 3), (8, 2, 2), (16, 1, 3), (6, 3, 6)])
def test_candidate_sets_cover_every_set_once_in_size_then_lexicographic_order(K, k_min, k_max):
    sets = candidate_sets(K, k_min, k_max)
    assert sets.dtype == torch.bool and sets.shape == (candidate_set_count(K, k_min, k_max), K)
    members = [tuple(np.flatnonzero(row)) for row in sets.numpy()]
    assert len(set(members)) == len(members)
    assert all(k_min <= len(m) <= k_max for m in members)
    assert members == sorted(members, key=lambda m: (len(m), m))
    assert candidate_set_count(K, k_min, k_max) == sum(math.comb(K, m) for m in range(k_min, k_max + 1))


def test_candidate_sets_are_cached_per_device_and_reject_bad_sizes():
    assert candidate_sets(8, 1, 3) is candidate_sets(8, 1, 3, "cpu")
    with pytest.raises(ValueError, match="k_min"):
        candidate_sets(8, 0, 2)
    with pytest.raises(ValueError, match="k_max"):
        candidate_sets(4, 1, 5)


@pytest.mark.parametrize("solver", sorted(MAX_CANDIDATE_SETS_CPU))
@pytest.mark.parametrize("device", [None, "cpu", "meta"])
def test_enumerable_follows_the_set_count_and_size_limits(device, solver):
    limit = MAX_CANDIDATE_SETS if device == "meta" else MAX_CANDIDATE_SETS_CPU[solver]
    assert not enumerable(8, 1, MAX_SET_SIZE + 1, device, solver)
    counts = {K: candidate_set_count(K, 1, min(K, 3)) for K in range(1, 200)}
    for K, count in counts.items():
        assert enumerable(K, 1, min(K, 3), device, solver) == (count <= limit)


def test_enumerable_rejects_an_unknown_solver():
    with pytest.raises(ValueError, match="solver"):
        enumerable(8, 1, 2, solver="milp")


def test_p2_solvers_refuse_sets_larger_than_max_set_size():
    s = torch.full((2, 5), 0.2, dtype=torch.float64)
    e = torch.ones(2, 5, 5, dtype=torch.float64)
    for solver in (optimal_enumerate, jesa_enumerate):
        with pytest.raises(ValueError, match="k_max"):
            solver(s, e, 0.5, 1, MAX_SET_SIZE + 1)


# --------------------------------------------------------------------------------------
# P1 against numba DES
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True], ids=["tie-free", "ties"])
def test_des_enumerate_matches_numba_des(tied):
    rng = np.random.default_rng(11 + tied)
    infeasible = dropped = 0
    for K, _, k_min, k_max, gamma in configs(rng, 60, 12, 3):
        s = make_scores(rng, 96, K, tied)
        c = make_costs(rng, (96, K), tied, outage=float(rng.choice([0.0, 0.2, 0.5])))
        mask, energy, violation, drop, _, _ = des_numpy(s, c, gamma, k_min, k_max)
        result = des_enumerate(*tensors(s, c), gamma, k_min, k_max)
        what = f"K={K} k={k_min}..{k_max} gamma={gamma}"
        assert_energy(result.energy, energy, what)
        assert_same(result.violation, violation, what + " violation")
        assert_same(result.dropped, drop, what + " dropped")
        if not tied:
            assert_same(result.mask, mask, what + " mask")
        assert_same(result.certified, ~violation, what + " certified")
        assert_bound(result.lower_bound, np.where(violation, np.nan, energy), what + " lower_bound")
        infeasible += int(violation.sum())
        dropped += int(drop.sum())
    assert infeasible > dropped > 0  # the fallback and the dropped rows were exercised


def test_des_enumerate_fallback_takes_top_scores_with_ties_to_lower_cost_then_index():
    # gamma unreachable with k_max=2: the two best scores; score ties go to the cheaper expert,
    # equal cost to the lower index; the unreachable expert 0 never enters
    s = torch.tensor([[0.4, 0.2, 0.2, 0.2], [0.1, 0.3, 0.3, 0.3]], dtype=torch.float64)
    c = torch.tensor([[math.inf, 3.0, 1.0, 1.0], [1.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    result = des_enumerate(s, c, 1.0, 1, 2)
    assert result.mask.tolist() == [[False, False, True, True], [False, True, True, False]]
    assert result.violation.all() and not result.dropped.any()
    assert result.energy.tolist() == [2.0, 4.0]


@pytest.mark.parametrize("tied", [False, True], ids=["tie-free", "ties"])
def test_des_small_kernel_equals_des_enumerate_bit_for_bit(tied):
    # the CPU router's DES for k_max <= 2 (des_small) must give des_enumerate's Selection
    # itself, ties included (same candidate order), also on a strided cost view
    rng = np.random.default_rng(31 + tied)
    differing_from_bb = 0
    for K, _, k_min, k_max, gamma in configs(rng, 80, 12, 3):
        k_max = min(k_max, SMALL_SET_SIZE)
        k_min = min(k_min, k_max)
        s = make_scores(rng, 128, K, tied)
        c3 = make_costs(rng, (128, K, K), tied, outage=float(rng.choice([0.0, 0.2, 0.5])))
        c = torch.from_numpy(c3).diagonal(dim1=1, dim2=2)  # strided, as the router passes it
        small = des_small(torch.from_numpy(s), c, gamma, k_min, k_max)
        reference = des_enumerate(torch.from_numpy(s), c.contiguous(), gamma, k_min, k_max)
        for name in ("mask", "subcarrier", "energy", "violation", "dropped", "nodes", "certified", "failed"):
            assert torch.equal(getattr(small, name), getattr(reference, name)), f"K={K} {k_min}..{k_max} {name}"
        assert torch.equal(small.lower_bound.isnan(), reference.lower_bound.isnan())
        assert torch.equal(small.lower_bound.nan_to_num(), reference.lower_bound.nan_to_num())
        differing_from_bb += int((small.mask.numpy() != des_numpy(s, c.numpy(), gamma, k_min, k_max)[0]).any())
    assert not tied or differing_from_bb > 0  # ties really were broken (by candidate order, not the B&B's)


def test_router_des_on_the_cpu_takes_the_small_kernel_for_pairs(monkeypatch):
    calls = []
    monkeypatch.setattr(registry, "des_small", lambda *args, **_: calls.append(args) or des_enumerate(*args))
    s = torch.softmax(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)), 1)
    c = torch.rand(64, 8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    route("des", s, c, gamma=0.5, k_max=2)
    route("des", s, c, gamma=0.5, k_max=3)
    assert len(calls) == 1 and calls[0][4] == 2


# --------------------------------------------------------------------------------------
# exact P2 against brute force and HiGHS
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True], ids=["tie-free", "ties"])
def test_optimal_enumerate_matches_brute_force_p2(tied):
    rng = np.random.default_rng(23 + tied)
    infeasible = 0
    for K, N, k_min, k_max, gamma in configs(rng, 40, 6, 5):
        s = make_scores(rng, 24, K, tied)
        e = make_costs(rng, (24, K, N), tied, outage=float(rng.choice([0.0, 0.3, 0.6])))
        reference = brute_force_p2(*tensors(s, e), gamma, k_min, k_max)
        result = optimal_enumerate(*tensors(s, e), gamma, k_min, k_max)
        what = f"K={K} N={N} k={k_min}..{k_max} gamma={gamma}"
        assert_energy(result.energy, reference.energy.numpy(), what)
        for field in ("violation", "dropped", "certified"):
            assert_same(getattr(result, field), getattr(reference, field).numpy(), f"{what} {field}")
        assert_bound(result.lower_bound, reference.lower_bound.numpy(), what + " lower_bound")
        if not tied:
            assert_same(result.mask, reference.mask.numpy(), what + " mask")
            assert_same(result.subcarrier, reference.subcarrier.numpy(), what + " subcarrier")
        infeasible += int(reference.violation.sum())
    assert infeasible > 0


def test_optimal_enumerate_matches_milp_p2_on_router_sizes():
    rng = np.random.default_rng(5)
    for K, N, k_max in ((8, 16, 3), (8, 4, 3), (16, 16, 2)):
        s = make_scores(rng, 12, K, tied=False)
        e = make_costs(rng, (12, K, N), tied=False, outage=0.2)
        reference = milp_p2(*tensors(s, e), 0.6, 1, k_max)
        result = optimal_enumerate(*tensors(s, e), 0.6, 1, k_max)
        assert_energy(result.energy, reference.energy.numpy(), f"K={K} N={N}")
        assert_same(result.mask, reference.mask.numpy(), f"K={K} N={N} mask")
        assert_same(result.subcarrier, reference.subcarrier.numpy(), f"K={K} N={N} subcarrier")
        assert_same(result.violation, reference.violation.numpy(), f"K={K} N={N} violation")


def test_optimal_enumerate_needs_a_subcarrier_beyond_the_best_one():
    # both experts' best subcarrier is 0; the optimum moves expert 1, whose second link is cheaper
    s = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    e = torch.tensor([[[1.0, 5.0, 9.0], [1.0, 2.0, 9.0]]], dtype=torch.float64)
    result = optimal_enumerate(s, e, 1.0, 1, 2)
    assert result.subcarrier.tolist() == [[0, 1]] and result.energy.tolist() == [3.0]
    assert result.certified.all() and result.lower_bound.tolist() == [3.0]


# --------------------------------------------------------------------------------------
# JESA against numba JESA
# --------------------------------------------------------------------------------------
def compare_jesa(result, reference, what):
    assert_energy(result.energy, reference.energy, what)
    for field in ("violation", "dropped", "certified", "mask", "subcarrier"):
        assert_same(getattr(result, field), getattr(reference, field), f"{what} {field}")
    assert_bound(result.lower_bound, reference.lower_bound, what + " lower_bound")


@pytest.mark.parametrize("tied_scores", [False, True], ids=["continuous", "tied-scores"])
def test_jesa_enumerate_matches_numba_jesa(tied_scores):
    rng = np.random.default_rng(31 + tied_scores)
    iterated = fallback = uncertified = 0
    for K, N, k_min, k_max, gamma in configs(rng, 60, 10, 6):
        s = make_scores(rng, 96, K, tied_scores)
        e = make_costs(rng, (96, K, N), tied=False, outage=float(rng.choice([0.0, 0.2, 0.5])))
        max_iterations = int(rng.choice([1, 2, 16]))
        reference = jesa_numpy(s, e, gamma, k_min, k_max, max_iterations)
        result = jesa_enumerate(*tensors(s, e), gamma, k_min, k_max, max_iterations)
        compare_jesa(result, reference, f"K={K} N={N} k={k_min}..{k_max} gamma={gamma} it={max_iterations}")
        iterated += int((reference.iterations > 1).sum())
        uncertified += int((~reference.certified & ~reference.violation).sum())
        fallback += int((reference.violation & ~np.isnan(reference.lower_bound)).sum())
    # the iterative phase, its uncertified results and the P2 fallback after it were exercised
    assert iterated > 0 and uncertified > 0 and fallback > 0


def test_jesa_enumerate_with_tied_costs_is_a_valid_p2_answer():
    """Cost ties let JESA pick other equally good sets and follow another path, so check what
    must hold for any such path: a feasible, correctly costed selection, never below the
    optimum, equal to it when certified, with the same infeasibility verdict when P1 under c*
    is infeasible."""
    rng = np.random.default_rng(41)
    for K, N, k_min, k_max, gamma in configs(rng, 30, 8, 6):
        s = make_scores(rng, 64, K, tied=True)
        e = make_costs(rng, (64, K, N), tied=True, outage=0.2)
        result = jesa_enumerate(*tensors(s, e), gamma, k_min, k_max)
        optimum = optimal_enumerate(*tensors(s, e), gamma, k_min, k_max)
        mask, sub = result.mask.numpy(), result.subcarrier.numpy()
        assert ((sub >= 0) == mask).all()
        for b in range(64):
            used = sub[b][mask[b]]
            assert len(set(used.tolist())) == used.size  # distinct subcarriers
            assert np.isclose(result.energy[b].item(), e[b, mask[b], used].sum(), rtol=RTOL)
        ok = ~result.violation.numpy()
        assert (s[ok] * mask[ok]).sum(1).min(initial=1.0) >= gamma - RELEVANCE_TOL
        assert (~optimum.violation.numpy() | ~ok).all()  # never feasible where P2 is not
        e_opt, e_jesa = optimum.energy.numpy(), result.energy.numpy()
        both = ok & ~optimum.violation.numpy()
        assert (e_jesa[both] >= e_opt[both] * (1 - RTOL)).all()
        sure = result.certified.numpy()
        assert np.allclose(e_jesa[sure], e_opt[sure], rtol=RTOL)
        reference = jesa_numpy(s, e, gamma, k_min, k_max)
        lower_known = ~np.isnan(reference.lower_bound)
        assert_bound(result.lower_bound, reference.lower_bound, "lower_bound")  # P1 optimum: unique
        assert_same(result.violation[~torch.from_numpy(lower_known)], reference.violation[~lower_known], "violation")


# --------------------------------------------------------------------------------------
# the device code path, dtypes, empty batches
# --------------------------------------------------------------------------------------
def test_device_path_without_row_compaction_gives_the_same_results(monkeypatch):
    """Off the CPU, rows are frozen by torch.where instead of compacted: same math, same answer."""
    rng = np.random.default_rng(3)
    s = make_scores(rng, 200, 8, tied=False)
    e = make_costs(rng, (200, 8, 3), tied=False, outage=0.3)
    compacted = jesa_enumerate(*tensors(s, e), 0.6, 1, 3)
    monkeypatch.setattr(enum, "_active_rows", lambda active: None)
    frozen = jesa_enumerate(*tensors(s, e), 0.6, 1, 3)
    for field in ("mask", "subcarrier", "energy", "violation", "dropped", "certified", "lower_bound"):
        torch.testing.assert_close(getattr(frozen, field), getattr(compacted, field), rtol=0, atol=0, equal_nan=True)
    assert (jesa_numpy(s, e, 0.6, 1, 3).iterations > 1).any()  # the frozen rounds mattered


def test_float32_inputs_are_solved_in_float64():
    rng = np.random.default_rng(8)
    s32 = torch.from_numpy(make_scores(rng, 64, 6, tied=False)).float()
    e32 = torch.from_numpy(make_costs(rng, (64, 6, 4), tied=False, outage=0.1)).float()
    s, e = s32.double().numpy(), e32.double().numpy()
    reference = jesa_numpy(s, e, 0.7, 1, 3)
    compare_jesa(jesa_enumerate(s32, e32, 0.7, 1, 3), reference, "float32 jesa")
    des_result = des_enumerate(s32, e32.amin(2), 0.7, 1, 3)
    assert des_result.energy.dtype == torch.float64
    assert_energy(des_result.energy, des_numpy(s, e.min(2), 0.7, 1, 3)[1], "float32 des")


@pytest.mark.parametrize("B", [0, 3])
def test_selection_fields_have_the_documented_shapes_dtypes_and_constants(B):
    s = torch.full((B, 4), 0.25)
    e = torch.ones(B, 4, 5)
    for result in (des_enumerate(s, e[:, :, 0], 0.5, 1, 2), optimal_enumerate(s, e, 0.5, 1, 2), jesa_enumerate(s, e, 0.5, 1, 2)):
        assert result.mask.shape == result.subcarrier.shape == result.failed.shape == (B, 4)
        assert result.mask.dtype == result.failed.dtype == torch.bool and result.subcarrier.dtype == torch.int64
        assert result.energy.dtype == result.lower_bound.dtype == torch.float64 and result.energy.shape == (B,)
        assert result.nodes.dtype == torch.int64 and not result.nodes.any() and not result.failed.any()
        assert result.mask.sum(1).eq(2).all() and result.energy.eq(2.0).all()
    assert des_enumerate(s, e[:, :, 0], 0.5, 1, 2).subcarrier.eq(-1).all()


# --------------------------------------------------------------------------------------
# no host sync in the solvers
# --------------------------------------------------------------------------------------
SYNCING = re.compile(r"\.item\(|\.tolist\(|\.cpu\(|\.numpy\(|nonzero\(|\bbool\(|\bfloat\(|\bint\(")


def test_solvers_read_no_tensor_values_outside_the_cpu_compaction_helper():
    """The lead also runs them under torch.cuda.set_sync_debug_mode("error") on a GPU."""
    tree = ast.parse(inspect.getsource(enum))
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    assert {"des_enumerate", "optimal_enumerate", "jesa_enumerate", "_active_rows"} <= {f.name for f in functions}
    source = inspect.getsource(enum).splitlines()
    for function in functions:
        if function.name == "_active_rows":
            continue
        body = "\n".join(source[function.lineno - 1 : function.end_lineno])
        assert not SYNCING.search(body), f"{function.name} may sync: {SYNCING.search(body).group(0)}"
    helper = next(f for f in functions if f.name == "_active_rows")
    assert 'device.type != "cpu"' in "\n".join(source[helper.lineno - 1 : helper.end_lineno])


# --------------------------------------------------------------------------------------
# many more instances (DMOE_SLOW=1)
# --------------------------------------------------------------------------------------
@pytest.mark.skipif(os.environ.get("DMOE_SLOW") != "1", reason="set DMOE_SLOW=1 for the long run")
def test_many_instances_match_numba():
    rng = np.random.default_rng(2024)
    for K, N, k_min, k_max, gamma in itertools.islice(configs(rng, 10_000, 16, 16), 400):
        s = make_scores(rng, 256, K, tied=bool(rng.random() < 0.3))
        e = make_costs(rng, (256, K, N), tied=False, outage=float(rng.choice([0.0, 0.1, 0.4])))
        compare_jesa(jesa_enumerate(*tensors(s, e), gamma, k_min, k_max), jesa_numpy(s, e, gamma, k_min, k_max), f"K={K} N={N}")
        mask, energy, violation, _, _, _ = des_numpy(s, e.min(2), gamma, k_min, k_max)
        result = des_enumerate(*tensors(s, e.min(2)), gamma, k_min, k_max)
        assert_energy(result.energy, energy, f"des K={K}")
        assert_same(result.mask, mask, f"des K={K} mask")
