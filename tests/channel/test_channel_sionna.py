"""Sionna (sionna-no-rt 2.2.0) as the oracle of our TR 38.901 channels.

Sionna pitfalls handled here: it draws on cuda:0 when a GPU is visible unless told
``device="cpu"``; its default precision is complex64 (we ask for "double"); its generator is
stateful (seeded once per call here, never compared draw for draw); ``normalize=True`` in
``cir_to_ofdm_channel`` rescales every realisation to unit energy (we keep it False, path
loss is ours anyway).  Import cost: ~5 s once per session (this module only).
"""

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from dmoe_torch.channel import ChannelConfig, WirelessChannel, scenario

try:  # a dependency (pyproject.toml), so a missing one fails the module, never skips it
    import sionna.phy as sionna
    from sionna.phy.channel import cir_to_ofdm_channel, subcarrier_frequencies
    from sionna.phy.channel.tr38901 import TDL, PanelArray, UMaScenario, UMiScenario
except ImportError as exc:
    raise ImportError(f"sionna-no-rt==2.2.0, a dependency of dmoe-torch, does not import ({exc}); pip install -e .") from None

SAMPLES = 4096


def sionna_power(profile: str, delay_spread: float, spacing: float, num_subcarriers: int, seed: int) -> np.ndarray:
    """|H|^2 of Sionna's TDL on num_subcarriers subcarriers, float64 [SAMPLES, N]."""
    sionna.config.seed = seed
    channel = TDL(profile, delay_spread=delay_spread, carrier_frequency=3.5e9, device="cpu", precision="double")
    a, tau = channel(batch_size=SAMPLES, num_time_steps=1, sampling_frequency=1.0)
    freqs = subcarrier_frequencies(num_subcarriers, spacing, precision="double", device="cpu")
    H = cir_to_ofdm_channel(freqs, a, tau, normalize=False)
    return (H.abs() ** 2).reshape(SAMPLES, num_subcarriers).double().numpy()


def our_power(profile: str, delay_spread: float, spacing: float, num_subcarriers: int) -> np.ndarray:
    cfg = ChannelConfig(
        model="tdl",
        tdl_profile=profile,
        delay_spread_s=delay_spread,
        subcarrier_bandwidth_hz=spacing,
        num_subcarriers=num_subcarriers,
    )
    return WirelessChannel(cfg, 8, 64, seed=0).power_gains(np.arange(SAMPLES // 8), 0, 0).reshape(-1, num_subcarriers)


def test_flat_tdl_power_follows_sionnas_exp1_law():
    """A single effective tap (1 ps delay spread): both |h|^2 are Exp(1); two-sample KS."""
    ours = our_power("A", 1e-12, 1e6, 1)[:, 0]
    theirs = sionna_power("A", 1e-12, 1e6, 1, seed=1)[:, 0]
    assert ks_2samp(ours, theirs).pvalue > 1e-3
    # and the test can tell laws apart: a Rician profile (TDL-D) is not Exp(1)
    assert ks_2samp(theirs, sionna_power("D", 1e-12, 1e6, 1, seed=2)[:, 0]).pvalue < 1e-6


@pytest.mark.parametrize(
    "profile,delay_spread,spacing", [("A", 300e-9, 1e6), ("C", 100e-9, 1e6), ("A", 1e-6, 120e3), ("D", 300e-9, 1e6)]
)
def test_tdl_frequency_correlation_matches_sionna(profile, delay_spread, spacing):
    """Adjacent- and 4-apart-subcarrier correlation of |H|^2, and E|H|^2, ours vs Sionna."""
    ours, theirs = our_power(profile, delay_spread, spacing, 16), sionna_power(profile, delay_spread, spacing, 16, seed=3)
    assert abs(ours.mean() - theirs.mean()) < 0.05
    for lag in (1, 4):
        corr = [np.corrcoef(p[:, :-lag].ravel(), p[:, lag:].ravel())[0, 1] for p in (ours, theirs)]
        assert abs(corr[0] - corr[1]) < 0.05, (lag, corr)
    assert ks_2samp(ours[:, 5], theirs[:, 5]).pvalue > 1e-3  # the marginal too (Rician for D)


@pytest.mark.parametrize("name,cls", [("umi", UMiScenario), ("uma", UMaScenario)])
def test_path_loss_equals_sionnas_tr38901_formula(name, cls):
    """TR 38.901 Table 7.4.1-1 UMi-Street Canyon / UMa, LoS and NLoS, 3.5 GHz, h_UT 1.5 m:
    ours equals Sionna's basic path loss on 10 m .. 5 km (both sides of the breakpoint)."""
    array = PanelArray(
        num_rows_per_panel=1,
        num_cols_per_panel=1,
        polarization="single",
        polarization_type="V",
        antenna_pattern="omni",
        carrier_frequency=3.5e9,
        device="cpu",
        precision="double",
    )
    sc = cls(3.5e9, "low", array, array, "downlink", device="cpu", precision="double")
    d = np.geomspace(10.0, 5000.0, 25)
    ut = torch.zeros(1, len(d), 3, dtype=torch.float64)
    ut[0, :, 0], ut[0, :, 2] = torch.from_numpy(d), scenario.UT_HEIGHT_M
    bs = torch.zeros(1, 1, 3, dtype=torch.float64)
    bs[0, 0, 2] = scenario.BS_HEIGHT_M[name]
    still = torch.zeros(1, len(d), 3, dtype=torch.float64)
    for los in (True, False):
        sc.set_topology(
            ut, bs, still, torch.zeros(1, 1, 3, dtype=torch.float64), still, torch.zeros(1, len(d), dtype=torch.bool), los=los
        )
        ours = scenario.path_loss_db(name, d, np.full(len(d), los), 3.5e9)
        np.testing.assert_allclose(ours, sc.basic_pathloss.numpy().reshape(-1), atol=1e-9)
    np.testing.assert_allclose(scenario.los_probability(name, d), sc.los_probability.numpy().reshape(-1), atol=1e-12)
