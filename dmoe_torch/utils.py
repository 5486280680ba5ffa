"""Small shared helpers: seeding, derived seeds, device choice, memory and atomic file writes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

INT64_MAX = 2**63 - 1  # the largest integer a tensor, a numpy array or a checkpoint holds


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch (CPU and CUDA).

    The wireless channel is seeded separately, through ``WirelessChannel(..., seed=seed)``,
    and the loaders through ``derive_seed``: both are explicit generators, so nothing here
    decides a channel draw or a shuffle.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (e.g. ``(seed, "shuffle", epoch)``).

    Independent streams get unrelated seeds, unlike ``seed + epoch`` which makes runs with
    neighbouring seeds share shuffles.
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def memory_bytes(device: torch.device) -> int:
    """Total memory of ``device`` in bytes: the GPU's for CUDA, else the machine's RAM."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device.index or 0).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def format_bytes(size: float) -> str:
    """``"1.5 GB"``, ``"12 MB"``, ``"3.2 TB"`` (powers of 1000)."""
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size / 1e3:.3g} kB"


# atomic_write's temporary files are ``.<name>.<random>.tmp`` beside the target.
_TEMP_SUFFIX = ".tmp"


def stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """The temporary files of :func:`atomic_write` in ``directory``: what a process killed while
    writing leaves behind (call it only where no other process writes)."""
    return sorted(Path(directory).glob(f".*{_TEMP_SUFFIX}"))


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], Any]) -> Path:
    """Write a file via ``write(fileobj)`` into a temporary file beside it, then rename it.

    A reader (or a run killed half-way) sees either the old file or the complete new one,
    never a truncated file.  Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TEMP_SUFFIX)
    try:
        os.chmod(tmp_name, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual mode
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def device_label(device: torch.device) -> str:
    """``"cpu"``, ``"cuda:0"``, ``"mps"``: the device a run used, with the CUDA index made explicit."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.current_device() if device.index is None else device.index}"
    return str(device)
