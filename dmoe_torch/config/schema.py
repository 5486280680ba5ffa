"""The config schema: one frozen dataclass per section of train.yaml / evaluate.yaml.

A section's fields are the keys it allows and its ``__post_init__`` holds the one check of
each field (ConfigError: one line naming ``<section>.<key>``).  ``model`` is the model's own
config (:data:`dmoe_torch.models.MODELS`), ``channel`` is :class:`~dmoe_torch.channel.ChannelConfig`,
``runtime`` is :class:`RuntimeSettings` (checked in :func:`dmoe_torch.config.runtime_settings`).
The loaders in :mod:`dmoe_torch.config` read a Hydra DictConfig into these sections (strict
keys, keys old runs lack from :mod:`dmoe_torch.config.migration`), add the checks that span
sections, and return :class:`TrainRun` / :class:`EvalRun`, which the engines take typed.
"""

from __future__ import annotations

import os
from dataclasses import InitVar, dataclass, fields
from datetime import timedelta
from typing import Any

import numpy as np

from ..data import DATASET_TRAIN_SIZES, DATASETS, split_sizes
from ..models import ModelConfig
from ..selection.common import check_gamma, is_real
from ..selection.policies import get_policy, policy_names
from ..selection.registry import check_lam
from ..utils import ConfigError, check_bool, check_float, check_int, check_str

MAX_WORKERS_PER_CPU = 4  # data.num_workers: at most this many loader processes per CPU core
MAX_LR = float(np.finfo(np.float32).max) / 10  # train.lr
MAX_TIMEOUT_S = timedelta.max.total_seconds()  # runtime.timeout_s
DEFAULT_DATA_ROOT = "data"


def field_names(schema: type) -> tuple[str, ...]:
    """The keys a section allows: its dataclass's fields, in order."""
    return tuple(f.name for f in fields(schema))


def absolute_path(path: str) -> str:
    """``path`` against the directory the command was started from (Hydra may chdir)."""
    from hydra.utils import to_absolute_path

    return to_absolute_path(os.path.expanduser(path))


# ---------------------------------------------------------------------------------------------
# data


def check_data_root(value: Any) -> str:
    """``data.root`` must be an existing directory, except the default ``data`` (created on
    first use): a mistyped path then fails here instead of receiving a fresh copy of the data."""
    check_str(value, "data.root")
    path = absolute_path(value)
    if os.path.isdir(path) or (value == DEFAULT_DATA_ROOT and not os.path.exists(path)):
        return path
    what = "not a directory" if os.path.exists(path) else "no such directory"
    raise ConfigError(
        f"data.root={value!r}: {what} ({path}); create it first (only the default "
        f"data.root={DEFAULT_DATA_ROOT} is created on first use)"
    )


def _check_loader_fields(section) -> None:
    """The keys evaluate.yaml's data section shares with train.yaml's."""
    check_data_root(section.root)
    check_int(section.batch_size, "data.batch_size", minimum=1)
    # Each worker is a process: a few per core, never thousands.
    check_int(
        section.num_workers,
        "data.num_workers",
        minimum=0,
        maximum=MAX_WORKERS_PER_CPU * (os.cpu_count() or 1),
        why=f"{MAX_WORKERS_PER_CPU} per CPU core of this machine",
    )
    check_int(section.limit_test, "data.limit_test", minimum=1, optional=True)


@dataclass(frozen=True)
class DataConfig:
    """train.yaml ``data``: the dataset, its split and how it is loaded."""

    name: str
    root: str
    batch_size: int
    val_size: int
    limit_train: int | None
    limit_test: int | None
    num_workers: int
    augment: bool

    def __post_init__(self) -> None:
        name = check_str(self.name, "data.name", choices=DATASETS)
        _check_loader_fields(self)
        limit_train = check_int(self.limit_train, "data.limit_train", minimum=1, optional=True)
        val_size = check_int(self.val_size, "data.val_size", minimum=0)
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
        check_bool(self.augment, "data.augment")

    @property
    def train_images(self) -> int:
        return split_sizes(DATASET_TRAIN_SIZES[self.name], self.val_size, self.limit_train)[0]


@dataclass(frozen=True)
class EvalDataConfig:
    """evaluate.yaml ``data``: how the checkpoint's test set is loaded."""

    root: str
    batch_size: int
    limit_test: int | None
    num_workers: int

    def __post_init__(self) -> None:
        _check_loader_fields(self)


# ---------------------------------------------------------------------------------------------
# router / eval_router


def check_gammas(value: Any, key: str, num_layers: int) -> float | list[float]:
    """gamma: one importance factor for every layer, or a list of ``num_layers`` of them; each
    checked by the router's rule (selection.common.check_gamma)."""
    allowed = f"a number in (0, 1] or a list of {num_layers} such numbers (one per MoE layer)"

    def ok(v: Any) -> bool:
        try:
            check_gamma(v)
        except ValueError:
            return False
        return True

    if isinstance(value, (list, tuple)):
        if len(value) != num_layers or not all(ok(v) for v in value):
            reason = f"has {len(value)} values for {num_layers} MoE layers; " if len(value) != num_layers else ""
            raise ConfigError(f"{key}={list(value)!r}: {reason}must be {allowed}")
        return [float(v) for v in value]
    if not ok(value):
        raise ConfigError(f"{key}={value!r}: must be {allowed}")
    return float(value)


def check_lam_value(value: Any, key: str, policy: str | None = None) -> float | None:
    """The Lagrange multiplier [1/J] of a policy that reads it (lagrangian): a number >= 0;
    null for the others."""
    needed = policy is not None and "lam" in get_policy(policy).params
    if value is None:
        if needed:
            raise ConfigError(f"{key}=null: policy {policy!r} needs its multiplier, a number >= 0 (relevance per joule, 1/J)")
        return None
    try:
        return check_lam(value, key)  # the rule lives with the router
    except ValueError:
        raise ConfigError(f"{key}={value!r}: must be a number >= 0 (relevance per joule, 1/J) or null") from None


def check_outage_target(value: Any, key: str) -> float | None:
    """null (plan on the channel estimate) or a probability in (0, 1)."""
    if value is None:
        return None
    if not is_real(value) or not 0.0 < value < 1.0:
        raise ConfigError(f"{key}={value!r}: must be null (trust the channel estimate) or a probability in (0, 1)")
    return float(value)


@dataclass(frozen=True)
class RouterConfig:
    """``router`` / ``eval_router`` (conf/router/*.yaml): one policy and its settings, for a
    model of ``num_experts`` experts and ``num_layers`` MoE layers; ``section`` names the
    section in messages.  Per-layer :class:`~dmoe_torch.moe.RouterSpec`\\ s: :meth:`specs`."""

    policy: str
    k: int
    gamma: float | list[float]
    k_min: int
    k_max: int | None
    lam: float | None
    outage_target: float | None
    num_experts: InitVar[int] = 1
    num_layers: InitVar[int] = 1
    section: InitVar[str] = "router"

    def __post_init__(self, num_experts: int, num_layers: int, section: str) -> None:
        prefix = section
        K, at_most = num_experts, f"at most model.num_experts={num_experts}"
        check_str(self.policy, f"{prefix}.policy", choices=policy_names())
        check_int(self.k, f"{prefix}.k", minimum=1, maximum=K, why=at_most)
        object.__setattr__(self, "gamma", check_gammas(self.gamma, f"{prefix}.gamma", num_layers))
        k_min = check_int(self.k_min, f"{prefix}.k_min", minimum=1, maximum=K, why=at_most)
        k_max = check_int(self.k_max, f"{prefix}.k_max", minimum=1, maximum=K, optional=True, why=at_most)
        if k_max is not None and k_min > k_max:
            raise ConfigError(f"{prefix}.k_min={k_min}: must be <= {prefix}.k_max={k_max}")
        object.__setattr__(self, "lam", check_lam_value(self.lam, f"{prefix}.lam", self.policy))
        object.__setattr__(self, "outage_target", check_outage_target(self.outage_target, f"{prefix}.outage_target"))

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in field_names(RouterConfig)}


# ---------------------------------------------------------------------------------------------
# train


@dataclass(frozen=True)
class TrainConfig:
    """train.yaml ``train``: the optimisation."""

    epochs: int
    lr: float
    weight_decay: float
    warmup_steps: int
    aux_loss_coef: float
    z_loss_coef: float
    energy_loss_coef: float
    grad_clip: float | None
    precision: str
    log_every: int
    stop_after_epochs: int | None

    def __post_init__(self) -> None:
        from ..moe import PRECISIONS

        check_int(self.epochs, "train.epochs", minimum=1)
        # AdamW's first step moves a weight by lr / (1 - beta1) = 10 lr, a float32 scalar.
        check_float(
            self.lr, "train.lr", exclusive_minimum=0.0, maximum=MAX_LR, why="AdamW's first step, 10 lr, must be a float32"
        )
        check_float(self.weight_decay, "train.weight_decay", minimum=0.0)
        check_float(self.aux_loss_coef, "train.aux_loss_coef", minimum=0.0)
        check_float(self.z_loss_coef, "train.z_loss_coef", minimum=0.0)
        check_float(self.energy_loss_coef, "train.energy_loss_coef", minimum=0.0)
        check_str(self.precision, "train.precision", choices=tuple(PRECISIONS))
        check_float(self.grad_clip, "train.grad_clip", exclusive_minimum=0.0, optional=True)
        check_int(self.warmup_steps, "train.warmup_steps", minimum=0)
        check_int(self.log_every, "train.log_every", minimum=1)
        check_int(self.stop_after_epochs, "train.stop_after_epochs", minimum=1, optional=True)


# ---------------------------------------------------------------------------------------------
# eval (evaluate.yaml); the settings it expands to are checked against the checkpoint in
# config/eval.py eval_policies


@dataclass(frozen=True)
class EvalConfig:
    """evaluate.yaml ``eval``: the grid of routing settings to evaluate."""

    policies: list
    gammas: list
    lams: list
    k_min: int
    k_max: int | None
    outage_targets: list
    channel_draws: int

    def __post_init__(self) -> None:
        if not isinstance(self.policies, list) or not self.policies:
            raise ConfigError(f"eval.policies={self.policies!r}: must be a non-empty list such as [topk@2, dense, des, jesa]")
        if not isinstance(self.gammas, list) or not self.gammas:
            raise ConfigError(f"eval.gammas={self.gammas!r}: must be a non-empty list of importance factors (see router.gamma)")
        check_int(self.channel_draws, "eval.channel_draws", minimum=1)
        k_min = check_int(self.k_min, "eval.k_min", minimum=1)
        k_max = check_int(self.k_max, "eval.k_max", minimum=1, optional=True)
        if k_max is not None and k_min > k_max:
            raise ConfigError(f"eval.k_min={k_min}: must be <= eval.k_max={k_max}")


# ---------------------------------------------------------------------------------------------
# runtime and the whole runs


@dataclass(frozen=True)
class RuntimeSettings:
    """``runtime`` (conf/runtime/*.yaml): where the experts execute."""

    name: str = "local"
    backend: str = "auto"
    timeout_s: float = 60.0


@dataclass(frozen=True)
class TrainRun:
    """A validated train.yaml (or a checkpoint's training config, with ``train`` None when
    only the parts evaluate.py rebuilds were checked)."""

    seed: int
    data: DataConfig
    model: ModelConfig
    model_name: str
    channel: Any  # ChannelConfig
    router: RouterConfig
    eval_router: RouterConfig | None = None
    train: TrainConfig | None = None
    runtime: RuntimeSettings = RuntimeSettings()
    device: str = "auto"
    progress: bool = False
    resume: str | None = None
    resume_force: bool = False


@dataclass(frozen=True)
class EvalRun:
    """A validated evaluate.yaml (the checkpoint is checked when it is loaded)."""

    ckpt: str
    seed: int | None
    device: str
    progress: bool
    data: EvalDataConfig
    eval: EvalConfig
    runtime: RuntimeSettings
    channel: dict  # non-null channel.* overrides of the checkpoint's channel
