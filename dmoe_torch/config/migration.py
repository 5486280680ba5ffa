"""Runs recorded before a key existed: every key added since, with the value its absence means
(what those runs did), in one table keyed by checkpoint version.

A checkpoint or a run directory's config.yaml written before a key was added lacks it; the
config loaders (:mod:`dmoe_torch.config.schema`) read such a key as its value here, and a rerun
of an old run directory compares it as that value (:func:`dmoe_torch.engine.rundir.check_rerun`).
Adding a config key that old runs lack is one line here (docs/architecture.md, "How to add a
config key").  A new checkpoint version (engine/checkpoint.py CHECKPOINT_VERSION) gets its own
entry: the keys added since the previous one.
"""

from __future__ import annotations

from typing import Any

from ..channel import ChannelConfig

# checkpoint version -> {dotted key: the value its absence means}
ADDED_KEYS: dict[int, dict[str, Any]] = {
    1: {
        "model.name": "cnn",  # the per-image model came first
        "model.link_dropout": 0.0,
        "model.combine": "renormalized",
        "model.balance_on": "selection",
        "model.channel_gate": False,
        "train.z_loss_coef": 0.0,
        "train.energy_loss_coef": 0.0,
        "train.precision": "fp32",
        "router.lam": None,
        "router.outage_target": None,  # plan on the channel estimate
        "eval_router.lam": None,
        "eval_router.outage_target": None,
        "eval.lams": [],  # evaluate.yaml before the lagrangian policy: no multipliers to sweep
        # channel.model and its keys (docs/method.md, "Channel models"): the rayleigh channel
        **{
            f"channel.{name}": getattr(ChannelConfig, name)
            for name in ("model", "tdl_profile", "delay_spread_s", "carrier_frequency_hz", "frame")
        },
    },
}

# Every added key of every version (a later version's value wins).
ADDED_KEY_DEFAULTS: dict[str, Any] = {key: value for added in ADDED_KEYS.values() for key, value in added.items()}


def added_default(key: str) -> Any:
    """The value an absent ``key`` (dotted) means; KeyError for a key every run has."""
    return ADDED_KEY_DEFAULTS[key]


def section_defaults(prefix: str) -> dict[str, Any]:
    """The added keys of section ``prefix`` (``"model"``, ``"train"``, ...), by field name."""
    return {key[len(prefix) + 1 :]: value for key, value in ADDED_KEY_DEFAULTS.items() if key.startswith(f"{prefix}.")}
