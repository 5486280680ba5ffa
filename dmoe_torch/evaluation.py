"""Evaluation engine (evaluate.py, and validation / test inside train.py).

Channel streams (so that draws never depend on batch size, order or workers): training epoch
``e`` (0-based) uses stream ``e``; validation uses :data:`VAL_STREAM` (the same channel every
epoch, so validation curves are comparable); evaluation draw ``d`` uses
``EVAL_STREAM_BASE + d`` (the final test of train.py is draw 0).  The costs of MoE layer
``l`` for a batch are ``channel.costs(sample_ids, l, stream)``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from . import report
from .checkpoint import load_checkpoint, load_model_state
from .config import (
    ConfigError,
    EvalPolicy,
    build_channel,
    build_model,
    data_root,
    eval_policies,
    setting_specs,
    validate_checkpoint_config,
)
from .utils import derive_seed, resolve_device, seed_everything

log = logging.getLogger(__name__)

VAL_STREAM = 10_000_000
EVAL_STREAM_BASE = 20_000_000


def train_stream(epoch: int) -> int:
    """Channel stream of training epoch ``epoch`` (0-based)."""
    return epoch


def eval_stream(draw: int) -> int:
    """Channel stream of evaluation draw ``draw``."""
    return EVAL_STREAM_BASE + draw


def layer_costs(channel, sample_ids: torch.Tensor, num_layers: int, stream: int) -> list[torch.Tensor]:
    """Per-layer link costs of a batch: L float64 CPU tensors [B, K, N] (J, +inf = outage)."""
    return [channel.costs(sample_ids, layer, stream) for layer in range(num_layers)]


# ---------------------------------------------------------------------------------------------
# Routing metrics


def combine_layers(per_layer: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-input router metrics from the per-layer results of ``MetricAverager.compute()``.

    energy_uj: summed over layers (microjoules per input); outage_rate: all failed links over
    all selected links; the other rates, experts_per_input, nodes, gate_entropy and
    utilisation [K]: averaged over layers (so experts_per_input is per MoE layer).
    """
    L = len(per_layer)
    links = sum(m["selected_links"] for m in per_layer)
    combined = {
        "energy_uj": 1e6 * sum(m["energy_j"] for m in per_layer),
        "outage_rate": sum(m["outage_rate"] * m["selected_links"] for m in per_layer) / links if links else 0.0,
    }
    for name in ("experts_per_input", "violation_rate", "drop_rate", "certified_rate", "nodes", "gate_entropy"):
        combined[name] = sum(m[name] for m in per_layer) / L
    K = len(per_layer[0]["utilisation"])
    combined["utilisation"] = [sum(m["utilisation"][k] for m in per_layer) / L for k in range(K)]
    return combined


@dataclass
class EvalTotals:
    """Exact per-input sums over an evaluation pass; independent of batch size and order.

    Integer counts are exact; per-input losses and energies are kept and summed with
    ``math.fsum`` (correctly rounded, hence order-independent).
    """

    num_layers: int
    inputs: int = 0
    correct: int = 0
    frames_selected: int = 0  # (input, layer) selected links
    failed_links: int = 0
    effective_experts: int = 0
    violations: int = 0
    drops: int = 0
    certified: int = 0
    nodes: int = 0
    losses: list[torch.Tensor] = field(default_factory=list)
    energies: list[torch.Tensor] = field(default_factory=list)

    def update(self, logits: torch.Tensor, labels: torch.Tensor, selections: list) -> None:
        self.inputs += len(labels)
        self.correct += int((logits.argmax(1) == labels).sum())
        self.losses.append(F.cross_entropy(logits.float(), labels, reduction="none").detach().to("cpu", torch.float64))
        energy = torch.zeros(len(labels), dtype=torch.float64)
        for sel in selections:
            effective = sel.mask & ~sel.failed
            energy = energy + sel.energy.to(torch.float64)
            self.frames_selected += int(sel.mask.sum())
            self.failed_links += int(sel.failed.sum())
            self.effective_experts += int(effective.sum())
            self.violations += int(sel.violation.sum())
            self.drops += int((~effective.any(1)).sum())
            self.certified += int(sel.certified.sum())
            self.nodes += int(sel.nodes.sum())
        self.energies.append(energy)

    def compute(self) -> dict[str, float]:
        """Means per input (rates per (input, layer) frame, energy summed over layers)."""
        n = max(self.inputs, 1)
        frames = max(self.inputs * self.num_layers, 1)

        def exact_sum(parts: list[torch.Tensor]) -> float:
            return math.fsum(torch.cat(parts).tolist()) if parts else 0.0

        return {
            "inputs": self.inputs,
            "accuracy": self.correct / n,
            "loss": exact_sum(self.losses) / n,
            "energy_uj": 1e6 * exact_sum(self.energies) / n,
            "experts_per_input": self.effective_experts / frames,
            "outage_rate": self.failed_links / max(self.frames_selected, 1),
            "violation_rate": self.violations / frames,
            "drop_rate": self.drops / frames,
            "certified_rate": self.certified / frames,
            "nodes": self.nodes / frames,
        }



@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable,
    *,
    channel,
    specs: list,
    stream: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    costs_cache: list | None = None,
    on_batch: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Accuracy, loss and per-input routing metrics of ``model`` routed by ``specs``.

    ``costs_cache``: a list filled with each batch's per-layer costs on the first pass over
    ``batches`` and reused on later passes with the same batches and stream (evaluating many
    policies on one channel draw).  Results do not depend on the batch size.
    """
    model.eval()
    totals = EvalTotals(num_layers=len(specs))
    for index, (images, labels, sample_ids) in enumerate(batches):
        if costs_cache is not None and index < len(costs_cache):
            costs = costs_cache[index]
        else:
            costs = layer_costs(channel, sample_ids, len(specs), stream)
            if costs_cache is not None:
                costs_cache.append(costs)
        output = model(images.to(device, non_blocking=True), costs, specs, generator=generator)
        totals.update(output.logits, labels.to(output.logits.device), output.selections)
        if on_batch is not None:
            on_batch()
    return totals.compute()


def routing_generator(seed: int, stream: int) -> torch.Generator:
    """The generator of random routing (random_topk) on channel stream ``stream``: a pass
    draws the same random choices whatever ran before it."""
    return torch.Generator().manual_seed(derive_seed(seed, "router", stream))


def evaluate_with_bar(model, loader, *, desc: str, show: bool, seed: int, stream: int, **kwargs) -> dict[str, float]:
    with tqdm(total=len(loader), desc=desc, disable=not show, leave=False, dynamic_ncols=True) as bar:
        return evaluate(model, loader, stream=stream, generator=routing_generator(seed, stream),
                        on_batch=lambda: bar.update(1), **kwargs)


def dataset_and_info(cfg: DictConfig, *, limit_train=None):
    from .data import build_datasets

    return build_datasets(
        cfg.data.name,
        data_root(cfg),
        val_size=int(cfg.data.val_size),
        seed=int(cfg.seed),
        limit_train=limit_train,
        limit_test=cfg.data.limit_test,
        augment=bool(cfg.data.get("augment", False)),
    )


# ---------------------------------------------------------------------------------------------
# Evaluation run (evaluate.py)


def load_trained(cfg: DictConfig) -> tuple[dict, DictConfig]:
    """Load ``cfg.ckpt`` and return (checkpoint, its training config, checked)."""
    from hydra.utils import to_absolute_path

    checkpoint = load_checkpoint(to_absolute_path(cfg.ckpt), key="ckpt")
    train_cfg = OmegaConf.create(checkpoint["config"])
    try:
        validate_checkpoint_config(train_cfg)
    except ConfigError as exc:
        raise ConfigError(f"ckpt={cfg.ckpt!r}: the checkpoint's config is invalid ({exc})") from None
    return checkpoint, train_cfg


def run_evaluation(cfg: DictConfig, output_dir: str | Path) -> list[dict[str, Any]]:
    """Evaluate every setting of eval.policies x eval.gammas over eval.channel_draws draws.

    Writes results.csv, results.md, results.png and TensorBoard events to ``output_dir``;
    returns the result rows (see report.RESULT_COLUMNS).
    """
    from hydra.utils import to_absolute_path

    from .data import make_loader

    output_dir = Path(output_dir)
    checkpoint, train_cfg = load_trained(cfg)
    settings: list[EvalPolicy] = eval_policies(cfg, train_cfg)
    seed = int(train_cfg.seed if cfg.seed is None else cfg.seed)
    run_cfg = OmegaConf.merge(
        train_cfg,
        {"seed": seed, "data": {"root": to_absolute_path(cfg.data.root), "limit_test": cfg.data.limit_test}},
    )
    seed_everything(seed)
    device = resolve_device(cfg.device)
    _, _, test_ds, info = dataset_and_info(run_cfg, limit_train=train_cfg.data.limit_train)
    model = build_model(train_cfg, info)
    load_model_state(model, checkpoint["model"], key="ckpt")
    model.to(device)
    channel = build_channel(run_cfg)
    num_layers = int(train_cfg.model.num_moe_layers)
    loader = make_loader(test_ds, int(cfg.data.batch_size), shuffle=False, seed=seed, num_workers=int(cfg.data.num_workers))
    draws = int(cfg.eval.channel_draws)

    per_setting: list[list[dict[str, float]]] = [[] for _ in settings]
    total = len(settings) * draws * len(loader)
    with tqdm(total=total, desc="evaluate", disable=not bool(cfg.progress), dynamic_ncols=True) as bar:
        for draw in range(draws):
            costs_cache: list = []  # one channel draw, shared by every setting
            for index, setting in enumerate(settings):
                bar.set_postfix_str(f"draw {draw + 1}/{draws} {setting.label} {report.format_gamma(setting.gamma)}")
                specs = setting_specs(setting, num_layers, channel.failure_energy_j)
                stream = eval_stream(draw)
                per_setting[index].append(
                    evaluate(model, loader, channel=channel, specs=specs, stream=stream, device=device,
                             generator=routing_generator(seed, stream), costs_cache=costs_cache,
                             on_batch=lambda: bar.update(1))
                )
    rows = [report.summarise_draws(setting, results) for setting, results in zip(settings, per_setting)]
    report.write_results(rows, output_dir, title=f"{cfg.ckpt} ({info.name}, {len(test_ds)} test images, {draws} channel draws)")
    log.info("results.csv, results.md and results.png written to %s", output_dir)
    return rows
