"""The objects a validated config describes: the model, the channel and the per-layer
router specs (train.py, evaluate.py and the benchmarks build them here, from the config or a
checkpoint's config)."""

from __future__ import annotations

from omegaconf import DictConfig

from ..config import channel_config, load_model, load_section, validate_model
from ..config.eval import EvalPolicy
from ..config.schema import RouterConfig
from ..models import ModelConfig


def router_specs(cfg: DictConfig, prefix: str, failure_energy: float) -> list:
    """One ``RouterSpec`` per MoE layer from ``cfg.<prefix>`` (gamma may differ per layer)."""
    shape = validate_model(cfg)
    router = load_section(
        cfg, prefix, RouterConfig, num_experts=shape.num_experts, num_layers=shape.num_moe_layers, section=prefix
    )
    return layer_specs(router, shape.num_moe_layers, failure_energy)


def layer_specs(router: RouterConfig, num_layers: int, failure_energy: float) -> list:
    """One ``RouterSpec`` per MoE layer of a validated router section."""
    setting = EvalPolicy(router.policy, router.k, router.gamma, router.k_min, router.k_max, router.outage_target, router.lam)
    return setting_specs(setting, num_layers, failure_energy)


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


def build_model(model: DictConfig | ModelConfig, info):
    """The classifier of a model config (a validated ``ModelConfig``, or a config whose
    ``model`` section describes it) for a dataset described by ``info`` (DataInfo)."""
    if not isinstance(model, ModelConfig):
        model = load_model(model)
    return model.build(info.in_channels, info.num_classes, info.image_size)


def build_channel(cfg: DictConfig, seed: int | None = None):
    """The run's ``WirelessChannel``: device geometry and fading seeded by ``cfg.seed``."""
    from ..channel import WirelessChannel

    return WirelessChannel(
        channel_config(cfg), int(cfg.model.num_experts), int(cfg.model.d_model), int(cfg.seed if seed is None else seed)
    )
