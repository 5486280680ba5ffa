"""evaluate.yaml: its own keys, and ``eval.policies x eval.gammas x eval.outage_targets``
expanded into the settings evaluate.py runs, checked against the checkpoint's model.

Evaluation policy syntax (``eval.policies``): ``NAME`` or ``NAME@K``.

* ``topk@K``, ``channel_topk@K``, ``random_topk@K``: fixed cardinality K (``NAME`` alone uses
  the checkpoint's ``router.k``);
* ``dense``: every reachable expert;
* ``des``, ``jesa``, ``optimal``: one row per importance factor in ``eval.gammas`` (a float
  for every MoE layer, or a list with one value per layer), with ``eval.k_min`` / ``eval.k_max``.

Under ``channel.frame=image`` (the tokens of an image share a frame): ``topk_capacity@K``
(Switch-style dropping at the link capacity) and ``jesa_tokenwise`` (P2 token by token, then
truncated) join; ``channel_topk``, ``random_topk`` and ``dense`` have no image-frame form and
are skipped with a note.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from ..data import DATASET_TEST_SIZES
from ..selection.policies import POLICY_TABLE, get_policy, policy_names
from . import (
    ADDED_KEY_DEFAULTS,
    EVAL_TOP_KEYS,
    ConfigError,
    allowed_keys,
    channel_config,
    check_keys,
    check_memory,
    format_value,
    get_bool,
    get_int,
    get_str,
    get_value,
    load_section,
    memory_terms,
    runtime_settings,
    validate_device,
    validate_gamma,
    validate_lam,
    validate_model,
    validate_outage_target,
)
from .schema import EvalConfig, EvalDataConfig, EvalRun


@dataclass(frozen=True)
class EvalPolicy:
    """One evaluation setting: a policy, its k (fixed-k policies) and gamma (des/jesa/optimal)."""

    policy: str
    k: int | None = None
    gamma: float | list[float] | None = None
    k_min: int = 1
    k_max: int | None = None
    outage_target: float | None = None  # des / jesa / optimal: conservative planning under imperfect CSI
    lam: float | None = None  # lagrangian: the multiplier [1/J]

    @property
    def label(self) -> str:
        return self.policy if self.k is None else f"{self.policy}@{self.k}"


def parse_policy(text: Any, key: str, *, num_experts: int, default_k: int) -> tuple[str, int | None]:
    """``"topk@2"`` -> ("topk", 2); ``"des"`` -> ("des", None); see the module docstring."""
    fixed_k = [n for n, p in POLICY_TABLE.items() if p.fixed_k]
    frame_only = [n for n in policy_names() if n not in policy_names("token")]
    allowed = (
        "NAME or NAME@K with NAME in "
        + ", ".join(policy_names())
        + " (K only for "
        + ", ".join(fixed_k)
        + "; "
        + ", ".join(frame_only)
        + " only with channel.frame=image)"
    )
    if not isinstance(text, str):
        raise ConfigError(f"{key}={format_value(text)}: must be {allowed}")
    name, _, k_text = text.partition("@")
    if name not in POLICY_TABLE:
        raise ConfigError(f"{key}={text!r}: unknown policy {name!r}; must be {allowed}")
    if name not in fixed_k:
        if k_text:
            raise ConfigError(f"{key}={text!r}: policy {name!r} takes no @K; must be {allowed}")
        return name, None
    if not k_text:
        return name, default_k
    if not k_text.isdigit() or not 1 <= int(k_text) <= num_experts:
        raise ConfigError(f"{key}={text!r}: K must be an integer in [1, {num_experts}] (model.num_experts)")
    return name, int(k_text)


def validate_eval_config(cfg: DictConfig) -> EvalRun:
    """Validate evaluate.yaml's own keys (the checkpoint is checked by :func:`eval_policies`)."""
    check_keys(cfg, "", EVAL_TOP_KEYS)
    runtime = runtime_settings(cfg)
    ckpt = get_str(cfg, "ckpt")
    seed = get_int(cfg, "seed", minimum=0, optional=True)
    device = validate_device(cfg)
    progress = get_bool(cfg, "progress")
    data = load_section(cfg, "data", EvalDataConfig)
    channel = {}
    if "channel" in cfg:  # evaluation-time changes of the checkpoint's channel; values are checked once merged
        channel = get_value(cfg, "channel") or {}
        check_keys(channel, "channel", allowed_keys("train", "channel"))
    evaluation = load_section(cfg, "eval", EvalConfig)
    overrides = {key: value for key, value in channel.items() if value is not None}
    return EvalRun(ckpt, seed, device, progress, data, evaluation, runtime, overrides)


def _sweep_values(cfg: DictConfig, K: int, L: int) -> tuple:
    """(k_min, k_max, gammas, outage targets, multipliers) of ``eval.*`` for a checkpoint with
    K experts and L MoE layers."""
    k_min = get_int(cfg, "eval.k_min", minimum=1, maximum=K, why=f"at most the checkpoint's model.num_experts={K}")
    k_max = get_int(cfg, "eval.k_max", minimum=1, maximum=K, optional=True, why=f"at most the checkpoint's model.num_experts={K}")
    gammas = [validate_gamma(g, f"eval.gammas[{i}]", L) for i, g in enumerate(get_value(cfg, "eval.gammas"))]
    targets_value = get_value(cfg, "eval.outage_targets")
    if not isinstance(targets_value, list) or not targets_value:
        raise ConfigError(
            f"eval.outage_targets={format_value(targets_value)}: must be a non-empty list of null or "
            "probabilities in (0, 1), e.g. [null,0.05]"
        )
    targets = [validate_outage_target(q, f"eval.outage_targets[{i}]") for i, q in enumerate(targets_value)]
    lams_value = get_value(cfg, "eval.lams") if "lams" in cfg.eval else ADDED_KEY_DEFAULTS["eval.lams"]
    if not isinstance(lams_value, list):
        raise ConfigError(f"eval.lams={format_value(lams_value)}: must be a list of numbers >= 0 (1/J), e.g. [1e4,3e4]")
    lams = [validate_lam(v, f"eval.lams[{i}]") for i, v in enumerate(lams_value)]
    return k_min, k_max, gammas, targets, lams


def eval_policies(cfg: DictConfig, train_cfg: DictConfig, notes: list[str] | None = None) -> list[EvalPolicy]:
    """Expand eval.policies x eval.gammas into settings, checked against the checkpoint's model.

    A checkpoint with fewer subcarriers than experts cannot run the static subcarrier plan
    (policies in STATIC_POLICIES): those entries are skipped, with a line appended to ``notes``
    saying so; a ConfigError says what to pass when nothing is left.
    """
    shape = validate_model(train_cfg)
    channel = channel_config(train_cfg)
    num_subcarriers, frame = channel.num_subcarriers, channel.frame
    K = shape.num_experts
    k_min, k_max, gammas, targets, lams = _sweep_values(cfg, K, shape.num_moe_layers)
    default_k = int(train_cfg.router.k)
    settings: list[EvalPolicy] = []
    skipped: list[str] = []
    frame_skipped: list[str] = []
    for i, text in enumerate(get_value(cfg, "eval.policies")):
        key = f"eval.policies[{i}]"
        name, k = parse_policy(text, key, num_experts=K, default_k=default_k)
        entry = get_policy(name)
        if frame == "token" and name not in policy_names("token"):
            raise ConfigError(f"{key}={text!r}: exists only with channel.frame=image (pass channel.frame=image)")
        if frame == "image" and name not in policy_names("image"):
            frame_skipped.append(text)
            continue
        if entry.static_plan and num_subcarriers < K:
            skipped.append(text)
            continue
        if entry.bounded and num_subcarriers < k_min:
            raise ConfigError(
                f"eval.k_min={k_min}: {name} needs at least k_min subcarriers and the checkpoint's "
                f"channel has {num_subcarriers}; pass eval.k_min={num_subcarriers} or less"
            )
        if "lam" in entry.params:
            if not lams:
                raise ConfigError(f"{key}={text!r}: needs eval.lams, the multipliers to sweep (numbers >= 0, 1/J)")
            settings.extend(EvalPolicy(name, None, None, k_min, k_max, q, lam) for lam in lams for q in targets)
        elif entry.bounded:
            settings.extend(EvalPolicy(name, None, gamma, k_min, k_max, q) for gamma in gammas for q in targets)
        else:
            settings.append(EvalPolicy(name, k))
    static_text = (
        f"the static subcarrier plan a(k) = k mod N needs at least as many subcarriers as experts and "
        f"the checkpoint has {num_subcarriers} subcarriers for {K} experts"
    )
    if skipped and not settings:
        usable = [n for n, p in POLICY_TABLE.items() if p.subcarriers == "joint" and p.token_solver is not None]
        raise ConfigError(
            f"eval.policies={format_value(get_value(cfg, 'eval.policies'))}: {static_text}; pass policies that "
            f"choose the subcarriers ({', '.join(usable)}), e.g. eval.policies=[{usable[0]}]"
        )
    if skipped and notes is not None:
        notes.append(f"skipped {', '.join(skipped)}: {static_text}")
    if frame_skipped and not settings:
        raise ConfigError(
            f"eval.policies={format_value(get_value(cfg, 'eval.policies'))}: none is available with "
            f"channel.frame=image; use {', '.join(policy_names('image'))}"
        )
    if frame_skipped and notes is not None:
        notes.append(f"skipped {', '.join(frame_skipped)}: no image-frame form under channel.frame=image")
    _check_grid(cfg, train_cfg, shape, channel, settings)
    return settings


def _check_grid(cfg: DictConfig, train_cfg: DictConfig, shape, channel, settings: list[EvalPolicy]) -> None:
    """ConfigError when the evaluation needs more memory than this machine has, or when two
    settings of the grid are the same."""
    num_subcarriers, frame = channel.num_subcarriers, channel.frame
    test_images = DATASET_TEST_SIZES[train_cfg.data.name]
    terms = memory_terms(
        shape,
        batch_size=cfg.data.batch_size,
        images=min(cfg.data.limit_test or test_images, test_images),
        num_subcarriers=num_subcarriers,
        frame=frame,
        training=False,
        local_experts=runtime_settings(cfg).name == "local",
    )
    check_memory(terms, cfg.device, [cfg, train_cfg], "evaluation")
    labels = [(s.label, format_value(s.gamma), format_value(s.outage_target), format_value(s.lam)) for s in settings]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        label, gamma, target, lam = duplicates[0]
        raise ConfigError(
            f"eval.policies / eval.gammas / eval.lams / eval.outage_targets: duplicate setting {label} "
            f"(gamma {gamma}, lam {lam}, outage target {target})"
        )
