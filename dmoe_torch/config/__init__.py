"""Config validation for train.py and evaluate.py: typed getters, strict keys, sections.

Every check runs before any work (data loading, model building, training) and reports a bad
value as a :class:`ConfigError` with one line that names the key, the value and what is
allowed.  Every section accepts only its own keys (:func:`check_keys`), so a typo or a
``+key=value`` addition fails too.  The entry points print that line and exit with status 2
(:mod:`dmoe_torch.cli`).  The ``runtime`` settings and which file ``ckpt=`` / ``resume=`` names
are checked here too (the bottom of this file), so that this module imports nothing above it.
evaluate.yaml's own checks and its policy settings live in
:mod:`dmoe_torch.config.eval`; the objects a valid config describes are built by
:mod:`dmoe_torch.engine.build`.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from ..data import DATASET_IMAGE_SIZES, DATASET_TRAIN_SIZES, DATASETS, split_sizes
from ..models.vmoe import STEMS
from ..selection.common import is_int, is_real
from ..selection.policies import get_policy, policy_names
from ..selection.registry import check_lam
from ..utils import INT64_MAX, format_bytes, memory_bytes, resolve_device

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
MAX_WORKERS_PER_CPU = 4  # data.num_workers: at most this many loader processes per CPU core
MAX_LR = float(np.finfo(np.float32).max) / 10  # train.lr
MAX_TIMEOUT_S = timedelta.max.total_seconds()  # runtime.timeout_s


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key."""


# ---------------------------------------------------------------------------------------------
# Small typed getters


def format_value(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    return repr(value)


def get_value(cfg: DictConfig, key: str) -> Any:
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


def get_int(
    cfg: DictConfig, key: str, *, minimum: int | None = None, maximum: int | None = None, optional: bool = False, why: str = ""
) -> int | None:
    """An integer in [minimum, maximum]; at most 2**63 - 1 in any case (tensors, numpy arrays
    and checkpoints hold 64-bit integers)."""
    value = get_value(cfg, key)
    if value is None and optional:
        return None
    bounds = _range_text(minimum, maximum)
    allowed = f"an integer{bounds}" + (" or null" if optional else "") + (f" ({why})" if why else "")
    if not is_int(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ConfigError(f"{key}={format_value(value)}: must be {allowed}")
    if value > INT64_MAX:
        raise ConfigError(f"{key}={format_value(value)}: must be {allowed} and at most 2**63 - 1 (a 64-bit integer)")
    return int(value)


def get_float(
    cfg: DictConfig,
    key: str,
    *,
    minimum: float | None = None,
    exclusive_minimum: float | None = None,
    maximum: float | None = None,
    optional: bool = False,
    why: str = "",
) -> float | None:
    value = get_value(cfg, key)
    if value is None and optional:
        return None
    if minimum is not None:
        bound_text, ok = f" >= {minimum:g}", lambda v: v >= minimum
    elif exclusive_minimum is not None:
        bound_text, ok = f" > {exclusive_minimum:g}", lambda v: v > exclusive_minimum
    else:
        bound_text, ok = "", lambda v: True
    if maximum is not None:
        bound_text += f" and <= {maximum:g}"
    allowed = f"a finite number{bound_text}" + (" or null" if optional else "") + (f" ({why})" if why else "")
    if not is_real(value) or not math.isfinite(value) or not ok(value) or (maximum is not None and value > maximum):
        raise ConfigError(f"{key}={format_value(value)}: must be {allowed}")
    return float(value)


def get_bool(cfg: DictConfig, key: str) -> bool:
    value = get_value(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={format_value(value)}: must be true or false")
    return value


def get_str(cfg: DictConfig, key: str, *, choices: tuple[str, ...] | None = None, optional: bool = False) -> str | None:
    value = get_value(cfg, key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or (choices is not None and value not in choices):
        allowed = f"one of {', '.join(choices)}" if choices is not None else "a string"
        raise ConfigError(f"{key}={format_value(value)}: must be {allowed}")
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

TRAIN_TOP_KEYS = (
    "seed",
    "device",
    "progress",
    "resume",
    "resume_force",
    "data",
    "model",
    "channel",
    "router",
    "eval_router",
    "train",
    "runtime",
)
TRAIN_DATA_KEYS = ("name", "root", "batch_size", "val_size", "limit_train", "limit_test", "num_workers", "augment")
ROUTER_KEYS = ("policy", "k", "gamma", "k_min", "k_max", "lam", "outage_target")
TRAIN_KEYS = (
    "epochs",
    "lr",
    "weight_decay",
    "warmup_steps",
    "aux_loss_coef",
    "z_loss_coef",
    "energy_loss_coef",
    "grad_clip",
    "precision",
    "log_every",
    "stop_after_epochs",
)
EVAL_TOP_KEYS = ("ckpt", "seed", "device", "progress", "data", "eval", "runtime", "channel")
EVAL_DATA_KEYS = ("root", "batch_size", "limit_test", "num_workers")
EVAL_KEYS = ("policies", "gammas", "lams", "k_min", "k_max", "outage_targets", "channel_draws")


def check_keys(section: Mapping, prefix: str, allowed: Iterable[str]) -> None:
    """Raise ConfigError for the first key of ``section`` that is not in ``allowed``.

    ``prefix`` is the section's dotted path ("" for the top level).  The one-line message
    names the key, the closest allowed key and every allowed one.
    """
    allowed = tuple(allowed)
    if not isinstance(section, Mapping):
        raise ConfigError(f"{prefix}={format_value(section)}: must be a mapping with the keys {', '.join(allowed)}")
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
        from ..channel import ChannelConfig

        return tuple(f.name for f in fields(ChannelConfig))
    table = {
        "": TRAIN_TOP_KEYS,
        "data": TRAIN_DATA_KEYS,
        "router": ROUTER_KEYS,
        "eval_router": ROUTER_KEYS,
        "train": TRAIN_KEYS,
        "model": tuple(dict.fromkeys(key for keys in MODEL_KEYS.values() for key in keys)),
    }
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
    check_keys(get_value(cfg, "data"), "data", TRAIN_DATA_KEYS if training else EVAL_DATA_KEYS)
    name = get_str(cfg, "data.name", choices=DATASETS) if training else None
    validate_data_root(cfg)
    get_int(cfg, "data.batch_size", minimum=1)
    # Each worker is a process: a few per core, never thousands.
    get_int(
        cfg,
        "data.num_workers",
        minimum=0,
        maximum=MAX_WORKERS_PER_CPU * (os.cpu_count() or 1),
        why=f"{MAX_WORKERS_PER_CPU} per CPU core of this machine",
    )
    get_int(cfg, "data.limit_test", minimum=1, optional=True)
    if training:
        limit_train = get_int(cfg, "data.limit_train", minimum=1, optional=True)
        val_size = get_int(cfg, "data.val_size", minimum=0)
        available = DATASET_TRAIN_SIZES[name]
        train_images, _ = split_sizes(available, val_size, limit_train)
        if train_images < 1:  # with data.limit_train the validation set is capped at limit_train // 5
            raise ConfigError(
                f"data.val_size={val_size}: must be smaller than the {available} training images of data.name={name}"
            )
        if train_images == 1:
            fix = "data.limit_train=2 or more" if limit_train is not None else f"data.val_size={available - 2} or less"
            key = f"data.limit_train={limit_train}" if limit_train is not None else f"data.val_size={val_size}"
            raise ConfigError(
                f"{key}: leaves 1 training image, and a batch of one image cannot train (BatchNorm "
                f"needs two; train.py drops such a batch); pass {fix}"
            )
        get_bool(cfg, "data.augment")


def validate_data_root(cfg: DictConfig) -> str:
    """``data.root`` must be an existing directory, except the default ``data`` (created on
    first use): a mistyped path then fails here instead of receiving a fresh copy of the data."""
    value = get_str(cfg, "data.root")
    path = data_root(cfg)
    if os.path.isdir(path) or (value == DEFAULT_DATA_ROOT and not os.path.exists(path)):
        return path
    what = "not a directory" if os.path.exists(path) else "no such directory"
    raise ConfigError(
        f"data.root={value!r}: {what} ({path}); create it first (only the default "
        f"data.root={DEFAULT_DATA_ROOT} is created on first use)"
    )


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs of a model, besides its expert layers: the routed tokens
    per image, lower bounds on its other weights and on the attention scores it keeps, and
    the keys that size them."""

    num_experts: int
    num_moe_layers: int
    d_model: int
    hidden_mult: int
    layers_key: str = "model.num_moe_layers"  # the key that sets num_moe_layers
    tokens_per_input: int = 1
    block_params: int = 0  # weights besides the experts (attention, depthwise convs, dense MLPs)
    block_keys: tuple[str, ...] = ()
    blocks: int = 0  # blocks that each keep attention_per_block scores per image
    attention_per_block: int = 0


# The keys of each model (config group `model`); `name` picks the architecture.
MODEL_KEYS = {
    "cnn": (
        "name",
        "d_model",
        "num_experts",
        "num_moe_layers",
        "hidden_mult",
        "link_dropout",
        "combine",
        "balance_on",
        "channel_gate",
    ),
    "vmoe": (
        "name",
        "d_model",
        "num_experts",
        "depth",
        "moe_every",
        "num_heads",
        "patch_size",
        "hidden_mult",
        "class_token",
        "stem",
        "link_dropout",
        "combine",
        "balance_on",
        "channel_gate",
    ),
    "convmoe": (
        "name",
        "d_model",
        "num_experts",
        "depth",
        "hidden_mult",
        "kernel_size",
        "link_dropout",
        "combine",
        "balance_on",
        "channel_gate",
    ),
}


def model_name(cfg: DictConfig) -> str:
    """``model.name``; checkpoints written before the token model have none and are ``cnn``."""
    if OmegaConf.select(cfg, "model.name", default=None) is None:
        return "cnn"
    return get_str(cfg, "model.name", choices=tuple(MODEL_KEYS))


def validate_model(cfg: DictConfig) -> ModelShape:
    """Check ``model.*`` (strict keys) against the architecture and the dataset's image size."""
    name = model_name(cfg)
    check_keys(get_value(cfg, "model"), "model", MODEL_KEYS[name])
    num_experts = get_int(cfg, "model.num_experts", minimum=1)
    d_model = get_int(cfg, "model.d_model", minimum=1)
    hidden_mult = get_int(cfg, "model.hidden_mult", minimum=1)
    # Absent from checkpoints written before it existed: no dropout.
    link_dropout = OmegaConf.select(cfg, "model.link_dropout", default=0.0)
    if not is_real(link_dropout) or not 0.0 <= link_dropout < 1.0:
        raise ConfigError(f"model.link_dropout={format_value(link_dropout)}: must be a probability in [0, 1)")
    validate_moe_choices(cfg)
    if OmegaConf.select(cfg, "model.channel_gate", default=None) is not None:  # absent in older runs: false
        get_bool(cfg, "model.channel_gate")
    shape = dict(num_experts=num_experts, d_model=d_model, hidden_mult=hidden_mult)
    if name == "cnn":
        num_moe_layers = get_int(cfg, "model.num_moe_layers", minimum=1)
    elif name == "convmoe":
        num_moe_layers = get_int(cfg, "model.depth", minimum=1)
        kernel_size = get_int(cfg, "model.kernel_size", minimum=1)
        if kernel_size % 2 == 0:
            raise ConfigError(f"model.kernel_size={kernel_size}: must be odd (a centred depthwise conv)")
        image_size = DATASET_IMAGE_SIZES.get(OmegaConf.select(cfg, "data.name", default=None))
        if image_size is not None and image_size % 4:
            raise ConfigError(
                f"model.name=convmoe: the image size {image_size} of data.name={cfg.data.name} "
                "must be divisible by 4 (the stem's two 2x poolings)"
            )
        shape.update(
            layers_key="model.depth",
            tokens_per_input=(image_size or 4) ** 2 // 16,
            block_params=num_moe_layers * d_model * kernel_size**2,
            block_keys=("model.depth", "model.d_model", "model.kernel_size"),
        )
    else:
        depth = get_int(cfg, "model.depth", minimum=1)
        moe_every = get_int(
            cfg, "model.moe_every", minimum=1, maximum=depth, why=f"at most model.depth={depth}, else no block is an MoE block"
        )
        num_heads = get_int(cfg, "model.num_heads", minimum=1)
        if d_model % num_heads:
            raise ConfigError(f"model.num_heads={num_heads}: must divide model.d_model={d_model}")
        patch_size = get_int(cfg, "model.patch_size", minimum=1)
        image_size = DATASET_IMAGE_SIZES.get(OmegaConf.select(cfg, "data.name", default=None))
        if image_size is not None and image_size % patch_size:
            divisors = [p for p in range(1, image_size + 1) if image_size % p == 0]
            raise ConfigError(
                f"model.patch_size={patch_size}: must divide the image size {image_size} "
                f"of data.name={cfg.data.name} (one of {', '.join(map(str, divisors))})"
            )
        get_bool(cfg, "model.class_token")
        if get_str(cfg, "model.stem", choices=STEMS) == "conv2" and patch_size % 2:
            raise ConfigError(
                f"model.patch_size={patch_size}: must be even with model.stem=conv2 (its stride-2 conv halves the image)"
            )
        num_moe_layers = depth // moe_every
        tokens = ((image_size or patch_size) // patch_size) ** 2 + int(cfg.model.class_token)
        # attention (4 d^2) in every block, a dense MLP in the blocks without experts
        shape.update(
            layers_key="model.depth",
            tokens_per_input=tokens,
            block_params=depth * 4 * d_model**2 + (depth - num_moe_layers) * 2 * hidden_mult * d_model**2,
            block_keys=("model.depth", "model.d_model"),
            blocks=depth,
            attention_per_block=num_heads * tokens**2,
        )
    return ModelShape(num_moe_layers=num_moe_layers, **shape)


# ---------------------------------------------------------------------------------------------
# Memory: a lower bound on what a run holds at once, checked before anything is allocated.

FLOAT32_BYTES, FLOAT64_BYTES = 4, 8
TRAINING_WEIGHT_COPIES = 4  # the weights, their gradients and AdamW's two moments


@dataclass(frozen=True)
class MemoryTerm:
    """A lower bound (bytes) on one part of a run's memory and the keys that size it;
    ``on_device``: on the model's device (else on the CPU, as the float64 link costs are)."""

    what: str
    keys: tuple[str, ...]
    size: int
    on_device: bool = True


def memory_terms(
    shape: ModelShape,
    *,
    batch_size: int,
    images: int,
    num_subcarriers: int,
    frame: str,
    training: bool,
    local_experts: bool = True,
) -> list[MemoryTerm]:
    """Lower bounds on the memory of a training run (``training``) or an evaluation over
    ``images`` images in batches of ``batch_size``.  Training keeps TRAINING_WEIGHT_COPIES of
    every weight and each layer's activations for the backward pass; an evaluation keeps the
    link costs of all its images (one channel draw serves every setting).  ``local_experts``
    False (runtime=distributed): the experts live on the workers."""
    batch = min(batch_size, images)
    T, K, d, h, L = shape.tokens_per_input, shape.num_experts, shape.d_model, shape.hidden_mult, shape.num_moe_layers
    copies = TRAINING_WEIGHT_COPIES if training else 1
    terms = []
    if local_experts:
        terms.append(
            MemoryTerm(
                "expert weights",
                ("model.num_experts", "model.d_model", "model.hidden_mult", shape.layers_key),
                copies * FLOAT32_BYTES * L * K * 2 * h * d * d,
            )
        )
        # at least one expert's hidden layer per token
        terms.append(
            MemoryTerm(
                "expert activations",
                ("data.batch_size", "model.d_model", "model.hidden_mult") + ((shape.layers_key,) if training else ()),
                FLOAT32_BYTES * batch * T * h * d * (L if training else 1),
            )
        )
    if shape.block_params:
        terms.append(MemoryTerm("block weights", shape.block_keys, copies * FLOAT32_BYTES * shape.block_params))
    if shape.attention_per_block:
        terms.append(
            MemoryTerm(
                "attention scores",
                ("data.batch_size", "model.patch_size", "model.num_heads"),
                FLOAT32_BYTES * batch * shape.attention_per_block * (shape.blocks if training else 1),
            )
        )
    # float64 costs [frames, K, N] per MoE layer (image frames: int64 capacities too)
    per_image = K * num_subcarriers * (2 * FLOAT64_BYTES if frame == "image" else FLOAT64_BYTES * T) * L
    link_images = batch if training else images
    terms.append(
        MemoryTerm(
            "link costs",
            (
                "data.batch_size" if training else "data.limit_test",
                "model.num_experts",
                "channel.num_subcarriers",
                shape.layers_key,
            ),
            link_images * per_image,
            on_device=False,
        )
    )
    return terms


def check_memory(terms: list[MemoryTerm], device: str, configs: Iterable[DictConfig], what: str) -> None:
    """ConfigError naming the keys of the largest term (with their values in the first of
    ``configs`` that has them) when ``terms`` need more memory than ``device`` (the on-device
    terms) or the CPU (the others, and all on a CPU run) has."""
    configs = list(configs)
    values = {
        key: value
        for config in reversed(configs)
        for term in terms
        for key in term.keys
        if (value := OmegaConf.select(config, key, default=_ABSENT)) is not _ABSENT
    }
    import torch

    model_device = resolve_device(device)
    places = [(torch.device("cpu"), [t for t in terms if not t.on_device or model_device.type == "cpu"])]
    if model_device.type != "cpu":
        places.append((model_device, [t for t in terms if t.on_device]))
    for place, held in places:
        need, have = sum(t.size for t in held), memory_bytes(place)
        if need > have:
            largest = max(held, key=lambda t: t.size)
            keys = ", ".join(f"{key}={format_value(values[key])}" for key in largest.keys if key in values)
            parts = ", ".join(f"{t.what} {format_bytes(t.size)}" for t in sorted(held, key=lambda t: -t.size))
            memory = "RAM" if place.type == "cpu" else f"{place.type} memory"
            raise ConfigError(
                f"{keys}: {what} needs at least {format_bytes(need)} of {memory} ({parts}) and this machine "
                f"has {format_bytes(have)}; make them smaller"
            )


def validate_moe_choices(cfg: DictConfig) -> tuple[str, str]:
    """``model.combine`` and ``model.balance_on`` (moe.COMBINE_RULES, moe.BALANCE_ON).  Absent
    from checkpoints written before they existed: the first choice, what those runs did."""
    from ..moe import BALANCE_ON, COMBINE_RULES

    chosen = []
    for key, choices in (("model.combine", COMBINE_RULES), ("model.balance_on", BALANCE_ON)):
        if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            chosen.append(choices[0])
        else:
            chosen.append(get_str(cfg, key, choices=choices))
    return chosen[0], chosen[1]


def channel_config(cfg: DictConfig):
    """Build and validate ``ChannelConfig`` from ``cfg.channel``."""
    from ..channel import ChannelConfig

    section = get_value(cfg, "channel")
    if not isinstance(section, dict):
        raise ConfigError(f"channel={format_value(section)}: must be a mapping of ChannelConfig fields")
    check_keys(section, "channel", [f.name for f in fields(ChannelConfig)])
    try:
        return ChannelConfig(**section).validate(prefix="channel")
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None


def validate_gamma(value: Any, key: str, num_layers: int) -> float | list[float]:
    """gamma: a float in (0, 1] for every layer, or a list of ``num_layers`` such floats."""
    allowed = f"a number in (0, 1] or a list of {num_layers} such numbers (one per MoE layer)"

    def ok(v: Any) -> bool:
        return is_real(v) and 0.0 < v <= 1.0

    if isinstance(value, (list, tuple)):
        if len(value) != num_layers or not all(ok(v) for v in value):
            reason = f"has {len(value)} values for {num_layers} MoE layers; " if len(value) != num_layers else ""
            raise ConfigError(f"{key}={format_value(value)}: {reason}must be {allowed}")
        return [float(v) for v in value]
    if not ok(value):
        raise ConfigError(f"{key}={format_value(value)}: must be {allowed}")
    return float(value)


def validate_router(
    cfg: DictConfig, prefix: str, shape: ModelShape, num_subcarriers: int, frame: str = "token"
) -> dict[str, Any]:
    """Check ``<prefix>.{policy,k,gamma,k_min,k_max}`` against the model and the channel
    (its subcarriers and its frame mode, channel.frame)."""
    check_keys(get_value(cfg, prefix), prefix, ROUTER_KEYS)
    K = shape.num_experts
    policy = get_str(cfg, f"{prefix}.policy", choices=policy_names())
    check_policy_fits_frame(policy, f"{prefix}.policy", frame)
    k = get_int(cfg, f"{prefix}.k", minimum=1, maximum=K, why=f"at most model.num_experts={K}")
    gamma = validate_gamma(get_value(cfg, f"{prefix}.gamma"), f"{prefix}.gamma", shape.num_moe_layers)
    k_min = get_int(cfg, f"{prefix}.k_min", minimum=1, maximum=K, why=f"at most model.num_experts={K}")
    k_max = get_int(cfg, f"{prefix}.k_max", minimum=1, maximum=K, optional=True, why=f"at most model.num_experts={K}")
    if k_max is not None and k_min > k_max:
        raise ConfigError(f"{prefix}.k_min={k_min}: must be <= {prefix}.k_max={k_max}")
    _check_policy_fits_channel(policy, f"{prefix}.policy", K, num_subcarriers, k_min)
    lam = validate_lam(OmegaConf.select(cfg, f"{prefix}.lam", default=None), f"{prefix}.lam", policy)
    # Checkpoints written before imperfect CSI existed have no outage_target: trust the estimate.
    outage_target = None
    if OmegaConf.select(cfg, f"{prefix}.outage_target", default=None) is not None:
        outage_target = validate_outage_target(get_value(cfg, f"{prefix}.outage_target"), f"{prefix}.outage_target")
    return {"policy": policy, "k": k, "gamma": gamma, "k_min": k_min, "k_max": k_max, "lam": lam, "outage_target": outage_target}


def validate_lam(value: Any, key: str, policy: str | None = None) -> float | None:
    """The Lagrange multiplier [1/J] of a policy that reads it (lagrangian): a number >= 0;
    null for the others (absent in runs recorded before it existed)."""
    needed = policy is not None and "lam" in get_policy(policy).params
    if value is None:
        if needed:
            raise ConfigError(f"{key}=null: policy {policy!r} needs its multiplier, a number >= 0 (relevance per joule, 1/J)")
        return None
    try:
        return check_lam(value, key)  # the rule lives with the router
    except ValueError:
        raise ConfigError(f"{key}={format_value(value)}: must be a number >= 0 (relevance per joule, 1/J) or null") from None


def validate_outage_target(value: Any, key: str) -> float | None:
    """null (plan on the channel estimate) or a probability in (0, 1)."""
    if value is None:
        return None
    if not is_real(value) or not 0.0 < value < 1.0:
        raise ConfigError(f"{key}={format_value(value)}: must be null (trust the channel estimate) or a probability in (0, 1)")
    return float(value)


def check_policy_fits_frame(policy: str, key: str, frame: str) -> None:
    """Frame-only policies need channel.frame=image; some token policies have no image-frame form."""
    if frame == "token" and policy not in policy_names("token"):
        raise ConfigError(f"{key}={policy!r}: exists only with channel.frame=image (the tokens of an image share a frame)")
    if frame == "image" and policy not in policy_names("image"):
        raise ConfigError(
            f"{key}={policy!r}: not available with channel.frame=image; use one of {', '.join(policy_names('image'))}"
        )


def _check_policy_fits_channel(policy: str, key: str, num_experts: int, num_subcarriers: int, k_min: int) -> None:
    entry = get_policy(policy)
    if entry.static_plan and num_subcarriers < num_experts:
        raise ConfigError(
            f"{key}={policy!r}: the static subcarrier plan needs channel.num_subcarriers >= model.num_experts "
            f"(got {num_subcarriers} < {num_experts}); use jesa or optimal, or more subcarriers"
        )
    if entry.bounded and num_subcarriers < k_min:
        raise ConfigError(f"{key}={policy!r}: needs channel.num_subcarriers >= k_min (got {num_subcarriers} < {k_min})")


def validate_train_config(cfg: DictConfig) -> None:
    """Validate the whole train.yaml config; raises ConfigError on the first bad value."""
    check_keys(cfg, "", TRAIN_TOP_KEYS)
    validate_runtime(cfg)
    get_int(cfg, "seed", minimum=0)
    validate_device(cfg)
    get_bool(cfg, "progress")
    validate_data(cfg, training=True)
    shape = validate_model(cfg)
    channel = channel_config(cfg)
    validate_router(cfg, "router", shape, channel.num_subcarriers, channel.frame)
    validate_router(cfg, "eval_router", shape, channel.num_subcarriers, channel.frame)
    train_images, _ = split_sizes(DATASET_TRAIN_SIZES[cfg.data.name], cfg.data.val_size, cfg.data.limit_train)
    terms = memory_terms(
        shape,
        batch_size=cfg.data.batch_size,
        images=train_images,
        num_subcarriers=channel.num_subcarriers,
        frame=channel.frame,
        training=True,
        local_experts=runtime_settings(cfg).name == "local",
    )
    check_memory(terms, cfg.device, [cfg], "training")
    check_keys(get_value(cfg, "train"), "train", TRAIN_KEYS)
    get_int(cfg, "train.epochs", minimum=1)
    # AdamW's first step moves a weight by lr / (1 - beta1) = 10 lr, a float32 scalar.
    get_float(cfg, "train.lr", exclusive_minimum=0.0, maximum=MAX_LR, why="AdamW's first step, 10 lr, must be a float32")
    get_float(cfg, "train.weight_decay", minimum=0.0)
    get_float(cfg, "train.aux_loss_coef", minimum=0.0)
    get_float(cfg, "train.z_loss_coef", minimum=0.0)
    if OmegaConf.select(cfg, "train.energy_loss_coef", default=None) is not None:  # absent in older runs: 0
        get_float(cfg, "train.energy_loss_coef", minimum=0.0)
    if OmegaConf.select(cfg, "train.precision", default=None) is not None:  # absent in older runs: fp32
        from ..moe import PRECISIONS

        get_str(cfg, "train.precision", choices=tuple(PRECISIONS))
    get_float(cfg, "train.grad_clip", exclusive_minimum=0.0, optional=True)
    get_int(cfg, "train.warmup_steps", minimum=0)
    get_int(cfg, "train.log_every", minimum=1)
    get_int(cfg, "train.stop_after_epochs", minimum=1, optional=True)
    get_bool(cfg, "resume_force")
    if get_str(cfg, "resume", optional=True) is not None:
        checkpoint_file(resume_path(cfg), key="resume")


def validate_runtime(cfg: DictConfig) -> None:
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
    channel = channel_config(cfg)
    validate_router(cfg, "router", shape, channel.num_subcarriers, channel.frame)


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


# ---------------------------------------------------------------------------------------------
# Checkpoint paths: which file ``ckpt=`` / ``resume=`` names.  checkpoint.py (the file format)
# imports these; they are here so that validating ``resume`` needs nothing above this layer.

CHECKPOINT_NAME = "checkpoint.pt"  # in a run directory


def checkpoint_file(path: str | os.PathLike, *, key: str = "ckpt") -> Path:
    """``path`` itself, or ``<path>/checkpoint.pt`` when ``path`` is a run directory; a
    ConfigError when neither exists."""
    path = Path(path)
    if path.is_dir():
        if (path / CHECKPOINT_NAME).is_file():
            return path / CHECKPOINT_NAME
        raise ConfigError(
            f"{key}={str(path)!r}: a directory without {CHECKPOINT_NAME}; pass a run directory of "
            f"train.py or its {CHECKPOINT_NAME}"
        )
    if not path.is_file():
        raise ConfigError(
            f"{key}={str(path)!r}: no such file or directory; pass a run directory of train.py or its {CHECKPOINT_NAME}"
        )
    return path


# ---------------------------------------------------------------------------------------------
# Runtime settings (config group ``runtime``, conf/runtime/*.yaml), checked against how the
# process was started.  dmoe_torch.runtime runs them; the checks live here with the others.

# Allowed keys of each runtime (conf/runtime/<name>.yaml).
RUNTIME_KEYS = {"local": ("name",), "distributed": ("name", "backend", "timeout_s")}
BACKENDS = ("auto", "gloo", "nccl")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TORCHRUN_HINT = (
    "torchrun --standalone --nproc-per-node=W+1 train.py (or evaluate.py) runtime=distributed, "
    "for 1 coordinator and W expert workers"
)


@dataclass(frozen=True)
class RuntimeSettings:
    name: str = "local"
    backend: str = "auto"
    timeout_s: float = 60.0


def runtime_settings(cfg: DictConfig) -> RuntimeSettings:
    """The validated ``runtime`` section (absent: local), checked against how the process was
    started: ConfigError naming a bad or unknown key, ``runtime=distributed`` without torchrun,
    a world size with no worker or more workers than ``model.num_experts`` (when the config
    has it), or ``runtime=local`` in a torchrun group of several processes."""
    section = cfg.get("runtime")
    if section is None:
        return RuntimeSettings()
    if not isinstance(section, DictConfig):
        raise ConfigError(f"runtime={section!r}: must be a config group choice, runtime=local or runtime=distributed")
    name = section.get("name")
    if name not in RUNTIME_KEYS:
        raise ConfigError(f"runtime.name={name!r}: must be one of {', '.join(RUNTIME_KEYS)} (choose with runtime=NAME)")
    allowed = RUNTIME_KEYS[name]
    for key in section:
        if key not in allowed:
            raise ConfigError(f"runtime.{key}: unknown key for runtime={name}; allowed: {', '.join(allowed)}")
    if name == "local":
        world = os.environ.get("WORLD_SIZE")
        if world not in (None, "", "1"):
            raise ConfigError(
                f"runtime=local with WORLD_SIZE={world} (started by torchrun?): every process would run the whole job; "
                "pass runtime=distributed, or start one process"
            )
        return RuntimeSettings()
    settings = RuntimeSettings(
        name=name,
        backend=get_str(cfg, "runtime.backend", choices=BACKENDS),
        timeout_s=get_float(
            cfg, "runtime.timeout_s", exclusive_minimum=0.0, maximum=MAX_TIMEOUT_S, why="the longest datetime.timedelta"
        ),
    )
    check_world_size(process_env()[1], configured_num_experts(cfg))
    return settings


def configured_num_experts(cfg: DictConfig) -> int | None:
    """model.num_experts when the config has it (train.py), else None (evaluate.py: the
    checkpoint's model is checked when it is attached)."""
    value = OmegaConf.select(cfg, "model.num_experts", default=None)
    return value if is_int(value) else None


def process_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; ConfigError without it."""
    missing = [name for name in TORCHRUN_VARS if not os.environ.get(name)]
    if missing:
        raise ConfigError(f"runtime=distributed needs torchrun ({', '.join(missing)} not set): start it as {TORCHRUN_HINT}")
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ConfigError(
            f"runtime=distributed: RANK={os.environ['RANK']!r} and WORLD_SIZE={os.environ['WORLD_SIZE']!r} must be integers"
        ) from None
    return rank, world, local_rank


def check_world_size(world_size: int, num_experts: int | None) -> None:
    """ConfigError unless there are 1..K expert workers besides the coordinator."""
    workers = world_size - 1
    if workers < 1:
        raise ConfigError(
            f"runtime=distributed: WORLD_SIZE={world_size} leaves no expert worker (rank 0 is the "
            f"coordinator); start W+1 >= 2 processes: {TORCHRUN_HINT}"
        )
    if num_experts is not None and workers > num_experts:
        raise ConfigError(
            f"runtime=distributed: {workers} expert workers for model.num_experts={num_experts}; at most "
            f"one worker per expert, so start at most {num_experts + 1} processes (--nproc-per-node)"
        )
