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

from ..channel.links import VAL_STREAM, eval_stream, layer_links, train_stream
from ..config import ConfigError, load_train_config, resume_path
from ..config.migration import ADDED_KEY_DEFAULTS
from ..config.schema import TrainRun
from ..moe import PRECISIONS, MetricAverager, MoELayer
from ..output import report
from ..runtime import attach_experts, clip_grad_norm
from ..utils import atomic_write_json, atomic_write_text, derive_seed, device_label, resolve_device, seed_everything
from .build import build_channel, build_model, layer_specs
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
            "batch_metrics": [[{k: v.cpu() for k, v in m.items()} for m in step] for step in self.batch_metrics],
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
    # a resumed epoch's metrics come from the checkpoint on the CPU: on the device with the new ones
    progress.batch_metrics = [[{k: v.to(device) for k, v in m.items()} for m in step] for step in progress.batch_metrics]
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
            # kept on the model's device (no copy per step): read at the logging steps, moved to the
            # CPU only when a checkpoint saves them (state_dict)
            progress.batch_metrics.append([{k: v.detach() for k, v in m.items()} for m in output.layer_metrics])
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
    run = load_train_config(cfg)  # validated once; the steps below read it typed
    output_dir = Path(output_dir)
    lock_run_dir(output_dir)  # creates it; a second process on it stops here
    check_run_dir_owner(output_dir, "train")
    session = TrainingSession(cfg, run, output_dir)
    session.build()
    session.restore()
    session.open_writer()
    try:
        with StopSignal() as stop:
            for epoch in range(session.start_epoch, run.train.epochs):
                status = session.train_epoch(epoch, stop)
                if status is not None:
                    return status
            return session.test()
    finally:
        session.writer.close()


class TrainingSession:
    """The state of one train.py run and its steps, in the order :func:`fit` calls them:
    :meth:`build` (data, model, channel, optimizer), :meth:`restore` (from a checkpoint),
    :meth:`open_writer` (config.yaml, TensorBoard), :meth:`train_epoch` per epoch (train,
    validate, save), :meth:`test`."""

    def __init__(self, cfg: DictConfig, run: TrainRun, output_dir: Path) -> None:
        self.cfg, self.run, self.output_dir = cfg, run, output_dir
        self.config_dict = OmegaConf.to_container(cfg, resolve=True)
        self.ckpt_path = output_dir / CHECKPOINT_NAME
        self.metrics_path = output_dir / "metrics.json"
        self.resume_from = resume_path(cfg) or (str(self.ckpt_path) if self.ckpt_path.is_file() else None)
        self.checkpoint = load_checkpoint(self.resume_from, key="resume") if self.resume_from else None
        # A rerun (or resume=PATH) must not change what the run computes, unless resume_force=true.
        self.diffs = check_rerun_dir(
            output_dir,
            cfg,
            free_keys=RESUME_FREE_KEYS,
            added_defaults=ADDED_KEY_DEFAULTS,
            checkpoint=self.checkpoint,
            checkpoint_path=self.resume_from,
        )
        # A rerun of a finished run redoes only the test; its TensorBoard points are there already.
        finished = self.checkpoint is not None and int(self.checkpoint["epoch"]) >= run.train.epochs
        self.logged_test = (
            json.loads(self.metrics_path.read_text()).get("test") if finished and self.metrics_path.is_file() else None
        )
        self.start_epoch, self.global_step = 0, 0
        self.history: list[dict[str, Any]] = []
        self.progress = EpochProgress()
        self.epoch_time_before = 0.0  # seconds the epoch in progress ran before an interruption
        self.epoch_start = 0.0

    def build(self) -> None:
        """Seed, then the datasets, the model, the channel, the router specs and the optimizer."""
        run = self.run
        seed_everything(run.seed)
        self.device = resolve_device(run.device)
        self.config_dict["device"] = device_label(self.device)  # config.yaml records the device used, not "auto"
        self.train_ds, self.val_ds, self.test_ds, info = dataset_and_info(self.cfg, limit_train=run.data.limit_train)
        batch_size = run.data.batch_size
        # BatchNorm cannot train on a batch of one image: drop the last batch only in that case.
        self.drop_last = len(self.train_ds) % batch_size == 1
        remainder = 0 if self.drop_last or len(self.train_ds) % batch_size == 0 else 1
        self.steps_per_epoch = len(self.train_ds) // batch_size + remainder
        if self.steps_per_epoch < 1:  # the config check refuses configs that leave one image; a smaller data file could
            raise ConfigError(
                f"data.root={run.data.root!r}: the training set has only {len(self.train_ds)} image(s); a batch of "
                "one image cannot train (BatchNorm needs two)"
            )
        self.model = build_model(run.model, info).to(self.device)
        self.channel = build_channel(self.cfg)
        num_layers = self.model.num_moe_layers
        self.specs = layer_specs(run.router, num_layers, self.channel.failure_energy_j)
        self.eval_specs = layer_specs(run.eval_router, num_layers, self.channel.failure_energy_j)
        train = run.train
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=float(train.lr), weight_decay=float(train.weight_decay))
        total_steps = train.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(total_steps, train.warmup_steps))
        # Generators whose state a mid-epoch checkpoint records; "router" (random routing) is
        # created per epoch.
        self.generators = {"augment": self.train_ds.generator}

    def restore(self) -> None:
        """Continue from the checkpoint, if any; then hand the experts to the runtime."""
        checkpoint = self.checkpoint
        if checkpoint is not None:
            load_model_state(self.model, checkpoint["model"], key="resume")
            if self.diffs:
                log.warning(
                    "resuming %s with a different config (resume_force=true: %s); the result will differ from an "
                    "uninterrupted run",
                    self.resume_from,
                    "; ".join(self.diffs),
                )
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            self.start_epoch, self.global_step = int(checkpoint["epoch"]), int(checkpoint["global_step"])
            self.history = list(checkpoint["metrics"].get("history", []))
            if checkpoint["step_in_epoch"]:
                self.progress = EpochProgress.from_state_dict(checkpoint["metrics"]["epoch_progress"])
                self.epoch_time_before = float(checkpoint["metrics"].get("epoch_elapsed_s", 0.0))
            log.info("Resuming from %s at epoch %d, step %d", self.resume_from, self.start_epoch + 1, checkpoint["step_in_epoch"])
        # runtime=distributed: experts to the workers
        attach_experts(self.model, self.optimizer, payload_bits=self.channel.payload_bits)

    def open_writer(self) -> None:
        """config.yaml, the TensorBoard writer and the validation loader."""
        from torch.utils.tensorboard import SummaryWriter

        from ..data import make_loader

        atomic_write_text(self.output_dir / "config.yaml", OmegaConf.to_yaml(self.config_dict))
        # TensorBoard drops the events of earlier writers from purge_step on: those a killed run logged
        # after its checkpoint (which holds every point up to its global_step, the epoch-end ones
        # included), or all of them when the run starts afresh (a run that failed before saving).
        if self.checkpoint is not None:
            purge_step = self.global_step + 1
        else:
            purge_step = 0 if any(self.output_dir.glob("events.out.tfevents.*")) else None
        self.writer = SummaryWriter(log_dir=str(self.output_dir), purge_step=purge_step)
        data = self.run.data
        self.val_loader = make_loader(
            self.val_ds, data.batch_size, shuffle=False, seed=self.run.seed, num_workers=data.num_workers
        )
        self.val_metrics: dict[str, Any] = self.history[-1]["val"] if self.history else {}
        if self.checkpoint is not None and not self.progress.steps:
            # At an epoch boundary nothing below draws from the global RNGs before the loop does.
            restore_rng_state(self.checkpoint["rng"], self.generators)

    def save(self, epoch: int, step_in_epoch: int, progress_state: dict | None) -> None:
        metrics: dict[str, Any] = {"history": self.history}
        if progress_state is not None:
            metrics["epoch_progress"] = progress_state
            metrics["epoch_elapsed_s"] = self.epoch_time_before + time.perf_counter() - self.epoch_start
        save_checkpoint(
            self.ckpt_path,
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            epoch=epoch,
            step_in_epoch=step_in_epoch,
            global_step=self.global_step,
            config=self.config_dict,
            metrics=metrics,
            rng=capture_rng_state(self.generators),
        )

    def epoch_batches(self, epoch: int):
        """The epoch's shuffled batches, its routing generator seeded; after a mid-epoch
        resume the batches already trained are skipped and the RNG states restored."""
        from ..data import make_loader

        seed = self.run.seed
        self.train_ds.generator.manual_seed(derive_seed(seed, "augment", epoch))
        self.generators["router"] = routing_generator(seed, train_stream(epoch))
        loader = make_loader(
            self.train_ds,
            self.run.data.batch_size,
            shuffle=True,
            seed=derive_seed(seed, "shuffle", epoch),
            num_workers=self.run.data.num_workers,
            drop_last=self.drop_last,
        )
        batches = iter(loader)
        if self.progress.steps:  # mid-epoch resume: replay the batch order, then the RNG states
            for _ in range(self.progress.steps):
                next(batches)
            restore_rng_state(self.checkpoint["rng"], self.generators)
        return batches

    def train_epoch(self, epoch: int, stop: StopSignal) -> int | None:
        """Train, validate and save one epoch; an exit status when the run stops here, else None."""
        run, train = self.run, self.run.train
        self.epoch_start = time.perf_counter()
        batches = self.epoch_batches(epoch)
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=self.progress.steps,
            desc=f"epoch {epoch + 1}/{train.epochs}",
            disable=not run.progress,
            leave=False,
            dynamic_ncols=True,
        )
        step_logger = _StepLogger(self.writer, bar, self.scheduler, train.log_every, self.global_step)
        finished = train_one_epoch(
            self.model,
            batches,
            self.optimizer,
            self.scheduler,
            channel=self.channel,
            specs=self.specs,
            stream=train_stream(epoch),
            device=self.device,
            aux_loss_coef=float(train.aux_loss_coef),
            grad_clip=None if train.grad_clip is None else float(train.grad_clip),
            z_loss_coef=float(train.z_loss_coef),
            energy_loss_coef=float(train.energy_loss_coef),
            precision=train.precision,
            generator=self.generators["router"],
            progress=self.progress,
            stop=stop,
            on_step=step_logger,
        )
        bar.close()
        self.global_step = step_logger.global_step
        if not finished:
            self.save(epoch, self.progress.steps, self.progress.state_dict())
            return _interrupted(stop, self.ckpt_path, epoch, self.progress.steps)
        step_logger.flush(self.progress)
        self.record_epoch(epoch)
        if stop.requested:
            return _interrupted(stop, self.ckpt_path, epoch + 1, 0)
        stop_after = train.stop_after_epochs
        if stop_after is not None and epoch + 1 >= stop_after and epoch + 1 < train.epochs:
            log.info(
                "Stopping after epoch %d of %d (train.stop_after_epochs=%d); checkpoint saved to %s; run again to continue.",
                epoch + 1,
                train.epochs,
                stop_after,
                self.ckpt_path,
            )
            return 0
        return None

    def record_epoch(self, epoch: int) -> None:
        """Validate after a finished epoch, log its record and save the checkpoint."""
        train_summary = self.progress.summary(self.model.tokens_per_input)
        with (
            autocast(self.run.train.precision, self.device),
            DivergenceWatch(self.model, f"in the validation after epoch {epoch + 1}"),
        ):
            self.val_metrics = self.evaluate(self.val_loader, "validation", VAL_STREAM) if len(self.val_ds) else {}
        record = {
            "epoch": epoch + 1,
            "global_step": self.global_step,
            "lr": self.scheduler.get_last_lr()[0],
            "train": train_summary,
            "val": self.val_metrics,
            "epoch_time_s": self.epoch_time_before + time.perf_counter() - self.epoch_start,  # all invocations
        }
        self.history.append(record)
        report.log_epoch(self.writer, record, self.global_step)
        log.info(epoch_line(record, self.run.train.epochs))
        self.progress, self.epoch_time_before = EpochProgress(), 0.0
        self.save(epoch + 1, 0, None)

    def evaluate(self, loader, desc: str, stream: int) -> dict[str, Any]:
        return evaluate_with_bar(
            self.model,
            loader,
            desc=desc,
            show=self.run.progress,
            seed=self.run.seed,
            stream=stream,
            channel=self.channel,
            specs=self.eval_specs,
            device=self.device,
        )

    def test(self) -> int:
        """The test evaluation after the last epoch; writes metrics.json.  A signal from here on
        lets it finish (seconds); the checkpoint is saved."""
        from ..data import make_loader

        run, cfg = self.run, self.cfg
        test_loader = make_loader(
            self.test_ds, run.data.batch_size, shuffle=False, seed=run.seed, num_workers=run.data.num_workers
        )
        with autocast(run.train.precision, self.device), DivergenceWatch(self.model, "in the test after the last epoch"):
            test_metrics = self.evaluate(test_loader, "test", eval_stream(0))
        results = {
            "epochs_completed": run.train.epochs,
            "global_step": self.global_step,
            "val": self.val_metrics,
            "test": test_metrics,
            "train_router": OmegaConf.to_container(cfg.router, resolve=True),
            "eval_router": OmegaConf.to_container(cfg.eval_router, resolve=True),
            "history": self.history,
        }
        atomic_write_json(self.metrics_path, results)
        if json.loads(json.dumps(test_metrics)) != self.logged_test:  # else the same points are in TensorBoard already
            report.log_scalars(self.writer, "test", test_metrics, self.global_step)
        log.info(
            "test accuracy %.4f, energy %.2f uJ/input (%s); outputs in %s",
            test_metrics["accuracy"],
            test_metrics["energy_uj"],
            run.eval_router.policy,
            self.output_dir,
        )
        return 0


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
