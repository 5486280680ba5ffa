"""apply_delivery: selected links the true channel cannot carry fail and cost P_ap * T_max."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch

from dmoe_torch.channel import ChannelConfig, WirelessChannel
from dmoe_torch.selection import route
from dmoe_torch.selection.common import empty_selection
from dmoe_torch.selection.delivery import apply_delivery

FAIL = 2e-4  # J per failed attempt


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, nan == nan (lower_bound is nan for baselines)."""
    return a.dtype == b.dtype and a.shape == b.shape and bool(((a == b) | (a != a) & (b != b)).all())


def small_case():
    """Two rows, K = 3 experts, N = 3 subcarriers, costs 1..18 uJ, all finite."""
    costs = (torch.arange(1, 19, dtype=torch.float64) * 1e-6).reshape(2, 3, 3)
    sel = empty_selection(2, 3)
    # row 0: experts 0 (subcarrier 2) and 2 (subcarrier 0); row 1: expert 1 on subcarrier 1.
    sel.mask[0, 0] = sel.mask[0, 2] = sel.mask[1, 1] = True
    sel.subcarrier[0, 0], sel.subcarrier[0, 2], sel.subcarrier[1, 1] = 2, 0, 1
    sel.energy[0] = costs[0, 0, 2] + costs[0, 2, 0]  # 3 + 7 uJ
    sel.energy[1] = costs[1, 1, 1]  # 14 uJ
    return sel, costs


def test_energy_accounting_against_hand_computed_case():
    sel, costs = small_case()
    delivered = torch.ones(2, 3, 3, dtype=torch.bool)
    delivered[0, 2, 0] = False  # row 0, expert 2 on its subcarrier 0: lost
    delivered[0, 1, :] = False  # expert 1 is not selected in row 0: irrelevant
    delivered[1, 1, 0] = False  # row 1, expert 1 is on subcarrier 1, not 0: irrelevant
    out = apply_delivery(sel, costs, delivered, FAIL)
    assert out.failed.tolist() == [[False, False, True], [False, False, False]]
    assert out.energy[0].item() == pytest.approx(3e-6 + FAIL, rel=1e-12)  # 7 uJ replaced by the failure
    assert out.energy[1].item() == sel.energy[1].item()
    assert out.dropped.tolist() == [False, False]
    assert torch.equal(out.mask, sel.mask) and torch.equal(out.subcarrier, sel.subcarrier)


def test_all_links_lost_drops_the_row():
    sel, costs = small_case()
    delivered = torch.ones(2, 3, 3, dtype=torch.bool)
    delivered[1] = False
    out = apply_delivery(sel, costs, delivered, FAIL)
    assert out.failed[1].tolist() == [False, True, False]
    assert out.energy[1].item() == FAIL
    assert out.dropped.tolist() == [False, True] and out.violation.tolist() == [False, True]
    # untouched row: every field unchanged, bit for bit
    for f in fields(sel):
        assert same(getattr(out, f.name)[0], getattr(sel, f.name)[0]), f.name


def test_already_failed_links_keep_their_energy():
    sel, costs = small_case()
    sel.failed[0, 0] = True  # a channel-unaware policy's failed attempt, already counted
    sel.energy[0] = FAIL + costs[0, 2, 0]
    delivered = torch.zeros(2, 3, 3, dtype=torch.bool)  # nothing delivered
    out = apply_delivery(sel, costs, delivered, FAIL)
    assert out.failed.tolist() == [[True, False, True], [False, True, False]]
    assert out.energy.tolist() == pytest.approx([2 * FAIL, FAIL], rel=1e-12)
    assert out.dropped.all()


def test_perfect_delivery_is_the_identity():
    torch.manual_seed(0)
    ch = WirelessChannel(ChannelConfig(d_min_m=200, d_max_m=300), num_devices=8, d_model=128, seed=1)
    state = ch.link_state(torch.arange(64), layer=0, stream=0)
    scores = torch.softmax(torch.randn(64, 8), dim=1)
    for policy in ("topk", "jesa"):
        sel = route(policy, scores, state.planned_costs, k=2, gamma=0.8, failure_energy=FAIL)
        assert sel.failed.any() or policy == "jesa"  # topk meets real outages here
        out = apply_delivery(sel, state.planned_costs, state.delivered, FAIL)
        for f in fields(sel):
            assert same(getattr(out, f.name), getattr(sel, f.name)), (policy, f.name)


def test_imperfect_csi_energy_matches_recount():
    """With CSI error, the realised energy of each row is its delivered planned costs + failures."""
    torch.manual_seed(1)
    ch = WirelessChannel(ChannelConfig(csi_error_std=0.3), num_devices=8, d_model=128, seed=2)
    state = ch.link_state(torch.arange(400), layer=0, stream=0)
    scores = torch.softmax(torch.randn(400, 8), dim=1)
    sel = route("jesa", scores, state.planned_costs, gamma=0.8, failure_energy=FAIL)
    out = apply_delivery(sel, state.planned_costs, state.delivered, FAIL)
    new = out.failed & ~sel.failed
    assert new.any()  # the naive plan meets outages under eps = 0.3
    link = state.planned_costs.gather(2, out.subcarrier.clamp(min=0).unsqueeze(2)).squeeze(2)
    expected = torch.where(out.mask & ~out.failed, link, torch.zeros_like(link)).sum(1) + FAIL * out.failed.sum(1).double()
    assert torch.allclose(out.energy, expected, rtol=1e-12, atol=0)
    untouched = ~new.any(1)
    assert torch.equal(out.energy[untouched], sel.energy[untouched])
    # a failed link is exactly a selected link whose true channel misses the planned rate
    link_ok = state.delivered.gather(2, out.subcarrier.clamp(min=0).unsqueeze(2)).squeeze(2)
    assert torch.equal(new, sel.mask & ~sel.failed & ~link_ok)


def test_bad_inputs_name_the_argument():
    sel, costs = small_case()
    with pytest.raises(ValueError, match="delivered"):
        apply_delivery(sel, costs, torch.ones(2, 3, 3), FAIL)
    with pytest.raises(ValueError, match="planned_costs"):
        apply_delivery(sel, costs[:, :, :2], torch.ones(2, 3, 3, dtype=torch.bool), FAIL)
    with pytest.raises(ValueError, match="failure_energy"):
        apply_delivery(sel, costs, torch.ones(2, 3, 3, dtype=torch.bool), math.nan)
