"""End to end through the real entry points on real Fashion-MNIST (a few hundred images).

train.py -> checkpoint, config, metrics, TensorBoard; evaluate.py -> results table and plot;
resume equality; evaluation determinism and independence of the batch size.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import REPO, check_ok, cli_env, run_cli

from dmoe_torch.output.report import RESULT_COLUMNS

# A tiny model on 400 training / 200 test images: each run takes seconds.
TINY_RUN = (
    "data.limit_train=400",
    "data.limit_test=200",
    "data.batch_size=64",
    "train.epochs=2",
    "model=tiny",
    "model.d_model=32",
    "model.num_experts=4",
    "train.warmup_steps=2",
    "device=cpu",
)
EVAL_ARGS = (
    "eval.policies=[topk@2,dense,des,jesa]",
    "eval.gammas=[0.3,0.9]",
    "eval.channel_draws=2",
    "data.limit_test=100",
    "device=cpu",
    "progress=false",
)
EVAL_ROWS = 2 + 2 * 2  # topk@2, dense, then des and jesa at two gammas


def train(run_dir: Path, data_root: str, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("train.py", *TINY_RUN, f"data.root={data_root}", f"hydra.run.dir={run_dir}", "progress=false", *extra)


def evaluate(ckpt: Path, run_dir: Path, data_root: str, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("evaluate.py", f"ckpt={ckpt}", *EVAL_ARGS, f"data.root={data_root}", f"hydra.run.dir={run_dir}", *extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root) -> Path:
    """An uninterrupted 2-epoch run."""
    run_dir = tmp_path_factory.mktemp("train")
    check_ok(train(run_dir, data_root))
    return run_dir


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, trained, data_root) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("eval")
    result = check_ok(evaluate(trained / "checkpoint.pt", run_dir, data_root, "data.batch_size=100"))
    return run_dir, result


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_train_writes_checkpoint_config_metrics_and_tensorboard(trained):
    checkpoint = torch.load(trained / "checkpoint.pt", map_location="cpu", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "epoch", "config", "metrics", "rng"):
        assert key in checkpoint
    assert checkpoint["epoch"] == 2 and checkpoint["step_in_epoch"] == 0
    assert checkpoint["config"]["model"]["d_model"] == 32
    assert (trained / "config.yaml").read_text().count("d_model: 32") == 1

    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["epochs_completed"] == 2 and len(metrics["history"]) == 2
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0 and metrics["test"]["inputs"] == 200
    # Two epochs on 320 images beat chance (10 classes) by far.
    assert metrics["test"]["accuracy"] > 0.3
    assert metrics["test"]["energy_uj"] > 0
    assert metrics["history"][1]["train"]["loss"] < metrics["history"][0]["train"]["loss"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(trained.glob("events.out.tfevents.*"))
    assert len(events) == 1  # one SummaryWriter per run
    accumulator = EventAccumulator(str(trained))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    expected = {
        "train/loss",
        "train/accuracy",
        "train/lr",
        "val/loss",
        "val/accuracy",
        "router/energy_uj",
        "router/experts_per_token",
        "router/outage_rate",
        "router/violation_rate",
        "router/drop_rate",
        "router/gate_entropy",
        *(f"router/utilisation_{k}" for k in range(4)),
    }
    assert expected <= tags, expected - tags
    assert len(accumulator.Scalars("val/accuracy")) == 2


def test_evaluate_writes_table_csv_and_plot(evaluated):
    run_dir, result = evaluated
    rows = read_rows(run_dir / "results.csv")
    assert len(rows) == EVAL_ROWS
    columns = tuple(rows[0].keys())
    assert columns[: len(RESULT_COLUMNS)] == RESULT_COLUMNS
    # then the per-MoE-layer breakdown (the tiny model has two MoE layers)
    assert {"layer1_energy_uj", "layer2_energy_uj", "layer1_experts_per_token"} <= set(columns[len(RESULT_COLUMNS) :])
    assert [r["policy"] for r in rows] == ["topk@2", "dense", "des", "des", "jesa", "jesa"]
    assert [r["gamma"] for r in rows] == ["", "", "0.3", "0.9", "0.3", "0.9"]
    for row in rows:
        assert 0.0 <= float(row["accuracy_mean"]) <= 1.0
        assert float(row["energy_uj_mean"]) > 0
        assert int(row["draws"]) == 2 and int(row["inputs"]) == 100
    by_setting = {(r["policy"], r["gamma"]): r for r in rows}
    dense_energy = float(by_setting[("dense", "")]["energy_uj_mean"])
    assert float(by_setting[("des", "0.3")]["energy_uj_mean"]) <= dense_energy
    assert float(by_setting[("jesa", "0.3")]["energy_uj_mean"]) <= float(by_setting[("des", "0.3")]["energy_uj_mean"]) + 1e-9
    assert float(by_setting[("topk@2", "")]["experts_per_token"]) <= 2.0

    table = (run_dir / "results.md").read_text()
    assert table.count("\n| des | 0.3 |") == 2 and "| jesa | 0.9 |" in table  # main and per-layer tables
    assert "| des | 0.3 |" in result.stdout  # the table is printed
    assert (run_dir / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(run_dir.glob("events.out.tfevents.*"))


def test_evaluate_is_deterministic_and_independent_of_batch_size_and_workers(evaluated, trained, data_root, tmp_path):
    run_dir, _ = evaluated
    reference = (run_dir / "results.csv").read_text()
    again = check_ok(evaluate(trained / "checkpoint.pt", tmp_path / "again", data_root, "data.batch_size=100"))
    assert (tmp_path / "again" / "results.csv").read_text() == reference, again.stderr[-2000:]
    # Channel draws are keyed by sample id, so routing and energies do not depend on the batch
    # size.  The CPU kernels' float rounding does (by ~1e-7), which reaches the mean loss and
    # the branch-and-bound node counts but no decision in this test.  Two loader workers
    # deliver the same batches, so they change nothing either.
    check_ok(
        evaluate(trained / "checkpoint.pt", tmp_path / "small_batches", data_root, "data.batch_size=50", "data.num_workers=2")
    )
    small = read_rows(tmp_path / "small_batches" / "results.csv")
    for row, ref in zip(small, read_rows(run_dir / "results.csv"), strict=True):
        for column in RESULT_COLUMNS:
            if column in ("loss", "nodes"):
                tolerance = 1e-5 if column == "loss" else 0.1  # a search may take another path
                assert float(row[column]) == pytest.approx(float(ref[column]), rel=tolerance), column
            else:
                assert row[column] == ref[column], (column, row, ref)


def assert_same_run(run_a: Path, run_b: Path) -> None:
    """Identical final weights, optimizer state and metrics (timings aside)."""
    a = torch.load(run_a / "checkpoint.pt", map_location="cpu", weights_only=True)
    b = torch.load(run_b / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(state_a["exp_avg"], state_b["exp_avg"])
    metrics_a = json.loads((run_a / "metrics.json").read_text())
    metrics_b = json.loads((run_b / "metrics.json").read_text())
    assert metrics_a["test"] == metrics_b["test"]
    for epoch_a, epoch_b in zip(metrics_a["history"], metrics_b["history"], strict=True):
        assert epoch_a["train"] == epoch_b["train"] and epoch_a["val"] == epoch_b["val"]


def scalar_points(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar of a run directory as TensorBoard shows it (after its purges):
    tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_resume_after_one_epoch_matches_uninterrupted_run(trained, data_root, tmp_path):
    # The 2-epoch schedule, stopped after epoch 1 (as a time-limited job would be)...
    stopped = check_ok(train(tmp_path, data_root, "train.stop_after_epochs=1"))
    assert "Stopping after epoch 1 of 2" in stopped.stdout  # logged (console and train.log)
    first = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert (first["epoch"], first["step_in_epoch"]) == (1, 0)
    assert not (tmp_path / "metrics.json").exists()
    # ...then the same command in the same run directory resumes from checkpoint.pt.
    resumed = check_ok(train(tmp_path, data_root))
    assert "Resuming" in resumed.stdout
    assert_same_run(trained, tmp_path)
    # The resumed run keeps the first epoch's TensorBoard points (it purged from the step after
    # its checkpoint's, where they are logged) and shows each point once, as the uninterrupted one.
    points = scalar_points(tmp_path)
    assert len(points["val/accuracy"]) == 2
    assert points == scalar_points(trained)


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_matches(trained, data_root, tmp_path):
    args = [*TINY_RUN, f"data.root={data_root}", f"hydra.run.dir={tmp_path}", "progress=true"]
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    seen = b""
    # The first epoch's progress bar appears once the signal handlers are installed.
    while b"epoch 1/2" not in seen:
        chunk = process.stdout.read1(4096)
        if not chunk:
            break
        seen += chunk
    process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=600)
    output = (seen + rest).decode(errors="replace")
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "Traceback" not in output
    assert "Stopped by SIGTERM" in output and "checkpoint saved" in output
    assert "Stopped by SIGTERM" in (tmp_path / "train.log").read_text()
    checkpoint = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] < 10  # stopped before the end of training (2 x 5 steps)
    assert not (tmp_path / "metrics.json").exists()

    resumed = check_ok(train(tmp_path, data_root))
    assert "Resuming" in resumed.stdout
    assert_same_run(trained, tmp_path)
    # Resumed mid-epoch: the epoch's train/* points span the same steps as the uninterrupted run's.
    assert scalar_points(tmp_path) == scalar_points(trained)


@pytest.mark.parametrize("model", ["tiny_convmoe", "tiny_vmoe"])
def test_token_models_train_and_evaluate_end_to_end(tmp_path, data_root, model):
    """Both token-routed models (every token of every image routed) train and evaluate through
    the entry points; jesa spends less than top-2 and `none` nothing."""
    run = tmp_path / "run"
    check_ok(
        run_cli(
            "train.py",
            f"model={model}",
            "data.limit_train=300",
            "data.limit_test=100",
            "data.batch_size=50",
            "train.epochs=1",
            "train.warmup_steps=2",
            "device=cpu",
            "progress=false",
            f"data.root={data_root}",
            f"hydra.run.dir={run}",
        )
    )
    check_ok(
        run_cli(
            "evaluate.py",
            f"ckpt={run}/checkpoint.pt",
            "eval.policies=[none,topk@2,jesa]",
            "eval.gammas=[0.5]",
            "eval.channel_draws=1",
            "data.limit_test=100",
            "device=cpu",
            "progress=false",
            f"data.root={data_root}",
            f"hydra.run.dir={run}/eval",
        )
    )
    rows = {row["policy"]: row for row in read_rows(run / "eval" / "results.csv")}
    assert set(rows) == {"none", "topk@2", "jesa"}
    assert float(rows["none"]["energy_uj_mean"]) == 0.0
    assert float(rows["topk@2"]["energy_uj_mean"]) > float(rows["jesa"]["energy_uj_mean"]) > 0.0
