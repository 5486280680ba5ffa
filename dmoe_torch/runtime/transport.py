"""What the coordinator (:mod:`.distributed`) and the expert workers (:mod:`.worker`) share.

The wire format: header ops and flags, the dtypes a header can name and the timeouts; where
expert k lives (:func:`worker_of_expert`); torchrun's environment and the world-size check
(from :mod:`dmoe_torch.config`);
:class:`Session`, this rank's process group with its ``isend``/``irecv`` and header helpers;
the ``torch.save`` (de)serialisation of control objects; and the byte accounting the
coordinator reports (:class:`ExchangeStats`).  Both sides import it; it imports neither.

Every message from the coordinator starts with an int64 header ``[op, layer, seq, flags,
dtype, rows, counts of the worker's experts...]``; control objects (setup, state) are
``torch.save`` bytes.  Headers and objects go over gloo on the CPU; rows and gradients over
the data group (gloo, or nccl on GPUs).
"""

from __future__ import annotations

import io
import logging
import re
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# torchrun's environment and the world-size check are runtime settings, validated in config.py.
from ..config import ConfigError, RuntimeSettings, check_world_size, process_env

log = logging.getLogger(__name__)

__all__ = ["ExchangeStats", "Session", "check_world_size", "hosted_experts", "log_summary", "process_env", "worker_of_expert"]

# Header ops (coordinator -> worker).
OP_SETUP, OP_FORWARD, OP_BACKWARD, OP_GRAD_NORMS, OP_CLIP, OP_STEP, OP_GET_STATE, OP_SHUTDOWN = range(1, 9)
BASE_HEADER = 6  # op, layer, seq, flags, dtype, rows; then one count per expert the worker hosts
FLAG_TRAINING, FLAG_GRAD = 1, 2
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
IDLE_TIMEOUT = timedelta(days=30)  # a worker waits this long for the coordinator's next message
JOIN_TIMEOUT = timedelta(minutes=10)  # for every rank to start and join (imports, data on rank 0)
CLOSE_TIMEOUT = timedelta(seconds=5)


def worker_of_expert(expert: int, num_workers: int) -> int:
    """Rank of the worker hosting expert ``expert`` of every MoE layer: ``1 + expert mod W``."""
    return 1 + expert % num_workers


def hosted_experts(worker: int, num_experts: int, num_workers: int) -> list[int]:
    """Experts (ascending) of a K-expert layer hosted by worker rank ``worker``."""
    return [k for k in range(num_experts) if worker_of_expert(k, num_workers) == worker]


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

    def start(self) -> Session:
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
            raise ConfigError(
                f"runtime.backend=nccl: rank(s) {missing} have no GPU of their own; use runtime.backend=gloo or auto"
            )
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

    def header(
        self,
        op: int,
        layer: int = 0,
        seq: int = 0,
        flags: int = 0,
        dtype: torch.dtype = torch.float32,
        rows: int = 0,
        counts: list[int] = (),
    ) -> torch.Tensor:
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


def _state_to_cpu(state: dict | None) -> dict | None:
    if not state:
        return None
    return {name: v.detach().cpu() if torch.is_tensor(v) else v for name, v in state.items()}


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
            row = {
                "layer": index,
                **c,
                "d_model": self.d_model.get(index),
                "bits_per_element_sent": self.element_bits.get(index),
                "payload_model_bytes_per_hop": model_bytes,
                "forward_sent_over_model": c["forward_sent"] / model_bytes if model_bytes else None,
                "forward_received_over_model": c["forward_received"] / model_bytes if model_bytes else None,
            }
            layers.append(row)
        return {
            "workers": num_workers,
            "payload_bits_per_hop_row": payload_bits,
            "layers": layers,
            "control_bytes": self.control_bytes,
        }


def log_summary(summary: dict[str, Any]) -> None:
    bits = summary["payload_bits_per_hop_row"]
    for row in summary["layers"]:
        model = (
            ""
            if row["forward_sent_over_model"] is None
            else (
                f"; payload model (rows x {bits} bit per hop) {row['payload_model_bytes_per_hop'] / 1e6:.3f} MB each way, "
                f"sent/model {row['forward_sent_over_model']:.2f} ({row['bits_per_element_sent']}-bit elements)"
            )
        )
        log.info(
            "exchange, MoE layer %d: %d rows; forward %.3f MB out / %.3f MB back, backward %.3f MB out / %.3f MB "
            "back, headers %.3f MB%s",
            row["layer"],
            row["rows"],
            row["forward_sent"] / 1e6,
            row["forward_received"] / 1e6,
            row["backward_sent"] / 1e6,
            row["backward_received"] / 1e6,
            row["header_bytes"] / 1e6,
            model,
        )
    log.info("exchange, control (setup, state, norms, steps): %.3f MB", summary["control_bytes"] / 1e6)
