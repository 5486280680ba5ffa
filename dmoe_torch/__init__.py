"""dmoe-torch: wireless-aware distributed Mixture-of-Experts (DMoE) in PyTorch.

The public names, for use in your own code (README "Use dmoe-torch in your own code",
examples/)::

    from dmoe_torch import des, jesa, route, Selection          # routing on your own tensors
    from dmoe_torch import ChannelConfig, WirelessChannel       # per-link energies
    from dmoe_torch import MoELayer, RouterSpec                 # the layer in your own nn.Module
    from dmoe_torch import ConvMoEClassifier, DMoEClassifier, VMoEClassifier  # the built-in models

Each name is imported from its module on first use, so ``import dmoe_torch`` stays cheap
(no torch, scipy or model code until a name is asked for).
"""

import importlib
import os
from typing import Any

import numba

# The solvers and channel kernels run numba's parallel loops.  numba's default OpenMP layer
# shares the OpenMP runtime with torch and resets torch's thread count when its pool starts
# (OMP_NUM_THREADS=1 would become the CPU count), which changes results and oversubscribes
# cores; the workqueue layer keeps its own threads.  A user's NUMBA_THREADING_LAYER wins.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

__version__ = "0.1.0"

# The module that defines each public name.
_HOMES = {
    # Routing policies: a Selection from scores [B, K] and costs [B, K] or [B, K, N] (joules).
    "dmoe_torch.selection": (
        "POLICIES",
        "Selection",
        "route",
        "des",
        "jesa",
        "topk",
        "channel_topk",
        "random_topk",
        "dense",
        "register_policy",
        "policy_names",
        "POLICY_TABLE",
        "Policy",
        "RouteArgs",
    ),
    "dmoe_torch.selection.delivery": ("apply_delivery",),
    "dmoe_torch.selection.exact": ("brute_force_p1", "milp_p1", "brute_force_p2", "milp_p2"),
    # The wireless channel: geometry, fading, per-link energies in joules.
    "dmoe_torch.channel": (
        "ChannelConfig",
        "WirelessChannel",
        "LinkState",
        "path_loss_db",
        "outage_probability",
        "db_to_linear",
        "linear_to_db",
        "dbm_to_watt",
    ),
    # The MoE layer and the models built from it.
    "dmoe_torch.moe": ("MoELayer", "MoEOutput", "RouterSpec", "Expert", "MetricAverager", "perfect_costs"),
    "dmoe_torch.models.cnn": ("DMoEClassifier",),
    "dmoe_torch.models.common": ("ModelOutput",),
    "dmoe_torch.models.vmoe": ("VMoEClassifier",),
    "dmoe_torch.models.convmoe": ("ConvMoEClassifier",),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "ChannelConfig",
    "ConvMoEClassifier",
    "DMoEClassifier",
    "Expert",
    "LinkState",
    "MetricAverager",
    "MoELayer",
    "MoEOutput",
    "ModelOutput",
    "POLICIES",
    "RouterSpec",
    "Selection",
    "VMoEClassifier",
    "WirelessChannel",
    "__version__",
    "apply_delivery",
    "brute_force_p1",
    "brute_force_p2",
    "channel_topk",
    "db_to_linear",
    "dbm_to_watt",
    "dense",
    "des",
    "jesa",
    "linear_to_db",
    "milp_p1",
    "milp_p2",
    "outage_probability",
    "path_loss_db",
    "perfect_costs",
    "random_topk",
    "route",
    "topk",
    "register_policy",
    "policy_names",
    "POLICY_TABLE",
    "Policy",
    "RouteArgs",
]


def __getattr__(name: str) -> Any:
    home = _HOME_OF.get(name)
    if home is None:
        raise AttributeError(f"module 'dmoe_torch' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME_OF))
