"""Where the experts execute: ``runtime=local`` (in this process) or ``runtime=distributed``.

The entry points run their job through :func:`launch`; the job (``fit``, ``run_evaluation``)
calls :func:`attach_experts` once its model (and optimizer) exist, and clips gradients with
:func:`clip_grad_norm`.  With the local runtime both are what the job did before (the model
is untouched, clipping is ``torch.nn.utils.clip_grad_norm_``); with the distributed runtime
rank 0 is the coordinator and ranks 1..W host the experts (see :mod:`.distributed`,
:mod:`.worker`); under torchrun, ranks >= 1 become those workers through
:func:`dmoe_torch.cli.serve_if_worker` before Hydra starts.

Config group ``runtime`` (conf/runtime/*.yaml)::

    name       local | distributed
    backend    (distributed) auto | gloo | nccl; auto: nccl when every rank has its own GPU
    timeout_s  (distributed) seconds a worker may take to answer before the run stops

validated by :func:`dmoe_torch.config.runtime_settings` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig

# The runtime settings are validated with the other config values (config.py); re-exported here.
from ..config import BACKENDS, RUNTIME_KEYS, RuntimeSettings, configured_num_experts, runtime_settings
from .local import LocalRuntime

__all__ = [
    "BACKENDS",
    "RUNTIME_KEYS",
    "ExchangeError",
    "RuntimeSettings",
    "attach_experts",
    "clip_grad_norm",
    "launch",
    "runtime_settings",
]


class ExchangeError(RuntimeError):
    """A peer of the distributed runtime died, hung or closed its connection; the message is
    one line naming it."""


# The runtime of this process: local unless a distributed coordinator is running a job.
_active: Any = LocalRuntime()


def _set_active(runtime: Any) -> None:
    global _active
    _active = runtime


def launch(cfg: DictConfig, main: Callable[[DictConfig, Any], Any], output_dir: Any) -> Any:
    """Run ``main(cfg, output_dir)`` under ``cfg.runtime`` and return its result.

    local: call it.  distributed (under torchrun): rank 0 runs it as the coordinator, ranks
    >= 1 serve their experts until the coordinator ends and return 0.  The runtime keys, the
    launcher and the world size (against ``model.num_experts`` when the config has it) are
    checked before any work.
    """
    settings = runtime_settings(cfg)
    if settings.name == "local":
        return main(cfg, output_dir)
    from . import distributed

    return distributed.launch(settings, main, cfg, output_dir, num_experts=configured_num_experts(cfg))


def attach_experts(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *, payload_bits: int | None = None
) -> torch.nn.Module:
    """Hand the experts of ``model``'s MoE layers to the active runtime (local: nothing).

    Call after the model is on its device and its weights (and ``optimizer``'s state) are
    loaded; later ``load_state_dict`` calls are forwarded too.  ``payload_bits``: the
    protocol's payload per hop (``channel.payload_bits``), reported next to the bytes sent.
    """
    return _active.attach(model, optimizer, payload_bits=payload_bits)


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)``, with the experts'
    gradients included wherever they live."""
    return _active.clip_grad_norm(model, max_norm)
