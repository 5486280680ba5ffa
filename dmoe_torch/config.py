"""Config validation and object building for train.py and evaluate.py.

Every check runs before any work (data loading, model building, training) and reports a bad
value as a :class:`ConfigError` with one line that names the key, the value and what is
allowed.  Every section accepts only its own keys (:func:`check_keys`), so a typo or a
``+key=value`` addition fails too.  The entry points print that line and exit with status 2
(see :func:`run_entry_point`), and validate before Hydra creates the run directory
(:class:`ValidateFirst`).

Evaluation policy syntax (``eval.policies``): ``NAME`` or ``NAME@K``.

* ``topk@K``, ``channel_topk@K``, ``random_topk@K``: fixed cardinality K (``NAME`` alone uses
  the checkpoint's ``router.k``);
* ``dense``: every reachable expert;
* ``des``, ``jesa``, ``optimal``: one row per importance factor in ``eval.gammas`` (a float
  for every MoE layer, or a list with one value per layer), with ``eval.k_min`` / ``eval.k_max``.
"""
from __future__ import annotations

import copy
import difflib
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Iterator

from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue

from .data import DATASET_IMAGE_SIZES, DATASET_TRAIN_SIZES, DATASETS
from .models.vmoe import STEMS
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
# Strict keys: each section of train.yaml / evaluate.yaml accepts only these (model.* is checked
# per architecture in validate_model, channel.* against ChannelConfig's fields).

TRAIN_TOP_KEYS = ("seed", "device", "progress", "resume", "resume_force", "data", "model", "channel", "router",
                  "eval_router", "train", "runtime")
TRAIN_DATA_KEYS = ("name", "root", "batch_size", "val_size", "limit_train", "limit_test", "num_workers", "augment")
ROUTER_KEYS = ("policy", "k", "gamma", "k_min", "k_max", "outage_target")
TRAIN_KEYS = ("epochs", "lr", "weight_decay", "warmup_steps", "aux_loss_coef", "grad_clip", "log_every",
              "stop_after_epochs")
EVAL_TOP_KEYS = ("ckpt", "seed", "device", "progress", "data", "eval", "runtime", "channel")
EVAL_DATA_KEYS = ("root", "batch_size", "limit_test", "num_workers")
EVAL_KEYS = ("policies", "gammas", "k_min", "k_max", "outage_targets", "channel_draws")


def check_keys(section: Mapping, prefix: str, allowed: Iterable[str]) -> None:
    """Raise ConfigError for the first key of ``section`` that is not in ``allowed``.

    ``prefix`` is the section's dotted path ("" for the top level).  The one-line message
    names the key, the closest allowed key and every allowed one.
    """
    allowed = tuple(allowed)
    if not isinstance(section, Mapping):
        raise ConfigError(f"{prefix}={_fmt(section)}: must be a mapping with the keys {', '.join(allowed)}")
    for name in section:
        if name not in allowed:
            raise ConfigError(unknown_key_message(f"{prefix}.{name}" if prefix else str(name), allowed))


def unknown_key_message(key: str, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    close = difflib.get_close_matches(key.rpartition(".")[2], allowed, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"{key}: unknown key{hint}; allowed: {', '.join(allowed)}"


def allowed_keys(config_name: str, prefix: str) -> tuple[str, ...] | None:
    """The keys section ``prefix`` of ``config_name`` (train / evaluate) accepts (for
    ``model``: those of every architecture; validate_model checks them per model.name)."""
    if config_name == "evaluate" and prefix != "channel":
        return {"": EVAL_TOP_KEYS, "data": EVAL_DATA_KEYS, "eval": EVAL_KEYS}.get(prefix)
    if prefix == "channel":
        from .channel import ChannelConfig

        return tuple(f.name for f in fields(ChannelConfig))
    table = {"": TRAIN_TOP_KEYS, "data": TRAIN_DATA_KEYS, "router": ROUTER_KEYS, "eval_router": ROUTER_KEYS,
             "train": TRAIN_KEYS, "model": tuple(dict.fromkeys(key for keys in MODEL_KEYS.values() for key in keys))}
    return table.get(prefix)


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
    """``data.*`` of train.yaml (``training``) or evaluate.yaml."""
    check_keys(_get(cfg, "data"), "data", TRAIN_DATA_KEYS if training else EVAL_DATA_KEYS)
    name = get_str(cfg, "data.name", choices=DATASETS) if training else None
    validate_data_root(cfg)
    get_int(cfg, "data.batch_size", minimum=1)
    get_int(cfg, "data.num_workers", minimum=0)
    get_int(cfg, "data.limit_test", minimum=1, optional=True)
    if training:
        limit_train = get_int(cfg, "data.limit_train", minimum=1, optional=True)
        val_size = get_int(cfg, "data.val_size", minimum=0)
        available = DATASET_TRAIN_SIZES[name]
        # With data.limit_train the validation set is capped at limit_train // 5 (build_datasets).
        if limit_train is None and val_size >= available:
            raise ConfigError(f"data.val_size={val_size}: must be smaller than the {available} training images of "
                              f"data.name={name}")
        get_bool(cfg, "data.augment")


def validate_data_root(cfg: DictConfig) -> str:
    """``data.root`` must be an existing directory, except the default ``data`` (created on
    first use): a mistyped path then fails here instead of receiving a fresh copy of the data."""
    value = get_str(cfg, "data.root")
    path = data_root(cfg)
    if os.path.isdir(path) or (value == DEFAULT_DATA_ROOT and not os.path.exists(path)):
        return path
    what = "not a directory" if os.path.exists(path) else "no such directory"
    raise ConfigError(f"data.root={value!r}: {what} ({path}); create it first (only the default "
                      f"data.root={DEFAULT_DATA_ROOT} is created on first use)")


@dataclass(frozen=True)
class ModelShape:
    num_experts: int
    num_moe_layers: int
    d_model: int
    hidden_mult: int


# The keys of each model (config group `model`); `name` picks the architecture.
MODEL_KEYS = {
    "cnn": ("name", "d_model", "num_experts", "num_moe_layers", "hidden_mult", "link_dropout"),
    "vmoe": ("name", "d_model", "num_experts", "depth", "moe_every", "num_heads", "patch_size",
             "hidden_mult", "class_token", "stem", "link_dropout"),
}


def model_name(cfg: DictConfig) -> str:
    """``model.name``; checkpoints written before the token model have none and are ``cnn``."""
    if OmegaConf.select(cfg, "model.name", default=None) is None:
        return "cnn"
    return get_str(cfg, "model.name", choices=tuple(MODEL_KEYS))


def validate_model(cfg: DictConfig) -> ModelShape:
    """Check ``model.*`` (strict keys) against the architecture and the dataset's image size."""
    name = model_name(cfg)
    check_keys(_get(cfg, "model"), "model", MODEL_KEYS[name])
    num_experts = get_int(cfg, "model.num_experts", minimum=1)
    d_model = get_int(cfg, "model.d_model", minimum=1)
    hidden_mult = get_int(cfg, "model.hidden_mult", minimum=1)
    # Absent from checkpoints written before it existed: no dropout.
    link_dropout = OmegaConf.select(cfg, "model.link_dropout", default=0.0)
    if not _is_number(link_dropout) or not 0.0 <= link_dropout < 1.0:
        raise ConfigError(f"model.link_dropout={_fmt(link_dropout)}: must be a probability in [0, 1)")
    if name == "cnn":
        num_moe_layers = get_int(cfg, "model.num_moe_layers", minimum=1)
    else:
        depth = get_int(cfg, "model.depth", minimum=1)
        moe_every = get_int(cfg, "model.moe_every", minimum=1, maximum=depth,
                            why=f"at most model.depth={depth}, else no block is an MoE block")
        num_heads = get_int(cfg, "model.num_heads", minimum=1)
        if d_model % num_heads:
            raise ConfigError(f"model.num_heads={num_heads}: must divide model.d_model={d_model}")
        patch_size = get_int(cfg, "model.patch_size", minimum=1)
        image_size = DATASET_IMAGE_SIZES.get(OmegaConf.select(cfg, "data.name", default=None))
        if image_size is not None and image_size % patch_size:
            divisors = [p for p in range(1, image_size + 1) if image_size % p == 0]
            raise ConfigError(f"model.patch_size={patch_size}: must divide the image size {image_size} "
                              f"of data.name={cfg.data.name} (one of {', '.join(map(str, divisors))})")
        get_bool(cfg, "model.class_token")
        if get_str(cfg, "model.stem", choices=STEMS) == "conv2" and patch_size % 2:
            raise ConfigError(f"model.patch_size={patch_size}: must be even with model.stem=conv2 "
                              "(its stride-2 conv halves the image)")
        num_moe_layers = depth // moe_every
    return ModelShape(num_experts=num_experts, num_moe_layers=num_moe_layers, d_model=d_model, hidden_mult=hidden_mult)


def channel_config(cfg: DictConfig):
    """Build and validate ``ChannelConfig`` from ``cfg.channel``."""
    from .channel import ChannelConfig

    section = _get(cfg, "channel")
    if not isinstance(section, dict):
        raise ConfigError(f"channel={_fmt(section)}: must be a mapping of ChannelConfig fields")
    check_keys(section, "channel", [f.name for f in fields(ChannelConfig)])
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
    check_keys(_get(cfg, prefix), prefix, ROUTER_KEYS)
    K = shape.num_experts
    policy = get_str(cfg, f"{prefix}.policy", choices=POLICIES)
    k = get_int(cfg, f"{prefix}.k", minimum=1, maximum=K, why=f"at most model.num_experts={K}")
    gamma = validate_gamma(_get(cfg, f"{prefix}.gamma"), f"{prefix}.gamma", shape.num_moe_layers)
    k_min = get_int(cfg, f"{prefix}.k_min", minimum=1, maximum=K, why=f"at most model.num_experts={K}")
    k_max = get_int(cfg, f"{prefix}.k_max", minimum=1, maximum=K, optional=True, why=f"at most model.num_experts={K}")
    if k_max is not None and k_min > k_max:
        raise ConfigError(f"{prefix}.k_min={k_min}: must be <= {prefix}.k_max={k_max}")
    _check_policy_fits_channel(policy, f"{prefix}.policy", K, num_subcarriers, k_min)
    # Checkpoints written before imperfect CSI existed have no outage_target: trust the estimate.
    outage_target = None
    if OmegaConf.select(cfg, f"{prefix}.outage_target", default=None) is not None:
        outage_target = validate_outage_target(_get(cfg, f"{prefix}.outage_target"), f"{prefix}.outage_target")
    return {"policy": policy, "k": k, "gamma": gamma, "k_min": k_min, "k_max": k_max, "outage_target": outage_target}


def validate_outage_target(value: Any, key: str) -> float | None:
    """null (plan on the channel estimate) or a probability in (0, 1)."""
    if value is None:
        return None
    if not _is_number(value) or not 0.0 < value < 1.0:
        raise ConfigError(f"{key}={_fmt(value)}: must be null (trust the channel estimate) or a probability in (0, 1)")
    return float(value)


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
    check_keys(cfg, "", TRAIN_TOP_KEYS)
    _validate_runtime(cfg)
    get_int(cfg, "seed", minimum=0)
    validate_device(cfg)
    get_bool(cfg, "progress")
    validate_data(cfg, training=True)
    shape = validate_model(cfg)
    channel = channel_config(cfg)
    validate_router(cfg, "router", shape, channel.num_subcarriers)
    validate_router(cfg, "eval_router", shape, channel.num_subcarriers)
    check_keys(_get(cfg, "train"), "train", TRAIN_KEYS)
    get_int(cfg, "train.epochs", minimum=1)
    get_float(cfg, "train.lr", exclusive_minimum=0.0)
    get_float(cfg, "train.weight_decay", minimum=0.0)
    get_float(cfg, "train.aux_loss_coef", minimum=0.0)
    get_float(cfg, "train.grad_clip", exclusive_minimum=0.0, optional=True)
    get_int(cfg, "train.warmup_steps", minimum=0)
    get_int(cfg, "train.log_every", minimum=1)
    get_int(cfg, "train.stop_after_epochs", minimum=1, optional=True)
    get_bool(cfg, "resume_force")
    if get_str(cfg, "resume", optional=True) is not None:
        from .checkpoint import checkpoint_file

        checkpoint_file(resume_path(cfg), key="resume")


def _validate_runtime(cfg: DictConfig) -> None:
    from .runtime import runtime_settings  # runtime.* (strict keys per runtime); imports this module

    runtime_settings(cfg)


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


DEFAULT_DATA_ROOT = "data"


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
    outage_target: float | None = None  # des / jesa / optimal: conservative planning under imperfect CSI

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
    check_keys(cfg, "", EVAL_TOP_KEYS)
    _validate_runtime(cfg)
    get_str(cfg, "ckpt")
    get_int(cfg, "seed", minimum=0, optional=True)
    validate_device(cfg)
    get_bool(cfg, "progress")
    validate_data(cfg, training=False)
    if "channel" in cfg:  # evaluation-time changes of the checkpoint's channel; values are checked once merged
        check_keys(_get(cfg, "channel") or {}, "channel", allowed_keys("train", "channel"))
    check_keys(_get(cfg, "eval"), "eval", EVAL_KEYS)
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


def eval_policies(cfg: DictConfig, train_cfg: DictConfig, notes: list[str] | None = None) -> list[EvalPolicy]:
    """Expand eval.policies x eval.gammas into settings, checked against the checkpoint's model.

    A checkpoint with fewer subcarriers than experts cannot run the static subcarrier plan
    (policies in STATIC_POLICIES): those entries are skipped, with a line appended to ``notes``
    saying so; a ConfigError says what to pass when nothing is left.
    """
    shape = validate_model(train_cfg)
    num_subcarriers = channel_config(train_cfg).num_subcarriers
    K, L = shape.num_experts, shape.num_moe_layers
    k_min = get_int(cfg, "eval.k_min", minimum=1, maximum=K, why=f"at most the checkpoint's model.num_experts={K}")
    k_max = get_int(cfg, "eval.k_max", minimum=1, maximum=K, optional=True, why=f"at most the checkpoint's model.num_experts={K}")
    gammas = [validate_gamma(g, f"eval.gammas[{i}]", L) for i, g in enumerate(_get(cfg, "eval.gammas"))]
    targets_value = _get(cfg, "eval.outage_targets")
    if not isinstance(targets_value, list) or not targets_value:
        raise ConfigError(f"eval.outage_targets={_fmt(targets_value)}: must be a non-empty list of null or probabilities in (0, 1), e.g. [null,0.05]")
    targets = [validate_outage_target(q, f"eval.outage_targets[{i}]") for i, q in enumerate(targets_value)]
    default_k = int(train_cfg.router.k)
    settings: list[EvalPolicy] = []
    skipped: list[str] = []
    for i, text in enumerate(_get(cfg, "eval.policies")):
        key = f"eval.policies[{i}]"
        name, k = parse_policy(text, key, num_experts=K, default_k=default_k)
        if name in STATIC_POLICIES and num_subcarriers < K:
            skipped.append(text)
            continue
        if name in GAMMA_POLICIES and num_subcarriers < k_min:
            raise ConfigError(f"eval.k_min={k_min}: {name} needs at least k_min subcarriers and the checkpoint's "
                              f"channel has {num_subcarriers}; pass eval.k_min={num_subcarriers} or less")
        if name in GAMMA_POLICIES:
            settings.extend(EvalPolicy(name, None, gamma, k_min, k_max, q) for gamma in gammas for q in targets)
        else:
            settings.append(EvalPolicy(name, k))
    static_text = (f"the static subcarrier plan a(k) = k mod N needs at least as many subcarriers as experts and "
                   f"the checkpoint has {num_subcarriers} subcarriers for {K} experts")
    if skipped and not settings:
        usable = [p for p in POLICIES if p not in STATIC_POLICIES and p != "none"]
        raise ConfigError(f"eval.policies={_fmt(_get(cfg, 'eval.policies'))}: {static_text}; pass policies that "
                          f"choose the subcarriers ({', '.join(usable)}), e.g. eval.policies=[{usable[0]}]")
    if skipped and notes is not None:
        notes.append(f"skipped {', '.join(skipped)}: {static_text}")
    labels = [(s.label, _fmt(s.gamma), _fmt(s.outage_target)) for s in settings]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        label, gamma, target = duplicates[0]
        raise ConfigError(f"eval.policies / eval.gammas / eval.outage_targets: duplicate setting {label} (gamma {gamma}, outage target {target})")
    return settings


# ---------------------------------------------------------------------------------------------
# Builders


def router_specs(cfg: DictConfig, prefix: str, failure_energy: float) -> list:
    """One ``RouterSpec`` per MoE layer from ``cfg.<prefix>`` (gamma may differ per layer)."""
    section = cfg[prefix]
    num_layers = validate_model(cfg).num_moe_layers
    return setting_specs(
        EvalPolicy(section.policy, int(section.k), _plain(section.gamma), int(section.k_min), _plain(section.k_max),
                   OmegaConf.select(section, "outage_target", default=None)),
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
            outage_target=setting.outage_target,
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
    if name == "vmoe":
        from .models.vmoe import VMoEClassifier

        return VMoEClassifier(in_channels=info.in_channels, num_classes=info.num_classes,
                              image_size=info.image_size, **model)
    from .models import DMoEClassifier

    return DMoEClassifier(in_channels=info.in_channels, num_classes=info.num_classes,
                          image_size=info.image_size, **model)


def build_channel(cfg: DictConfig, seed: int | None = None):
    """The run's ``WirelessChannel``: device geometry and fading seeded by ``cfg.seed``."""
    from .channel import WirelessChannel

    return WirelessChannel(
        channel_config(cfg), int(cfg.model.num_experts), int(cfg.model.d_model), int(cfg.seed if seed is None else seed)
    )


# ---------------------------------------------------------------------------------------------
# Error reporting for the entry points


# run_entry_point sets HYDRA_FULL_ERROR=1 for Hydra's sake; this says errors stay one line anyway.
_ONE_LINE_ERRORS = False


def _full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" and not _ONE_LINE_ERRORS


@contextmanager
def report_errors(*error_types: type[BaseException]) -> Iterator[None]:
    """Turn a ConfigError into one stderr line and exit status 2, and the other
    ``error_types`` (e.g. missing data, a diverging loss) into one line and exit status 1.

    With ``HYDRA_FULL_ERROR=1`` the exception propagates with its traceback instead.
    """
    try:
        yield
    except (ConfigError, *error_types) as exc:
        from .rundir import remove_unused_run_dirs

        remove_unused_run_dirs()  # a run that failed before any output leaves no directory behind
        if _full_error():
            raise
        _exit_with(str(exc), EXIT_CONFIG_ERROR if isinstance(exc, ConfigError) else EXIT_RUNTIME_ERROR)


def run_entry_point(main: Callable[[], Any], config_name: str) -> None:
    """Run a ``@hydra.main`` function (of ``config_name``: train or evaluate) so that Hydra's
    own override and composition errors (``foo=1``, ``router=nope``) are one stderr line and
    exit status 2, like the ConfigErrors that :func:`report_errors` reports inside ``main``.

    With ``HYDRA_FULL_ERROR=1`` every error propagates with its traceback instead.
    """
    global _ONE_LINE_ERRORS
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        main()
        return
    # Hydra prints its errors itself (several lines, exit 1) unless HYDRA_FULL_ERROR=1, in which
    # case it re-raises them: set it for the run and report them here, like ours.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    _ONE_LINE_ERRORS = True
    try:
        main()
    except HydraException as exc:
        _exit_with(hydra_error_line(exc, config_name), EXIT_CONFIG_ERROR)
    finally:
        del os.environ["HYDRA_FULL_ERROR"]
        _ONE_LINE_ERRORS = False


def _exit_with(message: str, status: int) -> None:
    print("Error: " + " ".join(message.split()), file=sys.stderr)
    sys.exit(status)


def hydra_error_line(exc: BaseException, config_name: str) -> str:
    """One line for an error Hydra raised while parsing the overrides or composing the config."""
    unknown = re.match(r"Could not override '([^']+)'", str(exc))
    if unknown and isinstance(exc.__cause__, (ConfigAttributeError, ConfigKeyError)):
        # `key=value` for a key the config does not have (Hydra's hint, `+key=value`, fails too).
        key = unknown.group(1)
        allowed = allowed_keys(config_name, key.rpartition(".")[0])
        return unknown_key_message(key, allowed) if allowed else f"{key}: unknown key (python {config_name}.py --cfg job shows the keys)"
    no_group = re.search(r"Could not override '([^']+)'\. No match in the defaults list.* use \+(\S+)", " ".join(str(exc).split()))
    if no_group:  # `group=option` for a group this entry point does not have (evaluate.py model=tiny)
        return f"{no_group.group(2)}: {config_name}.py has no config group {no_group.group(1)!r}; see {config_name}.py --help"
    if isinstance(exc, MissingConfigException) and exc.options is not None and exc.missing_cfg_file:
        # `group=option` with an unknown option
        group, _, option = exc.missing_cfg_file.rpartition("/")
        return f"{group}={option}: no such option; choose one of {', '.join(sorted(exc.options))}"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if isinstance(exc, OverrideParseException) and lines:
        return f"{exc.override}: not a valid override ({lines[0]}); see {config_name}.py --help"
    return " ".join(lines)


class ValidateFirst(Callback):
    """Hydra callback (``hydra.callbacks`` of train.yaml and evaluate.yaml) run before Hydra
    creates the run directory: validate the config, so that a bad value leaves no files behind,
    then take the run directory's lock (:mod:`dmoe_torch.rundir`) and, for train.py, refuse a
    rerun that would change the run, before Hydra writes its files there.  (Checks that need
    the data or the checkpoint come later; a run that fails before any output has its new run
    directory removed, see report_errors.)  Multirun jobs and the compose API skip it; the
    entry points validate again."""

    def __init__(self, config_name: str) -> None:
        self.config_name = config_name

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        job = copy.deepcopy(config)
        with open_dict(job):
            del job["hydra"]
        run_dir = os.path.abspath(str(OmegaConf.select(config, "hydra.run.dir")))
        from . import rundir

        # Hydra turns a callback's exception into a warning and goes on: report_errors exits
        # instead (SystemExit passes through Hydra).
        with report_errors():
            if self.config_name == "evaluate":
                validate_eval_config(job)
                rundir.lock_run_dir(run_dir)
            else:
                validate_train_config(job)
                rundir.lock_run_dir(run_dir)
                rundir.check_rerun_dir(run_dir, job)
