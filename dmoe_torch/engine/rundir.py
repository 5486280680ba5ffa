"""Run directories of train.py and evaluate.py: one process at a time, and no silent change of a run.

* :func:`lock_run_dir` takes an exclusive ``fcntl.flock`` on ``<run dir>/.lock`` for the rest of
  the process (the kernel drops it when the process exits, however it ends).  A second process
  on the same directory stops with one line naming the holder's pid.
  It also removes the temporary files a process killed while writing left there.
* :func:`check_rerun` compares the config of a rerun (or of ``resume=PATH``) with the config the
  run was started with, and refuses keys that would change what the run computes (the keys in
  ``free_keys``, such as ``device`` or ``data.num_workers``, and a longer ``train.epochs`` may
  change).  ``resume_force=true`` continues anyway, with a warning listing the differences.
  A run directory without a checkpoint (a run that failed before its first one) has nothing
  to continue: a rerun starts afresh, whatever its config.  A ``train.epochs`` below the
  epochs the checkpoint already holds is refused.
* :func:`check_run_dir_owner` refuses a run directory that holds the other entry point's
  records (Hydra would overwrite its ``.hydra/`` files there).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..config import CHECKPOINT_NAME, ConfigError
from ..utils import stale_temp_files
from .checkpoint import load_checkpoint

LOCK_NAME = ".lock"
CONFIG_NAME = "config.yaml"  # the resolved config train.py writes into its run directory
# The records each entry point writes into its run directory (results.csv: report.write_results).
RUN_RECORDS = {"train": (CHECKPOINT_NAME, CONFIG_NAME), "evaluate": ("results.csv",)}

_held: dict[str, int] = {}  # real path of a locked run directory -> file descriptor of its lock
_created: set[str] = set()  # run directories this process created


class RunDirBusyError(ConfigError):
    """Another process holds the run directory's lock."""


def lock_run_dir(run_dir: str | os.PathLike) -> None:
    """Create ``run_dir`` if needed and hold its exclusive lock until this process exits.

    Idempotent within a process.  Raises RunDirBusyError when another process holds it, and
    ConfigError when it cannot be created (e.g. a path under a regular file).  Once locked, the
    temporary files of writes that a killed process left half-done are removed.
    """
    run_dir = Path(run_dir)
    existed = run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # NotADirectoryError, FileExistsError (a file), PermissionError, ...
        raise ConfigError(
            f"hydra.run.dir={str(run_dir)!r}: cannot create the run directory ({exc.strerror}: "
            f"{exc.filename}); pass another hydra.run.dir"
        ) from None
    key = os.path.realpath(run_dir)
    if not existed:
        _created.add(key)
    if key not in _held:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise RunDirBusyError(
                f"hydra.run.dir={str(run_dir)!r}: {who} is running in this directory; wait for it to end, "
                "or pass another hydra.run.dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held[key] = fd
    for path in stale_temp_files(run_dir):  # nobody else writes here now (between this process's writes)
        path.unlink(missing_ok=True)


def check_run_dir_owner(run_dir: str | os.PathLike, entry_point: str) -> None:
    """ConfigError when ``run_dir`` holds the records of an entry point other than
    ``entry_point`` (train or evaluate): running there would overwrite its ``.hydra/`` files."""
    for other, records in RUN_RECORDS.items():
        found = [name for name in records if (Path(run_dir) / name).exists()]
        if other != entry_point and found:
            raise ConfigError(
                f"hydra.run.dir={str(run_dir)!r}: a run directory of {other}.py (it holds {found[0]}); {entry_point}.py "
                f"would overwrite its records there; pass another hydra.run.dir, e.g. hydra.run.dir={str(run_dir)}/{entry_point}"
            )


def remove_unused_run_dirs() -> None:
    """Remove the run directories this process created that hold nothing but Hydra's files
    (``.hydra/``, the log) and the lock: what a run that failed before its first output leaves."""
    for key in sorted(_created):
        entries = set(os.listdir(key)) if os.path.isdir(key) else set()
        if all(name in (".hydra", LOCK_NAME) or name.endswith(".log") for name in entries):
            shutil.rmtree(key, ignore_errors=True)
            _created.discard(key)


def config_differences(
    old: dict, new: dict, free_keys: Iterable[str] = (), prefix: str = "", added_defaults: dict | None = None
) -> list[str]:
    """``"key: old -> new"`` for every dotted key whose value differs, except ``free_keys``.
    ``added_defaults``: dotted keys added after ``old`` may have been written, with the value
    their absence stands for (an absent key equal to it is no difference)."""
    free_keys = tuple(free_keys)
    added_defaults = added_defaults or {}
    diffs = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        a, b = old.get(key, added_defaults.get(path, "<absent>")), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(config_differences(a, b, free_keys, f"{path}.", added_defaults))
        elif a != b and path not in free_keys:
            diffs.append(f"{path}: {a!r} -> {b!r}")
    return diffs


def check_rerun(
    previous: dict,
    config: dict,
    *,
    source: str,
    free_keys: Iterable[str],
    force: bool,
    added_defaults: dict | None = None,
    new_run: str = "pass another hydra.run.dir",
) -> list[str]:
    """Refuse (ConfigError) to continue ``source`` (run with config ``previous``) under a
    ``config`` that changes a result-altering key, unless ``force``.  Returns the differences.
    ``added_defaults``: see :func:`config_differences`.  ``new_run`` says how to start a new
    run instead."""
    diffs = config_differences(previous, config, free_keys, added_defaults=added_defaults)
    if diffs and not force:
        shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        raise ConfigError(
            f"{source} was run with a different config ({shown}); {new_run} to start a new run, "
            "or resume_force=true to continue it with the new config"
        )
    return diffs


def check_rerun_dir(
    run_dir: str | os.PathLike,
    cfg: DictConfig,
    *,
    free_keys: Iterable[str],
    added_defaults: dict,
    checkpoint: dict | None = None,
    checkpoint_path: str | os.PathLike | None = None,
) -> list[str]:
    """:func:`check_rerun` of ``cfg`` against the config.yaml that the last train.py in ``run_dir``
    recorded, and against the config of ``checkpoint`` (loaded from ``checkpoint_path``) when
    that checkpoint comes from elsewhere (``resume=PATH``) or ``run_dir`` has no config.yaml.
    ``checkpoint`` None: the run directory's own checkpoint.pt, when there is one.  Without
    any checkpoint the recorded config is not compared (the run stopped before saving one, so
    there is nothing to continue); a ``cfg.train.epochs`` smaller than the epochs the
    checkpoint holds is refused.  ``free_keys`` and ``added_defaults`` (see :func:`check_rerun`)
    come from the caller: training.RESUME_FREE_KEYS and training.ADDED_KEY_DEFAULTS (this
    module is below training).  Returns the differences a ``resume_force=true`` lets through."""
    config = OmegaConf.to_container(cfg, resolve=True)
    check = dict(free_keys=free_keys, added_defaults=added_defaults, force=bool(cfg.get("resume_force", False)))
    here = f"hydra.run.dir={str(run_dir)!r}"
    recorded = Path(run_dir) / CONFIG_NAME
    own_checkpoint = Path(run_dir) / CHECKPOINT_NAME
    if checkpoint is None and own_checkpoint.is_file():
        checkpoint, checkpoint_path = load_checkpoint(own_checkpoint, key="resume", mmap=True), own_checkpoint
    diffs = []
    if recorded.is_file() and own_checkpoint.is_file():
        previous: Any = OmegaConf.to_container(OmegaConf.load(recorded), resolve=False)
        diffs += check_rerun(previous, config, source=here, **check)
    if checkpoint is not None:
        path = Path(checkpoint_path)
        own = (path if path.is_dir() else path.parent).resolve() == Path(run_dir).resolve()
        if own:
            source, new_run = here, "pass another hydra.run.dir"
        else:
            source, new_run = f"resume={str(checkpoint_path)!r}", "leave resume unset"
        if not own or not recorded.is_file():
            diffs += check_rerun(checkpoint["config"], config, source=source, new_run=new_run, **check)
        check_epochs_left(checkpoint, int(cfg.train.epochs), source=source, new_run=new_run)
    return list(dict.fromkeys(diffs))


def check_epochs_left(checkpoint: dict, epochs: int, *, source: str, new_run: str) -> None:
    """ConfigError when ``checkpoint`` already holds more than ``epochs`` epochs (finished, or
    begun): continuing it under ``train.epochs=epochs`` would record fewer epochs than it ran."""
    begun = int(checkpoint["epoch"]) + (1 if int(checkpoint["step_in_epoch"]) else 0)
    if begun > epochs:
        held = f"is in epoch {begun}" if int(checkpoint["step_in_epoch"]) else f"has trained {begun} epochs"
        raise ConfigError(
            f"train.epochs={epochs}: {source} {held} already; pass train.epochs={begun} or more to continue "
            f"it, or {new_run} to start a new run"
        )
