"""Cell geometry, path loss and the energy of every link; channel parameters.

A coordinator at the cell centre talks to K edge devices over N OFDMA subcarriers. Device k
hosts expert k of every MoE layer. For each frame (one input of the stream) and each layer,
the cost of using expert k on subcarrier n is the energy of the downlink plus the uplink hop:

    e[k, n] = S_bits * (P_ap / r_dl[k, n] + P_dev / r_ul[k, n])        (joules)

with r = B log2(1 + P G / sigma2) and G = PL_k^-1 |h|^2. A link whose hop time S_bits / r
exceeds the latency budget T_max is in outage and costs +inf.

Channel models (``channel.model``): ``rayleigh`` (path loss 128.1 + 37.6 log10(d / 1 km),
|h|^2 ~ Exp(1) i.i.d. over subcarriers), ``tdl`` (the same path loss, TR 38.901 TDL fading
correlated over subcarriers, ``tdl.py``), ``umi`` / ``uma`` (TR 38.901 LoS state, path loss
and shadow fading per device, ``scenario.py``, with TDL fading).

Randomness.  Device positions (shadowing, LoS states) are drawn once per run from an
explicit ``torch.Generator`` seeded with ``seed``.  Fading and CSI noise are counter-based
(``fading.py``): pure functions of (seed, stream, layer, link, frame id), computed on the
CPU in float64 (where the selection solvers run anyway), so they do not depend on batch
size, order or data-loader workers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..selection.common import is_int, is_real
from ..utils import INT64_MAX
from . import scenario
from .csi import conservative_power, csi_correlation, estimate_power
from .fading import csi_noise, iid_power_gains, jakes_power_gains
from .kernels import link_energies, run_threaded
from .tdl import LOS_PROFILES, TDL_PROFILES, MissingSionnaError, tap_profile, tdl_iid_power, tdl_jakes_power

BOLTZMANN_NOISE_DBM_PER_HZ = -174.0  # thermal noise density at 290 K
FADING_MODELS = ("iid", "jakes")
CHANNEL_MODELS = ("rayleigh", "tdl") + scenario.SCENARIOS
# token: every routed token is its own frame (all N subcarriers and T_max to itself);
# image: the tokens of one image at one MoE layer share one frame (docs/method.md section 11).
FRAME_MODES = ("token", "image")
_TEXT_KEYS = ("fading", "model", "tdl_profile", "frame")


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
    """Channel parameters, SI units (W, Hz, s, m) unless the name says dB.

    Dynamics and CSI (docs/method.md, "Channel dynamics and imperfect CSI"):
    fading          'iid' (independent Rayleigh draw per frame) or 'jakes' (Rayleigh process
                    in time with autocorrelation J0(2 pi f_D tau))
    doppler_hz      maximum Doppler shift f_D = v f_c / c (jakes only; e.g. 3 km/h at 3.5 GHz
                    is about 9.7 Hz)
    frame_s         time between consecutive frames (t = frame_id * frame_s)
    csi_error_std   eps in [0, 1): h_hat = sqrt(1 - eps^2) h(f - D) + eps w, w ~ CN(0, 1)
    csi_delay_frames D >= 0: the coordinator's CSI is D frames old

    Channel model (docs/method.md, "Channel models"):
    model           'rayleigh' (i.i.d. subcarriers), 'tdl' (TR 38.901 tapped delay line),
                    'umi' / 'uma' (TR 38.901 LoS, path loss and shadowing, TDL fading)
    tdl_profile     TDL-A, B, C (Rayleigh taps) or D, E (LoS first tap); tdl, umi, uma
    delay_spread_s  RMS delay spread scaling the profile's delays (TR 38.901 Table 7.7.3-1:
                    10 ns very short .. 100 ns nominal .. 1 us very long)
    carrier_frequency_hz  f_c of the umi / uma path loss (doppler_hz stays the Doppler)

    frame           'token' (every routed token its own frame) or 'image' (the tokens of an
                    image share one frame per MoE layer: its channel draw, its N subcarriers,
                    and T_max, so link capacity caps the tokens each device takes)
    """

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
    fading: str = "iid"
    doppler_hz: float = 0.0
    frame_s: float = 1e-3
    csi_error_std: float = 0.0
    csi_delay_frames: int = 0
    model: str = "rayleigh"
    tdl_profile: str = "A"
    delay_spread_s: float = 100e-9
    carrier_frequency_hz: float = 3.5e9
    frame: str = "token"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "channel") -> ChannelConfig:
        """Raise ValueError naming the first bad field (as ``prefix.field``); returns self.

        Runs on construction; call it again after changing a field in place."""
        positive = (
            "num_subcarriers",
            "subcarrier_bandwidth_hz",
            "ap_power_w",
            "device_power_w",
            "d_min_m",
            "d_max_m",
            "bits_per_element",
            "latency_budget_s",
            "frame_s",
            "delay_spread_s",
            "carrier_frequency_hz",
        )
        if self.fading not in FADING_MODELS:
            raise ValueError(f"{prefix}.fading={self.fading!r}: must be one of {', '.join(FADING_MODELS)}")
        if self.model not in CHANNEL_MODELS:
            raise ValueError(f"{prefix}.model={self.model!r}: must be one of {', '.join(CHANNEL_MODELS)}")
        if self.frame not in FRAME_MODES:
            raise ValueError(f"{prefix}.frame={self.frame!r}: must be one of {', '.join(FRAME_MODES)}")
        if self.frame == "image" and not self.perfect_csi:
            raise ValueError(
                f"{prefix}.frame='image' plans on the true channel: it needs perfect CSI "
                f"({prefix}.csi_error_std=0 and {prefix}.csi_delay_frames=0)"
            )
        if self.tdl_profile not in TDL_PROFILES:
            raise ValueError(f"{prefix}.tdl_profile={self.tdl_profile!r}: must be one of {', '.join(TDL_PROFILES)}")
        for name, value in asdict(self).items():
            if name in _TEXT_KEYS:
                continue
            if not is_real(value) or not math.isfinite(value):
                raise ValueError(f"{prefix}.{name}={value!r} must be a finite number")
            if name in positive and value <= 0:
                raise ValueError(f"{prefix}.{name}={value!r} must be > 0")
        for name in ("num_subcarriers", "bits_per_element"):
            value = getattr(self, name)
            if int(value) != value or value > INT64_MAX:
                raise ValueError(f"{prefix}.{name}={value!r} must be a positive integer (at most 2**63 - 1)")
        if self.shadowing_std_db < 0:
            raise ValueError(f"{prefix}.shadowing_std_db={self.shadowing_std_db!r} must be >= 0")
        if self.d_min_m >= self.d_max_m:
            raise ValueError(f"{prefix}.d_min_m={self.d_min_m!r} must be < {prefix}.d_max_m={self.d_max_m!r}")
        if self.doppler_hz < 0:
            raise ValueError(f"{prefix}.doppler_hz={self.doppler_hz!r}: must be >= 0 (Hz)")
        if self.fading == "jakes" and self.doppler_hz <= 0:
            raise ValueError(f"{prefix}.doppler_hz={self.doppler_hz!r}: must be > 0 with {prefix}.fading='jakes'")
        if not 0.0 <= self.csi_error_std < 1.0:
            raise ValueError(f"{prefix}.csi_error_std={self.csi_error_std!r}: must be in [0, 1)")
        delay = self.csi_delay_frames
        if delay < 0 or int(delay) != delay or delay > INT64_MAX:  # frame ids - delay are int64
            raise ValueError(f"{prefix}.csi_delay_frames={delay!r}: must be an integer in [0, 2**63 - 1]")
        if self.model != "rayleigh" and self.tdl_profile in LOS_PROFILES and not self.perfect_csi:
            # csi.py's conditional law h | h_hat is that of a zero-mean Gaussian channel.
            raise ValueError(
                f"{prefix}.tdl_profile={self.tdl_profile!r}: its line-of-sight tap makes |h|^2 Rician, but imperfect CSI "
                f"({prefix}.csi_error_std / csi_delay_frames) assumes Rayleigh fading; use tdl_profile A, B or C, or perfect CSI"
            )
        if self.model in scenario.SCENARIOS:
            self._validate_scenario(prefix)
        if self.model != "rayleigh":
            try:  # the tap tables come from sionna-no-rt: a missing install is a config error, found first
                tap_profile(self.tdl_profile)
            except MissingSionnaError as exc:
                raise ValueError(f"{prefix}.model={self.model!r}: {exc}") from None
        return self

    def _validate_scenario(self, prefix: str) -> None:
        """The range where the TR 38.901 formulas hold; the scenario sets its own shadowing."""
        if self.shadowing_std_db != 0:
            los, nlos = scenario.SHADOW_STD_DB[self.model]
            raise ValueError(
                f"{prefix}.shadowing_std_db={self.shadowing_std_db!r}: {prefix}.model={self.model!r} sets its "
                f"own shadow fading ({los} dB LoS, {nlos} dB NLoS); leave it at 0"
            )
        if self.d_min_m < scenario.MIN_DISTANCE_M or self.d_max_m > scenario.MAX_DISTANCE_M:
            raise ValueError(
                f"{prefix}.d_min_m={self.d_min_m!r}, {prefix}.d_max_m={self.d_max_m!r}: {prefix}.model="
                f"{self.model!r} holds for distances in [10, 5000] m"
            )
        if not scenario.MIN_CARRIER_HZ <= self.carrier_frequency_hz <= scenario.MAX_CARRIER_HZ:
            raise ValueError(
                f"{prefix}.carrier_frequency_hz={self.carrier_frequency_hz!r}: {prefix}.model="
                f"{self.model!r} holds for 0.5e9 .. 100e9 Hz"
            )

    @property
    def noise_power_w(self) -> float:
        """sigma2 = N0 * B * NF per subcarrier, in W."""
        return dbm_to_watt(self.noise_psd_dbm_per_hz + self.noise_figure_db) * self.subcarrier_bandwidth_hz

    @property
    def perfect_csi(self) -> bool:
        """The coordinator knows the current channel exactly (eps = 0, D = 0)."""
        return self.csi_error_std == 0 and self.csi_delay_frames == 0


def path_loss_db(distance_m):
    """3GPP-style macro path loss 128.1 + 37.6 log10(d / 1 km), in dB (d in metres)."""
    if isinstance(distance_m, torch.Tensor):
        return 128.1 + 37.6 * torch.log10(distance_m / 1000.0)
    return 128.1 + 37.6 * np.log10(np.asarray(distance_m, dtype=np.float64) / 1000.0)


def outage_probability(cfg: ChannelConfig, mean_gain: float, payload_bits: int) -> float:
    """Closed-form probability that a Rayleigh link with mean gain E[G] is in outage.

    A link is in outage when either hop takes longer than T_max, i.e. when its rate is below
    S / T_max, i.e. when |h|^2 < (2^(S/(B T_max)) - 1) sigma2 / (P_min E[G]); |h|^2 ~ Exp(1)
    (the marginal of both fading models).
    """
    snr_needed = 2.0 ** (payload_bits / (cfg.subcarrier_bandwidth_hz * cfg.latency_budget_s)) - 1.0
    power = min(cfg.ap_power_w, cfg.device_power_w)
    return 1.0 - math.exp(-snr_needed * cfg.noise_power_w / (power * mean_gain))


@dataclass
class LinkState:
    """What the router plans with and what the channel then delivers, for R frames.

    planned_costs [R, K, N] float64 CPU  J per link computed from the gain the router plans
                                         with; +inf where that gain misses the latency budget
    delivered     [R, K, N] bool CPU     the true channel carries the planned rate within T_max
                                         (true gain >= planned gain); False where planned is +inf
    """

    planned_costs: torch.Tensor
    delivered: torch.Tensor


class WirelessChannel:
    """K devices in a cell around the coordinator, and the energy cost of every link.

    Args:
        cfg: channel parameters.
        num_devices: K, one device per expert index.
        d_model: hidden size; a hop carries d_model * bits_per_element bits.
        seed: seeds the geometry (explicit torch.Generator) and the fading hash.

    Every per-frame method takes ``frame_ids`` (int64 [R], >= 0; a tensor, array or list):
    frame id = sample_id * tokens_per_image + token_index.
    """

    def __init__(self, cfg: ChannelConfig, num_devices: int, d_model: int, seed: int):
        cfg.validate()  # again: a field may have been changed in place since construction
        for key, value, minimum in (("num_devices", num_devices, 1), ("d_model", d_model, 1), ("seed", seed, 0)):
            if not is_int(value) or not minimum <= value <= INT64_MAX:
                raise ValueError(f"{key}={value!r}: must be an integer in [{minimum}, 2**63 - 1]")
        self.cfg = cfg
        self.num_devices = int(num_devices)
        self.num_subcarriers = int(cfg.num_subcarriers)
        self.seed = int(seed)
        self.payload_bits = int(d_model * cfg.bits_per_element)

        generator = torch.Generator().manual_seed(self.seed)
        u = torch.rand(num_devices, generator=generator, dtype=torch.float64)
        # Uniform over the annulus area: d^2 is uniform between d_min^2 and d_max^2.
        self.distances_m = torch.sqrt(cfg.d_min_m**2 + u * (cfg.d_max_m**2 - cfg.d_min_m**2))
        normal = torch.randn(num_devices, generator=generator, dtype=torch.float64)
        self.los = None  # [K] bool line-of-sight state (umi / uma only)
        if cfg.model in scenario.SCENARIOS:
            # Drawn after the distances and normals, so a device sits where it sits under rayleigh.
            los_draw = torch.rand(num_devices, generator=generator, dtype=torch.float64).numpy()
            self.los = torch.from_numpy(los_draw < scenario.los_probability(cfg.model, self.distances_m.numpy()))
            basic = scenario.path_loss_db(cfg.model, self.distances_m.numpy(), self.los.numpy(), cfg.carrier_frequency_hz)
            self.path_loss_db = torch.from_numpy(basic + scenario.shadow_std_db(cfg.model, self.los.numpy()) * normal.numpy())
        else:
            self.path_loss_db = path_loss_db(self.distances_m) + cfg.shadowing_std_db * normal
        self.mean_gain = db_to_linear(-self.path_loss_db)  # [K], linear
        # The TDL tap table (read from sionna-no-rt's package data; a missing install fails here).
        self.profile = None if cfg.model == "rayleigh" else tap_profile(cfg.tdl_profile)

    @property
    def failure_energy_j(self) -> float:
        """Energy wasted by a failed attempt: the coordinator transmits for T_max and times out."""
        return self.cfg.ap_power_w * self.cfg.latency_budget_s

    @property
    def csi_correlation(self) -> float:
        """rho = E[h h_hat*] between the true fading and the coordinator's estimate."""
        cfg = self.cfg
        return csi_correlation(cfg.fading, cfg.csi_error_std, int(cfg.csi_delay_frames), cfg.doppler_hz, cfg.frame_s)

    def power_gains(self, frame_ids, layer: int, stream: int) -> np.ndarray:
        """True small-scale fading |h|^2 (unit mean; Exp(1) marginal except TDL-D/E), float64 numpy [R, K, N]."""
        return self._any_power(_as_numpy_ids(frame_ids), layer, stream)

    def gains(self, frame_ids, layer: int, stream: int) -> torch.Tensor:
        """Channel gains G = PL^-1 |h|^2 (linear), float64 [R, K, N]."""
        return self._gains_from_power(self.power_gains(frame_ids, layer, stream))

    def costs(self, frame_ids, layer: int, stream: int) -> torch.Tensor:
        """Energy of using expert k on subcarrier n (downlink + uplink), J, float64 CPU [R, K, N].

        The cost on the *true* channel (perfect CSI).  +inf where either hop would exceed
        the latency budget (outage).
        """
        return self._costs_from_power(self.power_gains(frame_ids, layer, stream))

    def link_state(self, frame_ids, layer: int, stream: int, outage_target: float | None = None) -> LinkState:
        """Planned costs and realised delivery under the configured fading and CSI, [R, K, N].

        The router plans on |h_hat|^2 (outage_target None) or on the conservative gain, the
        outage_target-quantile of |h|^2 given h_hat (docs/method.md); a link is delivered
        when the true |h|^2 is at least the planned one.  With perfect CSI and
        outage_target None, planned_costs equals costs() bit for bit and every finite link
        is delivered.
        """
        return self.link_states(frame_ids, layer, stream, [outage_target])[0]

    def link_states(self, frame_ids, layer: int, stream: int, outage_targets) -> list[LinkState]:
        """:meth:`link_state` for several outage targets (None allowed) on one channel draw."""
        targets = [check_outage_target(q) for q in outage_targets]
        true_power, est_power = self.true_and_estimated_power(frame_ids, layer, stream)
        states = []
        for q in targets:
            plan_power = est_power if q is None else conservative_power(est_power, self.csi_correlation, q)
            planned_costs = self._costs_from_power(plan_power)
            delivered = torch.from_numpy(true_power >= plan_power) & torch.isfinite(planned_costs)
            states.append(LinkState(planned_costs=planned_costs, delivered=delivered))
        return states

    def true_and_estimated_power(self, frame_ids, layer: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
        """(|h|^2, |h_hat|^2): the true fading and the coordinator's estimate, float64 numpy [R, K, N].

        h_hat = sqrt(1 - eps^2) h(f - D) + eps w.  With perfect CSI both are the same array.
        """
        cfg = self.cfg
        ids = _as_numpy_ids(frame_ids)
        delay = int(cfg.csi_delay_frames)
        if delay == 0:
            true_power = self.power_gains(ids, layer, stream)
            old_power = true_power
        else:  # one call for both frames: the jakes tables are shared
            both = self._any_power(np.concatenate([ids, ids - delay]), layer, stream)
            true_power, old_power = both[: len(ids)], both[len(ids) :]
        if cfg.csi_error_std == 0:
            return true_power, old_power
        noise_power, noise_cos = csi_noise(self.seed, stream, layer, ids, self.num_devices, self.num_subcarriers)
        return true_power, estimate_power(old_power, noise_power, noise_cos, cfg.csi_error_std)

    def costs_from_gains(self, gains: torch.Tensor) -> torch.Tensor:
        """Per-link energy in J from linear gains [..., K, N]; +inf in outage."""
        gains = gains.detach().to("cpu", torch.float64)
        flat = gains.reshape(-1, *gains.shape[-2:]).numpy()
        return self._energies(flat, np.ones(gains.shape[-2])).reshape(gains.shape)

    def _costs_from_power(self, power: np.ndarray) -> torch.Tensor:
        """Per-link energy in J from fading powers |h|^2 [R, K, N] (gain = mean_gain[k] |h|^2)."""
        return self._energies(power, self.mean_gain.numpy())

    def _energies(self, power: np.ndarray, mean_gain: np.ndarray) -> torch.Tensor:
        """e = P_ap S / r_dl + P_dev S / r_ul with r = B log2(1 + P G / sigma2), G = mean_gain[k]
        power[r, k, n]; +inf where either hop exceeds T_max.  One fused, multi-threaded pass
        (kernels.link_energies)."""
        cfg = self.cfg
        energies = run_threaded(
            link_energies,
            np.ascontiguousarray(power, dtype=np.float64),
            np.ascontiguousarray(mean_gain, dtype=np.float64),
            float(cfg.subcarrier_bandwidth_hz),
            float(cfg.noise_power_w),
            float(cfg.ap_power_w),
            float(cfg.device_power_w),
            float(self.payload_bits),
            float(cfg.latency_budget_s),
        )
        return torch.from_numpy(energies)

    def outage_probability(self) -> torch.Tensor:
        """Closed-form per-link outage probability of each device (perfect CSI), [K]; the
        Exp(1) law of |h|^2 is exact for rayleigh and the Rayleigh TDL profiles A, B, C."""
        if self.profile is not None and self.profile.los_power > 0:
            raise ValueError(
                f"outage_probability: tdl_profile={self.cfg.tdl_profile!r} is Rician; the closed form is for Rayleigh links"
            )
        return torch.tensor(
            [outage_probability(self.cfg, g, self.payload_bits) for g in self.mean_gain.tolist()], dtype=torch.float64
        )

    def _gains_from_power(self, power: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(power) * self.mean_gain[None, :, None]

    def _any_power(self, ids: np.ndarray, layer: int, stream: int) -> np.ndarray:
        """|h|^2 for any int64 frame ids, negative ones (before the stream starts) included."""
        cfg, K, N = self.cfg, self.num_devices, self.num_subcarriers
        if self.profile is None:
            if cfg.fading == "iid":
                return iid_power_gains(self.seed, stream, layer, ids, K, N)
            return jakes_power_gains(self.seed, stream, layer, ids, K, N, cfg.doppler_hz, cfg.frame_s)
        tdl = (self.profile, cfg.delay_spread_s, cfg.subcarrier_bandwidth_hz)
        if cfg.fading == "iid":
            return tdl_iid_power(self.seed, stream, layer, ids, K, N, *tdl)
        return tdl_jakes_power(self.seed, stream, layer, ids, K, N, *tdl, cfg.doppler_hz, cfg.frame_s)


def check_outage_target(outage_target) -> float | None:
    """None, or a float in (0, 1); ValueError naming outage_target otherwise."""
    if outage_target is None:
        return None
    if not is_real(outage_target) or not 0.0 < outage_target < 1.0:
        raise ValueError(f"outage_target={outage_target!r}: must be null or a probability in (0, 1)")
    return float(outage_target)


def _as_numpy_ids(frame_ids) -> np.ndarray:
    """Frame ids as int64 numpy [R]; ValueError unless they are integers in [0, 2**63 - 1]."""
    if isinstance(frame_ids, torch.Tensor):
        frame_ids = frame_ids.detach().cpu().numpy()
    try:
        ids = np.asarray(frame_ids)
    except (OverflowError, ValueError) as exc:  # ragged lists, Python ints beyond int64
        raise ValueError(f"frame_ids: must be integers in [0, 2**63 - 1] ({exc})") from None
    if ids.dtype == object:  # Python ints beyond int64
        raise ValueError("frame_ids: must be integers in [0, 2**63 - 1]")
    if not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
        # float ids would be truncated to other frames' ids (0.7 -> frame 0)
        raise ValueError(f"frame_ids: must be integers (an integer tensor, array or list), got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or (ids.dtype == np.uint64 and ids.max() > INT64_MAX)):
        raise ValueError("frame_ids: must be integers in [0, 2**63 - 1]")
    return ids.astype(np.int64, copy=False).reshape(-1)
