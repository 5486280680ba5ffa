"""Training engine (train.py): the epoch loop, checkpoints, resume and stop signals.

Exact resume.  Every source of randomness is either reseeded per epoch from
``(seed, epoch)`` (shuffle order, augmentation, random routing) or saved in the checkpoint
(global RNGs and the generators' positions), and a checkpoint taken inside an epoch also
stores the epoch's running sums; so a run interrupted and resumed ends with the same weights
and metrics as an uninterrupted one (on CPU).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ..channel.geometry import ADDED_CHANNEL_KEYS, ChannelConfig
from ..channel.links import VAL_STREAM, eval_stream, layer_links, train_stream
from ..config import ConfigError, resume_path, validate_train_config
from ..moe import PRECISIONS, MetricAverager, MoELayer
from ..output import report
from ..runtime import attach_experts, clip_grad_norm
from ..utils import atomic_write_json, atomic_write_text, derive_seed, device_label, resolve_device, seed_everything
from .build import build_channel, build_model, router_specs
from .checkpoint import CHECKPOINT_NAME, capture_rng_state, load_checkpoint, load_model_state, restore_rng_state, save_checkpoint
from .evaluation import combine_layers, dataset_and_info, evaluate_with_bar, routing_generator
from .rundir import check_rerun_dir, check_run_dir_owner, lock_run_dir

log = logging.getLogger(__name__)


# Config keys that may change between an interrupted run and its resumption without
# changing what the run computes (or that must change, like train.epochs to train longer).
RESUME_FREE_KEYS = (
    "resume",
    "resume_force",
    "progress",
    "device",
    "train.epochs",
    "train.stop_after_epochs",
    "data.num_workers",
    "data.root",
    "train.log_every",
    "runtime",
    "runtime.name",
    "runtime.backend",
    "runtime.timeout_s",
)

# Config keys added after runs may have been recorded, with the value their absence means, so
# that rerunning an older run directory is not refused for a key it could not have had.
ADDED_KEY_DEFAULTS = {
    "model.link_dropout": 0.0,
    "model.combine": "renormalized",
    "model.balance_on": "selection",
    "train.z_loss_coef": 0.0,
    "train.energy_loss_coef": 0.0,
    "train.precision": "fp32",
    "model.channel_gate": False,
    "router.lam": None,
    "eval_router.lam": None,
}

# channel.model and its keys (docs/method.md, "Channel models"): absent means the rayleigh channel.
ADDED_KEY_DEFAULTS.update({f"channel.{name}": getattr(ChannelConfig, name) for name in ADDED_CHANNEL_KEYS})


def autocast(precision: str, device: torch.device):
    """torch.autocast for train.precision on ``device`` (a no-op context for fp32)."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


class NonFiniteLossError(RuntimeError):
    """The training loss, or the router's gate scores, became NaN or infinite; training stops
    without saving."""


# What a diverged run does and what to try, after saying where it diverged.
DIVERGED_ADVICE = "stopped without saving, the last good checkpoint is kept (try a smaller train.lr or train.grad_clip)"


class DivergenceWatch:
    """Tells a diverged model from a bug when routing fails: with it, a ValueError raised by a
    forward pass whose gate logits (any MoE layer's) are NaN or infinite -- the router refuses
    such scores -- becomes a NonFiniteLossError saying where (``where``, set before each pass).

    Forward hooks keep a reference to each gate's last output (no copy, no device sync); they
    are looked at only when a ValueError passes.  Use as a context manager.
    """

    def __init__(self, model: torch.nn.Module, where: str = "") -> None:
        self.where = where
        self._logits: dict[int, torch.Tensor] = {}
        gates = [module.gate for module in model.modules() if isinstance(module, MoELayer)]
        self._hooks = [gate.register_forward_hook(self._keeper(index)) for index, gate in enumerate(gates)]

    def _keeper(self, index: int):
        def keep(module, inputs, output) -> None:
            self._logits[index] = output

        return keep

    def gates_finite(self) -> bool:
        return all(bool(torch.isfinite(logits.detach()).all()) for logits in self._logits.values())

    def __enter__(self) -> DivergenceWatch:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for hook in self._hooks:
            hook.remove()
        routing_error = exc_type is not None and issubclass(exc_type, ValueError) and not issubclass(exc_type, ConfigError)
        if routing_error and not self.gates_finite():
            raise NonFiniteLossError(
                f"training diverged {self.where}: the router's gate scores are NaN or infinite; {DIVERGED_ADVICE}"
            ) from None


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

    def __enter__(self) -> StopSignal:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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
    # (steps, inputs, correct, loss_sum) at this epoch's last train/* TensorBoard point: a
    # resumed epoch's next point then spans the same steps as an uninterrupted one's.
    logged: list = field(default_factory=lambda: [0, 0, 0, 0.0])

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "inputs": self.inputs,
            "correct": self.correct,
            "loss_sum": self.loss_sum,
            "batch_metrics": self.batch_metrics,
            "logged": list(self.logged),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> EpochProgress:
        progress = cls(**state)
        if "logged" not in state:  # a checkpoint from before it was saved: next point from here
            progress.logged = [progress.steps, progress.inputs, progress.correct, progress.loss_sum]
        return progress

    def summary(self, tokens_per_input: int = 1) -> dict[str, Any]:
        """Epoch means: loss, accuracy and the combined router metrics (see router_summary)."""
        n = max(self.inputs, 1)
        result = {"loss": self.loss_sum / n, "accuracy": self.correct / n, "steps": self.steps}
        if self.batch_metrics:
            result["router"] = router_summary(self.batch_metrics, tokens_per_input)
        return result


def router_summary(batch_metrics: list[list[dict[str, torch.Tensor]]], tokens_per_input: int = 1) -> dict[str, Any]:
    """The router metrics over the steps of ``batch_metrics`` ([step][layer] metric dicts of the
    MoE layers): each layer's means over the steps (MetricAverager), combined over the layers
    (combine_layers); {} without steps."""
    if not batch_metrics:
        return {}
    averagers = [MetricAverager() for _ in batch_metrics[0]]
    for step_metrics in batch_metrics:
        for averager, metrics in zip(averagers, step_metrics, strict=True):
            averager.update(metrics)
    return combine_layers([a.compute() for a in averagers], tokens_per_input)


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
    z_loss_coef: float = 0.0,
    energy_loss_coef: float = 0.0,
    precision: str = "fp32",
    generator: torch.Generator | None,
    progress: EpochProgress,
    stop: StopSignal | None = None,
    on_step: Callable[[EpochProgress, float], None] | None = None,
) -> bool:
    """Train on ``batches`` (``(images, labels, sample_ids)``), updating ``progress`` in place.

    The loss is cross-entropy + ``aux_loss_coef`` * load-balancing loss + ``z_loss_coef`` *
    router z-loss (the last only when z_loss_coef > 0).  ``on_step(progress,
    loss)`` runs after every optimizer step.  Returns True if the epoch ran to its end, False
    if ``stop`` was requested (checked after each step).  Raises NonFiniteLossError before
    the optimizer step of a batch whose loss is NaN or infinite, and when the router meets
    NaN or infinite gate scores (weights that diverged in the previous step).
    """
    model.train()
    with DivergenceWatch(model) as watch:
        for images, labels, sample_ids in batches:
            watch.where = f"at step {progress.steps + 1} of this epoch"
            costs, delivered = layer_links(channel, sample_ids, specs, stream, model.tokens_per_input)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast(precision, device):
                output = model(images, costs, specs, generator=generator, delivered=delivered)
            loss = F.cross_entropy(output.logits.float(), labels) + aux_loss_coef * output.aux_loss
            if z_loss_coef > 0:
                if output.z_loss is None:
                    raise ConfigError(f"train.z_loss_coef={z_loss_coef}: this model reports no router z-loss; use 0")
                loss = loss + z_loss_coef * output.z_loss
            if energy_loss_coef > 0:
                if output.energy_loss is None:
                    raise ConfigError(
                        f"train.energy_loss_coef={energy_loss_coef}: prices the channel-aware gate's expected "
                        "link cost; set model.channel_gate=true (or use 0)"
                    )
                loss = loss + energy_loss_coef * output.energy_loss
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(
                    f"training loss is {loss_value} at step {progress.steps + 1} of this epoch; {DIVERGED_ADVICE}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                clip_grad_norm(model, grad_clip)  # torch's clip_grad_norm_, remote experts included
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


class _StepLogger:
    """Progress bar postfix and TensorBoard train/* points (means since the previous point,
    ``progress.logged``) every ``log_every`` steps and at the end of each epoch."""

    def __init__(self, writer, bar, scheduler, log_every: int, global_step: int) -> None:
        self.writer, self.bar, self.scheduler, self.log_every = writer, bar, scheduler, log_every
        self.global_step = global_step

    def __call__(self, progress: EpochProgress, loss: float) -> None:
        self.global_step += 1
        self.bar.update(1)
        if self.global_step % self.log_every == 0:
            router = router_summary(progress.batch_metrics[progress.logged[0] :])  # since the last point
            self.flush(progress)
            # the channel's outages and training-time link dropout apart (0 before the metric existed)
            self.bar.set_postfix(
                loss=f"{loss:.3f}",
                acc=f"{progress.correct / max(progress.inputs, 1):.3f}",
                outage=f"{router.get('outage_rate', 0.0):.1%}",
                dropout=f"{router.get('link_dropout_rate', 0.0):.1%}",
            )

    def flush(self, progress: EpochProgress) -> None:
        _, last_inputs, last_correct, last_loss = progress.logged
        span = progress.inputs - last_inputs
        if span <= 0:
            return
        self.writer.add_scalar("train/loss", (progress.loss_sum - last_loss) / span, self.global_step)
        self.writer.add_scalar("train/accuracy", (progress.correct - last_correct) / span, self.global_step)
        self.writer.add_scalar("train/lr", self.scheduler.get_last_lr()[0], self.global_step)
        progress.logged = [progress.steps, progress.inputs, progress.correct, progress.loss_sum]


def fit(cfg: DictConfig, output_dir: str | Path) -> int:
    """Train as configured, writing config.yaml, checkpoint.pt, metrics.json and TensorBoard
    events to ``output_dir``.  Returns the process exit status: 0 when training finished,
    128 + signal number when stopped by SIGINT / SIGTERM (after saving a checkpoint).
    """
    validate_train_config(cfg)
    output_dir = Path(output_dir)
    lock_run_dir(output_dir)  # creates it; a second process on it stops here
    check_run_dir_owner(output_dir, "train")
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    ckpt_path = output_dir / CHECKPOINT_NAME
    resume_from = resume_path(cfg) or (str(ckpt_path) if ckpt_path.is_file() else None)
    checkpoint = load_checkpoint(resume_from, key="resume") if resume_from else None
    # A rerun (or resume=PATH) must not change what the run computes, unless resume_force=true.
    diffs = check_rerun_dir(
        output_dir,
        cfg,
        free_keys=RESUME_FREE_KEYS,
        added_defaults=ADDED_KEY_DEFAULTS,
        checkpoint=checkpoint,
        checkpoint_path=resume_from,
    )
    metrics_path = output_dir / "metrics.json"
    # A rerun of a finished run redoes only the test; its TensorBoard points are there already.
    logged_test = (
        json.loads(metrics_path.read_text()).get("test")
        if checkpoint is not None and metrics_path.is_file() and int(checkpoint["epoch"]) >= int(cfg.train.epochs)
        else None
    )

    seed = int(cfg.seed)
    seed_everything(seed)
    device = resolve_device(cfg.device)
    config_dict["device"] = device_label(device)  # config.yaml records the device used, not "auto"
    train_ds, val_ds, test_ds, info = dataset_and_info(cfg, limit_train=cfg.data.limit_train)
    from ..data import make_loader

    batch_size = int(cfg.data.batch_size)
    # BatchNorm cannot train on a batch of one image: drop the last batch only in that case.
    drop_last = len(train_ds) % batch_size == 1
    steps_per_epoch = len(train_ds) // batch_size + (0 if drop_last or len(train_ds) % batch_size == 0 else 1)
    if steps_per_epoch < 1:  # validate_data refuses configs that leave one image; a smaller data file could
        raise ConfigError(
            f"data.root={cfg.data.root!r}: the training set has only {len(train_ds)} image(s); a batch of "
            "one image cannot train (BatchNorm needs two)"
        )
    epochs = int(cfg.train.epochs)

    model = build_model(cfg, info).to(device)
    channel = build_channel(cfg)
    specs = router_specs(cfg, "router", channel.failure_energy_j)
    eval_specs = router_specs(cfg, "eval_router", channel.failure_energy_j)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(cfg.train.lr), weight_decay=float(cfg.train.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(epochs * steps_per_epoch, int(cfg.train.warmup_steps)))
    # Generators whose state a mid-epoch checkpoint records; "router" (random routing) is
    # created per epoch below.
    generators = {"augment": train_ds.generator}

    start_epoch, global_step = 0, 0
    history: list[dict[str, Any]] = []
    progress = EpochProgress()
    epoch_time_before = 0.0  # seconds the epoch in progress ran before an interruption
    if checkpoint is not None:
        load_model_state(model, checkpoint["model"], key="resume")
        if diffs:
            log.warning(
                "resuming %s with a different config (resume_force=true: %s); the result will differ from an uninterrupted run",
                resume_from,
                "; ".join(diffs),
            )
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start_epoch, global_step = int(checkpoint["epoch"]), int(checkpoint["global_step"])
        history = list(checkpoint["metrics"].get("history", []))
        if checkpoint["step_in_epoch"]:
            progress = EpochProgress.from_state_dict(checkpoint["metrics"]["epoch_progress"])
            epoch_time_before = float(checkpoint["metrics"].get("epoch_elapsed_s", 0.0))
        log.info("Resuming from %s at epoch %d, step %d", resume_from, start_epoch + 1, checkpoint["step_in_epoch"])
    attach_experts(model, optimizer, payload_bits=channel.payload_bits)  # runtime=distributed: experts to the workers

    atomic_write_text(output_dir / "config.yaml", OmegaConf.to_yaml(config_dict))
    from torch.utils.tensorboard import SummaryWriter

    # TensorBoard drops the events of earlier writers from purge_step on: those a killed run logged
    # after its checkpoint (which holds every point up to its global_step, the epoch-end ones
    # included), or all of them when the run starts afresh (a run that failed before saving).
    if checkpoint is not None:
        purge_step = global_step + 1
    else:
        purge_step = 0 if any(output_dir.glob("events.out.tfevents.*")) else None
    writer = SummaryWriter(log_dir=str(output_dir), purge_step=purge_step)
    val_loader = make_loader(val_ds, batch_size, shuffle=False, seed=seed, num_workers=int(cfg.data.num_workers))
    val_metrics: dict[str, Any] = history[-1]["val"] if history else {}

    def save(epoch: int, step_in_epoch: int, progress_state: dict | None) -> None:
        metrics = {"history": history}
        if progress_state is not None:
            metrics["epoch_progress"] = progress_state
            metrics["epoch_elapsed_s"] = epoch_time_before + time.perf_counter() - epoch_start
        save_checkpoint(
            ckpt_path,
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            epoch=epoch,
            step_in_epoch=step_in_epoch,
            global_step=global_step,
            config=config_dict,
            metrics=metrics,
            rng=capture_rng_state(generators),
        )

    show = bool(cfg.progress)
    stop_after = cfg.train.stop_after_epochs
    precision = OmegaConf.select(cfg, "train.precision", default="fp32")  # absent in older runs: fp32
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
                    train_ds,
                    batch_size,
                    shuffle=True,
                    seed=derive_seed(seed, "shuffle", epoch),
                    num_workers=int(cfg.data.num_workers),
                    drop_last=drop_last,
                )
                batches = iter(loader)
                if progress.steps:  # mid-epoch resume: replay the batch order, then the RNG states
                    for _ in range(progress.steps):
                        next(batches)
                    restore_rng_state(checkpoint["rng"], generators)
                bar = tqdm(
                    total=steps_per_epoch,
                    initial=progress.steps,
                    desc=f"epoch {epoch + 1}/{epochs}",
                    disable=not show,
                    leave=False,
                    dynamic_ncols=True,
                )
                step_logger = _StepLogger(writer, bar, scheduler, int(cfg.train.log_every), global_step)
                finished = train_one_epoch(
                    model,
                    batches,
                    optimizer,
                    scheduler,
                    channel=channel,
                    specs=specs,
                    stream=train_stream(epoch),
                    device=device,
                    aux_loss_coef=float(cfg.train.aux_loss_coef),
                    grad_clip=None if cfg.train.grad_clip is None else float(cfg.train.grad_clip),
                    z_loss_coef=float(OmegaConf.select(cfg, "train.z_loss_coef", default=0.0)),
                    energy_loss_coef=float(OmegaConf.select(cfg, "train.energy_loss_coef", default=0.0)),
                    precision=precision,
                    generator=generators["router"],
                    progress=progress,
                    stop=stop,
                    on_step=step_logger,
                )
                bar.close()
                global_step = step_logger.global_step
                if not finished:
                    save(epoch, progress.steps, progress.state_dict())
                    return _interrupted(stop, ckpt_path, epoch, progress.steps)
                step_logger.flush(progress)

                train_summary = progress.summary(model.tokens_per_input)
                with autocast(precision, device), DivergenceWatch(model, f"in the validation after epoch {epoch + 1}"):
                    val_metrics = (
                        evaluate_with_bar(
                            model,
                            val_loader,
                            desc="validation",
                            show=show,
                            seed=seed,
                            stream=VAL_STREAM,
                            channel=channel,
                            specs=eval_specs,
                            device=device,
                        )
                        if len(val_ds)
                        else {}
                    )
                record = {
                    "epoch": epoch + 1,
                    "global_step": global_step,
                    "lr": scheduler.get_last_lr()[0],
                    "train": train_summary,
                    "val": val_metrics,
                    "epoch_time_s": epoch_time_before + time.perf_counter() - epoch_start,  # all invocations
                }
                history.append(record)
                report.log_epoch(writer, record, global_step)
                log.info(epoch_line(record, epochs))
                progress, epoch_time_before = EpochProgress(), 0.0
                save(epoch + 1, 0, None)
                if stop.requested:
                    return _interrupted(stop, ckpt_path, epoch + 1, 0)
                if stop_after is not None and epoch + 1 >= stop_after and epoch + 1 < epochs:
                    log.info(
                        "Stopping after epoch %d of %d (train.stop_after_epochs=%d); checkpoint saved to %s; "
                        "run again to continue.",
                        epoch + 1,
                        epochs,
                        stop_after,
                        ckpt_path,
                    )
                    return 0

            # A signal from here on lets the test evaluation finish (seconds); the checkpoint is saved.
            test_loader = make_loader(test_ds, batch_size, shuffle=False, seed=seed, num_workers=int(cfg.data.num_workers))
            with autocast(precision, device), DivergenceWatch(model, "in the test after the last epoch"):
                test_metrics = evaluate_with_bar(
                    model,
                    test_loader,
                    desc="test",
                    show=show,
                    seed=seed,
                    stream=eval_stream(0),
                    channel=channel,
                    specs=eval_specs,
                    device=device,
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
            atomic_write_json(metrics_path, results)
            if json.loads(json.dumps(test_metrics)) != logged_test:  # else the same points are in TensorBoard already
                report.log_scalars(writer, "test", test_metrics, global_step)
            log.info(
                "test accuracy %.4f, energy %.2f uJ/input (%s); outputs in %s",
                test_metrics["accuracy"],
                test_metrics["energy_uj"],
                cfg.eval_router.policy,
                output_dir,
            )
            return 0
    finally:
        writer.close()


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    """report.epoch_line with the training-time link dropout shown apart from the channel's
    outages (a share of the selected links; 0 for metric records that predate it)."""
    line = report.epoch_line(record, epochs)
    router = record["train"].get("router")
    if not router:
        return line
    head, _, elapsed = line.rpartition(" | ")
    return f"{head} | train link dropout {router.get('link_dropout_rate', 0.0):.2%} | {elapsed}"


def _interrupted(stop: StopSignal, ckpt_path: Path, epoch: int, step: int) -> int:
    where = f"epoch {epoch + 1}, step {step}" if step else f"the end of epoch {epoch}"
    log.warning(
        "Stopped by %s at %s; checkpoint saved to %s. Run the same command again (same hydra.run.dir) "
        "or pass resume=<checkpoint> to continue.",
        stop.name,
        where,
        ckpt_path,
    )
    return 128 + int(stop.signum)
