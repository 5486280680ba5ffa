"""Config validation and object building for train.py and evaluate.py.

Every check runs before any work (data loading, model building, training) and reports a bad
value as a :class:`ConfigError` with one line that names the key, the value and what is
allowed.  The entry points print that line and exit with status 2 (see :func:`report_errors`).

Evaluation policy syntax (``eval.policies``): ``NAME`` or ``NAME@K``.

* ``topk@K``, ``channel_topk@K``, ``random_topk@K``: fixed cardinality K (``NAME`` alone uses
  the checkpoint's ``router.k``);
* ``dense``: every reachable expert;
* ``des``, ``jesa``, ``optimal``: one row per importance factor in ``eval.gammas`` (a float
  for every MoE layer, or a list with one value per layer), with ``eval.k_min`` / ``eval.k_max``.
"""
from __future__ import annotations

import math
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from .data import DATASETS
from .selection.registry import FIXED_K_POLICIES, POLICIES, STATIC_POLICIES

# Policies with a relevance target gamma and cardinality bounds k_min..k_max.
GAMMA_POLICIES = ("des", "jesa", "optimal")
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")

EXIT_CONFIG_ERROR = 2
EXIT_RUNTIME_ERROR = 1


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key."""


# ---------------------------------------------------------------------------------------------
# Small typed getters


def _fmt(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    return repr(value)


def _get(cfg: DictConfig, key: str) -> Any:
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True, default=_ABSENT)
    except MissingMandatoryValue:
        raise ConfigError(f"{key} is required but not set (pass {key}=...)") from None
    except Exception as exc:  # e.g. a broken interpolation such as ${oc.env:...}
        raise ConfigError(f"{key}: cannot be resolved ({str(exc).splitlines()[0]})") from None
    if value is _ABSENT:
        raise ConfigError(f"{key} is missing from the config")
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


_ABSENT = object()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def get_int(cfg: DictConfig, key: str, *, minimum: int | None = None, maximum: int | None = None, optional: bool = False, why: str = "") -> int | None:
    value = _get(cfg, key)
    if value is None and optional:
        return None
    bounds = _range_text(minimum, maximum)
    allowed = f"an integer{bounds}" + (" or null" if optional else "") + (f" ({why})" if why else "")
    if not _is_int(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ConfigError(f"{key}={_fmt(value)}: must be {allowed}")
    return value


def get_float(cfg: DictConfig, key: str, *, minimum: float | None = None, exclusive_minimum: float | None = None, optional: bool = False) -> float | None:
    value = _get(cfg, key)
    if value is None and optional:
        return None
    if minimum is not None:
        bound_text, ok = f" >= {minimum:g}", lambda v: v >= minimum
    elif exclusive_minimum is not None:
        bound_text, ok = f" > {exclusive_minimum:g}", lambda v: v > exclusive_minimum
    else:
        bound_text, ok = "", lambda v: True
    if not _is_number(value) or not math.isfinite(value) or not ok(value):
        raise ConfigError(f"{key}={_fmt(value)}: must be a finite number{bound_text}" + (" or null" if optional else ""))
    return float(value)


def get_bool(cfg: DictConfig, key: str) -> bool:
    value = _get(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={_fmt(value)}: must be true or false")
    return value


def get_str(cfg: DictConfig, key: str, *, choices: tuple[str, ...] | None = None, optional: bool = False) -> str | None:
    value = _get(cfg, key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or (choices is not None and value not in choices):
        allowed = f"one of {', '.join(choices)}" if choices is not None else "a string"
        raise ConfigError(f"{key}={_fmt(value)}: must be {allowed}")
    return value


def _range_text(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""


# ---------------------------------------------------------------------------------------------
# Sections


def validate_device(cfg: DictConfig, key: str = "device") -> str:
    value = get_str(cfg, key)
    import torch

    if value == "auto" or value == "cpu":
        return value
    if value == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"{key}={value!r}: MPS is not available on this machine; use auto or cpu")
        return value
    if value == "cuda" or (value.startswith("cuda:") and value[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={value!r}: CUDA is not available on this machine; use auto or cpu")
        index = int(value[5:]) if ":" in value else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"{key}={value!r}: only {torch.cuda.device_count()} CUDA device(s) present")
        return value
    raise ConfigError(f"{key}={value!r}: must be one of {', '.join(DEVICES)}")


def validate_data(cfg: DictConfig, *, training: bool) -> None:
    get_str(cfg, "data.name", choices=DATASETS)
    get_str(cfg, "data.root")
    get_int(cfg, "data.batch_size", minimum=1)
    get_int(cfg, "data.num_workers", minimum=0)
    get_int(cfg, "data.limit_test", minimum=1, optional=True)
    if training:
        get_int(cfg, "data.limit_train", minimum=1, optional=True)
        get_int(cfg, "data.val_size", minimum=0)
        get_bool(cfg, "data.augment")


@dataclass(frozen=True)
class ModelShape:
    num_experts: int
    num_moe_layers: int
    d_model: int
    hidden_mult: int


def validate_model(cfg: DictConfig) -> ModelShape:
    return ModelShape(
        num_experts=get_int(cfg, "model.num_experts", minimum=1),
        num_moe_layers=get_int(cfg, "model.num_moe_layers", minimum=1),
        d_model=get_int(cfg, "model.d_model", minimum=1),
        hidden_mult=get_int(cfg, "model.hidden_mult", minimum=1),
    )


def channel_config(cfg: DictConfig):
    """Build and validate ``ChannelConfig`` from ``cfg.channel``."""
    from .channel import ChannelConfig

    section = _get(cfg, "channel")
    if not isinstance(section, dict):
        raise ConfigError(f"channel={_fmt(section)}: must be a mapping of ChannelConfig fields")
    known = [f.name for f in fields(ChannelConfig)]
    for name in section:
        if name not in known:
            raise ConfigError(f"channel.{name}: unknown key; allowed: {', '.join(known)}")
    try:
        return ChannelConfig(**section).validate(prefix="channel")
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None


def validate_gamma(value: Any, key: str, num_layers: int) -> float | list[float]:
    """gamma: a float in (0, 1] for every layer, or a list of ``num_layers`` such floats."""
    allowed = f"a number in (0, 1] or a list of {num_layers} such numbers (one per MoE layer)"

    def ok(v: Any) -> bool:
        return _is_number(v) and 0.0 < v <= 1.0

    if isinstance(value, (list, tuple)):
        if len(value) != num_layers or not all(ok(v) for v in value):
            reason = f"has {len(value)} values for {num_layers} MoE layers; " if len(value) != num_layers else ""
            raise ConfigError(f"{key}={_fmt(value)}: {reason}must be {allowed}")
        return [float(v) for v in value]
    if not ok(value):
        raise ConfigError(f"{key}={_fmt(value)}: must be {allowed}")
    return float(value)


def validate_router(cfg: DictConfig, prefix: str, shape: ModelShape, num_subcarriers: int) -> dict[str, Any]:
    """Check ``<prefix>.{policy,k,gamma,k_min,k_max}`` against the model and the channel."""
    K = shape.num_experts
    policy = get_str(cfg, f"{prefix}.policy", choices=POLICIES)
    k = get_int(cfg, f"{prefix}.k", minimum=1, maximum=K, why=f"at most model.num_experts={K}")
    gamma = validate_gamma(_get(cfg, f"{prefix}.gamma"), f"{prefix}.gamma", shape.num_moe_layers)
    k_min = get_int(cfg, f"{prefix}.k_min", minimum=1, maximum=K, why=f"at most model.num_experts={K}")
    k_max = get_int(cfg, f"{prefix}.k_max", minimum=1, maximum=K, optional=True, why=f"at most model.num_experts={K}")
    if k_max is not None and k_min > k_max:
        raise ConfigError(f"{prefix}.k_min={k_min}: must be <= {prefix}.k_max={k_max}")
    _check_policy_fits_channel(policy, f"{prefix}.policy", K, num_subcarriers, k_min)
    return {"policy": policy, "k": k, "gamma": gamma, "k_min": k_min, "k_max": k_max}


def _check_policy_fits_channel(policy: str, key: str, num_experts: int, num_subcarriers: int, k_min: int) -> None:
    if policy in STATIC_POLICIES and num_subcarriers < num_experts:
        raise ConfigError(
            f"{key}={policy!r}: the static subcarrier plan needs channel.num_subcarriers >= model.num_experts "
            f"(got {num_subcarriers} < {num_experts}); use jesa or optimal, or more subcarriers"
        )
    if policy in GAMMA_POLICIES and num_subcarriers < k_min:
        raise ConfigError(f"{key}={policy!r}: needs channel.num_subcarriers >= k_min (got {num_subcarriers} < {k_min})")


def validate_train_config(cfg: DictConfig) -> None:
    """Validate the whole train.yaml config; raises ConfigError on the first bad value."""
    get_int(cfg, "seed", minimum=0)
    validate_device(cfg)
    get_bool(cfg, "progress")
    validate_data(cfg, training=True)
    shape = validate_model(cfg)
    channel = channel_config(cfg)
    validate_router(cfg, "router", shape, channel.num_subcarriers)
    validate_router(cfg, "eval_router", shape, channel.num_subcarriers)
    get_int(cfg, "train.epochs", minimum=1)
    get_float(cfg, "train.lr", exclusive_minimum=0.0)
    get_float(cfg, "train.weight_decay", minimum=0.0)
    get_float(cfg, "train.aux_loss_coef", minimum=0.0)
    get_float(cfg, "train.grad_clip", exclusive_minimum=0.0, optional=True)
    get_int(cfg, "train.warmup_steps", minimum=0)
    get_int(cfg, "train.log_every", minimum=1)
    get_int(cfg, "train.stop_after_epochs", minimum=1, optional=True)
    resume = get_str(cfg, "resume", optional=True)
    if resume is not None and not os.path.isfile(resume_path(cfg)):
        raise ConfigError(f"resume={resume!r}: no such file; pass the checkpoint.pt of an earlier run")


def validate_checkpoint_config(cfg: DictConfig) -> None:
    """The parts of a checkpoint's training config that evaluate.py rebuilds: the seed, the
    dataset split, the model, the channel and the training router (only these, so that
    checkpoints stay usable when train.yaml gains new keys)."""
    get_int(cfg, "seed", minimum=0)
    get_str(cfg, "data.name", choices=DATASETS)
    get_int(cfg, "data.val_size", minimum=0)
    get_int(cfg, "data.limit_train", minimum=1, optional=True)
    get_bool(cfg, "data.augment")
    shape = validate_model(cfg)
    validate_router(cfg, "router", shape, channel_config(cfg).num_subcarriers)


def resume_path(cfg: DictConfig) -> str | None:
    resume = cfg.get("resume")
    return None if resume is None else _absolute(resume)


def _absolute(path: str) -> str:
    from hydra.utils import to_absolute_path

    return to_absolute_path(os.path.expanduser(path))


def data_root(cfg: DictConfig) -> str:
    """``data.root`` resolved against the directory the command was started from."""
    return _absolute(cfg.data.root)


@dataclass(frozen=True)
class EvalPolicy:
    """One evaluation setting: a policy, its k (fixed-k policies) and gamma (des/jesa/optimal)."""

    policy: str
    k: int | None = None
    gamma: float | list[float] | None = None
    k_min: int = 1
    k_max: int | None = None

    @property
    def label(self) -> str:
        return self.policy if self.k is None else f"{self.policy}@{self.k}"


def parse_policy(text: Any, key: str, *, num_experts: int, default_k: int) -> tuple[str, int | None]:
    """``"topk@2"`` -> ("topk", 2); ``"des"`` -> ("des", None); see the module docstring."""
    allowed = "NAME or NAME@K with NAME in " + ", ".join(POLICIES) + " (K only for " + ", ".join(FIXED_K_POLICIES) + ")"
    if not isinstance(text, str):
        raise ConfigError(f"{key}={_fmt(text)}: must be {allowed}")
    name, _, k_text = text.partition("@")
    if name not in POLICIES:
        raise ConfigError(f"{key}={text!r}: unknown policy {name!r}; must be {allowed}")
    if name not in FIXED_K_POLICIES:
        if k_text:
            raise ConfigError(f"{key}={text!r}: policy {name!r} takes no @K; must be {allowed}")
        return name, None
    if not k_text:
        return name, default_k
    if not k_text.isdigit() or not 1 <= int(k_text) <= num_experts:
        raise ConfigError(f"{key}={text!r}: K must be an integer in [1, {num_experts}] (model.num_experts)")
    return name, int(k_text)


def validate_eval_config(cfg: DictConfig) -> None:
    """Validate evaluate.yaml's own keys (the checkpoint is checked by :func:`eval_policies`)."""
    get_str(cfg, "ckpt")
    get_int(cfg, "seed", minimum=0, optional=True)
    validate_device(cfg)
    get_bool(cfg, "progress")
    get_str(cfg, "data.root")
    get_int(cfg, "data.batch_size", minimum=1)
    get_int(cfg, "data.num_workers", minimum=0)
    get_int(cfg, "data.limit_test", minimum=1, optional=True)
    policies = _get(cfg, "eval.policies")
    if not isinstance(policies, list) or not policies:
        raise ConfigError(f"eval.policies={_fmt(policies)}: must be a non-empty list such as [topk@2, dense, des, jesa]")
    gammas = _get(cfg, "eval.gammas")
    if not isinstance(gammas, list) or not gammas:
        raise ConfigError(f"eval.gammas={_fmt(gammas)}: must be a non-empty list of numbers in (0, 1]")
    get_int(cfg, "eval.channel_draws", minimum=1)
    k_min = get_int(cfg, "eval.k_min", minimum=1)
    k_max = get_int(cfg, "eval.k_max", minimum=1, optional=True)
    if k_max is not None and k_min > k_max:
        raise ConfigError(f"eval.k_min={k_min}: must be <= eval.k_max={k_max}")


def eval_policies(cfg: DictConfig, train_cfg: DictConfig) -> list[EvalPolicy]:
    """Expand eval.policies x eval.gammas into settings, checked against the checkpoint's model."""
    shape = validate_model(train_cfg)
    num_subcarriers = channel_config(train_cfg).num_subcarriers
    K, L = shape.num_experts, shape.num_moe_layers
    k_min = get_int(cfg, "eval.k_min", minimum=1, maximum=K, why=f"at most the checkpoint's model.num_experts={K}")
    k_max = get_int(cfg, "eval.k_max", minimum=1, maximum=K, optional=True, why=f"at most the checkpoint's model.num_experts={K}")
    gammas = [validate_gamma(g, f"eval.gammas[{i}]", L) for i, g in enumerate(_get(cfg, "eval.gammas"))]
    default_k = int(train_cfg.router.k)
    settings: list[EvalPolicy] = []
    for i, text in enumerate(_get(cfg, "eval.policies")):
        key = f"eval.policies[{i}]"
        name, k = parse_policy(text, key, num_experts=K, default_k=default_k)
        _check_policy_fits_channel(name, key, K, num_subcarriers, k_min)
        if name in GAMMA_POLICIES:
            settings.extend(EvalPolicy(name, None, gamma, k_min, k_max) for gamma in gammas)
        else:
            settings.append(EvalPolicy(name, k))
    labels = [(s.label, _fmt(s.gamma)) for s in settings]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ConfigError(f"eval.policies / eval.gammas: duplicate setting {duplicates[0][0]} (gamma {duplicates[0][1]})")
    return settings


# ---------------------------------------------------------------------------------------------
# Builders


def router_specs(cfg: DictConfig, prefix: str, failure_energy: float) -> list:
    """One ``RouterSpec`` per MoE layer from ``cfg.<prefix>`` (gamma may differ per layer)."""
    section = cfg[prefix]
    num_layers = int(cfg.model.num_moe_layers)
    return setting_specs(
        EvalPolicy(section.policy, int(section.k), _plain(section.gamma), int(section.k_min), _plain(section.k_max)),
        num_layers,
        failure_energy,
    )


def setting_specs(setting: EvalPolicy, num_layers: int, failure_energy: float) -> list:
    """Per-layer RouterSpecs of one setting (gamma 1.0 where the policy has none)."""
    from .moe import RouterSpec
    gammas = setting.gamma if isinstance(setting.gamma, list) else [1.0 if setting.gamma is None else setting.gamma] * num_layers
    return [
        RouterSpec(
            policy=setting.policy,
            gamma=float(gammas[layer]),
            k=2 if setting.k is None else int(setting.k),
            k_min=int(setting.k_min),
            k_max=None if setting.k_max is None else int(setting.k_max),
            failure_energy=float(failure_energy),
        )
        for layer in range(num_layers)
    ]


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def build_model(cfg: DictConfig, info):
    """The classifier described by ``cfg.model`` for a dataset described by ``info`` (DataInfo)."""
    from .models import DMoEClassifier

    return DMoEClassifier(
        in_channels=info.in_channels,
        num_classes=info.num_classes,
        image_size=info.image_size,
        d_model=int(cfg.model.d_model),
        num_experts=int(cfg.model.num_experts),
        num_moe_layers=int(cfg.model.num_moe_layers),
        hidden_mult=int(cfg.model.hidden_mult),
    )


def build_channel(cfg: DictConfig, seed: int | None = None):
    """The run's ``WirelessChannel``: device geometry and fading seeded by ``cfg.seed``."""
    from .channel import WirelessChannel

    return WirelessChannel(
        channel_config(cfg), int(cfg.model.num_experts), int(cfg.model.d_model), int(cfg.seed if seed is None else seed)
    )


# ---------------------------------------------------------------------------------------------
# Error reporting for the entry points


@contextmanager
def report_errors(*error_types: type[BaseException]) -> Iterator[None]:
    """Turn a ConfigError into one stderr line and exit status 2, and the other
    ``error_types`` (e.g. missing data, a diverging loss) into one line and exit status 1.

    With ``HYDRA_FULL_ERROR=1`` the exception propagates with its traceback instead.
    """
    try:
        yield
    except (ConfigError, *error_types) as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = " ".join(str(exc).split("\n"))
        print(f"Error: {message}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR if isinstance(exc, ConfigError) else EXIT_RUNTIME_ERROR)
