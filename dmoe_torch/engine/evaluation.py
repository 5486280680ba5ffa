"""Evaluation engine (evaluate.py, and validation / test inside train.py).

Which channel frames, layer and stream a batch sees is decided in
:mod:`dmoe_torch.channel.links`, for training and evaluation alike.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ..channel.links import eval_stream, layer_links
from ..config import ConfigError, channel_config, data_root, validate_checkpoint_config
from ..config.eval import EvalPolicy, eval_policies
from ..output import frontier, report
from ..runtime import attach_experts
from ..utils import derive_seed, resolve_device, seed_everything
from .build import build_channel, build_model, setting_specs
from .checkpoint import load_checkpoint, load_model_state
from .rundir import check_run_dir_owner

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Routing metrics


def combine_layers(per_layer: list[dict[str, Any]], tokens_per_input: int = 1) -> dict[str, Any]:
    """Router metrics from the per-layer results of ``MetricAverager.compute()`` (whose rows
    are tokens).

    energy_uj: microjoules per image, summed over tokens and MoE layers; outage_rate: all
    links the channel failed over all selected links; link_dropout_rate: all links training-time
    link dropout dropped over all selected links; experts_per_token (per token and MoE layer), the
    other rates, nodes, gate_entropy and utilisation [K]: averaged over layers.  Routing
    health: single_expert_rate (share of frames with exactly one effective expert),
    load_max_over_mean and load_cv (of each layer's load over all the batches, see
    moe.LOAD_METRICS): averaged over layers; dead_experts: summed over layers, i.e. the
    (layer, expert) pairs that served nothing, and per layer in dead_experts_per_layer.
    A metric absent from the per-layer results (older metric dicts) is left out.
    """
    L = len(per_layer)
    links = sum(m["selected_links"] for m in per_layer)
    combined = {
        "energy_uj": 1e6 * tokens_per_input * sum(m["energy_j"] for m in per_layer),
        "experts_per_token": sum(m["experts_per_input"] for m in per_layer) / L,
    }
    for name in ("outage_rate", "link_dropout_rate"):  # shares of the selected links
        if all(name in m for m in per_layer):
            combined[name] = sum(m[name] * m["selected_links"] for m in per_layer) / links if links else 0.0
    for name in ("violation_rate", "drop_rate", "certified_rate", "nodes", "gate_entropy"):
        combined[name] = sum(m[name] for m in per_layer) / L
    K = len(per_layer[0]["utilisation"])
    combined["utilisation"] = [sum(m["utilisation"][k] for m in per_layer) / L for k in range(K)]
    for name in ("single_expert_rate", "load_max_over_mean", "load_cv", "frame_overrun_rate"):
        if all(name in m for m in per_layer):
            combined[name] = sum(m[name] for m in per_layer) / L
    if all("dead_experts" in m for m in per_layer):
        combined["dead_experts"] = sum(m["dead_experts"] for m in per_layer)
        combined["dead_experts_per_layer"] = [m["dead_experts"] for m in per_layer]
    return combined


# Per-MoE-layer counters of EvalTotals (one integer per layer).
_LAYER_COUNTS = ("selected_links", "failed_links", "effective_experts", "violations", "drops", "certified", "nodes", "overruns")


@dataclass
class EvalTotals:
    """Exact sums over an evaluation pass; independent of batch size and order.

    An image is routed as T tokens (T = 1 for the per-image model) at each of L MoE layers;
    one (token, layer) pair is a frame.  Integer counts are exact; per-image losses and
    energies are kept and summed with ``math.fsum`` (correctly rounded, hence order-independent).
    """

    num_layers: int
    tokens_per_input: int = 1
    inputs: int = 0
    correct: int = 0
    counts: dict[str, list[int]] = field(default_factory=dict)  # name -> [L]
    losses: list[torch.Tensor] = field(default_factory=list)
    energies: list[torch.Tensor] = field(default_factory=list)  # [B, L] J per image and layer
    correct_flags: list[torch.Tensor] = field(default_factory=list)  # [B] bool per image, in batch order
    expert_uses: list[torch.Tensor] = field(default_factory=list)  # [L, K] int64 effective selections

    def __post_init__(self) -> None:
        self.counts = {name: [0] * self.num_layers for name in _LAYER_COUNTS}

    def update(self, logits: torch.Tensor, labels: torch.Tensor, selections: list) -> None:
        B, T = len(labels), self.tokens_per_input
        self.inputs += B
        correct = (logits.argmax(1) == labels).cpu()
        self.correct += int(correct.sum())
        self.correct_flags.append(correct)
        self.losses.append(F.cross_entropy(logits.float(), labels, reduction="none").detach().to("cpu", torch.float64))
        energy = torch.zeros(B, self.num_layers, dtype=torch.float64)
        for layer, sel in enumerate(selections):
            effective = sel.mask & ~sel.failed
            energy[:, layer] = sel.energy.to(torch.float64).view(B, T).sum(1)
            for name, value in (
                ("selected_links", sel.mask),
                ("failed_links", sel.failed),
                ("effective_experts", effective),
                ("violations", sel.violation),
                ("drops", ~effective.any(1)),
                ("certified", sel.certified),
                ("nodes", sel.nodes),
                ("overruns", sel.frame_overrun),
            ):
                self.counts[name][layer] += int(value.sum())
        self.energies.append(energy)
        self.expert_uses.append(torch.stack([(s.mask & ~s.failed).sum(0).cpu() for s in selections]))

    def compute(self) -> dict[str, Any]:
        """Accuracy and loss per image; energy per image (summed over tokens and layers) and per
        token; experts per token and the rates per frame (averaged over layers); outage over
        selected links.  ``layers``: the same router metrics for each MoE layer."""
        n = max(self.inputs, 1)
        T, L = self.tokens_per_input, self.num_layers
        energies = torch.cat(self.energies) if self.energies else torch.zeros(0, L, dtype=torch.float64)

        def router_metrics(counts: dict[str, int], energy_j: float, layers: int) -> dict[str, float]:
            frames = max(self.inputs * T * layers, 1)
            return {
                "energy_uj": 1e6 * energy_j / n,
                "energy_per_token_uj": 1e6 * energy_j / (n * T),
                "experts_per_token": counts["effective_experts"] / frames,
                "outage_rate": counts["failed_links"] / max(counts["selected_links"], 1),
                "violation_rate": counts["violations"] / frames,
                "drop_rate": counts["drops"] / frames,
                "certified_rate": counts["certified"] / frames,
                "nodes": counts["nodes"] / frames,
                # tokens whose frame missed T_max / tokens: under image frames every token of a
                # frame carries its frame's flag, so this is also the share of frames
                "frame_overrun_rate": counts["overruns"] / frames,
            }

        total = {name: sum(values) for name, values in self.counts.items()}
        result = {
            "inputs": self.inputs,
            "tokens_per_input": T,
            "accuracy": self.correct / n,
            "loss": math.fsum(torch.cat(self.losses).tolist()) / n if self.losses else 0.0,
            **router_metrics(total, math.fsum(energies.sum(1).tolist()), L),
        }
        result["layers"] = [
            router_metrics(
                {name: values[layer] for name, values in self.counts.items()}, math.fsum(energies[:, layer].tolist()), 1
            )
            for layer in range(L)
        ]
        if self.expert_uses:  # utilisation[k]: share of the layer's tokens that expert k served
            uses = torch.stack(self.expert_uses).sum(0)
            for layer, metrics in enumerate(result["layers"]):
                metrics["utilisation"] = (uses[layer].double() / max(self.inputs * T, 1)).tolist()
        return result

    def per_image(self) -> dict[str, torch.Tensor]:
        """Per-image results in batch order (for intervals and paired comparisons):
        ``correct`` bool [n] and ``energy_uj`` float64 [n] (all tokens and MoE layers)."""
        if not self.correct_flags:
            return {"correct": torch.zeros(0, dtype=torch.bool), "energy_uj": torch.zeros(0, dtype=torch.float64)}
        return {"correct": torch.cat(self.correct_flags), "energy_uj": 1e6 * torch.cat(self.energies).sum(1)}


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
    per_image: list | None = None,
) -> dict[str, float]:
    """Accuracy, loss and per-input routing metrics of ``model`` routed by ``specs``.

    ``per_image``: a list that receives ``EvalTotals.per_image()`` (per-image correctness and
    energy, in the order of ``batches``).

    ``costs_cache``: a list of one dict per batch holding its per-layer link states (see
    :func:`layer_links`), filled on the first pass over ``batches`` and reused on later passes
    with the same batches and stream (evaluating many policies on one channel draw).  Results
    do not depend on the batch size.
    """
    model.eval()
    tokens = model.tokens_per_input
    totals = EvalTotals(num_layers=len(specs), tokens_per_input=tokens)
    for index, (images, labels, sample_ids) in enumerate(batches):
        if costs_cache is not None and index == len(costs_cache):
            costs_cache.append({})
        costs, delivered = layer_links(
            channel, sample_ids, specs, stream, tokens, cache=None if costs_cache is None else costs_cache[index]
        )
        output = model(images.to(device, non_blocking=True), costs, specs, generator=generator, delivered=delivered)
        totals.update(output.logits, labels.to(output.logits.device), output.selections)
        if on_batch is not None:
            on_batch()
    if per_image is not None:
        per_image.append(totals.per_image())
    return totals.compute()


def routing_generator(seed: int, stream: int) -> torch.Generator:
    """The generator of random routing (random_topk) on channel stream ``stream``: a pass
    draws the same random choices whatever ran before it."""
    return torch.Generator().manual_seed(derive_seed(seed, "router", stream))


def evaluate_with_bar(model, loader, *, desc: str, show: bool, seed: int, stream: int, **kwargs) -> dict[str, float]:
    with tqdm(total=len(loader), desc=desc, disable=not show, leave=False, dynamic_ncols=True) as bar:
        return evaluate(
            model, loader, stream=stream, generator=routing_generator(seed, stream), on_batch=lambda: bar.update(1), **kwargs
        )


def dataset_and_info(cfg: DictConfig, *, limit_train=None):
    from ..data import build_datasets

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


def with_channel_overrides(train_cfg: DictConfig, cfg: DictConfig) -> tuple[DictConfig, list[str]]:
    """The checkpoint's config with the non-null ``channel.*`` of evaluate.py replacing its
    channel fields, and ``"field old -> new"`` for each field that differs from training."""
    overrides = {
        key: value
        for key, value in (OmegaConf.to_container(cfg.channel) if cfg.get("channel") else {}).items()
        if value is not None
    }
    if not overrides:
        return train_cfg, []
    trained = asdict(channel_config(train_cfg))
    merged = OmegaConf.merge(train_cfg, {"channel": overrides})
    used = asdict(channel_config(merged))  # ConfigError naming channel.<field> for a bad value
    return merged, [f"{key} {trained[key]!r} -> {used[key]!r}" for key in used if used[key] != trained[key]]


def evaluate_settings(model, loader, settings: list[EvalPolicy], *, channel, seed: int, device, draws: int, show: bool):
    """Every setting over ``draws`` channel draws (one draw shared by every setting): per
    setting, the metrics of each draw and, per draw, the per-image correctness and energy."""
    num_layers = model.num_moe_layers
    per_setting: list[list[dict[str, float]]] = [[] for _ in settings]
    per_image: list[list[dict]] = [[] for _ in settings]  # per draw: per-image correctness and energy
    total = len(settings) * draws * len(loader)
    with tqdm(total=total, desc="evaluate", disable=not show, dynamic_ncols=True) as bar:
        for draw in range(draws):
            costs_cache: list = []  # one channel draw, shared by every setting
            for index, setting in enumerate(settings):
                bar.set_postfix_str(f"draw {draw + 1}/{draws} {setting.label} {report.format_gamma(setting.gamma)}")
                specs = setting_specs(setting, num_layers, channel.failure_energy_j)
                stream = eval_stream(draw)
                per_setting[index].append(
                    evaluate(
                        model,
                        loader,
                        channel=channel,
                        specs=specs,
                        stream=stream,
                        device=device,
                        generator=routing_generator(seed, stream),
                        costs_cache=costs_cache,
                        on_batch=lambda: bar.update(1),
                        per_image=per_image[index],
                    )
                )
    return per_setting, per_image


def run_evaluation(cfg: DictConfig, output_dir: str | Path) -> list[dict[str, Any]]:
    """Evaluate every setting of eval.policies x eval.gammas over eval.channel_draws draws.

    Writes results.csv, results.md (with the Frontier section), results.png, frontier.csv,
    frontier.png, per_image.npz (see :mod:`dmoe_torch.output.frontier`) and TensorBoard events to
    ``output_dir``; returns the result rows (see report.RESULT_COLUMNS).
    """
    from hydra.utils import to_absolute_path

    from ..data import make_loader

    output_dir = Path(output_dir)
    check_run_dir_owner(output_dir, "evaluate")  # also where ValidateFirst does not run (multirun, compose API)
    checkpoint, train_cfg = load_trained(cfg)
    # channel.* of evaluate.py: the checkpoint's channel with these fields replaced (weights unchanged)
    train_cfg, channel_changes = with_channel_overrides(train_cfg, cfg)
    notes: list[str] = []  # e.g. static-plan policies skipped for a checkpoint with N < K
    settings: list[EvalPolicy] = eval_policies(cfg, train_cfg, notes)
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
    attach_experts(model, payload_bits=channel.payload_bits)  # runtime=distributed: experts to the workers
    loader = make_loader(test_ds, int(cfg.data.batch_size), shuffle=False, seed=seed, num_workers=int(cfg.data.num_workers))
    draws = int(cfg.eval.channel_draws)

    per_setting, per_image = evaluate_settings(
        model, loader, settings, channel=channel, seed=seed, device=device, draws=draws, show=bool(cfg.progress)
    )
    rows = [
        report.summarise_draws(s, results, images) for s, results, images in zip(settings, per_setting, per_image, strict=True)
    ]
    report.add_comparisons(rows, per_image)
    for row in rows:  # what the rows were evaluated on
        row.update({"seed": seed, **{f"channel.{k}": v for k, v in asdict(channel.cfg).items()}})
    title = f"{cfg.ckpt} ({info.name}, {len(test_ds)} test images, {draws} channel draws, seed {seed})"
    if channel_changes:
        title += "; channel differs from training: " + ", ".join(channel_changes)
    images = frontier.stack_per_image(per_image)  # kept so that scripts/frontier.py can merge runs
    frontier.save_per_image(output_dir / frontier.PER_IMAGE_FILE, rows, images)
    _, frontier_table = frontier.write_frontier(rows, images, output_dir, title=title)
    with contextlib.redirect_stdout(io.StringIO()) as printed:  # the table goes to the log: console and evaluate.log
        report.write_results(rows, output_dir, title=title, frontier=frontier_table)
    log.info("Results:\n%s", printed.getvalue().rstrip("\n"))
    for note in notes:
        log.warning("Note: %s", note)
    log.info(
        "results.csv, results.md, results.png, frontier.csv, frontier.png and %s written to %s",
        frontier.PER_IMAGE_FILE,
        output_dir,
    )
    return rows
