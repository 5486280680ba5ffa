"""Training and evaluation engine shared by train.py and evaluate.py.

Channel streams (so that draws never depend on batch size, order or workers): training epoch
``e`` (0-based) uses stream ``e``; validation uses :data:`VAL_STREAM` (the same channel every
epoch, so validation curves are comparable); evaluation draw ``d`` uses
``EVAL_STREAM_BASE + d`` (the final test of train.py is draw 0).  The costs of MoE layer
``l`` for a batch are ``channel.costs(sample_ids, l, stream)``.

Exact resume.  Every source of randomness is either reseeded per epoch from
``(seed, epoch)`` (shuffle order, augmentation, random routing) or saved in the checkpoint
(global RNGs and the generators' positions), and a checkpoint taken inside an epoch also
stores the epoch's running sums; so a run interrupted and resumed ends with the same weights
and metrics as an uninterrupted one (on CPU).
"""
from __future__ import annotations

import logging
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from . import report
from .checkpoint import capture_rng_state, load_checkpoint, load_model_state, restore_rng_state, save_checkpoint
from .config import (
    ConfigError,
    EvalPolicy,
    build_channel,
    build_model,
    data_root,
    eval_policies,
    resume_path,
    router_specs,
    setting_specs,
    validate_checkpoint_config,
    validate_train_config,
)
from .moe import MetricAverager
from .utils import atomic_write_json, atomic_write_text, derive_seed, resolve_device, seed_everything

log = logging.getLogger(__name__)

VAL_STREAM = 10_000_000
EVAL_STREAM_BASE = 20_000_000
CHECKPOINT_NAME = "checkpoint.pt"
# Config keys that may change between an interrupted run and its resumption without
# changing what the run computes (or that must change, like train.epochs to train longer).
RESUME_FREE_KEYS = (
    "resume", "progress", "device", "train.epochs", "train.stop_after_epochs", "data.num_workers", "data.root", "train.log_every",
)


def train_stream(epoch: int) -> int:
    """Channel stream of training epoch ``epoch`` (0-based)."""
    return epoch


def eval_stream(draw: int) -> int:
    """Channel stream of evaluation draw ``draw``."""
    return EVAL_STREAM_BASE + draw


def layer_costs(channel, sample_ids: torch.Tensor, num_layers: int, stream: int) -> list[torch.Tensor]:
    """Per-layer link costs of a batch: L float64 CPU tensors [B, K, N] (J, +inf = outage)."""
    return [channel.costs(sample_ids, layer, stream) for layer in range(num_layers)]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; training stops without saving."""


# ---------------------------------------------------------------------------------------------
# Stop signals


class StopSignal:
    """Records SIGINT / SIGTERM so the training loop can stop after the current step.

    Use as a context manager; a second signal aborts at once (KeyboardInterrupt).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting without saving")
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name} received: stopping after the current step and saving a checkpoint "
            "(send it again to abort at once)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> "StopSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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


# ---------------------------------------------------------------------------------------------
# One epoch / one evaluation pass


@dataclass
class EpochProgress:
    """Running sums of a training epoch; saved in a mid-epoch checkpoint for exact resume."""

    steps: int = 0
    inputs: int = 0
    correct: int = 0
    loss_sum: float = 0.0
    batch_metrics: list[list[dict[str, torch.Tensor]]] = field(default_factory=list)  # [step][layer]

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "inputs": self.inputs, "correct": self.correct,
                "loss_sum": self.loss_sum, "batch_metrics": self.batch_metrics}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "EpochProgress":
        return cls(**state)

    def summary(self) -> dict[str, Any]:
        """Epoch means: loss, accuracy and the combined router metrics."""
        averagers = [MetricAverager() for _ in self.batch_metrics[0]] if self.batch_metrics else []
        for step_metrics in self.batch_metrics:
            for averager, metrics in zip(averagers, step_metrics):
                averager.update(metrics)
        n = max(self.inputs, 1)
        result = {"loss": self.loss_sum / n, "accuracy": self.correct / n, "steps": self.steps}
        if averagers:
            result["router"] = combine_layers([a.compute() for a in averagers])
        return result


def train_one_epoch(
    model: torch.nn.Module,
    batches: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    channel,
    specs: list,
    stream: int,
    device: torch.device,
    aux_loss_coef: float,
    grad_clip: float | None,
    generator: torch.Generator | None,
    progress: EpochProgress,
    stop: StopSignal | None = None,
    on_step: Callable[[EpochProgress, float], None] | None = None,
) -> bool:
    """Train on ``batches`` (``(images, labels, sample_ids)``), updating ``progress`` in place.

    The loss is cross-entropy + ``aux_loss_coef`` * load-balancing loss.  ``on_step(progress,
    loss)`` runs after every optimizer step.  Returns True if the epoch ran to its end, False
    if ``stop`` was requested (checked after each step).  Raises NonFiniteLossError before
    the optimizer step of a batch whose loss is NaN or infinite.
    """
    model.train()
    num_layers = len(specs)
    for images, labels, sample_ids in batches:
        costs = layer_costs(channel, sample_ids, num_layers, stream)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        output = model(images, costs, specs, generator=generator)
        loss = F.cross_entropy(output.logits, labels) + aux_loss_coef * output.aux_loss
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(
                f"training loss is {loss_value} at step {progress.steps + 1} of this epoch; stopped without "
                "saving, the last good checkpoint is kept (try a smaller train.lr or train.grad_clip)"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()

        batch = len(labels)
        progress.steps += 1
        progress.inputs += batch
        progress.correct += int((output.logits.detach().argmax(1) == labels).sum())
        progress.loss_sum += loss_value * batch
        progress.batch_metrics.append([{k: v.detach().cpu() for k, v in m.items()} for m in output.layer_metrics])
        if on_step is not None:
            on_step(progress, loss_value)
        if stop is not None and stop.requested:
            return False
    return True


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


# ---------------------------------------------------------------------------------------------
# Training run


def lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up over min(warmup_steps, total_steps // 10) steps, then cosine to 0."""
    warmup = min(warmup_steps, total_steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        span = max(total_steps - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))

    return factor


def _dataset_and_info(cfg: DictConfig, *, limit_train=None):
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


def _config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    diffs = []
    for key in keys:
        path = f"{prefix}{key}"
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(_config_differences(a, b, f"{path}."))
        elif a != b and path not in RESUME_FREE_KEYS:
            diffs.append(f"{path}: {a!r} -> {b!r}")
    return diffs


class _StepLogger:
    """Progress bar postfix and TensorBoard train/* points (means since the previous point)
    every ``log_every`` steps and at the end of each epoch."""

    def __init__(self, writer, bar, scheduler, log_every: int, global_step: int, progress: EpochProgress) -> None:
        self.writer, self.bar, self.scheduler, self.log_every = writer, bar, scheduler, log_every
        self.global_step = global_step
        self._last = (progress.inputs, progress.correct, progress.loss_sum)

    def __call__(self, progress: EpochProgress, loss: float) -> None:
        self.global_step += 1
        self.bar.update(1)
        if self.global_step % self.log_every == 0:
            self.flush(progress)
            self.bar.set_postfix(loss=f"{loss:.3f}", acc=f"{progress.correct / max(progress.inputs, 1):.3f}")

    def flush(self, progress: EpochProgress) -> None:
        last_inputs, last_correct, last_loss = self._last
        span = progress.inputs - last_inputs
        if span <= 0:
            return
        self.writer.add_scalar("train/loss", (progress.loss_sum - last_loss) / span, self.global_step)
        self.writer.add_scalar("train/accuracy", (progress.correct - last_correct) / span, self.global_step)
        self.writer.add_scalar("train/lr", self.scheduler.get_last_lr()[0], self.global_step)
        self._last = (progress.inputs, progress.correct, progress.loss_sum)


def fit(cfg: DictConfig, output_dir: str | Path) -> int:
    """Train as configured, writing config.yaml, checkpoint.pt, metrics.json and TensorBoard
    events to ``output_dir``.  Returns the process exit status: 0 when training finished,
    128 + signal number when stopped by SIGINT / SIGTERM (after saving a checkpoint).
    """
    validate_train_config(cfg)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    ckpt_path = output_dir / CHECKPOINT_NAME
    resume_from = resume_path(cfg) or (str(ckpt_path) if ckpt_path.is_file() else None)
    checkpoint = load_checkpoint(resume_from, key="resume") if resume_from else None

    seed = int(cfg.seed)
    seed_everything(seed)
    device = resolve_device(cfg.device)
    train_ds, val_ds, test_ds, info = _dataset_and_info(cfg, limit_train=cfg.data.limit_train)
    from .data import make_loader

    batch_size = int(cfg.data.batch_size)
    # BatchNorm cannot train on a batch of one image: drop the last batch only in that case.
    drop_last = len(train_ds) % batch_size == 1
    steps_per_epoch = len(train_ds) // batch_size + (0 if drop_last or len(train_ds) % batch_size == 0 else 1)
    if steps_per_epoch < 1:
        raise ConfigError(f"data.batch_size={batch_size}: the training set has only {len(train_ds)} image(s)")
    epochs = int(cfg.train.epochs)

    model = build_model(cfg, info).to(device)
    channel = build_channel(cfg)
    specs = router_specs(cfg, "router", channel.failure_energy_j)
    eval_specs = router_specs(cfg, "eval_router", channel.failure_energy_j)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(cfg.train.lr), weight_decay=float(cfg.train.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(epochs * steps_per_epoch, int(cfg.train.warmup_steps))
    )
    # Generators whose state a mid-epoch checkpoint records; "router" (random routing) is
    # created per epoch below.
    generators = {"augment": train_ds.generator}

    start_epoch, global_step = 0, 0
    history: list[dict[str, Any]] = []
    progress = EpochProgress()
    if checkpoint is not None:
        load_model_state(model, checkpoint["model"], key="resume")
        diffs = _config_differences(checkpoint["config"], config_dict)
        if diffs:
            log.warning("resuming %s with a different config (%s); the result will differ from an uninterrupted run",
                        resume_from, "; ".join(diffs))
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start_epoch, global_step = int(checkpoint["epoch"]), int(checkpoint["global_step"])
        history = list(checkpoint["metrics"].get("history", []))
        if checkpoint["step_in_epoch"]:
            progress = EpochProgress.from_state_dict(checkpoint["metrics"]["epoch_progress"])
        log.info("Resuming from %s at epoch %d, step %d", resume_from, start_epoch + 1, checkpoint["step_in_epoch"])

    atomic_write_text(output_dir / "config.yaml", OmegaConf.to_yaml(config_dict))
    from torch.utils.tensorboard import SummaryWriter

    # purge_step drops events a killed run logged after its last checkpoint.
    writer = SummaryWriter(log_dir=str(output_dir), purge_step=global_step if checkpoint is not None else None)
    val_loader = make_loader(val_ds, batch_size, shuffle=False, seed=seed, num_workers=int(cfg.data.num_workers))
    val_metrics: dict[str, Any] = history[-1]["val"] if history else {}

    def save(epoch: int, step_in_epoch: int, progress_state: dict | None) -> None:
        metrics = {"history": history}
        if progress_state is not None:
            metrics["epoch_progress"] = progress_state
        save_checkpoint(
            ckpt_path, model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            epoch=epoch, step_in_epoch=step_in_epoch, global_step=global_step, config=config_dict,
            metrics=metrics, rng=capture_rng_state(generators),
        )

    show = bool(cfg.progress)
    stop_after = cfg.train.stop_after_epochs
    if checkpoint is not None and not progress.steps:
        # At an epoch boundary nothing below draws from the global RNGs before the loop does.
        restore_rng_state(checkpoint["rng"], generators)
    try:
        with StopSignal() as stop:
            for epoch in range(start_epoch, epochs):
                epoch_start = time.perf_counter()
                train_ds.generator.manual_seed(derive_seed(seed, "augment", epoch))
                generators["router"] = routing_generator(seed, train_stream(epoch))
                loader = make_loader(
                    train_ds, batch_size, shuffle=True, seed=derive_seed(seed, "shuffle", epoch),
                    num_workers=int(cfg.data.num_workers), drop_last=drop_last,
                )
                batches = iter(loader)
                if progress.steps:  # mid-epoch resume: replay the batch order, then the RNG states
                    for _ in range(progress.steps):
                        next(batches)
                    restore_rng_state(checkpoint["rng"], generators)
                bar = tqdm(total=steps_per_epoch, initial=progress.steps, desc=f"epoch {epoch + 1}/{epochs}",
                           disable=not show, leave=False, dynamic_ncols=True)
                step_logger = _StepLogger(writer, bar, scheduler, int(cfg.train.log_every), global_step, progress)
                finished = train_one_epoch(
                    model, batches, optimizer, scheduler, channel=channel, specs=specs,
                    stream=train_stream(epoch), device=device, aux_loss_coef=float(cfg.train.aux_loss_coef),
                    grad_clip=None if cfg.train.grad_clip is None else float(cfg.train.grad_clip),
                    generator=generators["router"], progress=progress, stop=stop, on_step=step_logger,
                )
                bar.close()
                global_step = step_logger.global_step
                if not finished:
                    save(epoch, progress.steps, progress.state_dict())
                    return _interrupted(stop, ckpt_path, epoch, progress.steps)
                step_logger.flush(progress)

                train_summary = progress.summary()
                val_metrics = _evaluate_with_bar(
                    model, val_loader, desc="validation", show=show, seed=seed, stream=VAL_STREAM,
                    channel=channel, specs=eval_specs, device=device,
                ) if len(val_ds) else {}
                record = {
                    "epoch": epoch + 1,
                    "global_step": global_step,
                    "lr": scheduler.get_last_lr()[0],
                    "train": train_summary,
                    "val": val_metrics,
                    "epoch_time_s": time.perf_counter() - epoch_start,
                }
                history.append(record)
                report.log_epoch(writer, record, global_step)
                log.info(report.epoch_line(record, epochs))
                progress = EpochProgress()
                save(epoch + 1, 0, None)
                if stop.requested:
                    return _interrupted(stop, ckpt_path, epoch + 1, 0)
                if stop_after is not None and epoch + 1 >= stop_after and epoch + 1 < epochs:
                    log.info("Stopping after epoch %d of %d (train.stop_after_epochs=%d); checkpoint saved to %s; "
                             "run again to continue.", epoch + 1, epochs, stop_after, ckpt_path)
                    return 0

            # A signal from here on lets the test evaluation finish (seconds); the checkpoint is saved.
            test_loader = make_loader(test_ds, batch_size, shuffle=False, seed=seed, num_workers=int(cfg.data.num_workers))
            test_metrics = _evaluate_with_bar(
                model, test_loader, desc="test", show=show, seed=seed, stream=eval_stream(0),
                channel=channel, specs=eval_specs, device=device,
            )
            results = {
                "epochs_completed": epochs,
                "global_step": global_step,
                "val": val_metrics,
                "test": test_metrics,
                "train_router": OmegaConf.to_container(cfg.router, resolve=True),
                "eval_router": OmegaConf.to_container(cfg.eval_router, resolve=True),
                "history": history,
            }
            atomic_write_json(output_dir / "metrics.json", results)
            report.log_scalars(writer, "test", test_metrics, global_step)
            log.info("test accuracy %.4f, energy %.2f uJ/input (%s); outputs in %s",
                     test_metrics["accuracy"], test_metrics["energy_uj"], cfg.eval_router.policy, output_dir)
            return 0
    finally:
        writer.close()


def _interrupted(stop: StopSignal, ckpt_path: Path, epoch: int, step: int) -> int:
    where = f"epoch {epoch + 1}, step {step}" if step else f"the end of epoch {epoch}"
    log.warning("Stopped by %s at %s; checkpoint saved to %s. Run the same command again (same hydra.run.dir) "
                "or pass resume=<checkpoint> to continue.", stop.name, where, ckpt_path)
    return 128 + int(stop.signum)


def routing_generator(seed: int, stream: int) -> torch.Generator:
    """The generator of random routing (random_topk) on channel stream ``stream``: a pass
    draws the same random choices whatever ran before it."""
    return torch.Generator().manual_seed(derive_seed(seed, "router", stream))


def _evaluate_with_bar(model, loader, *, desc: str, show: bool, seed: int, stream: int, **kwargs) -> dict[str, float]:
    with tqdm(total=len(loader), desc=desc, disable=not show, leave=False, dynamic_ncols=True) as bar:
        return evaluate(model, loader, stream=stream, generator=routing_generator(seed, stream),
                        on_batch=lambda: bar.update(1), **kwargs)


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
    _, _, test_ds, info = _dataset_and_info(run_cfg, limit_train=train_cfg.data.limit_train)
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
