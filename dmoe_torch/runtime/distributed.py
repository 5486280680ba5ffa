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
all-to-all do not apply); the headers, objects and groups are in :mod:`.transport`.  The
setup object pickles the expert modules and the optimizer class: run only among trusted
hosts, as with torch.distributed's own object collectives.

Modules: this one holds the coordinator and :func:`launch`; :mod:`.worker` the expert
workers; :mod:`.transport` what both use.

Failure: every wait of the coordinator on a worker is bounded by ``runtime.timeout_s``; a
worker that died (connection closed) or hung (timeout) raises :class:`ExchangeError` with
one line naming it.  Workers wait for the coordinator without a time limit (it may be busy
with data or checkpoints) and stop when it closes the connection.
"""

from __future__ import annotations

import copy
import logging
import os
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..config import ConfigError
from ..moe import MoELayer
from ..utils import atomic_write_json
from . import ExchangeError, RuntimeSettings, _set_active
from .transport import (
    BASE_HEADER,
    CLOSE_TIMEOUT,
    FLAG_GRAD,
    FLAG_TRAINING,
    OP_BACKWARD,
    OP_CLIP,
    OP_FORWARD,
    OP_GET_STATE,
    OP_GRAD_NORMS,
    OP_SETUP,
    OP_SHUTDOWN,
    OP_STEP,
    ExchangeStats,
    Session,
    _first_line,
    _from_bytes,
    _state_to_cpu,
    _tensor_bytes,
    _to_bytes,
    check_world_size,
    hosted_experts,
    log_summary,
    process_env,
)
from .worker import serve

log = logging.getLogger(__name__)

__all__ = ["Coordinator", "launch"]


# ---------------------------------------------------------------------------------------------
# Coordinator


class _RemoteExperts(torch.autograd.Function):
    """Rows out to the workers, expert outputs back; backward: output gradients out, input
    gradients back.  inputs: one [rows_w, d] tensor per worker of ``plan``."""

    @staticmethod
    def forward(
        ctx, coordinator: Coordinator, layer: int, plan: list, training: bool, anchor: torch.Tensor, *inputs: torch.Tensor
    ):
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

    def attach(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, payload_bits: int | None = None
    ) -> nn.Module:
        """Place ``model``'s experts on the workers (with ``optimizer``'s state for them)."""
        self.detach()
        layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        if not layers:
            raise ConfigError("runtime=distributed: the model has no MoE layer, so there are no experts to place on workers")
        W, K = len(self.workers), min(layer.num_experts for layer in layers)
        if W > K:
            raise ConfigError(
                f"runtime=distributed: {W} expert workers for model.num_experts={K} (the checkpoint's); "
                f"at most one worker per expert, so start at most {K + 1} processes (--nproc-per-node)"
            )
        self.model, self.optimizer, self.layers, self.payload_bits = model, optimizer, layers, payload_bits
        self.hosted = {w: [hosted_experts(w, layer.num_experts, W) for layer in layers] for w in self.workers}
        self.remote, self.remote_index = {}, {}
        for w in self.workers:
            self.remote[w] = [
                p for index, layer in enumerate(layers) for k in self.hosted[w][index] for p in layer.experts[k].parameters()
            ]
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
        log.info(
            "runtime=distributed: %d expert workers (%s backend); expert k of every MoE layer on rank 1 + k mod %d",
            W,
            self.session.backend,
            W,
        )
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
        experts = [
            {k: copy.deepcopy(layer.experts[k]).cpu() for k in self.hosted[worker][index]}
            for index, layer in enumerate(self.layers)
        ]
        return {
            "experts": experts,
            "widths": [layer.d_model for layer in self.layers],
            "header_len": self._header_len(),
            "optimizer": optimizer,
        }

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
                for p, param_state in zip(self.remote[w], state["optim"], strict=True):
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
        for (_worker, hosted, worker_counts), out in zip(plan, outputs, strict=True):
            by_expert.update(zip(hosted, out.split(worker_counts), strict=True))
        return [by_expert[k] for k in range(len(counts)) if counts[k]]

    def _round_trip(self, op: int, index: int, seq: int, flags: int, plan: list, tensors, phase: str) -> list[torch.Tensor]:
        """Send ``tensors[i]`` to worker ``plan[i]`` and receive a tensor of the same shape back."""
        stats = self.stats.layer(index)
        what = f"the {phase} pass of MoE layer {index}"
        pending = []
        for (w, _hosted, worker_counts), x in zip(plan, tensors, strict=True):
            payload = x.detach().to(self.session.device).contiguous()
            header = self.session.header(op, index, seq, flags, payload.dtype, len(payload), worker_counts)
            pending.append((w, self._send(header, w, what), header))
            pending.append((w, self._send(payload, w, what, data=True), payload))
            stats[f"{phase}_sent"] += _tensor_bytes(payload)
            stats["header_bytes"] += _tensor_bytes(header)
            stats["messages"] += 2
            self.stats.element_bits[index] = payload.element_size() * 8
        replies = []
        for (w, _, _), x in zip(plan, tensors, strict=True):
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
        local_norms = dict(zip(map(id, local), torch._foreach_norm([p.grad for p in local], 2.0), strict=True)) if local else {}
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


# ---------------------------------------------------------------------------------------------
# Entry


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
