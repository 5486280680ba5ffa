"""The objects a validated config describes: the model, the channel and the per-layer
router specs (train.py, evaluate.py and the benchmarks build them here, from the config or a
checkpoint's config)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ..config import channel_config, validate_model
from ..config.eval import EvalPolicy


def router_specs(cfg: DictConfig, prefix: str, failure_energy: float) -> list:
    """One ``RouterSpec`` per MoE layer from ``cfg.<prefix>`` (gamma may differ per layer)."""
    section = cfg[prefix]
    num_layers = validate_model(cfg).num_moe_layers
    return setting_specs(
        EvalPolicy(
            section.policy,
            int(section.k),
            _plain(section.gamma),
            int(section.k_min),
            _plain(section.k_max),
            OmegaConf.select(section, "outage_target", default=None),
            OmegaConf.select(section, "lam", default=None),
        ),
        num_layers,
        failure_energy,
    )


def setting_specs(setting: EvalPolicy, num_layers: int, failure_energy: float) -> list:
    """Per-layer RouterSpecs of one setting (gamma 1.0 where the policy has none)."""
    from ..moe import RouterSpec

    gammas = setting.gamma if isinstance(setting.gamma, list) else [1.0 if setting.gamma is None else setting.gamma] * num_layers
    return [
        RouterSpec(
            policy=setting.policy,
            gamma=float(gammas[layer]),
            k=2 if setting.k is None else int(setting.k),
            k_min=int(setting.k_min),
            k_max=None if setting.k_max is None else int(setting.k_max),
            failure_energy=float(failure_energy),
            outage_target=setting.outage_target,
            lam=setting.lam,
        )
        for layer in range(num_layers)
    ]


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def build_model(cfg: DictConfig, info):
    """The classifier described by ``cfg.model`` for a dataset described by ``info`` (DataInfo)."""
    model = _plain(cfg.model)
    name = model.pop("name", "cnn")
    if name == "convmoe":
        from ..models.convmoe import ConvMoEClassifier

        return ConvMoEClassifier(in_channels=info.in_channels, num_classes=info.num_classes, image_size=info.image_size, **model)
    if name == "vmoe":
        from ..models.vmoe import VMoEClassifier

        return VMoEClassifier(in_channels=info.in_channels, num_classes=info.num_classes, image_size=info.image_size, **model)
    from ..models import DMoEClassifier

    return DMoEClassifier(in_channels=info.in_channels, num_classes=info.num_classes, image_size=info.image_size, **model)


def build_channel(cfg: DictConfig, seed: int | None = None):
    """The run's ``WirelessChannel``: device geometry and fading seeded by ``cfg.seed``."""
    from ..channel import WirelessChannel

    return WirelessChannel(
        channel_config(cfg), int(cfg.model.num_experts), int(cfg.model.d_model), int(cfg.seed if seed is None else seed)
    )
