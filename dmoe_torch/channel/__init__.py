"""Wireless channel of the DMoE protocol: geometry and energy, fading, imperfect CSI.

    from dmoe_torch.channel import ChannelConfig, WirelessChannel

* ``geometry.py``: :class:`ChannelConfig`, path loss, :class:`WirelessChannel` (per-link
  energies, :meth:`WirelessChannel.link_state` for planning under imperfect CSI).
* ``fading.py``: counter-based i.i.d. Rayleigh draws and the Jakes sum-of-sinusoids process.
* ``csi.py``: the CSI estimate and the conservative (outage-target quantile) planning gain.
* ``tdl.py``: TR 38.901 TDL-A..E frequency-selective fading (``channel.model=tdl``, umi, uma).
* ``scenario.py``: TR 38.901 UMi / UMa LoS probability, path loss and shadow fading.

docs/method.md sections 1 and "Channel dynamics and imperfect CSI" give the model.
"""

from .csi import conservative_power, csi_correlation, estimate_power
from .fading import (
    JAKES_SINUSOIDS,
    csi_noise,
    iid_power_gains,
    jakes_fading,
    jakes_power_gains,
    rayleigh_power_gains,
)
from .geometry import (
    BOLTZMANN_NOISE_DBM_PER_HZ,
    CHANNEL_MODELS,
    FADING_MODELS,
    ChannelConfig,
    LinkState,
    WirelessChannel,
    check_outage_target,
    db_to_linear,
    dbm_to_watt,
    linear_to_db,
    outage_probability,
    path_loss_db,
)
from .tdl import TDL_PROFILES, MissingSionnaError, TapProfile, tap_profile

__all__ = [
    "BOLTZMANN_NOISE_DBM_PER_HZ",
    "CHANNEL_MODELS",
    "FADING_MODELS",
    "JAKES_SINUSOIDS",
    "ChannelConfig",
    "LinkState",
    "MissingSionnaError",
    "TDL_PROFILES",
    "TapProfile",
    "WirelessChannel",
    "check_outage_target",
    "conservative_power",
    "csi_correlation",
    "csi_noise",
    "db_to_linear",
    "dbm_to_watt",
    "estimate_power",
    "iid_power_gains",
    "jakes_fading",
    "jakes_power_gains",
    "linear_to_db",
    "outage_probability",
    "path_loss_db",
    "rayleigh_power_gains",
    "tap_profile",
]
