"""Experts on their own processes: the DMoE protocol over torch.distributed.

Roles (``torchrun --nproc-per-node=W+1 train.py runtime=distributed``):

* rank 0, the coordinator, runs the whole job: data, channel, stem, gates, routing, combine,
  head, loss, logging and checkpoints.  Its model keeps a copy of every expert (the
  "shadow"), refreshed from the workers before a checkpoint is written, so checkpoints have
  the local format.
* ranks 1..W are expert workers: worker w (rank w) hosts expert k of every MoE layer for
  ``k mod W == w - 1``, i.e. expert k lives on rank ``1 + (k mod W)``.  A worker holds only
  its experts and their optimizer state; it needs no data, config or checkpoint.

Per MoE layer and batch the coordinator sends each worker only the rows routed to its
experts (one message, grouped by expert) and receives their outputs; under autograd the
backward pass sends the output gradients and receives the input gradients
(:class:`_RemoteExperts`).  Each worker keeps its experts' gradients and steps them with the
coordinator's optimizer class, hyperparameters and learning rate of the step; gradient
clipping combines the workers' per-parameter gradient norms with the coordinator's, in
parameter order, so every number equals the local run's.

Transport: point-to-point ``isend``/``irecv`` between the coordinator and each worker (a
star, like the radio links; no collective, so gloo's limits on list-form and uneven
all-to-all do not apply).  Every message from the coordinator starts with an int64 header
``[op, layer, seq, flags, dtype, rows, counts of the worker's experts...]``; control
objects (setup, state) are ``torch.save`` bytes.  Headers and objects go over gloo on the
CPU; rows and gradients over the data group (gloo, or nccl on GPUs).  The setup object
pickles the expert modules and the optimizer class: run only among trusted hosts, as with
torch.distributed's own object collectives.

Failure: every wait of the coordinator on a worker is bounded by ``runtime.timeout_s``; a
worker that died (connection closed) or hung (timeout) raises :class:`ExchangeError` with
one line naming it.  Workers wait for the coordinator without a time limit (it may be busy
with data or checkpoints) and stop when it closes the connection.
"""
from __future__ import annotations

import copy
import io
import logging
import math
import os
import re
import signal
import sys
from datetime import timedelta
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

from ..config import ConfigError
from ..moe import MoELayer
from ..utils import atomic_write_json
from . import ExchangeError, RuntimeSettings, _set_active

log = logging.getLogger(__name__)

__all__ = ["Coordinator", "Worker", "hosted_experts", "worker_of_expert", "launch", "process_env", "check_world_size"]

# Header ops (coordinator -> worker).
OP_SETUP, OP_FORWARD, OP_BACKWARD, OP_GRAD_NORMS, OP_CLIP, OP_STEP, OP_GET_STATE, OP_SHUTDOWN = range(1, 9)
BASE_HEADER = 6  # op, layer, seq, flags, dtype, rows; then one count per expert the worker hosts
FLAG_TRAINING, FLAG_GRAD = 1, 2
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
IDLE_TIMEOUT = timedelta(days=30)  # a worker waits this long for the coordinator's next message
JOIN_TIMEOUT = timedelta(minutes=10)  # for every rank to start and join (imports, data on rank 0)
CLOSE_TIMEOUT = timedelta(seconds=5)
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TORCHRUN_HINT = "torchrun --standalone --nproc-per-node=W+1 train.py (or evaluate.py) runtime=distributed, for 1 coordinator and W expert workers"


def worker_of_expert(expert: int, num_workers: int) -> int:
    """Rank of the worker hosting expert ``expert`` of every MoE layer: ``1 + expert mod W``."""
    return 1 + expert % num_workers


def hosted_experts(worker: int, num_experts: int, num_workers: int) -> list[int]:
    """Experts (ascending) of a K-expert layer hosted by worker rank ``worker``."""
    return [k for k in range(num_experts) if worker_of_expert(k, num_workers) == worker]


def process_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; ConfigError without it."""
    missing = [name for name in TORCHRUN_VARS if not os.environ.get(name)]
    if missing:
        raise ConfigError(f"runtime=distributed needs torchrun ({', '.join(missing)} not set): start it as {TORCHRUN_HINT}")
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ConfigError(f"runtime=distributed: RANK={os.environ['RANK']!r} and WORLD_SIZE={os.environ['WORLD_SIZE']!r} "
                          "must be integers") from None
    return rank, world, local_rank


def check_world_size(world_size: int, num_experts: int | None) -> None:
    """ConfigError unless there are 1..K expert workers besides the coordinator."""
    workers = world_size - 1
    if workers < 1:
        raise ConfigError(f"runtime=distributed: WORLD_SIZE={world_size} leaves no expert worker (rank 0 is the "
                          f"coordinator); start W+1 >= 2 processes: {TORCHRUN_HINT}")
    if num_experts is not None and workers > num_experts:
        raise ConfigError(f"runtime=distributed: {workers} expert workers for model.num_experts={num_experts}; at most "
                          f"one worker per expert, so start at most {num_experts + 1} processes (--nproc-per-node)")


def _first_line(exc: BaseException) -> str:
    """The gist of a transport error: gloo's source location and advice dropped."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\] ", "", text)
    return text.split(". This is typically")[0][:300]


# ---------------------------------------------------------------------------------------------
# Transport


class Session:
    """This rank's view of the process group: peers, timeouts, data device and group."""

    def __init__(self, settings: RuntimeSettings, rank: int, world_size: int, local_rank: int) -> None:
        self.settings = settings
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.timeout = timedelta(seconds=settings.timeout_s)
        self.header_len = BASE_HEADER
        self.device = torch.device("cpu")  # where rows and gradients travel (and workers compute)
        self.data_group = None  # None: the default (gloo) group
        self.backend = "gloo"

    def start(self) -> "Session":
        """Join the process group: gloo for control; nccl for the data too when asked (or auto)
        and every rank has its own GPU."""
        # Joining may take longer than an exchange: every wait after it sets its own timeout.
        dist.init_process_group("gloo", rank=self.rank, world_size=self.world_size, timeout=max(self.timeout, JOIN_TIMEOUT))
        own_gpu = torch.cuda.is_available() and self.local_rank < torch.cuda.device_count()
        flags = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(flags, torch.tensor([int(own_gpu)]))
        all_gpus = all(int(f) for f in flags) and dist.is_nccl_available()
        if self.settings.backend == "nccl" and not all_gpus:
            missing = [r for r, f in enumerate(flags) if not int(f)]
            raise ConfigError(f"runtime.backend=nccl: rank(s) {missing} have no GPU of their own; use runtime.backend=gloo or auto")
        if self.settings.backend in ("nccl", "auto") and all_gpus:
            self.backend = "nccl"
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)  # NCCL's communicators bind to the current device
            self.data_group = dist.new_group(backend="nccl", timeout=self.timeout)
        return self

    def end(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def isend(self, tensor: torch.Tensor, peer: int, *, data: bool = False):
        return dist.isend(tensor, dst=peer, group=self.data_group if data else None)

    def irecv(self, tensor: torch.Tensor, peer: int, *, data: bool = False):
        return dist.irecv(tensor, src=peer, group=self.data_group if data else None)

    def header(self, op: int, layer: int = 0, seq: int = 0, flags: int = 0, dtype: torch.dtype = torch.float32,
               rows: int = 0, counts: list[int] = ()) -> torch.Tensor:
        values = [op, layer, seq, flags, DTYPES.index(dtype), rows, *counts]
        header = torch.zeros(self.header_len, dtype=torch.int64)
        header[: len(values)] = torch.tensor(values, dtype=torch.int64)
        return header


def _to_bytes(obj: Any) -> torch.Tensor:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def _from_bytes(data: torch.Tensor, *, weights_only: bool) -> Any:
    return torch.load(io.BytesIO(data.numpy().tobytes()), map_location="cpu", weights_only=weights_only)


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# ---------------------------------------------------------------------------------------------
# Byte accounting


class ExchangeStats:
    """Bytes actually exchanged, per MoE layer and phase, plus control traffic.

    Per layer: ``rows`` (routed rows sent forward, one per effective (input, expert) link),
    ``forward_sent`` / ``forward_received`` (hidden states out, expert outputs back),
    ``backward_sent`` / ``backward_received`` (output gradients out, input gradients back),
    ``header_bytes``.  ``control_bytes``: setup, state, norms, clipping and steps.
    """

    PHASE_KEYS = ("rows", "forward_sent", "forward_received", "backward_sent", "backward_received", "header_bytes", "messages")

    def __init__(self) -> None:
        self.layers: dict[int, dict[str, int]] = {}
        self.control_bytes = 0
        self.d_model: dict[int, int] = {}
        self.element_bits: dict[int, int] = {}

    def layer(self, index: int) -> dict[str, int]:
        return self.layers.setdefault(index, dict.fromkeys(self.PHASE_KEYS, 0))

    def summary(self, payload_bits: int | None, num_workers: int) -> dict[str, Any]:
        """Per layer: the bytes counted and the payload model ``rows x payload_bits / 8`` per
        hop (downlink, uplink) of the protocol, with actual / model ratios."""
        layers = []
        for index in sorted(self.layers):
            c = self.layers[index]
            model_bytes = None if payload_bits is None else c["rows"] * payload_bits / 8
            row = {"layer": index, **c, "d_model": self.d_model.get(index), "bits_per_element_sent": self.element_bits.get(index),
                   "payload_model_bytes_per_hop": model_bytes,
                   "forward_sent_over_model": c["forward_sent"] / model_bytes if model_bytes else None,
                   "forward_received_over_model": c["forward_received"] / model_bytes if model_bytes else None}
            layers.append(row)
        return {"workers": num_workers, "payload_bits_per_hop_row": payload_bits, "layers": layers,
                "control_bytes": self.control_bytes}


def log_summary(summary: dict[str, Any]) -> None:
    bits = summary["payload_bits_per_hop_row"]
    for row in summary["layers"]:
        model = "" if row["forward_sent_over_model"] is None else (
            f"; payload model (rows x {bits} bit per hop) {row['payload_model_bytes_per_hop'] / 1e6:.3f} MB each way, "
            f"sent/model {row['forward_sent_over_model']:.2f} ({row['bits_per_element_sent']}-bit elements)")
        log.info("exchange, MoE layer %d: %d rows; forward %.3f MB out / %.3f MB back, backward %.3f MB out / %.3f MB "
                 "back, headers %.3f MB%s", row["layer"], row["rows"], row["forward_sent"] / 1e6,
                 row["forward_received"] / 1e6, row["backward_sent"] / 1e6, row["backward_received"] / 1e6,
                 row["header_bytes"] / 1e6, model)
    log.info("exchange, control (setup, state, norms, steps): %.3f MB", summary["control_bytes"] / 1e6)


# ---------------------------------------------------------------------------------------------
# Coordinator


class _RemoteExperts(torch.autograd.Function):
    """Rows out to the workers, expert outputs back; backward: output gradients out, input
    gradients back.  inputs: one [rows_w, d] tensor per worker of ``plan``."""

    @staticmethod
    def forward(ctx, coordinator: "Coordinator", layer: int, plan: list, training: bool, anchor: torch.Tensor,
                *inputs: torch.Tensor):
        ctx.coordinator, ctx.layer, ctx.plan = coordinator, layer, plan
        outputs, ctx.seq = coordinator.forward_exchange(layer, plan, inputs, training=training, keep_graph=True)
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs: torch.Tensor):
        grads = ctx.coordinator.backward_exchange(ctx.layer, ctx.seq, ctx.plan, grad_outputs)
        return (None, None, None, None, None, *grads)


class Coordinator:
    """Rank 0's runtime: runs the attached model's experts on the workers.

    ``attach`` replaces ``run_experts`` of every MoE layer, registers hooks so that the
    optimizer's steps reach the workers, ``state_dict()`` (model or optimizer) first fetches
    the experts' state, and ``load_state_dict`` sends it to them.
    """

    name = "distributed"

    def __init__(self, session: Session) -> None:
        self.session = session
        self.workers = list(range(1, session.world_size))
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.layers: list[MoELayer] = []
        self.hosted: dict[int, list[list[int]]] = {}  # worker -> per layer, its experts
        self.remote: dict[int, list[nn.Parameter]] = {}  # worker -> shadow parameters, canonical order
        self.remote_index: dict[int, tuple[int, int]] = {}  # id(shadow parameter) -> (worker, index)
        self.hooks: list = []
        self.seq = 0
        self.dirty = False  # the workers' experts changed since the shadow was refreshed
        self.stats = ExchangeStats()
        self.payload_bits: int | None = None
        self.anchor = torch.zeros(0, requires_grad=True)  # makes every exchange part of the graph

    # -- waiting on a worker ----------------------------------------------------------------

    def _wait(self, work, worker: int, what: str) -> None:
        """Wait for ``work`` with ``worker``; ExchangeError naming the worker if it fails."""
        try:
            work.wait(self.session.timeout)
        except Exception as exc:  # gloo raises RuntimeError (connection closed, timeout)
            reason = _first_line(exc)
            if "timed out" in reason.lower() or "timeout" in reason.lower():
                kind = f"did not answer within runtime.timeout_s={self.session.settings.timeout_s:g} s (hung?)"
            else:
                kind = "closed its connection (died?)"
            experts = ", ".join(map(str, self.hosted.get(worker, [[]])[0])) if self.hosted else "?"
            raise ExchangeError(
                f"expert worker {worker} (rank {worker}, experts {experts} of every MoE layer) {kind} during {what}: "
                f"{reason}; nothing was saved after the last checkpoint: rerun the same command to resume"
            ) from None

    def _send(self, tensor: torch.Tensor, worker: int, what: str, *, data: bool = False):
        try:
            return self.session.isend(tensor, worker, data=data)
        except Exception as exc:
            self._wait(_Failed(exc), worker, what)

    def _recv(self, tensor: torch.Tensor, worker: int, what: str, *, data: bool = False) -> torch.Tensor:
        try:
            work = self.session.irecv(tensor, worker, data=data)
        except Exception as exc:
            work = _Failed(exc)
        self._wait(work, worker, what)
        return tensor

    def _send_object(self, worker: int, obj: Any, what: str) -> int:
        data = _to_bytes(obj)
        size = torch.tensor([data.numel()], dtype=torch.int64)
        for work in (self._send(size, worker, what), self._send(data, worker, what)):
            self._wait(work, worker, what)
        return data.numel() + 8

    def _recv_object(self, worker: int, what: str) -> tuple[Any, int]:
        size = self._recv(torch.zeros(1, dtype=torch.int64), worker, what)
        data = self._recv(torch.empty(int(size), dtype=torch.uint8), worker, what)
        return _from_bytes(data, weights_only=True), int(size) + 8

    # -- attaching a model ------------------------------------------------------------------

    def owns(self, model: nn.Module) -> bool:
        return self.model is model

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
               payload_bits: int | None = None) -> nn.Module:
        """Place ``model``'s experts on the workers (with ``optimizer``'s state for them)."""
        self.detach()
        layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        if not layers:
            raise ConfigError("runtime=distributed: the model has no MoE layer, so there are no experts to place on workers")
        W, K = len(self.workers), min(layer.num_experts for layer in layers)
        if W > K:
            raise ConfigError(f"runtime=distributed: {W} expert workers for model.num_experts={K} (the checkpoint's); "
                              f"at most one worker per expert, so start at most {K + 1} processes (--nproc-per-node)")
        self.model, self.optimizer, self.layers, self.payload_bits = model, optimizer, layers, payload_bits
        self.hosted = {w: [hosted_experts(w, layer.num_experts, W) for layer in layers] for w in self.workers}
        self.remote, self.remote_index = {}, {}
        for w in self.workers:
            self.remote[w] = [p for index, layer in enumerate(layers) for k in self.hosted[w][index]
                              for p in layer.experts[k].parameters()]
            for i, p in enumerate(self.remote[w]):
                self.remote_index[id(p)] = (w, i)
        for index, layer in enumerate(layers):
            layer.run_experts = partial(self._run_experts, index)
            self.stats.d_model[index] = layer.d_model
        self.hooks = [
            model.register_state_dict_pre_hook(lambda *_: self.pull()),
            model.register_load_state_dict_post_hook(lambda *_: self.push()),
        ]
        if optimizer is not None:
            self.hooks += [
                optimizer.register_step_post_hook(lambda *_: self._step()),
                optimizer.register_state_dict_pre_hook(lambda *_: self.pull()),
                optimizer.register_load_state_dict_post_hook(lambda *_: self.push()),
            ]
        self.push()
        log.info("runtime=distributed: %d expert workers (%s backend); expert k of every MoE layer on rank 1 + k mod %d",
                 W, self.session.backend, W)
        return model

    def detach(self) -> None:
        """Give ``run_experts`` back to the layers (their shadow experts are current)."""
        if self.model is None:
            return
        self.pull()
        for handle in self.hooks:
            handle.remove()
        for layer in self.layers:
            if "run_experts" in layer.__dict__:
                del layer.run_experts
        self.model, self.optimizer, self.layers, self.hooks = None, None, [], []

    def _setup_object(self, worker: int) -> dict[str, Any]:
        optimizer = None
        if self.optimizer is not None:
            group_of = {id(p): g for g, group in enumerate(self.optimizer.param_groups) for p in group["params"]}
            optimizer = {
                "class": type(self.optimizer),
                "groups": [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups],
                "param_group": [group_of[id(p)] for p in self.remote[worker]],
                "state": [_state_to_cpu(self.optimizer.state.get(p)) for p in self.remote[worker]],
            }
        experts = [{k: copy.deepcopy(layer.experts[k]).cpu() for k in self.hosted[worker][index]}
                   for index, layer in enumerate(self.layers)]
        return {"experts": experts, "widths": [layer.d_model for layer in self.layers],
                "header_len": self._header_len(), "optimizer": optimizer}

    def _header_len(self) -> int:
        """Header length once set up: room for the counts of the most experts a worker hosts."""
        return BASE_HEADER + max(len(h) for hosted in self.hosted.values() for h in hosted)

    def push(self) -> None:
        """Send every worker its experts (the shadow's current weights) and their optimizer state."""
        for w in self.workers:
            self._wait(self._send(self.session.header(OP_SETUP), w, "setup"), w, "setup")
            self.stats.control_bytes += self.session.header_len * 8 + self._send_object(w, self._setup_object(w), "setup")
        self.session.header_len = self._header_len()
        self.dirty = False

    def pull(self) -> None:
        """Copy the workers' expert weights and optimizer state into the shadow (if changed)."""
        if not self.dirty or self.model is None:
            return
        for w in self.workers:
            self._wait(self._send(self.session.header(OP_GET_STATE), w, "a state fetch"), w, "a state fetch")
            state, size = self._recv_object(w, "a state fetch")
            self.stats.control_bytes += self.session.header_len * 8 + size
            with torch.no_grad():
                for (index, k), expert_state in state["experts"].items():
                    self.layers[index].experts[k].load_state_dict(expert_state)
            if self.optimizer is not None:
                for p, param_state in zip(self.remote[w], state["optim"]):
                    if param_state:
                        self.optimizer.state[p] = {
                            name: v.to(p.device) if torch.is_tensor(v) and name != "step" else v
                            for name, v in param_state.items()
                        }
                    else:
                        self.optimizer.state.pop(p, None)
        self.dirty = False

    # -- the exchange -----------------------------------------------------------------------

    def _run_experts(self, index: int, counts: list[int], groups: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """``MoELayer.run_experts`` of layer ``index``: each worker gets the rows of its experts."""
        plan, inputs = [], []
        for w in self.workers:
            hosted = self.hosted[w][index]
            worker_counts = [counts[k] for k in hosted]
            if sum(worker_counts):
                plan.append((w, hosted, worker_counts))
                inputs.append(torch.cat([groups[k] for k in hosted]))
        training = self.layers[index].training
        if torch.is_grad_enabled():
            outputs = _RemoteExperts.apply(self, index, plan, training, self.anchor, *inputs)
        else:
            outputs, _ = self.forward_exchange(index, plan, inputs, training=training, keep_graph=False)
        by_expert: dict[int, torch.Tensor] = {}
        for (w, hosted, worker_counts), out in zip(plan, outputs):
            by_expert.update(zip(hosted, out.split(worker_counts)))
        return [by_expert[k] for k in range(len(counts)) if counts[k]]

    def _round_trip(self, op: int, index: int, seq: int, flags: int, plan: list, tensors, phase: str) -> list[torch.Tensor]:
        """Send ``tensors[i]`` to worker ``plan[i]`` and receive a tensor of the same shape back."""
        stats = self.stats.layer(index)
        what = f"the {phase} pass of MoE layer {index}"
        pending = []
        for (w, hosted, worker_counts), x in zip(plan, tensors):
            payload = x.detach().to(self.session.device).contiguous()
            header = self.session.header(op, index, seq, flags, payload.dtype, len(payload), worker_counts)
            pending.append((w, self._send(header, w, what), header))
            pending.append((w, self._send(payload, w, what, data=True), payload))
            stats[f"{phase}_sent"] += _tensor_bytes(payload)
            stats["header_bytes"] += _tensor_bytes(header)
            stats["messages"] += 2
            self.stats.element_bits[index] = payload.element_size() * 8
        replies = []
        for (w, _, _), x in zip(plan, tensors):
            reply = torch.empty(x.shape, dtype=x.dtype, device=self.session.device)
            replies.append(self._recv(reply, w, what, data=True).to(x.device))
            stats[f"{phase}_received"] += _tensor_bytes(reply)
            stats["messages"] += 1
        for w, work, _ in pending:
            self._wait(work, w, what)
        return replies

    def forward_exchange(self, index: int, plan: list, inputs, *, training: bool, keep_graph: bool):
        self.seq += 1
        flags = (FLAG_TRAINING if training else 0) | (FLAG_GRAD if keep_graph else 0)
        self.stats.layer(index)["rows"] += sum(len(x) for x in inputs)
        return self._round_trip(OP_FORWARD, index, self.seq, flags, plan, inputs, "forward"), self.seq

    def backward_exchange(self, index: int, seq: int, plan: list, grad_outputs) -> list[torch.Tensor]:
        return self._round_trip(OP_BACKWARD, index, seq, 0, plan, grad_outputs, "backward")

    # -- optimizer --------------------------------------------------------------------------

    def _step(self) -> None:
        """After the coordinator's optimizer step: every worker steps with the same learning rates."""
        lrs = torch.tensor([float(group["lr"]) for group in self.optimizer.param_groups], dtype=torch.float64)
        pending = []
        for w in self.workers:
            header = self.session.header(OP_STEP, rows=len(lrs))
            pending += [(w, self._send(header, w, "an optimizer step")), (w, self._send(lrs, w, "an optimizer step"))]
            self.stats.control_bytes += _tensor_bytes(header) + _tensor_bytes(lrs)
        for w, work in pending:
            self._wait(work, w, "an optimizer step")
        self.dirty = True

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """``clip_grad_norm_(model.parameters(), max_norm)`` over the coordinator's and the
        workers' gradients: per-parameter norms in parameter order, then the norm of those."""
        if not self.owns(model):
            return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        remote_norms = {}
        for w in self.workers:
            self._wait(self._send(self.session.header(OP_GRAD_NORMS), w, "gradient clipping"), w, "gradient clipping")
            remote_norms[w] = self._recv(torch.empty(len(self.remote[w]), dtype=torch.float64), w, "gradient clipping")
            self.stats.control_bytes += self.session.header_len * 8 + _tensor_bytes(remote_norms[w])
        params = list(model.parameters())
        local = [p for p in params if id(p) not in self.remote_index and p.grad is not None]
        local_norms = dict(zip(map(id, local), torch._foreach_norm([p.grad for p in local], 2.0))) if local else {}
        norms = []
        for p in params:
            if id(p) in self.remote_index:
                w, i = self.remote_index[id(p)]
                value = float(remote_norms[w][i])
                if value != -1.0:  # -1: no gradient (the expert got no row)
                    norms.append(torch.tensor(value, dtype=p.dtype, device=p.device))
            elif id(p) in local_norms:
                norms.append(local_norms[id(p)])
        if not norms:
            return torch.tensor(0.0)
        total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2.0)
        torch.nn.utils.clip_grads_with_norm_(local, max_norm, total)
        values = torch.tensor([float(max_norm), float(total)], dtype=torch.float64)
        pending = []
        for w in self.workers:
            header = self.session.header(OP_CLIP, dtype=total.dtype)
            pending += [(w, self._send(header, w, "gradient clipping")), (w, self._send(values, w, "gradient clipping"))]
            self.stats.control_bytes += _tensor_bytes(header) + _tensor_bytes(values)
        for w, work in pending:
            self._wait(work, w, "gradient clipping")
        return total

    # -- end --------------------------------------------------------------------------------

    def close(self, *, failed: bool = False) -> None:
        """Tell every worker to stop (best effort after a failure: a dead worker is skipped)."""
        if not failed:
            self.detach()
        for w in self.workers:
            try:
                work = self.session.isend(self.session.header(OP_SHUTDOWN, flags=int(failed)), w)
                work.wait(CLOSE_TIMEOUT)
            except Exception:
                if not failed:
                    raise

    def report(self, output_dir: Any) -> dict[str, Any]:
        summary = self.stats.summary(self.payload_bits, len(self.workers))
        log_summary(summary)
        if output_dir is not None and summary["layers"]:
            atomic_write_json(os.path.join(str(output_dir), "exchange.json"), summary)
        return summary


class _Failed:
    """A work item that failed to start: ``wait`` re-raises the error."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def wait(self, *_):
        raise self.exc


def _state_to_cpu(state: dict | None) -> dict | None:
    if not state:
        return None
    return {name: v.detach().cpu() if torch.is_tensor(v) else v for name, v in state.items()}


# ---------------------------------------------------------------------------------------------
# Worker


class Worker:
    """An expert worker: serves the coordinator's messages until it says stop.

    Holds its experts of every MoE layer, the autograd graphs of forward passes awaiting
    their backward (by sequence number), and its own optimizer over its experts.
    """

    def __init__(self, session: Session) -> None:
        self.session = session
        self.device = session.device
        self.experts: list[dict[int, nn.Module]] = []  # per layer: expert index -> module
        self.widths: list[int] = []
        self.params: list[nn.Parameter] = []  # canonical order (layer, expert, parameter)
        self.optimizer: torch.optim.Optimizer | None = None
        self.group_of_coordinator: dict[int, int] = {}  # coordinator's param group -> ours
        self.graphs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handlers = {OP_SETUP: self.setup, OP_FORWARD: self.forward, OP_BACKWARD: self.backward,
                         OP_GRAD_NORMS: self.grad_norms, OP_CLIP: self.clip, OP_STEP: self.step,
                         OP_GET_STATE: self.get_state}

    def _recv(self, tensor: torch.Tensor, *, data: bool = False, timeout: timedelta | None = None) -> torch.Tensor:
        try:
            self.session.irecv(tensor, 0, data=data).wait(timeout or self.session.timeout)
        except Exception as exc:
            raise ExchangeError(f"expert worker {self.session.rank}: lost the coordinator (rank 0): {_first_line(exc)}") from None
        return tensor

    def _send(self, tensor: torch.Tensor, *, data: bool = False) -> None:
        try:
            self.session.isend(tensor, 0, data=data).wait(self.session.timeout)
        except Exception as exc:
            raise ExchangeError(f"expert worker {self.session.rank}: lost the coordinator (rank 0): {_first_line(exc)}") from None

    def _recv_object(self) -> Any:
        size = self._recv(torch.zeros(1, dtype=torch.int64))
        return _from_bytes(self._recv(torch.empty(int(size), dtype=torch.uint8)), weights_only=False)

    def _send_object(self, obj: Any) -> None:
        data = _to_bytes(obj)
        self._send(torch.tensor([data.numel()], dtype=torch.int64))
        self._send(data)

    def serve(self) -> int:
        """Handle messages until OP_SHUTDOWN; returns the exit status (0)."""
        while True:
            header = self._recv(torch.zeros(self.session.header_len, dtype=torch.int64), timeout=IDLE_TIMEOUT)
            op = int(header[0])
            if op == OP_SHUTDOWN:
                return 0
            if op not in self.handlers:
                raise ExchangeError(f"expert worker {self.session.rank}: unknown message {op} from the coordinator (version mismatch?)")
            self.handlers[op](header.tolist())

    def setup(self, header: list[int]) -> None:
        setup = self._recv_object()
        self.experts = [{k: m.to(self.device) for k, m in layer.items()} for layer in setup["experts"]]
        self.widths = setup["widths"]
        self.params = [p for layer in self.experts for k in sorted(layer) for p in layer[k].parameters()]
        self.graphs.clear()
        self.optimizer, self.group_of_coordinator = None, {}
        spec = setup["optimizer"]
        if spec is not None and self.params:
            groups: dict[int, dict[str, Any]] = {}
            for p, g in zip(self.params, spec["param_group"]):
                groups.setdefault(g, {**spec["groups"][g], "params": []})["params"].append(p)
            self.group_of_coordinator = {g: i for i, g in enumerate(groups)}
            self.optimizer = spec["class"](list(groups.values()))
            for p, state in zip(self.params, spec["state"]):
                if state:
                    self.optimizer.state[p] = {name: v.to(p.device) if torch.is_tensor(v) and name != "step" else v
                                               for name, v in state.items()}
        self.session.header_len = setup["header_len"]
        hosted = sorted(self.experts[0]) if self.experts else []
        log.info("expert worker %d: hosting experts %s of each of %d MoE layers", self.session.rank, hosted, len(self.experts))

    def forward(self, header: list[int]) -> None:
        _, index, seq, flags, dtype, rows = header[:BASE_HEADER]
        experts = self.experts[index]
        counts = header[BASE_HEADER: BASE_HEADER + len(experts)]
        x = self._recv(torch.empty(rows, self.widths[index], dtype=DTYPES[dtype], device=self.device), data=True)
        keep = bool(flags & FLAG_GRAD)
        with torch.set_grad_enabled(keep):
            if keep:
                x.requires_grad_()
            outputs = []
            for k, group, count in zip(sorted(experts), x.split(counts), counts):
                experts[k].train(bool(flags & FLAG_TRAINING))
                if count:
                    outputs.append(experts[k](group))
            y = torch.cat(outputs)
        self._send(y.detach().contiguous(), data=True)
        if keep:
            self.graphs[seq] = (x, y)

    def backward(self, header: list[int]) -> None:
        _, index, seq, flags, dtype, rows = header[:BASE_HEADER]
        grad_y = self._recv(torch.empty(rows, self.widths[index], dtype=DTYPES[dtype], device=self.device), data=True)
        x, y = self.graphs.pop(seq)
        torch.autograd.backward(y, grad_y)
        self._send(x.grad.contiguous(), data=True)

    def grad_norms(self, header: list[int]) -> None:
        with_grad = [p for p in self.params if p.grad is not None]
        norms = dict(zip(map(id, with_grad), torch._foreach_norm([p.grad for p in with_grad], 2.0))) if with_grad else {}
        values = [float(norms[id(p)]) if id(p) in norms else -1.0 for p in self.params]
        self._send(torch.tensor(values, dtype=torch.float64))

    def clip(self, header: list[int]) -> None:
        max_norm, total = self._recv(torch.zeros(2, dtype=torch.float64)).tolist()
        params = [p for p in self.params if p.grad is not None]
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.tensor(total, dtype=DTYPES[header[4]]))

    def step(self, header: list[int]) -> None:
        lrs = self._recv(torch.zeros(header[5], dtype=torch.float64)).tolist()
        if self.optimizer is not None:
            for g, i in self.group_of_coordinator.items():
                self.optimizer.param_groups[i]["lr"] = lrs[g]
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.graphs.clear()

    def get_state(self, header: list[int]) -> None:
        experts = {(index, k): {name: v.detach().cpu() for name, v in m.state_dict().items()}
                   for index, layer in enumerate(self.experts) for k, m in layer.items()}
        optim = [_state_to_cpu(self.optimizer.state.get(p)) if self.optimizer is not None else None for p in self.params]
        self._send_object({"experts": experts, "optim": optim})


# ---------------------------------------------------------------------------------------------
# Entry


class _KeepServing:
    """On a worker, the first SIGINT / SIGTERM is noted, not obeyed: the coordinator may still
    need the experts to save a checkpoint, and it ends the workers when it stops.  A second
    signal aborts."""

    def __init__(self, rank: int) -> None:
        self.rank, self.received, self.previous = rank, False, {}

    def _handle(self, signum, frame) -> None:
        if self.received:
            raise KeyboardInterrupt(f"expert worker {self.rank}: second {signal.Signals(signum).name}")
        self.received = True
        print(f"expert worker {self.rank}: {signal.Signals(signum).name} received; serving until the coordinator stops "
              "(send it again to abort)", file=sys.stderr, flush=True)

    def __enter__(self) -> "_KeepServing":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def serve(settings: RuntimeSettings, *, num_experts: int | None = None) -> int:
    """An expert worker (rank >= 1) from joining the group to the coordinator's end; returns 0."""
    rank, world_size, local_rank = process_env()
    check_world_size(world_size, num_experts)
    # An optimizer's first construction imports torch's compiler stack (seconds): do it before
    # joining, so that the coordinator's first exchange does not wait for it.
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    session = Session(settings, rank, world_size, local_rank).start()
    try:
        with _KeepServing(rank):
            return Worker(session).serve()
    finally:
        session.end()


def launch(settings: RuntimeSettings, main, cfg, output_dir, *, num_experts: int | None = None) -> Any:
    """See :func:`dmoe_torch.runtime.launch`: rank 0 runs ``main`` as the coordinator, the other
    ranks serve their experts."""
    rank, world_size, local_rank = process_env()
    if rank != 0:
        return serve(settings, num_experts=num_experts)
    check_world_size(world_size, num_experts)
    session = Session(settings, rank, world_size, local_rank).start()
    try:
        coordinator = Coordinator(session)
        _set_active(coordinator)
        try:
            result = main(cfg, output_dir)
        except BaseException:
            coordinator.close(failed=True)
            raise
        coordinator.close()
        coordinator.report(output_dir)
        return result
    finally:
        from .local import LocalRuntime

        _set_active(LocalRuntime())
        session.end()
