"""Imperfect channel state information (CSI) and the conservative planning gain.

The coordinator plans on an estimate of the fading of frame f, measured D frames earlier
and corrupted by estimation noise:

    h_hat = sqrt(1 - eps^2) h(f - D) + eps w,   w ~ CN(0, 1) independent of the channel.

h(f) and h_hat are jointly circular Gaussian with unit variances and correlation
rho = E[h h_hat*] = sqrt(1 - eps^2) r(D), where r(D) is the fading's correlation at lag D
frames (1 at D = 0; J0(2 pi f_D D frame_s) for jakes; 0 for iid at D > 0).  So

    h | h_hat ~ CN(rho h_hat, 1 - rho^2),

and |h|^2 given h_hat is s * (non-central chi-square, 2 degrees of freedom, non-centrality
rho^2 |h_hat|^2 / s) with s = (1 - rho^2) / 2.  Its q-quantile is the conservative gain
(:func:`conservative_power`): planning on it keeps P(|h|^2 < planned | h_hat) = q for every
estimate, so the realised per-link outage is q.  docs/method.md derives it in full.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from numba import njit
from scipy.special import j0, ndtri
from scipy.stats import ncx2

# Quantile table: uniform grid in xi = 1 / (1 + nu) on [1 / (1 + NU_MAX), 1]; beyond NU_MAX an
# asymptotic expansion.
_TABLE_POINTS = 4097
_NU_MAX = 60.0


def csi_correlation(fading: str, csi_error_std: float, csi_delay_frames: int, doppler_hz: float, frame_s: float) -> float:
    """rho = E[h h_hat*] between the true fading and the coordinator's estimate (may be < 0)."""
    scale = math.sqrt(1.0 - csi_error_std**2)
    if csi_delay_frames == 0:
        return scale
    if fading == "iid":
        return 0.0
    return scale * float(j0(2.0 * math.pi * doppler_hz * csi_delay_frames * frame_s))


def estimate_power(old_power: np.ndarray, noise_power: np.ndarray, noise_cos: np.ndarray, csi_error_std: float) -> np.ndarray:
    """|h_hat|^2 = |sqrt(1 - eps^2) h_old + eps w|^2 from powers and the relative phase.

    old_power = |h(f - D)|^2, noise_power = |w|^2, noise_cos = cos(arg w - arg h_old), all
    float64 [...].  Only the phase difference matters, so the channel's own phase is never
    drawn.
    """
    eps = float(csi_error_std)
    a = math.sqrt(1.0 - eps * eps)
    cross = (2.0 * a * eps) * np.sqrt(old_power * noise_power) * noise_cos
    return (a * a) * old_power + (eps * eps) * noise_power + cross


def conservative_power(est_power: np.ndarray, rho: float, outage_target: float) -> np.ndarray:
    """The outage_target-quantile of |h|^2 given |h_hat|^2 = est_power (float64 [...]).

    rho = 1 (perfect CSI): est_power itself.  rho = 0 (the estimate says nothing):
    the unconditional Exp(1) quantile -log(1 - q).  Otherwise

        sqrt(g_q) = sigma * quantile_q(Rice(nu, 1)),  sigma = sqrt((1 - rho^2) / 2),
        nu = |rho| sqrt(est_power) / sigma,

    with quantile_q(Rice(nu, 1)) - nu read from a table (:func:`rice_quantile_excess`), so
    a call costs one interpolation per link.
    """
    q = float(outage_target)
    rho2 = min(float(rho) ** 2, 1.0)
    if rho2 == 1.0:
        return est_power
    if rho2 == 0.0:
        return np.full_like(est_power, -math.log1p(-q))
    sigma = math.sqrt((1.0 - rho2) / 2.0)
    est = np.ascontiguousarray(est_power, dtype=np.float64)
    out = np.empty_like(est)
    _conservative_power(est.reshape(-1), math.sqrt(rho2), sigma, *_rice_quantile_table(q), out.reshape(-1))
    return out


def rice_quantile_excess(nu: np.ndarray, q: float) -> np.ndarray:
    """quantile_q(Rice(nu, 1)) - nu for nu >= 0 (float64 [...]), O(1) per point.

    nu <= NU_MAX: linear interpolation on a uniform grid of xi = 1 / (1 + nu) in
    [1 / (1 + NU_MAX), 1], on which the function is smooth.  nu > NU_MAX: the asymptotic
    expansion z_q + 1/(2 nu) - z_q/(4 nu^2), whose next term is below 1e-5 there.
    """
    nu = np.ascontiguousarray(nu, dtype=np.float64)
    out = np.empty_like(nu)
    _excess_array(nu.reshape(-1), *_rice_quantile_table(q), out.reshape(-1))
    return out


@njit(cache=True)
def _excess(nu, start, step, table, z):
    if nu > _NU_MAX:
        inv = 1.0 / nu
        return z + inv * (0.5 - 0.25 * z * inv)
    last = table.shape[0] - 1
    pos = min(max((1.0 / (1.0 + nu) - start) / step, 0.0), float(last))
    k = min(int(pos), last - 1)
    return table[k] + (pos - k) * (table[k + 1] - table[k])


@njit(cache=True)
def _excess_array(nu, start, step, table, z, out):
    for i in range(nu.shape[0]):
        out[i] = _excess(nu[i], start, step, table, z)


@njit(cache=True)
def _conservative_power(est, rho, sigma, start, step, table, z, out):
    """out = (rho |h_hat| + sigma * excess(rho |h_hat| / sigma))^2, clipped at 0, per link."""
    for i in range(est.shape[0]):
        magnitude = rho * math.sqrt(est[i])
        root = max(magnitude + sigma * _excess(magnitude / sigma, start, step, table, z), 0.0)
        out[i] = root * root


@lru_cache(maxsize=16)
def _rice_quantile_table(q: float) -> tuple[float, float, np.ndarray, float]:
    """(xi_min, step, values, z_q): quantile_q(Rice(nu, 1)) - nu on a uniform grid of xi = 1/(1 + nu).

    Rice(nu, 1) = |nu + X + iY|, X, Y ~ N(0, 1): its square is non-central chi-square
    (2 dof, non-centrality nu^2), whose quantile scipy computes.  z_q is the standard
    normal quantile (the limit nu -> inf).
    """
    xi = np.linspace(1.0 / (1.0 + _NU_MAX), 1.0, _TABLE_POINTS)
    nu = 1.0 / xi - 1.0
    excess = np.sqrt(ncx2.ppf(q, 2, nu * nu)) - nu
    return float(xi[0]), (1.0 - float(xi[0])) / (_TABLE_POINTS - 1), excess, float(ndtri(q))
