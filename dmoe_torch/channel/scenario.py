"""3GPP TR 38.901 V19.2 system-level scenarios UMi-Street Canyon and UMa, single antenna.

Per device: a line-of-sight state drawn with the scenario's LoS probability (Table 7.4.2-1),
the basic path loss of that state (Table 7.4.1-1) and a log-normal shadow fading with the
state's standard deviation.  The coordinator is the base station (height 10 m UMi, 25 m UMa),
devices are outdoor user terminals at 1.5 m, so C'(h_UT) = 0 and the effective environment
height is h_E = 1 m in both scenarios.  Distances in m, carrier frequency f_c in Hz (the
formulas take it in GHz), path loss in dB.

    d_3D = sqrt(d_2D^2 + (h_BS - h_UT)^2),   d'_BP = 4 (h_BS - h_E)(h_UT - h_E) f_c / c
    UMi LoS:  32.4 + 21 log10 d_3D + 20 log10 f_c          (d_2D <= d'_BP)
              32.4 + 40 log10 d_3D + 20 log10 f_c - 9.5 log10(d'_BP^2 + (h_BS - h_UT)^2)
    UMi NLoS: max(LoS, 35.3 log10 d_3D + 22.4 + 21.3 log10 f_c - 0.3 (h_UT - 1.5))
    UMa LoS:  28 + 22 log10 d_3D + 20 log10 f_c             (d_2D <= d'_BP)
              28 + 40 log10 d_3D + 20 log10 f_c - 9 log10(d'_BP^2 + (h_BS - h_UT)^2)
    UMa NLoS: max(LoS, 13.54 + 39.08 log10 d_3D + 20 log10 f_c - 0.6 (h_UT - 1.5))
    P_LoS = 1 for d_2D <= 18 m, else 18/d_2D + exp(-d_2D / D) (1 - 18/d_2D), D = 36 m (UMi), 63 m (UMa)
    sigma_SF: UMi 4 dB (LoS), 7.82 dB (NLoS); UMa 4 dB (LoS), 6 dB (NLoS)

The formulas hold for 10 m <= d_2D <= 5 km and 0.5 GHz <= f_c <= 100 GHz (ChannelConfig
checks both).
"""

from __future__ import annotations

import numpy as np

SCENARIOS = ("umi", "uma")
SPEED_OF_LIGHT = 299_792_458.0
UT_HEIGHT_M = 1.5
ENV_HEIGHT_M = 1.0
BS_HEIGHT_M = {"umi": 10.0, "uma": 25.0}
SHADOW_STD_DB = {"umi": (4.0, 7.82), "uma": (4.0, 6.0)}  # (LoS, NLoS)
LOS_DECAY_M = {"umi": 36.0, "uma": 63.0}
MIN_DISTANCE_M, MAX_DISTANCE_M = 10.0, 5000.0
MIN_CARRIER_HZ, MAX_CARRIER_HZ = 0.5e9, 100e9


def los_probability(scenario: str, distance_2d_m) -> np.ndarray:
    """P(line of sight) of an outdoor device at ground distance d_2D (m), float64 [...]."""
    d = np.asarray(distance_2d_m, dtype=np.float64)
    far = 18.0 / d + np.exp(-d / LOS_DECAY_M[scenario]) * (1.0 - 18.0 / d)
    return np.where(d <= 18.0, 1.0, far)


def path_loss_db(scenario: str, distance_2d_m, los, carrier_frequency_hz: float) -> np.ndarray:
    """Basic path loss (no shadowing) in dB of each device, float64 [...]; ``los`` bool [...]."""
    d2 = np.asarray(distance_2d_m, dtype=np.float64)
    h_bs, h_ut = BS_HEIGHT_M[scenario], UT_HEIGHT_M
    d3 = np.sqrt(d2**2 + (h_bs - h_ut) ** 2)
    f_ghz = carrier_frequency_hz / 1e9
    breakpoint_m = 4.0 * (h_bs - ENV_HEIGHT_M) * (h_ut - ENV_HEIGHT_M) * carrier_frequency_hz / SPEED_OF_LIGHT
    if scenario == "umi":
        near = 32.4 + 21.0 * np.log10(d3) + 20.0 * np.log10(f_ghz)
        far = 32.4 + 40.0 * np.log10(d3) + 20.0 * np.log10(f_ghz) - 9.5 * np.log10(breakpoint_m**2 + (h_bs - h_ut) ** 2)
        nlos = 35.3 * np.log10(d3) + 22.4 + 21.3 * np.log10(f_ghz) - 0.3 * (h_ut - 1.5)
    else:
        near = 28.0 + 22.0 * np.log10(d3) + 20.0 * np.log10(f_ghz)
        far = 28.0 + 40.0 * np.log10(d3) + 20.0 * np.log10(f_ghz) - 9.0 * np.log10(breakpoint_m**2 + (h_bs - h_ut) ** 2)
        nlos = 13.54 + 39.08 * np.log10(d3) + 20.0 * np.log10(f_ghz) - 0.6 * (h_ut - 1.5)
    pl_los = np.where(d2 <= breakpoint_m, near, far)
    return np.where(np.asarray(los, dtype=bool), pl_los, np.maximum(pl_los, nlos))


def shadow_std_db(scenario: str, los) -> np.ndarray:
    """Shadow-fading standard deviation (dB) of each device by LoS state, float64 [...]."""
    los_std, nlos_std = SHADOW_STD_DB[scenario]
    return np.where(np.asarray(los, dtype=bool), los_std, nlos_std)
