"""Error reporting for the entry points: a bad config is one stderr line and exit status 2,
a runtime failure one line and status 1, also for Hydra's own override errors;
:class:`ValidateFirst`, which validates before Hydra creates the run directory; and
:func:`serve_if_worker`, which turns torchrun ranks >= 1 into expert workers."""

from __future__ import annotations

import copy
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from .config import (
    ConfigError,
    allowed_keys,
    configured_num_experts,
    runtime_settings,
    unknown_key_message,
    validate_train_config,
)
from .config.eval import validate_eval_config

EXIT_CONFIG_ERROR = 2
EXIT_RUNTIME_ERROR = 1


# run_entry_point sets HYDRA_FULL_ERROR=1 for Hydra's sake; this says errors stay one line anyway.
_ONE_LINE_ERRORS = False


def _full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" and not _ONE_LINE_ERRORS


@contextmanager
def report_errors(*error_types: type[BaseException]) -> Iterator[None]:
    """Turn a ConfigError into one stderr line and exit status 2, and the other
    ``error_types`` (e.g. missing data, a diverging loss) into one line and exit status 1.

    With ``HYDRA_FULL_ERROR=1`` the exception propagates with its traceback instead.
    """
    try:
        yield
    except (ConfigError, *error_types) as exc:
        from .engine.rundir import remove_unused_run_dirs

        remove_unused_run_dirs()  # a run that failed before any output leaves no directory behind
        if _full_error():
            raise
        _exit_with(str(exc), EXIT_CONFIG_ERROR if isinstance(exc, ConfigError) else EXIT_RUNTIME_ERROR)


def run_entry_point(main: Callable[[], Any], config_name: str) -> None:
    """Run a ``@hydra.main`` function (of ``config_name``: train or evaluate) so that Hydra's
    own override and composition errors (``foo=1``, ``router=nope``) are one stderr line and
    exit status 2, like the ConfigErrors that :func:`report_errors` reports inside ``main``.

    With ``HYDRA_FULL_ERROR=1`` every error propagates with its traceback instead.
    """
    global _ONE_LINE_ERRORS
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        main()
        return
    # Hydra prints its errors itself (several lines, exit 1) unless HYDRA_FULL_ERROR=1, in which
    # case it re-raises them: set it for the run and report them here, like ours.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    _ONE_LINE_ERRORS = True
    try:
        main()
    except HydraException as exc:
        _exit_with(hydra_error_line(exc, config_name), EXIT_CONFIG_ERROR)
    finally:
        del os.environ["HYDRA_FULL_ERROR"]
        _ONE_LINE_ERRORS = False


def _exit_with(message: str, status: int) -> None:
    print("Error: " + " ".join(message.split()), file=sys.stderr)
    sys.exit(status)


def hydra_error_line(exc: BaseException, config_name: str) -> str:
    """One line for an error Hydra raised while parsing the overrides or composing the config."""
    unknown = re.match(r"Could not override '([^']+)'", str(exc))
    if unknown and isinstance(exc.__cause__, (ConfigAttributeError, ConfigKeyError)):
        # `key=value` for a key the config does not have (Hydra's hint, `+key=value`, fails too).
        key = unknown.group(1)
        allowed = allowed_keys(config_name, key.rpartition(".")[0])
        return (
            unknown_key_message(key, allowed)
            if allowed
            else f"{key}: unknown key (python {config_name}.py --cfg job shows the keys)"
        )
    no_group = re.search(
        r"Could not override '([^']+)'\. No match in the defaults list.* use \+(\S+)", " ".join(str(exc).split())
    )
    if no_group:  # `group=option` for a group this entry point does not have (evaluate.py model=tiny)
        return f"{no_group.group(2)}: {config_name}.py has no config group {no_group.group(1)!r}; see {config_name}.py --help"
    if isinstance(exc, MissingConfigException) and exc.options is not None and exc.missing_cfg_file:
        # `group=option` with an unknown option
        group, _, option = exc.missing_cfg_file.rpartition("/")
        return f"{group}={option}: no such option; choose one of {', '.join(sorted(exc.options))}"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if isinstance(exc, OverrideParseException) and lines:
        return f"{exc.override}: not a valid override ({lines[0]}); see {config_name}.py --help"
    return " ".join(lines)


def serve_if_worker(config_name: str, argv: list[str] | None = None, config_dir: str | os.PathLike | None = None) -> None:
    """Under torchrun, turn ranks >= 1 into expert workers before Hydra starts; return at once
    on rank 0 or outside torchrun.

    A worker composes the entry point's config (``config_dir``, default: ``conf`` beside the
    ``__main__`` script) from the same overrides (``argv``, default ``sys.argv[1:]``) and reads only ``runtime``
    (and ``model.num_experts``): it writes no run directory and needs no data, so worker hosts only need the code.
    It serves until
    the coordinator ends, then exits the process (0; 1 if the coordinator was lost; 2 on a
    bad runtime config, with one line on stderr).
    """
    rank = os.environ.get("RANK", "")
    argv = sys.argv[1:] if argv is None else list(argv)
    if rank in ("", "0") or any(arg.startswith("-") for arg in argv):  # --help, --multirun: Hydra's
        return
    from .runtime import ExchangeError

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
        from .runtime import worker

        try:
            status = worker.serve(settings, num_experts=configured_num_experts(cfg))
        except KeyboardInterrupt:  # a second SIGINT / SIGTERM (torchrun forwards them)
            status = 128 + 2
        sys.exit(status)


class ValidateFirst(Callback):
    """Hydra callback (``hydra.callbacks`` of train.yaml and evaluate.yaml) run before Hydra
    creates the run directory: validate the config, so that a bad value leaves no files behind,
    then take the run directory's lock (:mod:`dmoe_torch.engine.rundir`), refuse an empty
    ``hydra.run.dir`` (the current directory) and a directory of the other entry point, and,
    for train.py, refuse a rerun that would change the run, before Hydra writes its files there.  (Checks that need
    the data or the checkpoint come later; a run that fails before any output has its new run
    directory removed, see report_errors.)  Multirun jobs and the compose API skip it; the
    entry points validate again."""

    def __init__(self, config_name: str) -> None:
        self.config_name = config_name

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        job = copy.deepcopy(config)
        with open_dict(job):
            del job["hydra"]
        given_dir = str(OmegaConf.select(config, "hydra.run.dir"))
        run_dir = os.path.abspath(given_dir)
        from .engine import rundir

        # Hydra turns a callback's exception into a warning and goes on: report_errors exits
        # instead (SystemExit passes through Hydra).
        with report_errors():
            if not given_dir.strip():  # Hydra would write the run's files into the current directory
                raise ConfigError(
                    f"hydra.run.dir={given_dir!r}: must name a directory; leave it out for the default "
                    f"outputs/{self.config_name}/<date>/<time>"
                )
            if self.config_name == "evaluate":
                validate_eval_config(job)
                rundir.lock_run_dir(run_dir)
                rundir.check_run_dir_owner(run_dir, "evaluate")
            else:
                validate_train_config(job)
                rundir.lock_run_dir(run_dir)
                rundir.check_run_dir_owner(run_dir, "train")
                from .config.migration import ADDED_KEY_DEFAULTS
                from .engine.training import RESUME_FREE_KEYS

                rundir.check_rerun_dir(run_dir, job, free_keys=RESUME_FREE_KEYS, added_defaults=ADDED_KEY_DEFAULTS)
