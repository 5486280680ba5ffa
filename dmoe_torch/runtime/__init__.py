"""Where the experts execute: ``runtime=local`` (in this process) or ``runtime=distributed``.

The entry points run their job through :func:`launch`; the job (``fit``, ``run_evaluation``)
calls :func:`attach_experts` once its model (and optimizer) exist, and clips gradients with
:func:`clip_grad_norm`.  With the local runtime both are what the job did before (the model
is untouched, clipping is ``torch.nn.utils.clip_grad_norm_``); with the distributed runtime
rank 0 is the coordinator and ranks 1..W host the experts (see :mod:`.distributed`,
:mod:`.worker`).

Config group ``runtime`` (conf/runtime/*.yaml)::

    name       local | distributed
    backend    (distributed) auto | gloo | nccl; auto: nccl when every rank has its own GPU
    timeout_s  (distributed) seconds a worker may take to answer before the run stops
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError, get_float, get_str
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
    "serve_if_worker",
]

# Allowed keys of each runtime (conf/runtime/<name>.yaml).
RUNTIME_KEYS = {"local": ("name",), "distributed": ("name", "backend", "timeout_s")}
BACKENDS = ("auto", "gloo", "nccl")


class ExchangeError(RuntimeError):
    """A peer of the distributed runtime died, hung or closed its connection; the message is
    one line naming it."""


@dataclass(frozen=True)
class RuntimeSettings:
    name: str = "local"
    backend: str = "auto"
    timeout_s: float = 60.0


def runtime_settings(cfg: DictConfig) -> RuntimeSettings:
    """The validated ``runtime`` section (absent: local), checked against how the process was
    started: ConfigError naming a bad or unknown key, ``runtime=distributed`` without torchrun,
    a world size with no worker or more workers than ``model.num_experts`` (when the config
    has it), or ``runtime=local`` in a torchrun group of several processes."""
    section = cfg.get("runtime")
    if section is None:
        return RuntimeSettings()
    if not isinstance(section, DictConfig):
        raise ConfigError(f"runtime={section!r}: must be a config group choice, runtime=local or runtime=distributed")
    name = section.get("name")
    if name not in RUNTIME_KEYS:
        raise ConfigError(f"runtime.name={name!r}: must be one of {', '.join(RUNTIME_KEYS)} (choose with runtime=NAME)")
    allowed = RUNTIME_KEYS[name]
    for key in section:
        if key not in allowed:
            raise ConfigError(f"runtime.{key}: unknown key for runtime={name}; allowed: {', '.join(allowed)}")
    if name == "local":
        world = os.environ.get("WORLD_SIZE")
        if world not in (None, "", "1"):
            raise ConfigError(
                f"runtime=local with WORLD_SIZE={world} (started by torchrun?): every process would run the whole job; "
                "pass runtime=distributed, or start one process"
            )
        return RuntimeSettings()
    settings = RuntimeSettings(
        name=name,
        backend=get_str(cfg, "runtime.backend", choices=BACKENDS),
        timeout_s=get_float(cfg, "runtime.timeout_s", exclusive_minimum=0.0),
    )
    from .transport import check_world_size, process_env

    check_world_size(process_env()[1], _num_experts(cfg))
    return settings


# The runtime of this process: local unless a distributed coordinator is running a job.
_active: Any = LocalRuntime()


def _set_active(runtime: Any) -> None:
    global _active
    _active = runtime


def _num_experts(cfg: DictConfig) -> int | None:
    """model.num_experts when the config has it (train.py), else None (evaluate.py: the
    checkpoint's model is checked when it is attached)."""
    value = OmegaConf.select(cfg, "model.num_experts", default=None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


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

    return distributed.launch(settings, main, cfg, output_dir, num_experts=_num_experts(cfg))


def serve_if_worker(config_name: str, argv: list[str] | None = None, config_dir: str | os.PathLike | None = None) -> None:
    """Under torchrun, turn ranks >= 1 into expert workers before Hydra starts; return at once
    on rank 0 or outside torchrun.

    A worker composes the entry point's config (``config_dir``, default: ``conf`` beside the
    ``__main__`` script) from the same overrides (``argv``, default ``sys.argv[1:]``) and reads only ``runtime`` (and ``model.num_experts``): it writes no
    run directory and needs no data, so worker hosts only need the code.  It serves until
    the coordinator ends, then exits the process (0; 1 if the coordinator was lost; 2 on a
    bad runtime config, with one line on stderr).
    """
    rank = os.environ.get("RANK", "")
    argv = sys.argv[1:] if argv is None else list(argv)
    if rank in ("", "0") or any(arg.startswith("-") for arg in argv):  # --help, --multirun: Hydra's
        return
    from ..cli import report_errors

    logging.basicConfig(level=logging.INFO, format=f"[%(asctime)s][rank {rank}][%(levelname)s] - %(message)s")
    with report_errors(ExchangeError):
        from hydra import compose, initialize_config_dir
        from hydra.errors import HydraException

        if config_dir is None:
            config_dir = Path(sys.modules["__main__"].__file__).resolve().parent / "conf"
        try:
            with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
                cfg = compose(config_name, overrides=argv)
        except HydraException as exc:
            raise ConfigError(str(exc).splitlines()[0]) from None
        settings = runtime_settings(cfg)
        from . import worker

        try:
            status = worker.serve(settings, num_experts=_num_experts(cfg))
        except KeyboardInterrupt:  # a second SIGINT / SIGTERM (torchrun forwards them)
            status = 128 + 2
        sys.exit(status)


def attach_experts(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                   payload_bits: int | None = None) -> torch.nn.Module:
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
