"""Frequency-selective small-scale fading: the 3GPP TR 38.901 tapped delay lines TDL-A..E.

The channel of device k on subcarrier n (frequency n * Delta f, Delta f = the subcarrier
bandwidth) is the frequency response of a tapped delay line,

    H[k, n] = sum_p a[k, p] exp(-2 pi i n Delta f tau_p),   a[k, p] ~ CN(0, P_p),
    tau_p = delay_spread * (normalised delay of tap p),       sum_p P_p (+ P_LoS) = 1,

so E|H|^2 = 1 on every subcarrier (path loss stays separate) and neighbouring subcarriers
are correlated, E[H_n H_m*] = sum_p P_p exp(-2 pi i (n - m) Delta f tau_p), within a
coherence bandwidth of about 1 / (5 * delay spread).  TDL-D and TDL-E add a line-of-sight
(specular) component of power P_LoS at delay 0 with a uniform phase (Rician first tap).

The tap tables (normalised delays, powers in dB) are TR 38.901 V19.2 Tables 7.7.2-1..5 as
shipped by Sionna (``sionna-no-rt``): read from its installed package data without importing
it (the import costs seconds), so ours and the Sionna oracle of the tests share one table.

How it is drawn.  The Rayleigh taps make H[k, :] a zero-mean complex Gaussian vector with
covariance R = S^H diag(P) S, S[p, n] = exp(-2 pi i n Delta f tau_p).  We draw it as
H = z B, z ~ CN(0, I_M), B = diag(sqrt(lambda)) U^H from R's eigen-decomposition, keeping the
M <= min(P, N) modes with lambda > 1e-12 trace(R): the same law as summing the P taps, with
fewer draws (M = 15 instead of 23 taps for TDL-A at 100 ns and 1 MHz; 3-5 when nearly flat).
Draws are counter-based like ``fading.py``: a pure function of (seed, stream, layer, device,
mode, frame id).  ``iid``: independent per frame (one fused numba kernel,
:func:`kernels.mode_power_draws`); ``jakes``: every mode is an independent Jakes process
(``fading.jakes_fading``), so H(t) has the cross-covariance R J0(2 pi f_D tau): every
subcarrier keeps the flat model's autocorrelation, and the CSI formulas of ``csi.py`` stay
exact for the Rayleigh profiles A, B and C.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np

from .fading import JAKES_SINUSOIDS, jakes_fading, stream_key, uniforms
from .kernels import PHASE_COS, PHASE_SIN, mode_power_draws, run_threaded

TDL_PROFILES = ("A", "B", "C", "D", "E")
LOS_PROFILES = ("D", "E")  # a specular first tap: |H|^2 is Rician, not Exp(1)
SIONNA_PACKAGE = "sionna-no-rt"
SIONNA_VERSION = "2.2.0"
# Where sionna-no-rt keeps the TR 38.901 V19.2 tables, relative to site-packages.
_TABLE_DIR = "sionna/phy/channel/tr38901/models/v19_2"
# Angle of arrival of the LoS path under Jakes motion (Sionna's TDL default, arccos 0.7).
LOS_ARRIVAL_COS = 0.7

# Tags of the hash streams of TDL draws (distinct from fading.py's).
TAG_TDL = 0x54444C0000000004
TAG_TDL_JAKES = 0x54444C4A4B000005
TAG_TDL_LOS = 0x54444C4C4F000006


@dataclass(frozen=True, eq=False)  # hashed by identity (tap_profile caches one per name)
class TapProfile:
    """One TDL profile, normalised to unit total power.

    delays      [P] float64  tap delays in units of the RMS delay spread (sorted as in the table)
    powers      [P] float64  mean power of each Rayleigh tap (linear)
    los_power   float        power of the specular component at delay 0 (0 for A, B, C)
    """

    name: str
    delays: np.ndarray
    powers: np.ndarray
    los_power: float


class MissingSionnaError(RuntimeError):
    """sionna-no-rt (its TR 38.901 tables) is not installed or not readable."""


def sionna_missing_message(reason: str) -> str:
    return (
        f"{SIONNA_PACKAGE}=={SIONNA_VERSION} is needed for channel.model=tdl/umi/uma (the TR 38.901 tables) "
        f"but {reason}; install it with: pip install {SIONNA_PACKAGE}=={SIONNA_VERSION}"
    )


@cache
def tap_profile(name: str) -> TapProfile:
    """The TR 38.901 profile TDL-<name> (name in A..E), read from sionna-no-rt's package data.

    Sionna's JSON lists a LoS profile's first tap twice (specular, then Rayleigh, both at
    delay 0); the specular part becomes ``los_power``.
    """
    if name not in TDL_PROFILES:
        raise ValueError(f"tdl_profile={name!r}: must be one of {', '.join(TDL_PROFILES)}")
    table = json.loads(_read_table(f"TDL-{name}.json"))
    delays = np.asarray(table["delays"], dtype=np.float64)
    powers = 10.0 ** (np.asarray(table["powers"], dtype=np.float64) / 10.0)
    los_power = 0.0
    if table["los"]:
        los_power, powers, delays = float(powers[0]), powers[1:], delays[1:]
    total = powers.sum() + los_power
    return TapProfile(name=name, delays=delays, powers=powers / total, los_power=los_power / total)


def _read_table(filename: str) -> str:
    from importlib import metadata

    try:
        dist = metadata.distribution(SIONNA_PACKAGE)
    except metadata.PackageNotFoundError:
        raise MissingSionnaError(sionna_missing_message("it is not installed")) from None
    if dist.version != SIONNA_VERSION:
        raise MissingSionnaError(sionna_missing_message(f"version {dist.version} is installed"))
    try:
        return dist.locate_file(f"{_TABLE_DIR}/{filename}").read_text()
    except OSError as exc:
        raise MissingSionnaError(sionna_missing_message(f"its table {filename} is unreadable ({exc.strerror})")) from None


def steering(profile: TapProfile, delay_spread_s: float, subcarrier_spacing_hz: float, num_subcarriers: int) -> np.ndarray:
    """exp(-2 pi i n Delta f tau_p), complex128 [P, N]: tap p's phase on subcarrier n."""
    tau = profile.delays * float(delay_spread_s)
    freqs = np.arange(num_subcarriers, dtype=np.float64) * float(subcarrier_spacing_hz)
    return np.exp(-2j * math.pi * tau[:, None] * freqs[None, :])


@lru_cache(maxsize=64)
def frequency_basis(profile: TapProfile, delay_spread_s: float, subcarrier_spacing_hz: float, num_subcarriers: int) -> np.ndarray:
    """B, complex128 [M, N], with B^H B = R = S^H diag(P) S (the Rayleigh taps' covariance over
    subcarriers), from R's eigen-decomposition; modes with lambda <= 1e-12 trace(R) are dropped."""
    taps = np.sqrt(profile.powers)[:, None] * steering(profile, delay_spread_s, subcarrier_spacing_hz, num_subcarriers)
    eigenvalues, vectors = np.linalg.eigh(taps.conj().T @ taps)
    keep = eigenvalues > 1e-12 * eigenvalues.sum()
    return np.sqrt(eigenvalues[keep])[:, None] * vectors[:, keep].conj().T


def frequency_correlation(profile: TapProfile, delay_spread_s: float, offset_hz: float) -> complex:
    """E[H(f) H*(f + offset)] of the Rayleigh taps plus the LoS power (theory, for tests and docs)."""
    tau = profile.delays * float(delay_spread_s)
    return complex(np.sum(profile.powers * np.exp(2j * math.pi * tau * offset_hz)) + profile.los_power)


def tdl_iid_power(
    seed, stream, layer, frame_ids, num_devices, num_subcarriers, profile, delay_spread_s, spacing_hz
) -> np.ndarray:
    """|H|^2 drawn independently per frame: float64 [R, K, N] (frame ids int64, any sign)."""
    basis = frequency_basis(profile, float(delay_spread_s), float(spacing_hz), int(num_subcarriers))
    ids = np.ascontiguousarray(frame_ids, dtype=np.int64)
    return run_threaded(
        mode_power_draws,
        stream_key(seed, stream, layer, TAG_TDL),
        ids,
        int(num_devices),
        np.ascontiguousarray(basis.real),
        np.ascontiguousarray(basis.imag),
        math.sqrt(profile.los_power),
        PHASE_COS,
        PHASE_SIN,
    )


def tdl_jakes_power(
    seed, stream, layer, frame_ids, num_devices, num_subcarriers, profile, delay_spread_s, spacing_hz, doppler_hz, frame_s
) -> np.ndarray:
    """|H|^2 with every mode a Jakes process in t = frame_id * frame_s: float64 [R, K, N].

    The LoS component (D, E) turns at the Doppler shift of its arrival angle,
    phase = 2 pi (u_k + f_D cos(aoa) t) with u_k uniform per device.
    """
    ids = np.asarray(frame_ids, dtype=np.int64).reshape(-1)
    basis = frequency_basis(profile, float(delay_spread_s), float(spacing_hz), int(num_subcarriers))
    z = jakes_fading(seed, stream, layer, ids, num_devices, len(basis), doppler_hz, frame_s, JAKES_SINUSOIDS, tag=TAG_TDL_JAKES)
    H = z @ basis  # [R, K, N]
    if profile.los_power > 0:
        start = uniforms(stream_key(seed, stream, layer, TAG_TDL_LOS), np.arange(num_devices, dtype=np.int64), 1)[:, 0]
        cycles = start[None, :] + (doppler_hz * LOS_ARRIVAL_COS * frame_s) * ids.astype(np.float64)[:, None]
        H = H + math.sqrt(profile.los_power) * np.exp(2j * math.pi * (cycles - np.floor(cycles)))[:, :, None]
    return H.real**2 + H.imag**2
