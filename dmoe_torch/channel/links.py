"""Per-batch channel plumbing, for training and evaluation alike: which channel frames,
MoE layer and stream a batch sees, and the links each layer's router gets.

Channel streams (so that draws never depend on batch size, order or workers): training epoch
``e`` (0-based) uses stream ``e``; validation uses :data:`VAL_STREAM` (the same channel every
epoch, so validation curves are comparable); evaluation draw ``d`` uses
``EVAL_STREAM_BASE + d`` (the final test of train.py is draw 0).  The costs of MoE layer
``l`` for a batch are ``channel.costs(frame_ids, l, stream)``.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..selection.frame import FrameLinks, link_capacity

log = logging.getLogger(__name__)

VAL_STREAM = 10_000_000
EVAL_STREAM_BASE = 20_000_000


def train_stream(epoch: int) -> int:
    """Channel stream of training epoch ``epoch`` (0-based)."""
    return epoch


def eval_stream(draw: int) -> int:
    """Channel stream of evaluation draw ``draw``."""
    return EVAL_STREAM_BASE + draw


def frame_ids(sample_ids: torch.Tensor, tokens_per_input: int) -> torch.Tensor:
    """Frame id of every routed token: ``sample_id * T + token`` (int64 [B*T], row b*T + t).

    One frame is one input of the DMoE protocol; the channel of a frame is a pure function of
    (seed, stream, MoE layer, frame id), so draws do not depend on batch size, order or workers.
    """
    ids = torch.as_tensor(sample_ids, dtype=torch.int64).reshape(-1, 1)
    return (ids * tokens_per_input + torch.arange(tokens_per_input, dtype=torch.int64)).reshape(-1)


def layer_costs(channel, sample_ids: torch.Tensor, num_layers: int, stream: int, tokens_per_input: int = 1) -> list[torch.Tensor]:
    """Per-layer link costs of a batch on the true channel (perfect CSI): L float64 CPU
    tensors [B*T, K, N] (J, +inf = outage)."""
    frames = frame_ids(sample_ids, tokens_per_input)
    return [channel.costs(frames, layer, stream) for layer in range(num_layers)]


def layer_links(
    channel, sample_ids: torch.Tensor, specs: list, stream: int, tokens_per_input: int = 1, cache: dict | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """What the router of each MoE layer sees and what the channel then delivers.

    Under channel.frame=image: per layer the :class:`FrameLinks` of the batch's images (one
    frame per image, frame id = sample id; perfect CSI only, delivered None).  Otherwise
    returns (costs, delivered): per layer the costs [B*T, K, N] (J, +inf = outage) planned
    from the coordinator's channel estimate (conservatively for a spec whose
    ``planning_target`` is set) and the bool mask [B*T, K, N] of links the true channel
    delivers at the planned rate; under perfect CSI the costs are the true ones and
    delivered is None.  ``cache`` (a dict, for one batch and stream) keeps the states per
    (layer, target) so that several settings on one channel draw compute them once.
    """
    cache = {} if cache is None else cache
    if channel.cfg.frame == "image":  # one frame per (image, layer), keyed by the sample id
        announce_frame_solver_compile()
        ids = torch.as_tensor(sample_ids, dtype=torch.int64).reshape(-1)
        for layer in range(len(specs)):
            if (layer, "image") not in cache:
                layer_costs, capacity = frame_links(channel, ids, layer, stream)
                cache[layer, "image"] = FrameLinks(torch.from_numpy(layer_costs), torch.from_numpy(capacity))
        return [cache[layer, "image"] for layer in range(len(specs))], [None] * len(specs)
    frames = frame_ids(sample_ids, tokens_per_input)
    perfect_csi = channel.cfg.csi_error_std == 0 and channel.cfg.csi_delay_frames == 0
    costs, delivered = [], []
    for layer, spec in enumerate(specs):
        target = None if perfect_csi else spec.planning_target
        key = (layer, target)
        if key not in cache:
            if perfect_csi:
                cache[key] = (channel.costs(frames, layer, stream), None)
            else:
                state = channel.link_state(frames, layer, stream, target)
                cache[key] = (state.planned_costs, state.delivered)
        costs.append(cache[key][0])
        delivered.append(cache[key][1])
    return costs, delivered


FRAME_COMPILE_NOTE = "compiling the image-frame solver (numba, once per machine; ~30 s)"
_frame_compile_checked = False


def frame_kernels_cached() -> bool:
    """Whether numba's on-disk cache holds every image-frame kernel (selection/frame_kernels.py)
    for the current source; False when it cannot tell (numba's cache index is internal)."""
    from numba.core.registry import CPUDispatcher

    from ..selection import frame_kernels

    kernels = [obj for obj in vars(frame_kernels).values() if isinstance(obj, CPUDispatcher)]
    try:  # an empty index: never compiled here, or compiled from another version of the file
        return all(kernel.signatures or kernel._cache._cache_file._load_index() for kernel in kernels)
    except Exception:  # noqa: BLE001 -- another numba version: assume cold
        return False


def announce_frame_solver_compile() -> None:
    """Log :data:`FRAME_COMPILE_NOTE` once per process, before the first image-frame routing,
    when numba will compile the frame kernels (its cache is cold): epoch 1 then takes ~30 s
    longer without a word otherwise."""
    global _frame_compile_checked
    if _frame_compile_checked:
        return
    _frame_compile_checked = True
    if not frame_kernels_cached():
        log.info(FRAME_COMPILE_NOTE)


def frame_links(channel, frame_ids, layer: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    """Link energies and capacities of image frames on the true channel (perfect CSI).

    channel: a ``WirelessChannel``; frame_ids [F] int64 (one id per (image, layer) frame:
    all its tokens share that draw).  Returns costs [F, K, N] J (``channel.costs``) and
    capacity [F, K, N] int64 = floor(T_max min(r_dl, r_ul) / S), 0 exactly where the cost
    is +inf and at least 1 where it is finite (the same outage rule)."""
    cfg = channel.cfg
    gains = channel.gains(frame_ids, layer, stream)  # one fading draw serves costs and rates
    costs = channel.costs_from_gains(gains).numpy()
    snr = gains.numpy() / cfg.noise_power_w
    rate_dl = cfg.subcarrier_bandwidth_hz * np.log2(1.0 + cfg.ap_power_w * snr)
    rate_ul = cfg.subcarrier_bandwidth_hz * np.log2(1.0 + cfg.device_power_w * snr)
    capacity = link_capacity(rate_dl, rate_ul, channel.payload_bits, cfg.latency_budget_s)
    finite = np.isfinite(costs)
    return costs, np.where(finite, np.maximum(capacity, 1), 0).astype(np.int64)
