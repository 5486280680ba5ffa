"""Training checkpoints: one self-describing dict, written atomically, with every RNG state.

A checkpoint holds what an exact resume needs::

    format, version        identify the file
    model, optimizer, scheduler   state dicts
    epoch                  0-based index of the epoch in progress when ``step_in_epoch`` > 0,
                           otherwise the number of finished epochs (the next epoch to run)
    step_in_epoch          optimizer steps already taken in epoch ``epoch`` (0 at a boundary)
    global_step            optimizer steps taken in total
    config                 the resolved run config (plain dict): evaluate.py rebuilds the model,
                           the data and the channel (same seed, so the same device geometry)
    metrics                {"history": [per-epoch dicts], ...}
    rng                    python / numpy / torch (CPU, CUDA) states and named torch.Generators

Everything is stored as tensors and plain Python containers, so it loads with
``torch.load(..., weights_only=True)``: loading a checkpoint never runs pickled code.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Which file a ``ckpt=`` / ``resume=`` value names is checked with the other config values.
from ..config import CHECKPOINT_NAME, ConfigError, checkpoint_file
from ..utils import atomic_torch_save

CHECKPOINT_FORMAT = "dmoe-torch-checkpoint"
CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "epoch", "step_in_epoch", "global_step", "config", "metrics", "rng")


def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG state that can influence training, as tensors / plain containers."""
    version, mt_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: gen.get_state() for name, gen in (generators or {}).items()},
    }
    return state


def restore_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Inverse of :func:`capture_rng_state`; ``generators`` are restored by name in place."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    np_state = state["numpy"]
    np.random.set_state(
        (np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"], np_state["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in (generators or {}).items():
        if name in state["generators"]:
            gen.set_state(state["generators"][name])


def save_checkpoint(path: str | os.PathLike, **fields: Any) -> Path:
    """Write ``fields`` (see the module docstring) to ``path`` atomically (temp file + rename)."""
    missing = [key for key in REQUIRED_KEYS if key not in fields]
    if missing:
        raise ValueError(f"save_checkpoint: missing fields {missing}")
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **fields}
    return atomic_torch_save(payload, path)


# torch.save writes a zip archive; anything else (a YAML, JSON or PNG file, text) is not a checkpoint.
_ZIP_MAGIC = b"PK\x03\x04"


def load_checkpoint(
    path: str | os.PathLike, *, key: str = "ckpt", map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """Load and check a checkpoint (a file, or a run directory holding checkpoint.pt); a
    missing, unreadable or foreign file raises ConfigError.

    ``key`` is the config key that named the file (``ckpt`` or ``resume``), for the message.
    ``mmap``: map the tensors instead of reading them (cheap when only the config, epoch and
    step are needed).
    """
    path = checkpoint_file(path, key=key)
    not_checkpoint = f"{key}={str(path)!r}: not a dmoe-torch checkpoint"
    with open(path, "rb") as handle:
        magic = handle.read(len(_ZIP_MAGIC))
    if magic != _ZIP_MAGIC:
        raise ConfigError(
            f"{not_checkpoint} (not a file written by torch.save); pass a run directory of train.py or its {CHECKPOINT_NAME}"
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        # weights_only refuses pickled Python objects: a torch file, but not one of ours.
        raise ConfigError(f"{not_checkpoint} (a torch file holding Python objects, which are never unpickled)") from None
    except Exception as exc:  # a truncated or damaged archive: RuntimeError, EOFError, KeyError, ...
        reason = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{key}={str(path)!r}: not a readable checkpoint (corrupt or truncated file: {reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{key}={str(path)!r}: not a dmoe-torch checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(
            f"{key}={str(path)!r}: checkpoint format version {payload.get('version')!r}, "
            f"this code reads version {CHECKPOINT_VERSION}"
        )
    missing = [name for name in REQUIRED_KEYS if name not in payload]
    if missing:
        raise ConfigError(f"{key}={str(path)!r}: checkpoint lacks {', '.join(missing)} (corrupt file?)")
    return payload


def load_model_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], *, key: str = "ckpt") -> None:
    """``model.load_state_dict`` that reports a shape or name mismatch as one ConfigError line."""
    own = model.state_dict()
    for name, tensor in state_dict.items():
        if name not in own:
            raise ConfigError(
                f"{key}: checkpoint parameter {name!r} does not exist in the configured model "
                "(model.* differs from the checkpoint's)"
            )
        if tuple(own[name].shape) != tuple(tensor.shape):
            raise ConfigError(
                f"{key}: checkpoint parameter {name!r} has shape {list(tensor.shape)}, the configured model "
                f"expects {list(own[name].shape)} (model.* differs from the checkpoint's)"
            )
    absent = [name for name in own if name not in state_dict]
    if absent:
        raise ConfigError(f"{key}: checkpoint lacks model parameter {absent[0]!r} (model.* differs from the checkpoint's)")
    model.load_state_dict(state_dict)
