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
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from ..data import DATASET_IMAGE_SIZES
from ..models import MODELS, ModelConfig, ModelShape
from ..selection.common import is_int
from ..selection.policies import get_policy, policy_names
from ..utils import ConfigError, check_bool, check_float, check_int, check_str, format_bytes, memory_bytes, resolve_device
from .migration import ADDED_KEY_DEFAULTS
from .schema import (
    MAX_TIMEOUT_S,
    DataConfig,
    EvalConfig,
    EvalDataConfig,
    RouterConfig,
    RuntimeSettings,
    TrainConfig,
    TrainRun,
    absolute_path,
    check_gammas,
    check_lam_value,
    check_outage_target,
    field_names,
)

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


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


def get_int(cfg: DictConfig, key: str, **bounds) -> int | None:
    """``key`` of ``cfg`` checked by :func:`dmoe_torch.utils.check_int` (same keyword arguments)."""
    return check_int(get_value(cfg, key), key, **bounds)


def get_float(cfg: DictConfig, key: str, **bounds) -> float | None:
    return check_float(get_value(cfg, key), key, **bounds)


def get_bool(cfg: DictConfig, key: str) -> bool:
    return check_bool(get_value(cfg, key), key)


def get_str(cfg: DictConfig, key: str, **choices) -> str | None:
    return check_str(get_value(cfg, key), key, **choices)


def load_section(cfg: DictConfig, prefix: str, schema: type, allowed: Iterable[str] | None = None, **extra):
    """Section ``prefix`` of ``cfg`` as the dataclass ``schema``: strict keys (``allowed``,
    default the fields), every field read with :func:`get_value` (so an unset ``???`` or a
    broken interpolation names its key), a key that runs recorded before it existed lack read
    as its value in config/migration.py, and the fields checked by ``schema.__post_init__``.
    ``extra``: the dataclass's init-only arguments."""
    names = field_names(schema)
    section = get_value(cfg, prefix)
    check_keys(section, prefix, names if allowed is None else allowed)
    values = {}
    for name in names:
        key = f"{prefix}.{name}"
        if name in section:
            values[name] = get_value(cfg, key)
        elif key in ADDED_KEY_DEFAULTS:
            values[name] = ADDED_KEY_DEFAULTS[key]
        else:
            raise ConfigError(f"{key} is missing from the config")
    return schema(**values, **extra)


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
TRAIN_DATA_KEYS = field_names(DataConfig)
ROUTER_KEYS = field_names(RouterConfig)
TRAIN_KEYS = field_names(TrainConfig)
EVAL_TOP_KEYS = ("ckpt", "seed", "device", "progress", "data", "eval", "runtime", "channel")
EVAL_DATA_KEYS = field_names(EvalDataConfig)
EVAL_KEYS = field_names(EvalConfig)


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
        "model": tuple(dict.fromkeys(key for schema in MODELS.values() for key in schema.keys())),
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


def validate_data(cfg: DictConfig, *, training: bool) -> DataConfig | EvalDataConfig:
    """``data.*`` of train.yaml (``training``) or evaluate.yaml."""
    return load_section(cfg, "data", DataConfig if training else EvalDataConfig)


def model_name(cfg: DictConfig) -> str:
    """``model.name`` (absent in runs recorded before the token models: config/migration.py)."""
    if OmegaConf.select(cfg, "model.name", default=None) is None:
        return ADDED_KEY_DEFAULTS["model.name"]
    return get_str(cfg, "model.name", choices=tuple(MODELS))


def dataset_image_size(cfg: DictConfig) -> tuple[int | None, str]:
    """The side of ``data.name``'s images (None when the config names no dataset) and where it comes from."""
    name = OmegaConf.select(cfg, "data.name", default=None)
    return DATASET_IMAGE_SIZES.get(name), f"data.name={name}"


def load_model(cfg: DictConfig) -> ModelConfig:
    """``model.*`` as the config dataclass of ``model.name`` (strict keys), checked against
    the dataset's image size."""
    schema = MODELS[model_name(cfg)]
    model = load_section(cfg, "model", schema, allowed=schema.keys())
    image_size, source = dataset_image_size(cfg)
    if image_size is not None:
        model.check_image_size(image_size, source)
    return model


def validate_model(cfg: DictConfig) -> ModelShape:
    """Check ``model.*``; the model's shape on the dataset's images (for the memory estimate)."""
    return load_model(cfg).shape(dataset_image_size(cfg)[0])


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


validate_gamma = check_gammas  # names kept for callers outside the config package
validate_lam = check_lam_value
validate_outage_target = check_outage_target


def load_router(cfg: DictConfig, prefix: str, shape: ModelShape, num_subcarriers: int, frame: str = "token") -> RouterConfig:
    """``<prefix>.*`` (router or eval_router) for a model of ``shape``, checked against the
    channel (its subcarriers and its frame mode, channel.frame)."""
    router = load_section(
        cfg, prefix, RouterConfig, num_experts=shape.num_experts, num_layers=shape.num_moe_layers, section=prefix
    )
    check_policy_fits_frame(router.policy, f"{prefix}.policy", frame)
    _check_policy_fits_channel(router.policy, f"{prefix}.policy", shape.num_experts, num_subcarriers, router.k_min)
    return router


def validate_router(
    cfg: DictConfig, prefix: str, shape: ModelShape, num_subcarriers: int, frame: str = "token"
) -> dict[str, Any]:
    """:func:`load_router` as a dict of its fields."""
    return load_router(cfg, prefix, shape, num_subcarriers, frame).as_dict()


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


def load_train_config(cfg: DictConfig) -> TrainRun:
    """The whole train.yaml config, validated and typed; raises ConfigError on the first bad value."""
    check_keys(cfg, "", TRAIN_TOP_KEYS)
    runtime = runtime_settings(cfg)
    seed = get_int(cfg, "seed", minimum=0)
    device = validate_device(cfg)
    progress = get_bool(cfg, "progress")
    run = _load_model_run(cfg, seed, load_section(cfg, "data", DataConfig))
    shape = run.model.shape(dataset_image_size(cfg)[0])
    eval_router = load_router(cfg, "eval_router", shape, run.channel.num_subcarriers, run.channel.frame)
    terms = memory_terms(
        shape,
        batch_size=run.data.batch_size,
        images=run.data.train_images,
        num_subcarriers=run.channel.num_subcarriers,
        frame=run.channel.frame,
        training=True,
        local_experts=runtime.name == "local",
    )
    check_memory(terms, device, [cfg], "training")
    train = load_section(cfg, "train", TrainConfig)
    resume_force = get_bool(cfg, "resume_force")
    resume = get_str(cfg, "resume", optional=True)
    if resume is not None:
        checkpoint_file(resume_path(cfg), key="resume")
    return replace(
        run,
        eval_router=eval_router,
        train=train,
        runtime=runtime,
        device=device,
        progress=progress,
        resume=resume,
        resume_force=resume_force,
    )


validate_train_config = load_train_config


def _load_model_run(cfg: DictConfig, seed: int, data: DataConfig) -> TrainRun:
    """The model, the channel and the training router of ``cfg`` (with ``seed`` and ``data``)."""
    model = load_model(cfg)
    channel = channel_config(cfg)
    shape = model.shape(dataset_image_size(cfg)[0])
    router = load_router(cfg, "router", shape, channel.num_subcarriers, channel.frame)
    return TrainRun(seed=seed, data=data, model=model, model_name=model_name(cfg), channel=channel, router=router)


def load_checkpoint_config(cfg: DictConfig) -> TrainRun:
    """The parts of a checkpoint's training config that evaluate.py rebuilds: the seed, the
    dataset split, the model, the channel and the training router (only these, so that
    checkpoints stay usable when train.yaml gains new keys).  ``data.root`` is not checked
    (evaluate.py's own replaces it); the other sections are None."""
    seed = get_int(cfg, "seed", minimum=0)
    section = get_value(cfg, "data")
    # how the training run loaded its data is evaluate.py's own choice now: not checked
    loading = {"root": ".", "batch_size": 1, "limit_test": None, "num_workers": 0}
    split = OmegaConf.create({"data": {**section, **loading} if isinstance(section, dict) else section})
    return _load_model_run(cfg, seed, load_section(split, "data", DataConfig))


validate_checkpoint_config = load_checkpoint_config


def validate_runtime(cfg: DictConfig) -> RuntimeSettings:
    return runtime_settings(cfg)


def resume_path(cfg: DictConfig) -> str | None:
    resume = cfg.get("resume")
    return None if resume is None else _absolute(resume)


_absolute = absolute_path


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
