import math

import numpy as np
import pytest
import torch

from dmoe_torch.channel import (
    ChannelConfig,
    WirelessChannel,
    db_to_linear,
    dbm_to_watt,
    linear_to_db,
    path_loss_db,
    rayleigh_power_gains,
)


def test_rayleigh_power_gain_is_unit_mean_exponential():
    g = rayleigh_power_gains(seed=3, stream=0, layer=0, sample_ids=range(4000), num_devices=8, num_subcarriers=16)
    assert g.shape == (4000, 8, 16)
    n = g.size
    # Exp(1): mean 1, variance 1; 5 standard errors.
    assert abs(g.mean() - 1.0) < 5 / math.sqrt(n)
    assert abs(g.var() - 1.0) < 5 * math.sqrt(8 / n)
    # CDF at a few points against 1 - exp(-x).
    for x in (0.05, 0.5, 1.0, 3.0):
        assert abs((g < x).mean() - (1 - math.exp(-x))) < 0.005


def _splitmix64(x: int) -> int:
    """Reference SplitMix64 finaliser on Python ints (independent of the numpy version)."""
    mask = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_iid_draw_is_the_documented_counter_hash():
    """|h|^2 = -log(u), u from 53 bits of SplitMix64(SplitMix64(counter ^ key)) (the original model)."""
    seed, stream, layer, K, N = 5, 2, 1, 3, 4
    key = 0
    for part in (seed, stream, layer):
        key = _splitmix64(key ^ part)
    ids = [0, 7, 123456]
    g = rayleigh_power_gains(seed, stream, layer, ids, K, N)
    for r, frame in enumerate(ids):
        for link in range(K * N):
            bits = _splitmix64(_splitmix64((frame * K * N + link) ^ key))
            u = ((bits >> 11) + 0.5) / 2.0**53
            assert g[r, link // N, link % N] == pytest.approx(-math.log(u), rel=1e-15)


def test_fading_independent_across_links_and_streams():
    g = rayleigh_power_gains(0, 0, 0, range(5000), 2, 2).reshape(5000, 4)
    corr = np.corrcoef(g.T)
    assert np.abs(corr - np.eye(4)).max() < 0.05
    other_layer = rayleigh_power_gains(0, 0, 1, range(5000), 2, 2).reshape(5000, 4)
    other_stream = rayleigh_power_gains(0, 1, 0, range(5000), 2, 2).reshape(5000, 4)
    other_seed = rayleigh_power_gains(1, 0, 0, range(5000), 2, 2).reshape(5000, 4)
    for other in (other_layer, other_stream, other_seed):
        assert abs(np.corrcoef(g[:, 0], other[:, 0])[0, 1]) < 0.05


def test_draws_depend_only_on_sample_id_not_on_batch():
    ch = WirelessChannel(ChannelConfig(), num_devices=4, d_model=32, seed=7)
    ids = torch.tensor([5, 900, 3, 41])
    together = ch.costs(ids, layer=1, stream=2)
    one_by_one = torch.cat([ch.costs(ids[i : i + 1], layer=1, stream=2) for i in range(4)])
    reordered = ch.costs(ids.flip(0), layer=1, stream=2).flip(0)
    assert torch.equal(together, one_by_one)
    assert torch.equal(together, reordered)
    again = WirelessChannel(ChannelConfig(), num_devices=4, d_model=32, seed=7).costs(ids, 1, 2)
    assert torch.equal(together, again)
    assert not torch.equal(together, ch.costs(ids, layer=0, stream=2))


def test_path_loss_formula():
    assert path_loss_db(1000.0) == pytest.approx(128.1)
    assert path_loss_db(100.0) == pytest.approx(128.1 - 37.6)
    d = torch.tensor([50.0, 300.0], dtype=torch.float64)
    assert torch.allclose(path_loss_db(d), 128.1 + 37.6 * torch.log10(d / 1000))


def test_db_helpers_round_trip():
    assert db_to_linear(10.0) == pytest.approx(10.0)
    assert linear_to_db(100.0) == pytest.approx(20.0)
    assert dbm_to_watt(30.0) == pytest.approx(1.0)
    # sigma2 = N0 B NF: -174 dBm/Hz + 60 dB(1 MHz) + 9 dB = -105 dBm
    assert ChannelConfig().noise_power_w == pytest.approx(dbm_to_watt(-105.0))


def test_geometry_within_cell_and_seeded():
    cfg = ChannelConfig(d_min_m=50, d_max_m=300)
    ch = WirelessChannel(cfg, num_devices=2000, d_model=8, seed=1)
    d = ch.distances_m
    assert d.min() >= 50 and d.max() <= 300
    # Uniform over the annulus area: P(d < r) = (r^2 - dmin^2) / (dmax^2 - dmin^2).
    r = 200.0
    expected = (r**2 - 50**2) / (300**2 - 50**2)
    assert abs((d < r).double().mean().item() - expected) < 0.04
    assert torch.equal(d, WirelessChannel(cfg, 2000, 8, seed=1).distances_m)
    assert not torch.equal(d, WirelessChannel(cfg, 2000, 8, seed=2).distances_m)


def test_outage_rate_matches_rayleigh_closed_form():
    cfg = ChannelConfig(d_min_m=250, d_max_m=300)
    ch = WirelessChannel(cfg, num_devices=4, d_model=128, seed=0)
    costs = ch.costs(torch.arange(20000), layer=0, stream=0)
    measured = torch.isinf(costs).double().mean(dim=(0, 2))
    expected = ch.outage_probability()
    assert (expected > 0.01).all()  # the test is meaningful only with real outages
    n = 20000 * cfg.num_subcarriers
    tol = 5 * torch.sqrt(expected * (1 - expected) / n)
    assert ((measured - expected).abs() < tol).all(), (measured, expected)


def test_energy_formula_and_monotone_in_distance():
    cfg = ChannelConfig()
    ch = WirelessChannel(cfg, num_devices=1, d_model=128, seed=0)
    gains = torch.logspace(-13, -9, 50, dtype=torch.float64).reshape(1, 50)
    e = ch.costs_from_gains(gains)
    finite = torch.isfinite(e)
    assert finite.any() and (~finite).any()
    snr = 0.2 * gains / cfg.noise_power_w
    rate = cfg.subcarrier_bandwidth_hz * torch.log2(1 + snr)
    expected = 128 * 16 * (0.2 / rate + 0.2 / rate)
    assert torch.allclose(e[finite], expected[finite], rtol=1e-12)
    # outage exactly where the hop time exceeds the budget
    assert torch.equal(~finite, 128 * 16 / rate > cfg.latency_budget_s)
    # larger gain (shorter distance, same fading) -> strictly less energy
    assert (e[finite][1:] < e[finite][:-1]).all()
    # same fading draw, devices sorted by distance -> energy sorted too
    far = WirelessChannel(cfg, 16, 128, seed=3)
    order = torch.argsort(far.distances_m)
    fixed = torch.ones(1, 16, 1, dtype=torch.float64) * far.mean_gain[None, :, None]
    e_dist = far.costs_from_gains(fixed)[0, order, 0]
    assert (e_dist[1:] >= e_dist[:-1]).all()


def test_default_operating_point_is_meaningful():
    """The defaults of docs/method.md section 1: about 20 dB mean SNR at 300 m, tens of uJ per hop, a few % outage."""
    cfg = ChannelConfig()
    snr_db = linear_to_db(cfg.ap_power_w * db_to_linear(-path_loss_db(300.0)) / cfg.noise_power_w)
    assert 18 < snr_db < 22
    ch = WirelessChannel(ChannelConfig(d_min_m=299, d_max_m=300), 1, 128, 0)
    p = ch.outage_probability().item()
    assert 0.01 < p < 0.1
    e = ch.costs(torch.arange(2000), 0, 0)
    median_hop_uj = e[torch.isfinite(e)].median().item() / 2 * 1e6
    assert 10 < median_hop_uj < 200


def test_failure_energy():
    cfg = ChannelConfig(ap_power_w=0.5, latency_budget_s=2e-3)
    assert WirelessChannel(cfg, 2, 8, 0).failure_energy_j == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("num_subcarriers", 0, "channel.num_subcarriers"),
        ("ap_power_w", -0.2, "channel.ap_power_w"),
        ("device_power_w", 0.0, "channel.device_power_w"),
        ("subcarrier_bandwidth_hz", -1.0, "channel.subcarrier_bandwidth_hz"),
        ("latency_budget_s", 0.0, "channel.latency_budget_s"),
        ("d_min_m", 400.0, "channel.d_min_m"),
        ("shadowing_std_db", -1.0, "channel.shadowing_std_db"),
        ("noise_figure_db", float("nan"), "channel.noise_figure_db"),
        ("num_subcarriers", 2.5, "channel.num_subcarriers"),
        ("num_subcarriers", 1e30, "channel.num_subcarriers"),  # an integer value beyond int64
        ("csi_delay_frames", 2**63, "channel.csi_delay_frames"),
        ("frame_s", True, "channel.frame_s"),
        ("fading", "rician", "channel.fading"),
    ],
)
def test_bad_config_is_refused_on_construction_naming_the_field(field, value, match):
    with pytest.raises(ValueError, match=match) as info:
        ChannelConfig(**{field: value})  # not only when a WirelessChannel is built
    assert "\n" not in str(info.value)


def test_a_field_changed_in_place_is_checked_when_the_channel_is_built():
    cfg = ChannelConfig()
    cfg.num_subcarriers = 0
    with pytest.raises(ValueError, match="channel.num_subcarriers=0"):
        WirelessChannel(cfg, 2, 8, 0)


def test_numpy_scalars_are_numbers_like_python_ones():
    numpy_cfg = ChannelConfig(
        num_subcarriers=np.int64(8), d_max_m=np.float32(250.0), csi_delay_frames=np.int32(0), csi_error_std=np.float64(0.0)
    )
    python_cfg = ChannelConfig(num_subcarriers=8, d_max_m=250.0)
    numpy_channel = WirelessChannel(numpy_cfg, np.int64(4), np.int32(16), seed=np.uint8(3))
    python_channel = WirelessChannel(python_cfg, 4, 16, seed=3)
    ids = np.arange(5, dtype=np.int32)
    assert torch.equal(numpy_channel.costs(ids, 0, 0), python_channel.costs(ids.tolist(), 0, 0))
    assert numpy_channel.link_state(ids, 0, 0, outage_target=np.float32(0.1)).planned_costs.shape == (5, 4, 8)
    for bad in (True, 2.0, 0):
        with pytest.raises(ValueError, match="num_devices"):
            WirelessChannel(python_cfg, bad, 16, seed=0)


@pytest.mark.parametrize(
    "frame_ids",
    [[0.2, 0.7, 1.9], np.array([1.0, 2.0]), torch.tensor([0.5]), [True, False]],
    ids=["float list", "float array", "float tensor", "bool list"],
)
def test_frame_ids_must_be_integers(frame_ids):
    channel = WirelessChannel(ChannelConfig(num_subcarriers=4), 2, 8, seed=0)
    # Truncating [0.2, 0.7, 1.9] would silently give the costs of frames [0, 0, 1].
    with pytest.raises(ValueError, match="frame_ids: must be integers"):
        channel.costs(frame_ids, 0, 0)


@pytest.mark.parametrize("frame_ids", [[-1], [2**64], np.array([2**63], dtype=np.uint64)])
def test_frame_ids_must_fit_int64_and_be_non_negative(frame_ids):
    channel = WirelessChannel(ChannelConfig(num_subcarriers=4), 2, 8, seed=0)
    with pytest.raises(ValueError, match=r"frame_ids: must be integers in \[0, 2\*\*63 - 1\]"):
        channel.costs(frame_ids, 0, 0)
