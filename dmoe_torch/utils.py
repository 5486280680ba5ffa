"""Small shared helpers: seeding, derived seeds, device choice, memory, atomic file writes, and
the typed value checks of config fields (one-line ConfigError messages naming the key)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .selection.common import is_int, is_real

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


# ---------------------------------------------------------------------------------------------
# Typed value checks: the rule of one config field, in the words every message uses.


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key."""


def check_int(
    value: Any, key: str, *, minimum: int | None = None, maximum: int | None = None, optional: bool = False, why: str = ""
) -> int | None:
    """``value`` as an int in [minimum, maximum] (None when ``optional``); at most 2**63 - 1 in
    any case (tensors, numpy arrays and checkpoints hold 64-bit integers)."""
    if value is None and optional:
        return None
    allowed = f"an integer{_range_text(minimum, maximum)}" + (" or null" if optional else "") + (f" ({why})" if why else "")
    if not is_int(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ConfigError(f"{key}={value!r}: must be {allowed}")
    if value > INT64_MAX:
        raise ConfigError(f"{key}={value!r}: must be {allowed} and at most 2**63 - 1 (a 64-bit integer)")
    return int(value)


def check_float(
    value: Any,
    key: str,
    *,
    minimum: float | None = None,
    exclusive_minimum: float | None = None,
    maximum: float | None = None,
    optional: bool = False,
    why: str = "",
) -> float | None:
    """``value`` as a finite float within the bounds (None when ``optional``)."""
    if value is None and optional:
        return None
    if minimum is not None:
        bound_text, ok = f" >= {minimum:g}", lambda v: v >= minimum
    elif exclusive_minimum is not None:
        bound_text, ok = f" > {exclusive_minimum:g}", lambda v: v > exclusive_minimum
    else:
        bound_text, ok = "", lambda v: True
    if maximum is not None:
        bound_text += f" and <= {maximum:g}"
    allowed = f"a finite number{bound_text}" + (" or null" if optional else "") + (f" ({why})" if why else "")
    if not is_real(value) or not math.isfinite(value) or not ok(value) or (maximum is not None and value > maximum):
        raise ConfigError(f"{key}={value!r}: must be {allowed}")
    return float(value)


def check_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: must be true or false")
    return value


def check_str(value: Any, key: str, *, choices: tuple[str, ...] | None = None, optional: bool = False) -> str | None:
    """``value`` as a string, one of ``choices`` when given (None when ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or (choices is not None and value not in choices):
        allowed = f"one of {', '.join(choices)}" if choices is not None else "a string"
        raise ConfigError(f"{key}={value!r}: must be {allowed}")
    return value


def _range_text(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""


def machine_facts(**extra: Any) -> dict[str, Any]:
    """What a benchmark's JSON records of the machine it ran on (platform, processor, CPU
    count, torch version), plus ``extra`` (threads, device, notes)."""
    import platform

    return dict(
        platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(), torch=torch.__version__, **extra
    )
