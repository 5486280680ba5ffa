"""An expert worker (torchrun ranks >= 1 of ``runtime=distributed``).

:class:`Worker` holds its experts of every MoE layer and their optimizer, and answers the
coordinator's messages (:mod:`.distributed`) until it says stop; :func:`serve` runs one from
joining the process group to the coordinator's end.  Kept apart from the coordinator: the
two sides share only :mod:`.transport`.
"""

from __future__ import annotations

import logging
import signal
import sys
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from . import ExchangeError, RuntimeSettings
from .transport import (
    BASE_HEADER,
    DTYPES,
    FLAG_GRAD,
    FLAG_TRAINING,
    IDLE_TIMEOUT,
    OP_BACKWARD,
    OP_CLIP,
    OP_FORWARD,
    OP_GET_STATE,
    OP_GRAD_NORMS,
    OP_SETUP,
    OP_SHUTDOWN,
    OP_STEP,
    Session,
    _first_line,
    _from_bytes,
    _state_to_cpu,
    _to_bytes,
    check_world_size,
    process_env,
)

log = logging.getLogger(__name__)

__all__ = ["Worker", "serve"]


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
        self.handlers = {
            OP_SETUP: self.setup,
            OP_FORWARD: self.forward,
            OP_BACKWARD: self.backward,
            OP_GRAD_NORMS: self.grad_norms,
            OP_CLIP: self.clip,
            OP_STEP: self.step,
            OP_GET_STATE: self.get_state,
        }

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
                raise ExchangeError(
                    f"expert worker {self.session.rank}: unknown message {op} from the coordinator (version mismatch?)"
                )
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
            for p, g in zip(self.params, spec["param_group"], strict=True):
                groups.setdefault(g, {**spec["groups"][g], "params": []})["params"].append(p)
            self.group_of_coordinator = {g: i for i, g in enumerate(groups)}
            self.optimizer = spec["class"](list(groups.values()))
            for p, state in zip(self.params, spec["state"], strict=True):
                if state:
                    self.optimizer.state[p] = {
                        name: v.to(p.device) if torch.is_tensor(v) and name != "step" else v for name, v in state.items()
                    }
        self.session.header_len = setup["header_len"]
        hosted = sorted(self.experts[0]) if self.experts else []
        log.info("expert worker %d: hosting experts %s of each of %d MoE layers", self.session.rank, hosted, len(self.experts))

    def forward(self, header: list[int]) -> None:
        _, index, seq, flags, dtype, rows = header[:BASE_HEADER]
        experts = self.experts[index]
        counts = header[BASE_HEADER : BASE_HEADER + len(experts)]
        x = self._recv(torch.empty(rows, self.widths[index], dtype=DTYPES[dtype], device=self.device), data=True)
        keep = bool(flags & FLAG_GRAD)
        with torch.set_grad_enabled(keep):
            if keep:
                x.requires_grad_()
            outputs = []
            for k, group, count in zip(sorted(experts), x.split(counts), counts, strict=True):
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
        norms = (
            dict(zip(map(id, with_grad), torch._foreach_norm([p.grad for p in with_grad], 2.0), strict=True)) if with_grad else {}
        )
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
        experts = {
            (index, k): {name: v.detach().cpu() for name, v in m.state_dict().items()}
            for index, layer in enumerate(self.experts)
            for k, m in layer.items()
        }
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
        print(
            f"expert worker {self.rank}: {signal.Signals(signum).name} received; serving until the coordinator stops "
            "(send it again to abort)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> _KeepServing:
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
