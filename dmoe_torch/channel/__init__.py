"""Wireless channel and energy model of the DMoE protocol (DESIGN.md section 2).

A coordinator at the cell centre talks to K edge devices over N OFDMA subcarriers. Device k
hosts expert k of every MoE layer. For each input (one frame) and each layer, every
(device, subcarrier) link has an i.i.d. Rayleigh block-fading gain; the cost of using
expert k on subcarrier n is the energy of the downlink plus the uplink hop:

    e[k, n] = S_bits * (P_ap / r_dl[k, n] + P_dev / r_ul[k, n])        (joules)

with r = B log2(1 + P G / sigma2). A link whose hop time S_bits / r exceeds the latency
budget T_max is in outage and costs +inf.

Randomness.  Device positions (and optional shadowing) are drawn once per run from an
explicit ``torch.Generator`` seeded with ``seed``.  Fading is *counter-based*: |h|^2 of
link (k, n) for input ``sample_id`` at MoE layer ``layer`` in channel ``stream`` is a pure
function of (seed, stream, layer, sample_id, k, n), computed by a SplitMix64 hash.  So the
draws do not depend on batch size, shuffling order or data-loader workers, and are
identical on every device and platform (they are computed on the CPU in float64, where
the selection solvers run anyway).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

BOLTZMANN_NOISE_DBM_PER_HZ = -174.0  # thermal noise density at 290 K


def db_to_linear(db):
    """10^(db/10); works on floats, numpy arrays and tensors."""
    return 10.0 ** (db / 10.0)


def linear_to_db(x):
    """10 log10(x)."""
    if isinstance(x, torch.Tensor):
        return 10.0 * torch.log10(x)
    return 10.0 * np.log10(x)


def dbm_to_watt(dbm):
    return db_to_linear(dbm) * 1e-3


@dataclass
class ChannelConfig:
    """Channel parameters, SI units (W, Hz, s, m) unless the name says dB."""

    num_subcarriers: int = 16
    subcarrier_bandwidth_hz: float = 1e6
    noise_psd_dbm_per_hz: float = BOLTZMANN_NOISE_DBM_PER_HZ
    noise_figure_db: float = 9.0
    ap_power_w: float = 0.2
    device_power_w: float = 0.2
    d_min_m: float = 50.0
    d_max_m: float = 300.0
    shadowing_std_db: float = 0.0
    bits_per_element: int = 16
    latency_budget_s: float = 1e-3

    def validate(self, prefix: str = "channel") -> "ChannelConfig":
        """Raise ValueError naming the first bad field (as ``prefix.field``)."""
        positive = (
            "num_subcarriers",
            "subcarrier_bandwidth_hz",
            "ap_power_w",
            "device_power_w",
            "d_min_m",
            "d_max_m",
            "bits_per_element",
            "latency_budget_s",
        )
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{prefix}.{name}={value!r} must be a finite number")
            if name in positive and value <= 0:
                raise ValueError(f"{prefix}.{name}={value!r} must be > 0")
        for name in ("num_subcarriers", "bits_per_element"):
            if int(getattr(self, name)) != getattr(self, name):
                raise ValueError(f"{prefix}.{name}={getattr(self, name)!r} must be a positive integer")
        if self.shadowing_std_db < 0:
            raise ValueError(f"{prefix}.shadowing_std_db={self.shadowing_std_db!r} must be >= 0")
        if self.d_min_m >= self.d_max_m:
            raise ValueError(
                f"{prefix}.d_min_m={self.d_min_m!r} must be < {prefix}.d_max_m={self.d_max_m!r}"
            )
        return self

    @property
    def noise_power_w(self) -> float:
        """sigma2 = N0 * B * NF per subcarrier, in W."""
        return dbm_to_watt(self.noise_psd_dbm_per_hz + self.noise_figure_db) * self.subcarrier_bandwidth_hz


def path_loss_db(distance_m):
    """3GPP-style macro path loss 128.1 + 37.6 log10(d / 1 km), in dB (d in metres)."""
    if isinstance(distance_m, torch.Tensor):
        return 128.1 + 37.6 * torch.log10(distance_m / 1000.0)
    return 128.1 + 37.6 * np.log10(np.asarray(distance_m, dtype=np.float64) / 1000.0)


def outage_probability(cfg: ChannelConfig, mean_gain: float, payload_bits: int) -> float:
    """Closed-form probability that a Rayleigh link with mean gain E[G] is in outage.

    A link is in outage when either hop takes longer than T_max, i.e. when its rate is below
    S / T_max, i.e. when |h|^2 < (2^(S/(B T_max)) - 1) sigma2 / (P_min E[G]); |h|^2 ~ Exp(1).
    """
    snr_needed = 2.0 ** (payload_bits / (cfg.subcarrier_bandwidth_hz * cfg.latency_budget_s)) - 1.0
    power = min(cfg.ap_power_w, cfg.device_power_w)
    return 1.0 - math.exp(-snr_needed * cfg.noise_power_w / (power * mean_gain))


# --- counter-based random numbers ------------------------------------------------------

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


def rayleigh_power_gains(seed: int, stream: int, layer: int, sample_ids, num_devices: int, num_subcarriers: int) -> np.ndarray:
    """|h|^2 ~ Exp(1) (Rayleigh fading, E|h|^2 = 1) for every link: float64 [B, K, N].

    A pure function of its arguments: entry [b, k, n] depends only on
    (seed, stream, layer, sample_ids[b], k, n).
    """
    ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
    if (ids < 0).any():
        raise ValueError("sample_ids must be >= 0")
    key = _stream_key(seed, stream, layer)
    links = num_devices * num_subcarriers
    counters = ids.astype(np.uint64)[:, None] * np.uint64(links) + np.arange(links, dtype=np.uint64)[None, :]
    bits = _splitmix64(_splitmix64(counters ^ key))
    # 53 random bits -> uniform in (0, 1), never exactly 0, so -log is finite.
    uniform = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 9007199254740992.0)
    return (-np.log(uniform)).reshape(len(ids), num_devices, num_subcarriers)


# --- the channel --------------------------------------------------------------------------


class WirelessChannel:
    """K devices in a cell around the coordinator, and the energy cost of every link.

    Args:
        cfg: channel parameters.
        num_devices: K, one device per expert index.
        d_model: hidden size; a hop carries d_model * bits_per_element bits.
        seed: seeds the geometry (explicit torch.Generator) and the fading hash.
    """

    def __init__(self, cfg: ChannelConfig, num_devices: int, d_model: int, seed: int):
        cfg.validate()
        if num_devices < 1:
            raise ValueError(f"num_devices must be >= 1, got {num_devices}")
        if d_model < 1:
            raise ValueError(f"d_model must be >= 1, got {d_model}")
        self.cfg = cfg
        self.num_devices = num_devices
        self.num_subcarriers = int(cfg.num_subcarriers)
        self.seed = int(seed)
        self.payload_bits = int(d_model * cfg.bits_per_element)

        generator = torch.Generator().manual_seed(self.seed)
        u = torch.rand(num_devices, generator=generator, dtype=torch.float64)
        # Uniform over the annulus area: d^2 is uniform between d_min^2 and d_max^2.
        self.distances_m = torch.sqrt(cfg.d_min_m**2 + u * (cfg.d_max_m**2 - cfg.d_min_m**2))
        shadowing = cfg.shadowing_std_db * torch.randn(num_devices, generator=generator, dtype=torch.float64)
        self.path_loss_db = path_loss_db(self.distances_m) + shadowing
        self.mean_gain = db_to_linear(-self.path_loss_db)  # [K], linear

    @property
    def failure_energy_j(self) -> float:
        """Energy wasted by a failed attempt: the coordinator transmits for T_max and times out."""
        return self.cfg.ap_power_w * self.cfg.latency_budget_s

    def gains(self, sample_ids, layer: int, stream: int) -> torch.Tensor:
        """Channel gains G = PL^-1 |h|^2 (linear), float64 [B, K, N]."""
        fading = rayleigh_power_gains(self.seed, stream, layer, _as_numpy_ids(sample_ids), self.num_devices, self.num_subcarriers)
        return torch.from_numpy(fading) * self.mean_gain[None, :, None]

    def costs(self, sample_ids, layer: int, stream: int) -> torch.Tensor:
        """Energy of using expert k on subcarrier n (downlink + uplink), J, float64 CPU [B, K, N].

        +inf where either hop would exceed the latency budget (outage).
        """
        return self.costs_from_gains(self.gains(sample_ids, layer, stream))

    def costs_from_gains(self, gains: torch.Tensor) -> torch.Tensor:
        """Per-link energy in J from linear gains [..., K, N]; +inf in outage."""
        cfg = self.cfg
        noise = cfg.noise_power_w
        rate_dl = cfg.subcarrier_bandwidth_hz * torch.log2(1.0 + cfg.ap_power_w * gains / noise)
        rate_ul = cfg.subcarrier_bandwidth_hz * torch.log2(1.0 + cfg.device_power_w * gains / noise)
        time_dl = self.payload_bits / rate_dl
        time_ul = self.payload_bits / rate_ul
        energy = cfg.ap_power_w * time_dl + cfg.device_power_w * time_ul
        outage = (time_dl > cfg.latency_budget_s) | (time_ul > cfg.latency_budget_s)
        return energy.masked_fill(outage, math.inf)

    def outage_probability(self) -> torch.Tensor:
        """Closed-form per-link outage probability of each device, [K]."""
        return torch.tensor([outage_probability(self.cfg, g, self.payload_bits) for g in self.mean_gain.tolist()], dtype=torch.float64)


def _as_numpy_ids(sample_ids) -> np.ndarray:
    if isinstance(sample_ids, torch.Tensor):
        return sample_ids.detach().cpu().numpy()
    return np.asarray(sample_ids)
