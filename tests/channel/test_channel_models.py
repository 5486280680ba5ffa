"""channel.model = tdl / umi / uma: laws, determinism, CSI on top, validation (no Sionna import;
tests/channel/test_channel_sionna.py compares with Sionna itself)."""

import math
import subprocess
import sys
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy.special import j0

from dmoe_torch.channel import ChannelConfig, WirelessChannel, rayleigh_power_gains, scenario, tdl
from dmoe_torch.channel.geometry import path_loss_db
from dmoe_torch.config import ConfigError, channel_config


def tdl_cfg(**kw):
    return ChannelConfig(**{"model": "tdl", **kw})


def test_rayleigh_default_is_the_original_draw_bit_for_bit():
    cfg = ChannelConfig()
    assert cfg.model == "rayleigh"
    ch = WirelessChannel(cfg, 8, 64, seed=3)
    ids = np.arange(500) * 7
    assert np.array_equal(ch.power_gains(ids, 1, 2), rayleigh_power_gains(3, 2, 1, ids, 8, 16))
    assert torch.equal(ch.path_loss_db, path_loss_db(ch.distances_m))
    assert ch.profile is None and ch.los is None


@pytest.mark.parametrize(
    "cfg",
    [
        tdl_cfg(),
        tdl_cfg(tdl_profile="D"),
        ChannelConfig(model="umi"),
        tdl_cfg(fading="jakes", doppler_hz=20.0),
        tdl_cfg(fading="jakes", doppler_hz=20.0, tdl_profile="E"),
    ],
)
def test_gains_are_a_pure_function_of_the_frame(cfg):
    """Any batch split and order gives the same gains; layer, stream and seed change them."""
    ch = WirelessChannel(cfg, 8, 64, seed=1)
    ids = np.random.default_rng(0).permutation(3000)[:600] * 11
    whole = ch.power_gains(ids, 2, 5)
    order = np.random.default_rng(1).permutation(len(ids))
    parts = [ch.power_gains(ids[order[i : i + 37]], 2, 5) for i in range(0, len(ids), 37)]
    shuffled = np.empty_like(whole)
    shuffled[order] = np.concatenate(parts)
    assert np.array_equal(whole, shuffled)
    assert np.array_equal(whole, WirelessChannel(cfg, 8, 64, seed=1).power_gains(ids, 2, 5))
    for other in (
        ch.power_gains(ids, 3, 5),
        ch.power_gains(ids, 2, 6),
        WirelessChannel(cfg, 8, 64, seed=2).power_gains(ids, 2, 5),
    ):
        assert not np.allclose(whole, other)


@pytest.mark.parametrize(
    "profile,delay_spread,spacing", [("A", 100e-9, 1e6), ("C", 300e-9, 1e6), ("A", 30e-9, 120e3), ("B", 1e-6, 120e3)]
)
def test_tdl_power_has_unit_mean_and_the_theoretical_frequency_correlation(profile, delay_spread, spacing):
    """For Gaussian H, corr(|H_n|^2, |H_m|^2) = |E[H_n H_m*]|^2 (tdl.frequency_correlation)."""
    cfg = tdl_cfg(tdl_profile=profile, delay_spread_s=delay_spread, subcarrier_bandwidth_hz=spacing)
    power = WirelessChannel(cfg, 8, 64, seed=4).power_gains(np.arange(4000), 0, 0).reshape(-1, 16)
    assert abs(power.mean() - 1.0) < 0.02
    assert abs(np.mean(power < 0.1) - (1 - math.exp(-0.1))) < 0.005  # Exp(1) marginal: P(|H|^2 < 0.1)
    for lag in (1, 4):
        theory = abs(tdl.frequency_correlation(tdl.tap_profile(profile), delay_spread, lag * spacing)) ** 2
        measured = np.corrcoef(power[:, :-lag].ravel(), power[:, lag:].ravel())[0, 1]
        assert abs(measured - theory) < 0.03, (lag, measured, theory)


def test_frequency_correlation_falls_with_delay_spread():
    """TDL-A: nearly flat at 30 ns / 120 kHz, |rho|^2 = 0.31 at 1 us / 1 MHz."""
    profile = tdl.tap_profile("A")
    adjacent = [abs(tdl.frequency_correlation(profile, ds, 120e3)) ** 2 for ds in (30e-9, 100e-9, 300e-9, 1e-6)]
    assert adjacent[0] > 0.99 and all(np.diff(adjacent) < 0) and adjacent[-1] < 0.7
    assert abs(tdl.frequency_correlation(profile, 1e-6, 1e6)) ** 2 < 0.35
    assert len(tdl.frequency_basis(profile, 30e-9, 120e3, 16)) < len(tdl.frequency_basis(profile, 1e-6, 1e6, 16))


def test_tdl_jakes_keeps_the_bessel_autocorrelation():
    """Every subcarrier of a Jakes TDL has corr(|H(t)|^2, |H(t + tau)|^2) = J0(2 pi f_D tau)^2."""
    cfg = tdl_cfg(fading="jakes", doppler_hz=50.0)
    ch = WirelessChannel(cfg, 8, 64, seed=6)
    base = np.arange(600) * 1000
    now = ch.power_gains(base, 0, 0).ravel()
    for lag in (2, 5):
        later = ch.power_gains(base + lag, 0, 0).ravel()
        theory = j0(2 * math.pi * 50.0 * lag * cfg.frame_s) ** 2
        assert abs(np.corrcoef(now, later)[0, 1] - theory) < 0.03, lag


@pytest.mark.parametrize(
    "cfg",
    [
        tdl_cfg(csi_error_std=0.3),
        tdl_cfg(csi_error_std=0.1, csi_delay_frames=1),
        tdl_cfg(fading="jakes", doppler_hz=10.0, csi_error_std=0.1, csi_delay_frames=3),
    ],
)
def test_conservative_plan_realises_the_outage_target_on_tdl(cfg):
    """csi.py's planning stays exact on Rayleigh TDL: P(true < planned) = q across links."""
    cfg = replace(cfg, d_min_m=50.0, d_max_m=60.0)
    ch = WirelessChannel(cfg, 8, 128, seed=7)
    ids = torch.arange(2000) * 29
    rates = torch.cat(
        [(~s.delivered).double().mean(0).reshape(-1) for layer in range(4) for s in ch.link_states(ids, layer, 0, [0.05])]
    )
    stderr = rates.std().item() / math.sqrt(len(rates))
    assert abs(rates.mean().item() - 0.05) < 5 * stderr


@pytest.mark.parametrize("name", scenario.SCENARIOS)
def test_scenario_geometry_los_and_shadowing(name):
    """LoS share follows P_LoS(d); path loss - basic formula is N(0, sigma_SF(LoS state))."""
    ch = WirelessChannel(ChannelConfig(model=name), 4000, 64, seed=0)
    d, los = ch.distances_m.numpy(), ch.los.numpy()
    assert torch.equal(ch.distances_m, WirelessChannel(ChannelConfig(), 4000, 64, seed=0).distances_m)  # same placement
    expected = scenario.los_probability(name, d)
    assert abs(los.mean() - expected.mean()) < 4 * math.sqrt((expected * (1 - expected)).sum()) / len(d)
    shadow = ch.path_loss_db.numpy() - scenario.path_loss_db(name, d, los, 3.5e9)
    for state, std in zip((True, False), scenario.SHADOW_STD_DB[name], strict=True):
        assert abs(shadow[los == state].std() / std - 1) < 0.1
        assert abs(shadow[los == state].mean()) < 4 * std / math.sqrt((los == state).sum())


def test_umi_loses_more_than_the_macro_model_and_raises_outage():
    """TR 38.901 UMi NLoS at 3.5 GHz is ~13 dB above 128.1 + 37.6 log10(d / km) at 300 m."""
    excess = scenario.path_loss_db("umi", 300.0, False, 3.5e9) - path_loss_db(300.0)
    assert 12.0 < excess < 14.0
    ids = np.arange(400)
    rayleigh = WirelessChannel(ChannelConfig(), 8, 64, seed=0).costs(ids, 0, 0)
    umi = WirelessChannel(ChannelConfig(model="umi"), 8, 64, seed=0).costs(ids, 0, 0)
    assert torch.isinf(umi).double().mean() > 5 * torch.isinf(rayleigh).double().mean()


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(model="ray"), "channel.model='ray': must be one of rayleigh, tdl, umi, uma"),
        (dict(model="tdl", tdl_profile="F"), "channel.tdl_profile='F'"),
        (dict(model="tdl", delay_spread_s=0.0), "channel.delay_spread_s=0.0"),
        (dict(model="tdl", tdl_profile="D", csi_error_std=0.1), "channel.tdl_profile='D': its line-of-sight tap"),
        (dict(model="umi", shadowing_std_db=3.0), "channel.shadowing_std_db=3.0: channel.model='umi' sets its own"),
        (dict(model="uma", d_min_m=5.0), "holds for distances in"),
        (dict(model="umi", carrier_frequency_hz=2e11), "channel.carrier_frequency_hz"),
    ],
)
def test_bad_channel_model_config_is_one_line_naming_the_key(overrides, match):
    cfg = OmegaConf.create({"channel": {**asdict(ChannelConfig()), **overrides}})
    with pytest.raises(ConfigError) as info:
        channel_config(cfg)
    assert match in str(info.value) and "\n" not in str(info.value)


def test_missing_sionna_is_one_clear_line(monkeypatch):
    from importlib import metadata

    def absent(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", absent)
    tdl.tap_profile.cache_clear()
    try:
        with pytest.raises(ConfigError) as info:
            channel_config(OmegaConf.create({"channel": {**asdict(ChannelConfig()), "model": "tdl"}}))
    finally:
        tdl.tap_profile.cache_clear()
    message = str(info.value)
    assert "channel.model='tdl'" in message and "pip install sionna-no-rt==2.2.0" in message and "\n" not in message
    channel_config(OmegaConf.create({"channel": asdict(ChannelConfig())}))  # rayleigh needs no Sionna


def test_evaluation_override_switches_the_channel_model():
    from dmoe_torch.engine.evaluation import with_channel_overrides

    train_cfg = OmegaConf.create({"channel": asdict(ChannelConfig())})
    cfg = OmegaConf.create({"channel": {"model": "tdl", "delay_spread_s": 3e-7, "tdl_profile": None}})
    merged, changes = with_channel_overrides(train_cfg, cfg)
    assert merged.channel.model == "tdl" and changes == ["model 'rayleigh' -> 'tdl'", "delay_spread_s 1e-07 -> 3e-07"]


def test_default_path_never_imports_sionna():
    """Neither rayleigh nor tdl imports sionna: the tables are read as package data."""
    code = (
        "import sys, numpy as np; from dmoe_torch.channel import ChannelConfig, WirelessChannel; "
        "import dmoe_torch.engine.training, dmoe_torch.engine.evaluation; "
        "[WirelessChannel(ChannelConfig(model=m), 8, 64, seed=0).costs(np.arange(4), 0, 0) for m in ('rayleigh', 'tdl', 'umi')]; "
        "assert not [name for name in sys.modules if name.startswith('sionna')], 'sionna imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_figure7_sweeps_and_draw():
    """make figures' fig7: tdl at two spacings over the delay spread; JESA's saving over DES."""
    from pathlib import Path

    from dmoe_torch.engine import sweeps as figures
    from dmoe_torch.output import figures as figure_plots

    spec = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "figures" / "default.yaml")
    facts = {"path": "run/checkpoint.pt", "K": 8, "L": 4, "T": 49, "d_min_m": 50.0, "bandwidth_hz": 1e6, "latency_s": 1e-3}
    sweeps = figures.build_sweeps(spec, facts)
    wide, narrow = sweeps["delay_spread_wide"], sweeps["delay_spread_narrow"]
    assert wide.key == "++channel.delay_spread_s" and wide.values == ("3e-08", "1e-07", "3e-07", "1e-06")
    assert "++channel.model=tdl" in wide.fixed and "++channel.subcarrier_bandwidth_hz=120000.0" in narrow.fixed
    assert "++channel.latency_budget_s=0.008333333333333333" in narrow.fixed  # same spectral efficiency as 1 MHz, 1 ms
    assert f"data.limit_test={1000 // 49}" in wide.fixed

    def row(policy, spacing, spread, energy):
        return {
            "policy": policy,
            "gamma": 0.9,
            "energy_uj_mean": energy,
            "energy_uj_ci95": 1.0,
            "inputs": 20,
            "draws": 1,
            "seed": 0,
            "channel.subcarrier_bandwidth_hz": spacing,
            "channel.delay_spread_s": spread,
            "channel.latency_budget_s": 1e-3 * 1e6 / spacing,
            "channel.tdl_profile": "A",
        }

    data = {
        "delay_spread_wide": [("3e-08", [row("des", 1e6, 3e-8, 100.0), row("jesa", 1e6, 3e-8, 80.0)])],
        "delay_spread_narrow": [("3e-08", [row("des", 1.2e5, 3e-8, 100.0), row("jesa", 1.2e5, 3e-8, 95.0)])],
    }
    figure, rows = figure_plots.draw_delay_spread(data, facts, sweeps)
    assert len(rows) == 4 and figure is not None
    savings = {s["spacing_hz"]: s["saving_pct"] for s in figure_plots._jesa_savings(rows)}
    assert savings == pytest.approx({1e6: 20.0, 1.2e5: 5.0})
