"""Fused, multi-threaded kernels of the channel's hot path (numba, parallel over frames).

A token-level training step draws the channel of ~12,500 frames x K x N links per MoE layer;
in numpy the hash, the logarithms and the energy formula each make a pass over 1.6M
elements with temporaries.  These kernels compute the same formulas element by element in
one pass per stage.  Every value depends only on its own element, so results are identical
for any number of threads (the thread count follows ``torch.get_num_threads()``, see
:func:`dmoe_torch.selection.threads.solver_threads`).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_TWO53_INV = 1.0 / 9007199254740992.0


@njit(inline="always")
def _mix(z):
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@njit(parallel=True, cache=True)
def exp1_draws(key, frame_ids, links):
    """-log(u) ~ Exp(1), float64 [R, links]; u from 53 bits of SplitMix64(SplitMix64(
    (frame_id * links + l) ^ key)), the counter-based draw of ``fading.uniforms``."""
    rows = frame_ids.shape[0]
    out = np.empty((rows, links), dtype=np.float64)
    for r in prange(rows):
        base = np.uint64(frame_ids[r]) * np.uint64(links)
        for link in range(links):
            bits = _mix(_mix((base + np.uint64(link)) ^ key))
            u = (np.float64(bits >> np.uint64(11)) + 0.5) * _TWO53_INV
            out[r, link] = -math.log(u)
    return out


# Unit phasors at 2^PHASE_BITS angles: a phase draw reads the nearest lower entry and rotates
# by the remainder with a 3-term Taylor series (error < 1e-13), so no cosine per draw.
PHASE_BITS = 12
_PHASE_STEP = 2.0 * math.pi / (1 << PHASE_BITS)
PHASE_COS = np.cos(_PHASE_STEP * np.arange(1 << PHASE_BITS))
PHASE_SIN = np.sin(_PHASE_STEP * np.arange(1 << PHASE_BITS))
_FRACTION_SCALE = _PHASE_STEP / float(1 << (53 - PHASE_BITS))


@njit(inline="always")
def _uniform(counter, key):
    return (np.float64(_mix(_mix(counter ^ key)) >> np.uint64(11)) + 0.5) * _TWO53_INV


@njit(inline="always")
def _unit_phasor(counter, key, phase_cos, phase_sin):
    """(cos, sin) of an angle uniform on [0, 2 pi) drawn from 53 hash bits: 12 pick the table
    entry, 41 the remainder delta < 2 pi / 4096."""
    bits = _mix(_mix(counter ^ key)) >> np.uint64(11)
    index = bits >> np.uint64(53 - PHASE_BITS)
    delta = (np.float64(bits & np.uint64((1 << (53 - PHASE_BITS)) - 1)) + 0.5) * _FRACTION_SCALE
    d2 = delta * delta
    cos_d = 1.0 - d2 * (0.5 - d2 * (1.0 / 24.0))
    sin_d = delta * (1.0 - d2 * (1.0 / 6.0 - d2 * (1.0 / 120.0)))
    c, s = phase_cos[index], phase_sin[index]
    return c * cos_d - s * sin_d, s * cos_d + c * sin_d


@njit(parallel=True, cache=True)
def mode_power_draws(key, frame_ids, num_devices, basis_re, basis_im, los_amplitude, phase_cos, phase_sin):
    """|H|^2 of a Gaussian frequency response drawn afresh per frame, float64 [R, K, N].

    H[k, :] = sum_m z[k, m] basis[m, :] (+ los_amplitude e^{i phi_k} on every subcarrier),
    z[k, m] = sqrt(-log u) e^{i phi} ~ CN(0, 1).  The uniforms hash (key, frame id, draw
    index) as in :func:`exp1_draws`; a frame makes K (2M + 1) draws (two per mode, one LoS
    phase per device), so every value depends on its own frame id only.
    basis_re, basis_im [M, N]; phase_cos, phase_sin: the tables PHASE_COS, PHASE_SIN.
    """
    rows = frame_ids.shape[0]
    modes, N = basis_re.shape
    per_device = 2 * modes + 1
    out = np.empty((rows, num_devices, N), dtype=np.float64)
    for r in prange(rows):
        base = np.uint64(frame_ids[r]) * np.uint64(num_devices * per_device)
        re = np.empty(N)
        im = np.empty(N)
        for k in range(num_devices):
            first = base + np.uint64(k * per_device)
            for n in range(N):
                re[n] = 0.0
                im[n] = 0.0
            for m in range(modes):
                magnitude = math.sqrt(-math.log(_uniform(first + np.uint64(2 * m), key)))
                c, s = _unit_phasor(first + np.uint64(2 * m + 1), key, phase_cos, phase_sin)
                z_re, z_im = magnitude * c, magnitude * s
                for n in range(N):
                    re[n] += z_re * basis_re[m, n] - z_im * basis_im[m, n]
                    im[n] += z_re * basis_im[m, n] + z_im * basis_re[m, n]
            if los_amplitude > 0.0:
                c, s = _unit_phasor(first + np.uint64(2 * modes), key, phase_cos, phase_sin)
                for n in range(N):
                    re[n] += los_amplitude * c
                    im[n] += los_amplitude * s
            for n in range(N):
                out[r, k, n] = re[n] * re[n] + im[n] * im[n]
    return out


@njit(parallel=True, cache=True)
def link_energies(power, mean_gain, bandwidth_hz, noise_w, ap_power_w, device_power_w, payload_bits, latency_s):
    """Downlink + uplink energy (J) of every link from its fading power |h|^2, [R, K, N];
    +inf where either hop takes longer than ``latency_s`` (outage).

    power [R, K, N] float64; mean_gain [K] (path loss and shadowing, linear)."""
    rows, K, N = power.shape
    out = np.empty((rows, K, N), dtype=np.float64)
    for r in prange(rows):
        for k in range(K):
            for n in range(N):
                gain = power[r, k, n] * mean_gain[k]
                rate_dl = bandwidth_hz * math.log2(1.0 + ap_power_w * gain / noise_w)
                rate_ul = bandwidth_hz * math.log2(1.0 + device_power_w * gain / noise_w)
                time_dl = payload_bits / rate_dl
                time_ul = payload_bits / rate_ul
                if time_dl > latency_s or time_ul > latency_s:
                    out[r, k, n] = math.inf
                else:
                    out[r, k, n] = ap_power_w * time_dl + device_power_w * time_ul
    return out


def run_threaded(kernel, *args):
    """``kernel(*args)`` on as many numba threads as torch uses (restored afterwards)."""
    from ..selection.threads import solver_threads

    previous = numba.get_num_threads()
    numba.set_num_threads(solver_threads())
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(previous)
