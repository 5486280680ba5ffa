"""The entry points as a user meets them (issue 12): documented commands, --help, Hydra's own
errors, run directories (lock, reruns, no leftovers), and what the records say.

Error paths run train.py / evaluate.py in process (runpy), training runs call ``fit`` on a few
hundred real Fashion-MNIST images; one evaluate.py and two --help runs are subprocesses.
"""

from __future__ import annotations

import json
import logging
import os
import re
import runpy
import signal
import subprocess
import sys
from itertools import chain
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from support import REPO, cli_env

from dmoe_torch.config import (
    EVAL_DATA_KEYS,
    EVAL_KEYS,
    ROUTER_KEYS,
    TRAIN_DATA_KEYS,
    TRAIN_KEYS,
    ConfigError,
    validate_train_config,
)
from dmoe_torch.config.eval import validate_eval_config
from dmoe_torch.data import DATASETS
from dmoe_torch.engine import training
from dmoe_torch.engine.rundir import lock_run_dir
from dmoe_torch.selection.policies import policy_names

POLICIES = policy_names()  # every policy of the table: the help texts name them all

CONF = str(REPO / "conf")
ROUTERS = sorted(p.stem for p in (REPO / "conf" / "router").glob("*.yaml"))


def run_subprocess(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=cli_env(**env)
    )


def run_in_process(script: str, *args: str) -> int:
    """``python script args`` in this process (as far as Hydra is concerned); the exit status."""
    argv, root = sys.argv, logging.getLogger()
    handlers, level = root.handlers[:], root.level  # Hydra configures logging to the captured streams
    sys.argv = [str(REPO / script), *args]
    GlobalHydra.instance().clear()
    try:
        runpy.run_path(str(REPO / script), run_name="__main__")
        return 0
    except SystemExit as exc:
        return exc.code
    finally:
        sys.argv = argv
        root.handlers[:] = handlers
        root.setLevel(level)
        GlobalHydra.instance().clear()


def compose_cfg(name: str, overrides=()):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


# --------------------------------------------------------------------------------------------
# Every command the README, the config comments, the help texts and the Makefile show


COMMAND = re.compile(r"(python|\$\(PY\)|torchrun\b[^#\n`]*?)\s+(train|evaluate)\.py\b([^#\n`]*)")


MAKE_IF_MODEL = re.compile(r"\$\(if \$\(MODEL\),model=\$\(MODEL\)\)")


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, script, arguments) of every train.py / evaluate.py command line in the docs."""
    sources = [
        REPO / "README.md",
        REPO / "Makefile",
        *sorted((REPO / "docs").glob("*.md")),
        *sorted((REPO / "conf").rglob("*.yaml")),
    ]
    commands = []
    for path in sources:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for launcher, script, rest in COMMAND.findall(line):
                rest = rest.replace("$(RUN_DIR)", "outputs/default")
                make_if = MAKE_IF_MODEL.search(rest)
                if make_if:  # `make run MODEL=name`: the default (no MODEL), then every model
                    for model in [None, *sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))]:
                        args = rest.replace(make_if.group(0), f"model={model}" if model else "").split()
                        commands.append((f"{path.relative_to(REPO)}:{number} MODEL={model or ''}", script, args))
                    continue
                words = rest.split()
                if any(w.startswith("--help") for w in words):
                    continue
                args = [w.rstrip("`),") for w in words if "=" in w and not w.startswith("[")] + [w for w in words if w == "-m"]
                args = ["ckpt=x" if a == "ckpt=..." else a for a in args]
                if launcher.startswith("torchrun"):
                    args.append("<torchrun>")
                commands.append((f"{path.relative_to(REPO)}:{number}", script, args))
    return commands


def override_sets(args: list[str]) -> list[list[str]]:
    """The configs a command composes: one per value of each sweep (``-m a=1,2``), hydra.* dropped."""
    parsed = OverridesParser.create().parse_overrides(
        [a for a in args if a not in ("-m", "<torchrun>") and not a.startswith("hydra.")]
    )
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    sweeps = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in parsed if o.is_sweep_override()]
    return [fixed] + [[*fixed, value] for value in chain.from_iterable(sweeps)] if sweeps else [fixed]


DOCUMENTED = documented_commands()


def test_the_documentation_shows_the_commands_a_user_tries_first():
    shown = {(script, " ".join(args)) for _, script, args in DOCUMENTED}
    assert ("train", "eval_router=jesa") in shown
    assert ("train", "router=topk router.k=1") in shown
    assert ("train", "+experiment=quick") in shown
    assert any(script == "evaluate" and "-m" in args for _, script, args in DOCUMENTED)
    assert len(DOCUMENTED) >= 20


@pytest.mark.parametrize("where,script,args", DOCUMENTED, ids=[f"{w} {' '.join(a)}" for w, _, a in DOCUMENTED])
def test_every_documented_command_composes_and_validates(where, script, args, monkeypatch):
    if "<torchrun>" in args:  # rank 0 of torchrun with one expert worker
        for name, value in (
            ("RANK", "0"),
            ("LOCAL_RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "localhost"),
            ("MASTER_PORT", "29500"),
        ):
            monkeypatch.setenv(name, value)
    for overrides in override_sets(args):
        cfg = compose_cfg(script, overrides)
        (validate_train_config if script == "train" else validate_eval_config)(cfg)


# --------------------------------------------------------------------------------------------
# --help


def test_train_help_lists_keys_values_groups_and_examples():
    result = run_subprocess("train.py", "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "Powered by Hydra" not in text and "Examples:" in text
    for word in (*POLICIES, *DATASETS, *ROUTERS, "same_as_train", "resume_force", "hydra.run.dir"):
        assert re.search(rf"\b{word}\b", text), word
    for key in (
        *(f"train.{k}" for k in TRAIN_KEYS),
        *(f"data.{k}" for k in TRAIN_DATA_KEYS),
        *(f"router.{k}" for k in ROUTER_KEYS),
    ):
        assert key in text, key
    assert f"router: {', '.join(ROUTERS)}" in text  # the groups, as Hydra lists them


def test_evaluate_help_offers_only_what_evaluate_accepts():
    result = run_subprocess("evaluate.py", "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for key in ("ckpt", *(f"eval.{k}" for k in EVAL_KEYS), *(f"data.{k}" for k in EVAL_DATA_KEYS)):
        assert key in text, key
    for word in POLICIES:
        assert re.search(rf"\b{word}\b", text), word
    for train_only in ("model=", "model:", "experiment", "same_as_train", "eval_router", "router:"):
        # channel.model=... (and channel's `  model:` in the printed config) is a channel
        # override, not the model group: sections start a line, overrides follow no key.
        pattern = rf"(?m)^{re.escape(train_only)}" if train_only.endswith(":") else rf"(?<![\w.]){re.escape(train_only)}"
        assert not re.search(pattern, text), train_only


# --------------------------------------------------------------------------------------------
# Errors: one line, exit 2, no run directory; HYDRA_FULL_ERROR=1 gives the traceback


HYDRA_ERRORS = [
    ("train.py", ["foo=1"], r"^foo: unknown key; allowed: seed, "),
    ("train.py", ["train.epoch=1"], r"^train.epoch: unknown key \(did you mean epochs\?\); allowed: epochs, "),
    ("train.py", ["+train.epoch=1"], r"^train.epoch: unknown key \(did you mean epochs\?\); allowed: epochs, "),
    ("train.py", ["router=des", "+router.gama=0.5"], r"^router.gama: unknown key \(did you mean gamma\?\)"),
    ("train.py", ["router=nope"], r"^router=nope: no such option; choose one of channel_topk, dense, des, "),
    ("train.py", ["eval_router=top2"], r"^eval_router=top2: no such option; choose one of .*same_as_train, topk$"),
    ("train.py", ["router.gamma=[0.9"], r"^router.gamma=\[0.9: not a valid override"),
    ("train.py", ["data.val_size=60000"], r"^data.val_size=60000: must be smaller than the 60000 training images"),
    ("evaluate.py", ["ckpt=x", "+model=tiny"], r"^model: unknown key; allowed: ckpt, "),
    ("evaluate.py", ["ckpt=x", "model=tiny"], r"^model=tiny: evaluate.py has no config group 'model'; see evaluate.py --help$"),
    ("evaluate.py", ["ckpt=x", "eval.policy=[des]"], r"^eval.policy: unknown key \(did you mean policies\?\)"),
]


@pytest.mark.parametrize("script,args,pattern", HYDRA_ERRORS, ids=[f"{s} {' '.join(a)}" for s, a, _ in HYDRA_ERRORS])
def test_errors_are_one_line_exit_2_and_leave_no_run_directory(script, args, pattern, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    run_dir = tmp_path / "run"
    assert run_in_process(script, *args, f"hydra.run.dir={run_dir}") == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert re.search(pattern, lines[0][len("Error: ") :]), lines[0]
    assert "HYDRA_FULL_ERROR" not in os.environ  # restored
    assert not run_dir.exists()


def test_full_error_env_lets_the_errors_through(tmp_path, monkeypatch):
    from hydra.errors import ConfigCompositionException

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigCompositionException, match="Could not override 'foo'"):
        run_in_process("train.py", "foo=1", f"hydra.run.dir={tmp_path / 'a'}")
    with pytest.raises(ConfigError, match="router.gamma=1.5"):
        run_in_process("train.py", "router.gamma=1.5", f"hydra.run.dir={tmp_path / 'b'}")


# --------------------------------------------------------------------------------------------
# Run directories


def test_a_second_process_on_a_run_directory_stops_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    lock_run_dir(run_dir)  # held by this test process until it exits
    result = run_subprocess("train.py", "model=tiny", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"Error: hydra.run.dir='{run_dir}': process {os.getpid()} is running in this directory; "
        "wait for it to end, or pass another hydra.run.dir"
    )
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # Hydra wrote nothing there


def test_a_failure_after_the_run_directory_was_made_removes_it(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    not_a_checkpoint = tmp_path / "config.yaml"
    not_a_checkpoint.write_text("seed: 0\n")
    run_dir = tmp_path / "run"
    assert run_in_process("train.py", "model=tiny", f"resume={not_a_checkpoint}", f"hydra.run.dir={run_dir}") == 2
    assert "not a dmoe-torch checkpoint" in capsys.readouterr().err
    assert not run_dir.exists()


TINY_OVERRIDES = (
    "data.limit_train=250",
    "data.limit_test=50",
    "data.batch_size=50",
    "model=tiny",
    "train.epochs=2",
    "train.warmup_steps=1",
    "progress=false",
    "device=auto",
)


def tiny_args(data_root: Path, *overrides: str) -> list[str]:
    return [f"data.root={data_root}", *TINY_OVERRIDES, *overrides]


def tiny_cfg(data_root: Path, *overrides: str):
    return compose_cfg("train", tiny_args(data_root, *overrides))


def test_a_rerun_that_would_change_the_run_is_refused(data_root, tmp_path):
    run_dir = tmp_path / "run"
    assert training.fit(tiny_cfg(data_root), run_dir) == 0
    records = {name: (run_dir / name).read_bytes() for name in ("checkpoint.pt", "metrics.json", "config.yaml")}
    for change in (["router=des"], ["eval_router=jesa"], ["train.lr=0.01"], ["seed=1"], ["data.limit_train=300"]):
        with pytest.raises(ConfigError) as info:
            training.fit(tiny_cfg(data_root, *change), run_dir)
        message = str(info.value)
        assert message.startswith(f"hydra.run.dir={str(run_dir)!r} was run with a different config (")
        assert message.endswith(
            "pass another hydra.run.dir to start a new run, or resume_force=true to continue it with the new config"
        )
        assert {name: (run_dir / name).read_bytes() for name in records} == records  # nothing touched
    # Keys that cannot alter the results pass (and redo only the test of the finished run).
    assert training.fit(tiny_cfg(data_root, "progress=true", "device=cpu", "train.log_every=3"), run_dir) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["test"] == json.loads(records["metrics.json"])["test"]
    # A longer schedule continues training.
    assert training.fit(tiny_cfg(data_root, "train.epochs=3"), run_dir) == 0
    assert len(json.loads((run_dir / "metrics.json").read_text())["history"]) == 3
    # resume_force=true continues with the new config, and the records follow it.
    assert training.fit(tiny_cfg(data_root, "train.epochs=3", "router=des", "resume_force=true"), run_dir) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["eval_router"]["policy"] == "des" and "policy: des" in (run_dir / "config.yaml").read_text()
    assert training.fit(tiny_cfg(data_root, "train.epochs=3", "router=des"), run_dir) == 0  # now the recorded config


def test_resume_from_another_run_with_a_different_config_is_refused(data_root, tmp_path):
    first = tmp_path / "first"
    assert training.fit(tiny_cfg(data_root, "train.stop_after_epochs=1"), first) == 0
    with pytest.raises(
        ConfigError,
        match=r"^resume='.*first' was run with a different config \(eval_router.policy: "
        r"'topk' -> 'jesa'; router.policy: 'topk' -> 'jesa'\); leave resume unset to "
        r"start a new run, or resume_force=true",
    ):
        training.fit(tiny_cfg(data_root, f"resume={first}", "router=jesa"), tmp_path / "second")
    assert training.fit(tiny_cfg(data_root, f"resume={first}"), tmp_path / "third") == 0


def test_records_hold_the_device_used_and_the_whole_time_of_a_resumed_epoch(data_root, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_train_one_epoch = training.train_one_epoch

    def interrupted_after_two_slow_steps(*args, on_step, **kwargs):
        def step(progress, loss):
            on_step(progress, loss)
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            import time

            time.sleep(0.3)  # the part before the interruption takes at least 0.6 s
            if progress.steps == 2:
                os.kill(os.getpid(), signal.SIGINT)

        return real_train_one_epoch(*args, on_step=step, **kwargs)

    monkeypatch.setattr(training, "train_one_epoch", interrupted_after_two_slow_steps)
    assert training.fit(tiny_cfg(data_root, "train.epochs=1"), run_dir) == 128 + signal.SIGINT
    checkpoint = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert checkpoint["step_in_epoch"] == 2
    before = checkpoint["metrics"]["epoch_elapsed_s"]
    assert before >= 0.6
    monkeypatch.setattr(training, "train_one_epoch", real_train_one_epoch)
    assert training.fit(tiny_cfg(data_root, "train.epochs=1"), run_dir) == 0
    (record,) = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert record["epoch_time_s"] >= before  # both invocations, not only the resumed part
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert f"\ndevice: {expected}\n" in "\n" + (run_dir / "config.yaml").read_text()


def test_evaluate_accepts_a_run_directory_and_logs_the_table(data_root, tmp_path):
    run_dir = tmp_path / "run"
    assert training.fit(tiny_cfg(data_root, "train.epochs=1"), run_dir) == 0
    eval_dir = tmp_path / "eval"
    result = run_subprocess(
        "evaluate.py",
        f"ckpt={run_dir}",
        "eval.policies=[topk@1,jesa]",
        "eval.gammas=[0.5]",
        "eval.channel_draws=1",
        f"data.root={data_root}",
        "data.limit_test=50",
        "progress=false",
        "device=cpu",
        f"hydra.run.dir={eval_dir}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    log_text = (eval_dir / "evaluate.log").read_text()
    for row in ("| topk@1 | - |", "| jesa | 0.5 |"):
        assert row in log_text and row in result.stdout
    assert f"{Path(data_root) / 'FashionMNIST' / 'raw'}" in log_text  # where the data came from


def test_a_key_added_later_is_no_difference_at_its_default():
    from dmoe_torch.engine.rundir import config_differences
    from dmoe_torch.engine.training import ADDED_KEY_DEFAULTS

    old = {"model": {"name": "cnn", "d_model": 128}}  # recorded before model.link_dropout existed
    assert (
        config_differences(
            old, {"model": {"name": "cnn", "d_model": 128, "link_dropout": 0.0}}, added_defaults=ADDED_KEY_DEFAULTS
        )
        == []
    )
    assert config_differences(
        old, {"model": {"name": "cnn", "d_model": 128, "link_dropout": 0.3}}, added_defaults=ADDED_KEY_DEFAULTS
    ) == ["model.link_dropout: 0.0 -> 0.3"]
    assert config_differences(
        old, {"model": {"name": "cnn", "d_model": 128, "stem": "conv"}}, added_defaults=ADDED_KEY_DEFAULTS
    ) == ["model.stem: '<absent>' -> 'conv'"]
    # Issue 21's keys: absent means renormalized combine, selection balancing, no z-loss.
    new = {
        "model": {"name": "cnn", "d_model": 128, "combine": "renormalized", "balance_on": "selection"},
        "train": {"z_loss_coef": 0.0},
    }
    assert config_differences({**old, "train": {}}, new, added_defaults=ADDED_KEY_DEFAULTS) == []
    new["model"]["combine"] = "renormalized_st"
    assert config_differences({**old, "train": {}}, new, added_defaults=ADDED_KEY_DEFAULTS) == [
        "model.combine: 'renormalized' -> 'renormalized_st'"
    ]


# --------------------------------------------------------------------------------------------
# Records that agree after a resume or a rerun; run directories that are not the run's own


def scalar_points(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard's view of a run directory (after its purges): tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


@pytest.fixture(scope="module")
def finished_run(data_root, tmp_path_factory) -> Path:
    """A finished 2-epoch tiny run (tests must leave it as it is)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert training.fit(tiny_cfg(data_root), run_dir) == 0
    return run_dir


def record_bytes(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file() and p.name != ".lock"}


def test_a_rerun_with_fewer_epochs_than_the_checkpoint_holds_is_refused(finished_run, data_root, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    before = record_bytes(finished_run)
    # Accepted, config.yaml and metrics.json would say 1 epoch against 2 in the history and the checkpoint.
    expected = (
        f"train.epochs=1: hydra.run.dir='{finished_run}' has trained 2 epochs already; pass train.epochs=2 or "
        "more to continue it, or pass another hydra.run.dir to start a new run"
    )
    with pytest.raises(ConfigError) as info:
        training.fit(tiny_cfg(data_root, "train.epochs=1"), finished_run)
    assert str(info.value) == expected
    # train.py refuses before Hydra writes its .hydra/ files there.
    assert run_in_process("train.py", *tiny_args(data_root, "train.epochs=1"), f"hydra.run.dir={finished_run}") == 2
    assert capsys.readouterr().err.strip() == f"Error: {expected}"
    assert record_bytes(finished_run) == before and not (finished_run / ".hydra").exists()


def test_a_rerun_of_a_finished_run_logs_its_test_points_once(finished_run, data_root, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    before = scalar_points(run_dir)
    assert training.fit(tiny_cfg(data_root), run_dir) == 0  # redoes only the test
    assert scalar_points(run_dir) == before and len(before["test/accuracy"]) == 1


def test_a_run_killed_while_writing_its_first_checkpoint_reruns_with_each_point_once(data_root, tmp_path):
    run_dir = tmp_path / "run"
    assert training.fit(tiny_cfg(data_root, "train.stop_after_epochs=1"), run_dir) == 0
    # What a SIGKILL inside that checkpoint's write leaves: epoch 1's points, a 0-byte temp file, no checkpoint.
    (run_dir / "checkpoint.pt").unlink()
    (run_dir / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"")
    assert training.fit(tiny_cfg(data_root), run_dir) == 0  # starts afresh
    assert not list(run_dir.glob(".*.tmp"))
    points = scalar_points(run_dir)
    steps = [step for step, _ in points["val/accuracy"]]
    assert len(steps) == 2 and steps[0] < steps[1]  # epoch 1 once, then epoch 2
    assert all(len({step for step, _ in values}) == len(values) for values in points.values())


def test_a_run_that_diverged_before_its_first_checkpoint_can_be_rerun_in_place(data_root, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    run_dir = tmp_path / "run"
    assert run_in_process("train.py", *tiny_args(data_root, "train.lr=1e30", "train.epochs=1"), f"hydra.run.dir={run_dir}") == 1
    assert capsys.readouterr().err.strip().startswith("Error: training ")  # loss is nan / diverged, one line
    assert (run_dir / "config.yaml").is_file() and not (run_dir / "checkpoint.pt").exists()
    # Nothing to continue, so nothing to protect: the rerun with a sane lr is not refused.
    assert run_in_process("train.py", *tiny_args(data_root, "train.epochs=1"), f"hydra.run.dir={run_dir}") == 0
    assert "lr: 0.002" in (run_dir / "config.yaml").read_text() and (run_dir / "metrics.json").is_file()


def test_evaluate_refuses_a_training_run_directory(finished_run, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    before = record_bytes(finished_run)
    assert run_in_process("evaluate.py", f"ckpt={finished_run}", f"hydra.run.dir={finished_run}") == 2
    assert capsys.readouterr().err.strip() == (
        f"Error: hydra.run.dir='{finished_run}': a run directory of train.py (it holds checkpoint.pt); evaluate.py "
        f"would overwrite its records there; pass another hydra.run.dir, e.g. hydra.run.dir={finished_run}/evaluate"
    )
    assert record_bytes(finished_run) == before and not (finished_run / ".hydra").exists()


def test_train_refuses_an_evaluation_run_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    (tmp_path / "results.csv").write_text("policy\n")
    assert run_in_process("train.py", "model=tiny", f"hydra.run.dir={tmp_path}") == 2
    assert "a run directory of evaluate.py (it holds results.csv)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "results.csv"]


@pytest.mark.parametrize("script,args", [("train.py", ["model=tiny"]), ("evaluate.py", ["ckpt=x"])])
def test_an_empty_run_directory_is_refused_instead_of_writing_into_the_current_one(script, args, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert run_in_process(script, *args, "hydra.run.dir=''") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: hydra.run.dir='': must name a directory")
    assert list(tmp_path.iterdir()) == []


def test_a_run_directory_under_a_regular_file_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    (tmp_path / "notes.txt").write_text("a file\n")
    assert run_in_process("train.py", "model=tiny", f"hydra.run.dir={tmp_path / 'notes.txt' / 'run'}") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "cannot create the run directory (Not a directory" in lines[0]
