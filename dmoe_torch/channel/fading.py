"""Small-scale fading h of every (device k, subcarrier n) link, frame by frame.

A *frame* is one input of the protocol stream, numbered ``frame_id = sample_id *
tokens_per_image + token_index`` (``tokens_per_image = 1`` when an image is one input).
Every draw here is *counter-based*: a pure function of (seed, stream, layer, link, frame id)
computed with a SplitMix64 hash, so it does not depend on batch size, order or workers.

* ``iid``: |h|^2 ~ Exp(1), independent over links, frames, layers and streams
  (:func:`rayleigh_power_gains`, the model's original draw, unchanged bit for bit).
* ``jakes``: each link is a Rayleigh process in time, t = frame_id * frame_s, built as a sum
  of sinusoids in the style of Zheng and Xiao (:func:`jakes_fading`) with Rayleigh
  amplitudes: h(t) is exactly CN(0, 1) at every t and E[h(t) h*(t + tau)] = J0(2 pi f_D tau)
  for any number of sinusoids M = :data:`JAKES_SINUSOIDS`.

Uniforms are drawn from 53 hash bits, in (0, 1) and never 0 or 1.  Different uses of the
hash (magnitudes, phases, CSI noise, Jakes parameters) append their own tag to the
(seed, stream, layer) key, which makes them independent streams.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .kernels import exp1_draws, run_threaded

# Sinusoids per quadrature component of a Jakes link.  With Rayleigh amplitudes the marginal
# and the correlation are exact for any M; M sets how closely each link's own time average
# follows the ensemble (its mean power has std 1/sqrt(2M)) and the cost, linear in M.
JAKES_SINUSOIDS = 8
# Frames per block of the angle-addition tables in jakes_fading (a power of two).
_BLOCK_BITS = 6

# Tags of the independent hash streams (arbitrary distinct 64-bit constants).
TAG_CSI_NOISE_POWER = 0x43534950574E0001
TAG_CSI_NOISE_PHASE = 0x435349504E0A0002
TAG_JAKES = 0x4A414B4553000003

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective 64-bit hash with good avalanche (uint64 in and out)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def _stream_key(*parts: int) -> np.uint64:
    key = np.uint64(0)
    for part in parts:
        key = _splitmix64(np.asarray(key ^ np.uint64(part & 0xFFFFFFFFFFFFFFFF), dtype=np.uint64))
    return np.uint64(key)


def stream_key(seed: int, stream: int, layer: int, tag: int | None = None) -> np.uint64:
    """Hash key of one (seed, stream, layer) and, optionally, one use ``tag``."""
    parts = (seed, stream, layer) if tag is None else (seed, stream, layer, tag)
    return _stream_key(*parts)


def uniforms(key: np.uint64, frame_ids: np.ndarray, links: int) -> np.ndarray:
    """Uniforms in (0, 1), float64 [R, links]: entry [r, l] hashes (key, frame_ids[r], l).

    frame_ids: int64 [R]; negative ids (frames before the stream starts, reached by a CSI
    delay) are valid counters too (two's complement).
    """
    counters = frame_ids.astype(np.uint64)[:, None] * np.uint64(links) + np.arange(links, dtype=np.uint64)[None, :]
    bits = _splitmix64(_splitmix64(counters ^ key))
    # 53 random bits -> uniform in (0, 1), never exactly 0, so -log is finite.
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 9007199254740992.0)


def rayleigh_power_gains(seed: int, stream: int, layer: int, sample_ids, num_devices: int, num_subcarriers: int) -> np.ndarray:
    """|h|^2 ~ Exp(1) (Rayleigh fading, E|h|^2 = 1) for every link: float64 [R, K, N].

    A pure function of its arguments: entry [r, k, n] depends only on
    (seed, stream, layer, sample_ids[r], k, n).  ``sample_ids`` are frame ids (>= 0).
    """
    ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
    if (ids < 0).any():
        raise ValueError("sample_ids must be >= 0")
    return iid_power_gains(seed, stream, layer, ids, num_devices, num_subcarriers)


def iid_power_gains(
    seed: int, stream: int, layer: int, frame_ids: np.ndarray, num_devices: int, num_subcarriers: int
) -> np.ndarray:
    """:func:`rayleigh_power_gains` for any int64 frame ids [R] (negative ones included)."""
    # -log(uniforms(...)) in one fused, multi-threaded pass (kernels.exp1_draws).
    links = num_devices * num_subcarriers
    ids = np.ascontiguousarray(frame_ids, dtype=np.int64)
    draws = run_threaded(exp1_draws, stream_key(seed, stream, layer), ids, links)
    return draws.reshape(len(ids), num_devices, num_subcarriers)


def jakes_fading(
    seed: int,
    stream: int,
    layer: int,
    frame_ids,
    num_devices: int,
    num_subcarriers: int,
    doppler_hz: float,
    frame_s: float,
    num_sinusoids: int = JAKES_SINUSOIDS,
    tag: int = TAG_JAKES,
) -> np.ndarray:
    """Jakes (sum-of-sinusoids) Rayleigh fading h, complex128 [R, K, N], E|h|^2 = 1.

    Link l = (k, n) is the process, with t = frame_id * frame_s and omega = 2 pi f_D,

        h_l(t) = (1/sqrt(M)) sum_{m=1..M} [A_lm cos(omega t cos a_lm + phi_lm) + i B_lm cos(omega t sin a_lm + psi_lm)],
        a_lm = (2 pi m - pi + theta_l) / (4 M),

    with theta_l, phi_lm, psi_lm uniform on [-pi, pi) and amplitudes A_lm, B_lm Rayleigh with
    E[A^2] = 1, drawn once per (seed, stream, layer, link) from the hash.  Each term
    A cos(x + phi) is N(0, 1/2) at any fixed time, so h(t) is exactly CN(0, 1) and, given
    theta, (h(t), h(t + tau)) is exactly jointly Gaussian.  Over theta the M angles tile
    [0, pi/2] uniformly, so E[h(t) h*(t + tau)] = J0(omega tau) and E[h(t) h(t + tau)] = 0.
    frame_ids: int64 [R], any sign (t < 0 is as valid as t >= 0).  ``tag`` names the hash
    stream (tdl.py draws its taps, N = taps, from its own).
    """
    ids, sums = _jakes_sums(
        seed, stream, layer, frame_ids, num_devices * num_subcarriers, doppler_hz, frame_s, num_sinusoids, tag
    )
    h = (sums[:, 0] + 1j * sums[:, 1]) * (1.0 / math.sqrt(num_sinusoids))
    return h.reshape(len(ids), num_devices, num_subcarriers)


def jakes_power_gains(
    seed: int,
    stream: int,
    layer: int,
    frame_ids,
    num_devices: int,
    num_subcarriers: int,
    doppler_hz: float,
    frame_s: float,
    num_sinusoids: int = JAKES_SINUSOIDS,
) -> np.ndarray:
    """|h|^2 of :func:`jakes_fading` (same arguments), float64 [R, K, N], without the complex array."""
    ids, sums = _jakes_sums(seed, stream, layer, frame_ids, num_devices * num_subcarriers, doppler_hz, frame_s, num_sinusoids)
    power = (sums[:, 0] ** 2 + sums[:, 1] ** 2) * (1.0 / num_sinusoids)
    return power.reshape(len(ids), num_devices, num_subcarriers)


def _jakes_sums(seed, stream, layer, frame_ids, links, doppler_hz, frame_s, num_sinusoids, tag=TAG_JAKES):
    """The two amplitude-weighted sums of cosines of every (frame, link): (ids [R], float64 [R, 2, L]).

    Fast path: frame f = 2^b hi + lo contributes A cos(x_hi + x_lo) = Re(e^{i x_hi} A e^{i x_lo});
    the phasors are tabulated per distinct hi block and per lo in [0, 2^b), so a call costs
    one complex product per (frame, link, sinusoid) instead of a cosine, and each value
    still depends on its own frame id only.
    """
    ids = np.asarray(frame_ids, dtype=np.int64).reshape(-1)
    M = int(num_sinusoids)
    # Per-link constants: theta, 2M phases (in cycles), 2M amplitudes; component j = 0 (real), 1 (imag).
    u = uniforms(stream_key(seed, stream, layer, tag), np.arange(links, dtype=np.int64), 4 * M + 1)
    theta = math.pi * (2.0 * u[:, 0] - 1.0)
    angle = (2.0 * math.pi * np.arange(1, M + 1)[:, None] - math.pi + theta[None, :]) / (4.0 * M)  # [M, L]
    cycles_per_frame = doppler_hz * frame_s * np.stack([np.cos(angle), np.sin(angle)])  # [2, M, L]
    phase = u[:, 1 : 2 * M + 1].reshape(links, 2, M).transpose(1, 2, 0)  # [2, M, L], cycles
    amplitude = np.sqrt(-np.log(u[:, 2 * M + 1 :])).reshape(links, 2, M).transpose(1, 2, 0)  # [2, M, L]

    block = 1 << _BLOCK_BITS
    hi_blocks, hi_index = np.unique(ids >> _BLOCK_BITS, return_inverse=True)
    lo = ids & (block - 1)
    hi_cos, hi_sin = _unit_phasors((hi_blocks * block).astype(np.float64)[:, None, None, None] * cycles_per_frame)
    lo_cos, lo_sin = _unit_phasors(np.arange(block, dtype=np.float64)[:, None, None, None] * cycles_per_frame + phase)
    sums = np.empty((len(ids), 2, links))
    _sum_of_sinusoids(hi_cos, hi_sin, lo_cos * amplitude, lo_sin * amplitude, hi_index.reshape(-1).astype(np.int64), lo, sums)
    return ids, sums


def _unit_phasors(cycles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) of 2 pi * cycles, reducing to [0, 1) cycles first for accuracy."""
    angle = (2.0 * math.pi) * (cycles - np.floor(cycles))
    return np.cos(angle), np.sin(angle)


@njit(cache=True)
def _sum_of_sinusoids(hi_cos, hi_sin, lo_cos, lo_sin, hi_index, lo, out):
    """out[r, j, l] = sum_m A cos(x_hi + x_lo) for frame r, component j, link l.

    Tables are [blocks, 2, M, L]; the inner loop runs over links (independent sums, so it
    vectorises without reordering any sum: results do not depend on the batch).
    """
    R = hi_index.shape[0]
    J, M, L = hi_cos.shape[1], hi_cos.shape[2], hi_cos.shape[3]
    for r in range(R):
        h = hi_index[r]
        o = lo[r]
        for j in range(J):
            for q in range(L):
                out[r, j, q] = 0.0
            for m in range(M):
                for q in range(L):
                    out[r, j, q] += hi_cos[h, j, m, q] * lo_cos[o, j, m, q] - hi_sin[h, j, m, q] * lo_sin[o, j, m, q]


def csi_noise(
    seed: int, stream: int, layer: int, frame_ids: np.ndarray, num_devices: int, num_subcarriers: int
) -> tuple[np.ndarray, np.ndarray]:
    """The CSI error w ~ CN(0, 1) of every link, as (|w|^2 ~ Exp(1), relative phase cos).

    Returns float64 [R, K, N] arrays (|w|^2, cos psi) with psi uniform on [0, 2 pi) and
    independent of everything else.  Only the phase of w *relative to* the delayed channel
    matters for |h_hat|^2 (see csi.estimate_power), and w's phase is uniform and independent
    of h, so psi is that relative phase.
    """
    links = num_devices * num_subcarriers
    shape = (len(frame_ids), num_devices, num_subcarriers)
    power = -np.log(uniforms(stream_key(seed, stream, layer, TAG_CSI_NOISE_POWER), frame_ids, links))
    phase = uniforms(stream_key(seed, stream, layer, TAG_CSI_NOISE_PHASE), frame_ids, links)
    return power.reshape(shape), np.cos((2.0 * math.pi) * phase).reshape(shape)
