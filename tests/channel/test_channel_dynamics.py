"""Time-correlated (Jakes) fading, imperfect CSI and the conservative planning gain.

Statistical tolerances.  A Jakes link keeps its sinusoid amplitudes for the whole stream, so
frames of one link are not independent samples; where a tolerance is "k standard errors",
the standard error is measured across links (independent by construction), which accounts
for that.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import j0
from scipy.stats import ncx2

from dmoe_torch.channel import (
    ChannelConfig,
    WirelessChannel,
    conservative_power,
    jakes_fading,
    jakes_power_gains,
)
from dmoe_torch.channel.csi import rice_quantile_excess

DOPPLER_HZ, FRAME_S = 50.0, 1e-3  # f_D * frame_s = 0.05: 20 frames per Doppler period


def jakes_cfg(**kw) -> ChannelConfig:
    return ChannelConfig(fading="jakes", doppler_hz=DOPPLER_HZ, frame_s=FRAME_S, **kw)


# --------------------------------------------------------------------------------------------
# Jakes fading: correlation in time, Rayleigh marginal, purity


def test_jakes_autocorrelation_matches_bessel():
    """E[h h*(tau)] = J0(2 pi f_D tau) and corr(|h|^2, |h(tau)|^2) = J0^2, within 0.03."""
    frames = np.arange(3000)
    h = np.concatenate(
        [jakes_fading(4, 0, layer, frames, 16, 32, DOPPLER_HZ, FRAME_S).reshape(3000, -1) for layer in range(2)], axis=1
    )
    g = np.abs(h) ** 2
    gc = g - g.mean()
    lags = (1, 2, 3, 5, 8, 10, 12, 20, 30)
    for lag in lags:
        x = 2 * math.pi * DOPPLER_HZ * lag * FRAME_S
        field = np.mean(h[:-lag] * np.conj(h[lag:])).real / np.mean(np.abs(h) ** 2)
        power = np.mean(gc[:-lag] * gc[lag:]) / np.mean(gc**2)
        assert abs(field - j0(x)) < 0.03, (lag, field, j0(x))
        assert abs(power - j0(x) ** 2) < 0.03, (lag, power, j0(x) ** 2)
    # the lags probe a negative J0 and a near-zero J0^2, not only the easy region near 1
    assert j0(2 * math.pi * DOPPLER_HZ * 10 * FRAME_S) < -0.3 and j0(2 * math.pi * DOPPLER_HZ * 8 * FRAME_S) ** 2 < 0.01


def test_jakes_marginal_is_exponential():
    """|h|^2 ~ Exp(1): CDF at several points within 5 standard errors (measured across links)."""
    frames = np.arange(100) * 997  # about 50 Doppler periods apart
    g = jakes_power_gains(9, 1, 0, frames, 64, 64, DOPPLER_HZ, FRAME_S).reshape(100, -1)  # 4096 links
    links = g.shape[1]
    for x in (0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 4.0):
        per_link = (g < x).mean(0)
        stderr = per_link.std() / math.sqrt(links)
        assert abs(per_link.mean() - (1 - math.exp(-x))) < 5 * stderr + 1e-4, x
    per_link_mean = g.mean(0)
    assert abs(per_link_mean.mean() - 1.0) < 5 * per_link_mean.std() / math.sqrt(links)
    assert abs(g.var() - 1.0) < 0.03


def test_jakes_is_a_pure_function_of_the_frame():
    rng = np.random.default_rng(0)
    frames = rng.choice(3_000_000, 300, replace=False)
    whole = jakes_fading(1, 2, 3, frames, 4, 8, DOPPLER_HZ, FRAME_S)
    order = rng.permutation(300)
    shuffled = jakes_fading(1, 2, 3, frames[order], 4, 8, DOPPLER_HZ, FRAME_S)
    assert np.array_equal(shuffled, whole[order])
    pieces = np.concatenate([jakes_fading(1, 2, 3, frames[i : i + 7], 4, 8, DOPPLER_HZ, FRAME_S) for i in range(0, 300, 7)])
    assert np.array_equal(pieces, whole)
    # different seed / stream / layer: a different process
    assert not np.allclose(whole, jakes_fading(1, 2, 4, frames, 4, 8, DOPPLER_HZ, FRAME_S))
    assert not np.allclose(whole, jakes_fading(1, 3, 3, frames, 4, 8, DOPPLER_HZ, FRAME_S))
    assert not np.allclose(whole, jakes_fading(2, 2, 3, frames, 4, 8, DOPPLER_HZ, FRAME_S))
    # the fast (tabulated) evaluation equals the sum of sinusoids evaluated directly
    assert np.allclose(whole, direct_jakes(1, 2, 3, frames, 4, 8), rtol=0, atol=1e-9)


def direct_jakes(seed, stream, layer, frames, K, N):
    """The Jakes sum of sinusoids evaluated term by term (reference for the fast path)."""
    from dmoe_torch.channel.fading import JAKES_SINUSOIDS as M
    from dmoe_torch.channel.fading import TAG_JAKES, stream_key, uniforms

    u = uniforms(stream_key(seed, stream, layer, TAG_JAKES), np.arange(K * N), 4 * M + 1)
    theta = math.pi * (2 * u[:, 0] - 1)
    angle = (2 * math.pi * np.arange(1, M + 1)[None, :] - math.pi + theta[:, None]) / (4 * M)  # [L, M]
    phase_c, phase_s = 2 * math.pi * u[:, 1 : M + 1], 2 * math.pi * u[:, M + 1 : 2 * M + 1]
    amp_c, amp_s = np.sqrt(-np.log(u[:, 2 * M + 1 : 3 * M + 1])), np.sqrt(-np.log(u[:, 3 * M + 1 :]))
    w = 2 * math.pi * DOPPLER_HZ * frames[:, None, None] * FRAME_S
    real = (amp_c * np.cos(w * np.cos(angle) + phase_c)).sum(-1)
    imag = (amp_s * np.cos(w * np.sin(angle) + phase_s)).sum(-1)
    return ((real + 1j * imag) / math.sqrt(M)).reshape(len(frames), K, N)


@pytest.mark.parametrize(
    "cfg", [jakes_cfg(), jakes_cfg(csi_error_std=0.2, csi_delay_frames=3), ChannelConfig(csi_error_std=0.3, csi_delay_frames=1)]
)
def test_link_state_is_independent_of_batch_split_and_order(cfg):
    ch = WirelessChannel(cfg, num_devices=4, d_model=64, seed=3)
    ids = torch.tensor([5, 900, 3, 41, 0, 1, 2, 77777])
    whole = ch.link_state(ids, layer=1, stream=2, outage_target=0.05)
    parts = [ch.link_state(ids[i : i + 3], 1, 2, 0.05) for i in range(0, 8, 3)]
    assert torch.equal(torch.cat([p.planned_costs for p in parts]), whole.planned_costs)
    assert torch.equal(torch.cat([p.delivered for p in parts]), whole.delivered)
    flipped = ch.link_state(ids.flip(0), 1, 2, 0.05)
    assert torch.equal(flipped.planned_costs.flip(0), whole.planned_costs)
    assert torch.equal(flipped.delivered.flip(0), whole.delivered)


# --------------------------------------------------------------------------------------------
# Perfect CSI reproduces the static model


def test_iid_perfect_csi_reproduces_costs_bit_for_bit():
    ch = WirelessChannel(ChannelConfig(d_min_m=200, d_max_m=300), num_devices=8, d_model=128, seed=11)
    ids = torch.arange(3000) * 3 + 1
    costs = ch.costs(ids, layer=1, stream=2)
    assert torch.isinf(costs).any() and torch.isfinite(costs).any()
    for target in (None, 0.05):  # perfect CSI: rho = 1, the conservative gain is the gain itself
        state = ch.link_state(ids, layer=1, stream=2, outage_target=target)
        assert state.planned_costs.dtype == torch.float64 and state.planned_costs.shape == (3000, 8, 16)
        assert torch.equal(state.planned_costs, costs)
        assert torch.equal(state.delivered, torch.isfinite(costs))
    several = ch.link_states(ids, 1, 2, [None, 0.05])
    assert all(torch.equal(s.planned_costs, costs) for s in several)


def test_jakes_perfect_csi_delivers_every_finite_link():
    ch = WirelessChannel(jakes_cfg(d_min_m=200, d_max_m=300), num_devices=8, d_model=128, seed=0)
    ids = torch.arange(2000)
    state = ch.link_state(ids, 0, 0)
    assert torch.equal(state.planned_costs, ch.costs(ids, 0, 0))
    assert torch.equal(state.delivered, torch.isfinite(state.planned_costs))


# --------------------------------------------------------------------------------------------
# Imperfect CSI


@pytest.mark.parametrize(
    "cfg",
    [
        ChannelConfig(csi_error_std=0.3),
        ChannelConfig(csi_error_std=0.1, csi_delay_frames=2),  # iid: the old channel says nothing
        jakes_cfg(csi_error_std=0.3),
        jakes_cfg(csi_error_std=0.1, csi_delay_frames=3),
        jakes_cfg(csi_delay_frames=10),  # J0 < 0: rho is negative
    ],
)
def test_estimate_correlates_with_the_truth_as_rho(cfg):
    """corr(|h|^2, |h_hat|^2) = |rho|^2 for jointly circular Gaussian h, h_hat."""
    ch = WirelessChannel(cfg, num_devices=8, d_model=128, seed=5)
    eps, D = cfg.csi_error_std, cfg.csi_delay_frames
    lag = 1.0 if D == 0 else (0.0 if cfg.fading == "iid" else j0(2 * math.pi * cfg.doppler_hz * D * cfg.frame_s))
    assert ch.csi_correlation == pytest.approx(math.sqrt(1 - eps**2) * lag, abs=1e-15)
    ids = np.arange(2000) * 53
    pairs = [ch.true_and_estimated_power(ids, layer, 0) for layer in range(4)]
    true = np.concatenate([p[0].ravel() for p in pairs])
    est = np.concatenate([p[1].ravel() for p in pairs])
    assert abs(np.corrcoef(true, est)[0, 1] - ch.csi_correlation**2) < 0.02
    per_link = np.stack([p[1].reshape(len(ids), -1).mean(0) for p in pairs]).ravel()  # E|h_hat|^2 per link
    assert abs(per_link.mean() - 1.0) < 5 * per_link.std() / math.sqrt(len(per_link))  # h_hat is CN(0, 1) too
    # true and estimated power are exchangeable: the naive plan fails half the time
    assert abs((true < est).mean() - 0.5) < 0.01


@pytest.mark.parametrize(
    "cfg",
    [
        ChannelConfig(csi_error_std=0.1),
        ChannelConfig(csi_error_std=0.3),
        ChannelConfig(csi_error_std=0.3, csi_delay_frames=1),
        jakes_cfg(csi_error_std=0.1),
        jakes_cfg(csi_error_std=0.3),
        jakes_cfg(csi_error_std=0.1, csi_delay_frames=3),
        jakes_cfg(csi_error_std=0.3, csi_delay_frames=5),
    ],
)
def test_conservative_plan_realises_the_outage_target(cfg):
    """P(true gain < planned gain) = q, within 5 standard errors (measured across links)."""
    cfg.d_min_m, cfg.d_max_m = 50.0, 60.0  # strong links: no plan misses the latency budget
    ch = WirelessChannel(cfg, num_devices=8, d_model=128, seed=7)
    ids = torch.arange(2000) * 29
    targets = (0.05, 0.01)
    lost = {q: [] for q in targets}
    for layer in range(4):
        for q, state in zip(targets, ch.link_states(ids, layer, 0, targets), strict=True):
            assert torch.isfinite(state.planned_costs).all()
            lost[q].append((~state.delivered).double().mean(0).reshape(-1))  # per-link outage rate
    for q in targets:
        rates = torch.cat(lost[q])
        stderr = rates.std().item() / math.sqrt(len(rates))
        assert abs(rates.mean().item() - q) < 5 * stderr, (q, rates.mean().item(), stderr)
    naive = ch.link_state(ids, 0, 0)  # trusting the estimate: far above the target
    assert (~naive.delivered).double().mean() > 0.3


def test_delivered_is_true_gain_at_least_planned_gain():
    ch = WirelessChannel(jakes_cfg(csi_error_std=0.2, csi_delay_frames=2, d_max_m=500), 8, 128, seed=1)
    ids = np.arange(500)
    true, est = ch.true_and_estimated_power(ids, 0, 0)
    plan = conservative_power(est, ch.csi_correlation, 0.05)
    state = ch.link_state(ids, 0, 0, outage_target=0.05)
    assert torch.equal(state.planned_costs, ch.costs_from_gains(torch.from_numpy(plan) * ch.mean_gain[None, :, None]))
    finite = torch.isfinite(state.planned_costs)
    assert (~finite).any()  # far devices: some plans miss the latency budget and are never delivered
    assert torch.equal(state.delivered, torch.from_numpy(true >= plan) & finite)


# --------------------------------------------------------------------------------------------
# The conservative gain


def test_rice_quantile_table_matches_scipy():
    rng = np.random.default_rng(0)
    nu = np.concatenate([[0.0, 1e-3, 60.0, 60.5], rng.random(500) * 3, rng.random(500) * 60, 60 + rng.random(50) * 140])
    for q in (0.05, 0.01, 0.001):
        exact = np.sqrt(ncx2.ppf(q, 2, nu * nu)) - nu
        assert np.abs(rice_quantile_excess(nu, q) - exact).max() < 2e-5


def test_conservative_power_special_cases_and_monotonicity():
    est = np.random.default_rng(1).exponential(size=(50, 4, 3))
    assert conservative_power(est, 1.0, 0.05) is est  # perfect CSI: the estimate itself
    assert np.allclose(conservative_power(est, 0.0, 0.05), -math.log(0.95), rtol=1e-14, atol=0)  # Exp(1) quantile
    rho = 0.9
    s = (1 - rho**2) / 2
    exact = s * ncx2.ppf(0.05, 2, rho**2 * est / s)
    assert np.allclose(conservative_power(est, rho, 0.05), exact, rtol=1e-4)
    assert np.allclose(conservative_power(est, -rho, 0.05), exact, rtol=1e-4)  # only rho^2 matters
    grid = np.linspace(0, 20, 2001)
    plan = conservative_power(grid, rho, 0.05)
    assert np.all(np.diff(plan) > 0)  # a better estimate never plans a lower gain
    strong = grid >= 1.0
    assert np.all(plan[strong] < grid[strong]) and plan[0] > 0  # backs off, but h_hat = 0 still plans > 0
    assert np.all(conservative_power(grid, rho, 0.01) < plan)  # a stricter target plans lower


# --------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("fading", "rayleigh", r"channel\.fading='rayleigh': must be one of iid, jakes"),
        ("fading", 3, r"channel\.fading=3"),
        ("doppler_hz", -1.0, r"channel\.doppler_hz=-1\.0"),
        ("doppler_hz", float("inf"), r"channel\.doppler_hz"),
        ("frame_s", 0.0, r"channel\.frame_s=0\.0"),
        ("csi_error_std", 1.0, r"channel\.csi_error_std=1\.0: must be in \[0, 1\)"),
        ("csi_error_std", -0.1, r"channel\.csi_error_std"),
        ("csi_delay_frames", -1, r"channel\.csi_delay_frames=-1"),
        ("csi_delay_frames", 1.5, r"channel\.csi_delay_frames=1\.5"),
        ("csi_delay_frames", True, r"channel\.csi_delay_frames"),
    ],
)
def test_bad_dynamics_field_is_named(field, value, match):
    with pytest.raises(ValueError, match=match) as err:
        ChannelConfig(**{field: value}).validate()
    assert "\n" not in str(err.value)


def test_jakes_needs_a_doppler_shift():
    with pytest.raises(ValueError, match=r"channel\.doppler_hz=0\.0: must be > 0 with channel\.fading='jakes'"):
        ChannelConfig(fading="jakes").validate()
    ChannelConfig(fading="iid", doppler_hz=0.0).validate()
    ChannelConfig(fading="jakes", doppler_hz=5.0).validate()


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, True, "0.05", float("nan")])
def test_bad_outage_target_is_named(target):
    ch = WirelessChannel(ChannelConfig(), 2, 8, 0)
    with pytest.raises(ValueError, match="outage_target"):
        ch.link_state([0, 1], 0, 0, outage_target=target)


def test_negative_frame_ids_are_rejected():
    ch = WirelessChannel(jakes_cfg(csi_delay_frames=2), 2, 8, 0)
    with pytest.raises(ValueError, match="frame_ids"):
        ch.link_state([3, -1], 0, 0)
    ch.link_state([0, 1], 0, 0)  # frames before the delay reaches back are fine (t < 0 is valid)
