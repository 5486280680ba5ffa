"""Fused, multi-threaded kernels of the channel's hot path (numba, parallel over frames).

A token-level training step draws the channel of ~12,500 frames x K x N links per MoE layer;
in numpy the hash, the logarithms and the energy formula each make a pass over 1.6M
elements with temporaries.  These kernels compute the same formulas element by element in
one pass per stage.  Every value depends only on its own element, so results are identical
for any number of threads (the thread count follows ``torch.get_num_threads()``, see
:func:`dmoe_torch.selection.des.solver_threads`).
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
    from ..selection.des import solver_threads

    previous = numba.get_num_threads()
    numba.set_num_threads(solver_threads())
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(previous)
