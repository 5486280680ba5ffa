"""runtime=distributed: experts on their own processes (gloo on localhost) against runtime=local.

A 3-process group (coordinator + 2 expert workers) trains the tiny model for a few steps on real
Fashion-MNIST images and evaluates it: the losses, routing decisions, gradient norms, weights,
optimizer state and evaluation results equal the in-process run's; a checkpoint state taken
from either runtime continues on the other.  A worker that dies or hangs stops the coordinator
with one line naming it, the last checkpoint intact, and a rerun resumes.  Bad runtime
configs and world sizes fail before any work.  Every process is bounded in time.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from support import REPO

from dmoe_torch.config import ConfigError
from dmoe_torch.runtime import RuntimeSettings, runtime_settings
from dmoe_torch.runtime.distributed import Coordinator
from dmoe_torch.runtime.transport import Session, hosted_experts, worker_of_expert

PROCESS_TIMEOUT = 240  # seconds any spawned group may take before the test fails (and kills it)
TINY = (
    "model=tiny",
    "data.limit_train=320",
    "data.limit_test=100",
    "data.batch_size=64",
    "train.warmup_steps=2",
    "device=cpu",
    "progress=false",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# One compute thread in every process.  NUMBA_NUM_THREADS too: numba's OpenMP pool (channel
# draws, des, jesa) otherwise resets the process's OpenMP thread count, torch's included, to
# the number of CPUs, and the coordinator's float rounding would then differ from the workers'.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}


def torchrun_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The variables torchrun sets, for a process started by hand; one compute thread."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return {
        **env,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        **ONE_THREAD,
    }


# ---------------------------------------------------------------------------------------------
# Placement and bad input (no process group)


def test_expert_k_lives_on_worker_one_plus_k_mod_w():
    for K, W in ((4, 1), (4, 2), (5, 3), (8, 8)):
        hosted = [hosted_experts(w, K, W) for w in range(1, W + 1)]
        assert sorted(itertools.chain(*hosted)) == list(range(K))  # a partition of the experts
        for w, experts in enumerate(hosted, start=1):
            assert all(worker_of_expert(k, W) == w == 1 + k % W for k in experts)


@pytest.mark.parametrize(
    "env, section, message",
    [
        ({}, {"name": "distributed", "backend": "auto", "timeout_s": 5}, "needs torchrun"),
        ({"WORLD_SIZE": "1"}, {"name": "distributed", "backend": "auto", "timeout_s": 5}, "WORLD_SIZE=1 leaves no expert worker"),
        (
            {"WORLD_SIZE": "6"},
            {"name": "distributed", "backend": "auto", "timeout_s": 5},
            "5 expert workers for model.num_experts=4",
        ),
        ({"WORLD_SIZE": "3"}, {"name": "local"}, "runtime=local with WORLD_SIZE=3"),
        (
            {"WORLD_SIZE": "3"},
            {"name": "distributed", "backend": "auto", "timeout_s": 5, "timeout": 5},
            "runtime.timeout: unknown key",
        ),
        ({"WORLD_SIZE": "3"}, {"name": "distributed", "backend": "mpi", "timeout_s": 5}, "runtime.backend='mpi'"),
        ({"WORLD_SIZE": "3"}, {"name": "distributed", "backend": "gloo", "timeout_s": 0}, "runtime.timeout_s=0"),
        ({"WORLD_SIZE": "3"}, {"name": "remote"}, "runtime.name='remote'"),
    ],
)
def test_bad_runtime_config_or_world_size_is_one_clear_error(monkeypatch, env, section, message):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    if env:
        env = {"RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", **env}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cfg = OmegaConf.create({"model": {"num_experts": 4}, "runtime": section})
    with pytest.raises(ConfigError) as info:
        runtime_settings(cfg)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_good_runtime_configs(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert runtime_settings(OmegaConf.create({"runtime": {"name": "local"}})) == RuntimeSettings()
    assert runtime_settings(OmegaConf.create({})).name == "local"
    for name, value in {"RANK": "0", "WORLD_SIZE": "5", "MASTER_ADDR": "h", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    cfg = OmegaConf.create({"model": {"num_experts": 4}, "runtime": {"name": "distributed", "backend": "gloo", "timeout_s": 7}})
    assert runtime_settings(cfg) == RuntimeSettings("distributed", "gloo", 7.0)


def test_more_workers_than_the_checkpoints_experts_is_refused_before_any_exchange():
    """evaluate.py learns K from the checkpoint: the coordinator checks it when attaching."""
    from dmoe_torch.models import DMoEClassifier

    session = Session(RuntimeSettings("distributed", "gloo", 5.0), rank=0, world_size=6, local_rank=0)  # never started
    model = DMoEClassifier(1, 10, 28, d_model=16, num_experts=4, num_moe_layers=1)
    with pytest.raises(ConfigError, match="5 expert workers for model.num_experts=4"):
        Coordinator(session).attach(model)
    assert "run_experts" not in model.moe_layers[0].__dict__  # the model is left local


def test_distributed_without_torchrun_exits_2_with_one_line_and_writes_nothing(tmp_path, data_root):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "HYDRA_FULL_ERROR")}
    result = subprocess.run(
        [sys.executable, "train.py", *TINY, f"data.root={data_root}", "runtime=distributed", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        env={**env, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: runtime=distributed needs torchrun"), result.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Distributed equals local (3 processes: coordinator + 2 workers)


def _run(cfg, model, optimizer, scheduler, batches, channel, specs, *, clip_norms: list, masks: list) -> list[float]:
    """Train on ``batches`` with the real training step; return the losses."""
    from dmoe_torch.channel.links import train_stream
    from dmoe_torch.engine import training
    from dmoe_torch.engine.training import EpochProgress, train_one_epoch

    losses: list[float] = []
    clip = training.clip_grad_norm
    training.clip_grad_norm = lambda m, c: clip_norms.append(float(clip(m, c)))
    hooks = [
        layer.register_forward_hook(lambda mod, args, out: masks.append((out.selection.mask, out.selection.failed)))
        for layer in model.moe_layers
    ]
    try:
        train_one_epoch(
            model,
            batches,
            optimizer,
            scheduler,
            channel=channel,
            specs=specs,
            stream=train_stream(0),
            device=torch.device("cpu"),
            aux_loss_coef=0.01,
            grad_clip=float(cfg.train.grad_clip),
            generator=None,
            progress=EpochProgress(),
            on_step=lambda progress, loss: losses.append(loss),
        )
    finally:
        training.clip_grad_norm = clip
        for hook in hooks:
            hook.remove()
    return losses


def _equality_job(cfg, out_dir):
    """Rank 0: the same steps and evaluations local, then distributed, then resumed across runtimes."""
    from dmoe_torch import runtime
    from dmoe_torch.channel.links import eval_stream
    from dmoe_torch.data import make_loader
    from dmoe_torch.engine.build import build_channel, build_model, router_specs
    from dmoe_torch.engine.evaluation import dataset_and_info, evaluate, routing_generator
    from dmoe_torch.engine.training import lr_lambda

    torch.manual_seed(0)
    train_ds, _, test_ds, info = dataset_and_info(cfg, limit_train=cfg.data.limit_train)
    batches = list(make_loader(train_ds, 64, shuffle=True, seed=1))[:4]
    test_loader = make_loader(test_ds, 50, shuffle=False, seed=0)
    channel = build_channel(cfg)
    specs = router_specs(cfg, "router", channel.failure_energy_j)
    base = build_model(cfg, info)

    def fresh():
        model = copy.deepcopy(base)
        optimizer = torch.optim.AdamW(model.parameters(), lr=float(cfg.train.lr), weight_decay=float(cfg.train.weight_decay))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(8, 2))
        return model, optimizer, scheduler

    def evaluations(model):
        results = []
        # (Not des / jesa here: their numba thread pool changes torch's thread count, and with
        # it the float rounding of later steps in this process.)
        for policy, k in (("topk", 1), ("dense", 2), ("channel_topk", 2)):
            eval_specs = [dataclasses.replace(s, policy=policy, k=k) for s in specs]
            results.append(
                evaluate(
                    model,
                    test_loader,
                    channel=channel,
                    specs=eval_specs,
                    stream=eval_stream(0),
                    device=torch.device("cpu"),
                    generator=routing_generator(0, eval_stream(0)),
                )
            )
        return results

    results = {}
    for name in ("local", "distributed"):
        model, optimizer, scheduler = fresh()
        if name == "distributed":
            runtime.attach_experts(model, optimizer, payload_bits=channel.payload_bits)
        record = {"clip_norms": [], "masks": []}
        losses = _run(cfg, model, optimizer, scheduler, batches[:2], channel, specs, **record)
        halfway = {
            "model": copy.deepcopy(model.state_dict()),
            "optimizer": copy.deepcopy(optimizer.state_dict()),
            "scheduler": scheduler.state_dict(),
        }
        losses += _run(cfg, model, optimizer, scheduler, batches[2:], channel, specs, **record)
        results[name] = {
            "losses": losses,
            **record,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "halfway": halfway,
            "eval": evaluations(model),
        }
        if name == "distributed":
            results[name]["exchange"] = copy.deepcopy(runtime._active.stats.layers)
    # Resume across runtimes: a local checkpoint state continues distributed, and vice versa.
    for source, name in (("local", "local_to_distributed"), ("distributed", "distributed_to_local")):
        model, optimizer, scheduler = fresh()
        if name == "local_to_distributed":
            runtime.attach_experts(model, optimizer)  # attached first: loading pushes the state
        half = results[source]["halfway"]
        model.load_state_dict(half["model"])
        optimizer.load_state_dict(half["optimizer"])
        scheduler.load_state_dict(half["scheduler"])
        if name == "distributed_to_local":
            runtime._active.detach()  # the previous attachment ends; this model stays local
        losses = _run(cfg, model, optimizer, scheduler, batches[2:], channel, specs, clip_norms=[], masks=[])
        results[name] = {"losses": losses, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
    torch.save(results, Path(out_dir) / "results.pt")
    return 0


def _rank_main(rank: int, world_size: int, port: int, overrides: list[str], out_dir: str) -> None:
    os.environ.update(
        {
            k: v
            for k, v in torchrun_env(rank, world_size, port).items()
            if k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        }
    )
    torch.set_num_threads(1)
    from hydra import compose, initialize_config_dir

    from dmoe_torch.runtime import launch

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    status = launch(cfg, _equality_job, out_dir)
    sys.exit(int(status or 0))


def spawn_group(world_size: int, overrides: list[str], out_dir: Path) -> list[int]:
    """Start ranks 0..world_size-1 of :func:`_rank_main`; their exit codes (killed at the timeout)."""
    context = mp.get_context("spawn")
    port = free_port()
    processes = [
        context.Process(target=_rank_main, args=(rank, world_size, port, overrides, str(out_dir))) for rank in range(world_size)
    ]
    saved = {name: os.environ.get(name) for name in ONE_THREAD}
    os.environ.update(ONE_THREAD)  # spawned processes start with this environment
    try:
        for process in processes:
            process.start()
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value
    for process in processes:
        process.join(PROCESS_TIMEOUT)
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    return [process.exitcode for process in processes]


@pytest.fixture(scope="module")
def equality_results(tmp_path_factory, data_root) -> dict:
    out_dir = tmp_path_factory.mktemp("equality")
    overrides = [
        *TINY,
        f"data.root={data_root}",
        "runtime=distributed",
        "runtime.backend=gloo",
        "runtime.timeout_s=60",
        "train.grad_clip=0.05",
        "router=topk",
        "router.k=2",
    ]
    assert spawn_group(3, overrides, out_dir) == [0, 0, 0]
    return torch.load(out_dir / "results.pt", weights_only=False)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def _assert_same_optimizer(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert sorted(a["state"]) == sorted(b["state"])  # the same parameters have state
    for index, state in a["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(value, b["state"][index][name], rtol=0, atol=1e-6)


def test_distributed_training_equals_local(equality_results):
    local, dist = equality_results["local"], equality_results["distributed"]
    assert len(local["losses"]) == 4
    assert dist["losses"] == pytest.approx(local["losses"], abs=1e-5)
    # Routing decisions (every layer, every step) and the gradient norms being clipped.
    assert len(local["masks"]) == len(dist["masks"]) == 4 * 2
    for (mask_a, failed_a), (mask_b, failed_b) in zip(local["masks"], dist["masks"], strict=True):
        assert torch.equal(mask_a, mask_b) and torch.equal(failed_a, failed_b)
    assert dist["clip_norms"] == pytest.approx(local["clip_norms"], rel=1e-6)
    assert min(local["clip_norms"]) > 0.05  # grad_clip=0.05 was active at every step
    # The gathered expert weights and AdamW state form the local checkpoint's state.
    _assert_same_state(local["model"], dist["model"])
    _assert_same_optimizer(local["optimizer"], dist["optimizer"])
    assert not torch.equal(
        local["model"]["moe_layers.0.experts.1.fc1.weight"], local["halfway"]["model"]["moe_layers.0.experts.1.fc1.weight"]
    )  # the experts trained


def test_distributed_evaluation_equals_local(equality_results):
    local, dist = equality_results["local"]["eval"], equality_results["distributed"]["eval"]
    assert [r["inputs"] for r in local] == [100, 100, 100]
    assert dist == local  # accuracy, loss, energy, rates: identical


def test_checkpoint_state_resumes_across_runtimes(equality_results):
    local = equality_results["local"]
    for name in ("local_to_distributed", "distributed_to_local"):
        resumed = equality_results[name]
        assert resumed["losses"] == pytest.approx(local["losses"][2:], abs=1e-5)
        _assert_same_state(local["model"], resumed["model"])
        _assert_same_optimizer(local["optimizer"], resumed["optimizer"])


def test_bytes_exchanged_are_the_routed_rows(equality_results):
    """Forward: every effective (row, expert) link sends d_model float32 values each way;
    backward the same for the training steps only."""
    dist = equality_results["distributed"]
    d_model, element = 32, 4
    for layer in (0, 1):
        train_rows = sum(int((mask & ~failed).sum()) for mask, failed in dist["masks"][layer::2])
        counters = dist["exchange"][layer]
        assert counters["backward_sent"] == counters["backward_received"] == train_rows * d_model * element
        assert counters["rows"] > train_rows  # the evaluations exchanged rows too
        assert counters["forward_sent"] == counters["forward_received"] == counters["rows"] * d_model * element


# ---------------------------------------------------------------------------------------------
# A worker that dies or hangs (the entry points, processes started as torchrun would)

FAULTY_WORKER = """
import os, sys, time
from dmoe_torch.cli import serve_if_worker
from dmoe_torch.runtime import worker
forwards = int(os.environ["FAIL_AFTER_FORWARDS"])
serve_forward = worker.Worker.forward
def forward(self, header):
    global forwards
    forwards -= 1
    if forwards < 0:
        if os.environ["FAILURE"] == "dies":
            os._exit(1)
        time.sleep(3600)
    serve_forward(self, header)
worker.Worker.forward = forward
config_dir = sys.argv.pop(1)
serve_if_worker("train", sys.argv[1:], config_dir=config_dir)
"""


@pytest.fixture(scope="module")
def one_epoch_checkpoint(tmp_path_factory, data_root) -> Path:
    """A local run stopped after epoch 1 of 2 (its checkpoint is what a rerun continues)."""
    run_dir = tmp_path_factory.mktemp("first_epoch")
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            *TINY,
            f"data.root={data_root}",
            "train.epochs=2",
            "train.stop_after_epochs=1",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        env=torchrun_env(0, 1, 0) | {"WORLD_SIZE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("failure", ["dies", "hangs"])
def test_dead_or_hung_worker_stops_the_coordinator_with_one_line(tmp_path, data_root, one_epoch_checkpoint, failure):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("checkpoint.pt", "config.yaml"):
        (run_dir / name).write_bytes((one_epoch_checkpoint / name).read_bytes())
    before = _digest(run_dir / "checkpoint.pt")
    args = [
        *TINY,
        f"data.root={data_root}",
        "train.epochs=2",
        "train.stop_after_epochs=1",
        f"hydra.run.dir={run_dir}",
        "runtime=distributed",
        f"runtime.timeout_s={60 if failure == 'dies' else 5}",
    ]
    port = free_port()
    starts = [
        [sys.executable, "train.py", *args],
        [sys.executable, "train.py", *args],
        [sys.executable, "-c", FAULTY_WORKER, str(REPO / "conf"), *args],
    ]
    env = {"FAIL_AFTER_FORWARDS": "3", "FAILURE": failure}
    processes = [
        subprocess.Popen(
            start, cwd=REPO, env=torchrun_env(rank, 3, port) | env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for rank, start in enumerate(starts)
    ]
    try:
        _, stderr = processes[0].communicate(timeout=PROCESS_TIMEOUT)
    finally:
        for process in processes:
            process.kill()
            process.communicate()
    assert processes[0].returncode == 1
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert "expert worker 2 (rank 2, experts 1, 3 of every MoE layer)" in errors[0]
    assert ("closed its connection" if failure == "dies" else "did not answer within runtime.timeout_s=5 s") in errors[0]
    assert _digest(run_dir / "checkpoint.pt") == before  # the last checkpoint is intact
    assert not (run_dir / "metrics.json").exists()

    if failure == "dies":  # a rerun (here on the local runtime) resumes from that checkpoint and finishes
        result = subprocess.run(
            [sys.executable, "train.py", *args[:-2]],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=PROCESS_TIMEOUT,
            env=torchrun_env(0, 1, 0),
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Resuming from" in result.stdout + result.stderr
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["epochs_completed"] == 2 and len(metrics["history"]) == 2


@pytest.mark.parametrize(
    "frame, policies, rows",
    [
        ("token", "[topk@1,topk@2,dense,channel_topk@2]", 4),
        ("image", "[topk@2,topk_capacity@2,jesa]", 3),  # channel.frame=image: the P3 policies
    ],
)
def test_evaluate_py_distributed_writes_the_local_table(tmp_path, data_root, one_epoch_checkpoint, frame, policies, rows):
    """evaluate.py with its experts on 2 workers (processes started as torchrun would) writes
    the same results.csv as in process, from a checkpoint written by a local run."""
    args = [
        f"ckpt={one_epoch_checkpoint}",
        f"eval.policies={policies}",
        "eval.gammas=[0.5]",
        "eval.channel_draws=2",
        "data.limit_test=100",
        f"data.root={data_root}",
        "device=cpu",
        "progress=false",
        f"channel.frame={frame}",
    ]
    local = subprocess.run(
        [sys.executable, "evaluate.py", *args, f"hydra.run.dir={tmp_path / 'local'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        env=torchrun_env(0, 1, 0),
    )
    assert local.returncode == 0, local.stderr[-3000:]
    port = free_port()
    distributed = [*args, f"hydra.run.dir={tmp_path / 'distributed'}", "runtime=distributed"]
    processes = [
        subprocess.Popen(
            [sys.executable, "evaluate.py", *distributed],
            cwd=REPO,
            env=torchrun_env(rank, 3, port),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for rank in range(3)
    ]
    try:
        outputs = [process.communicate(timeout=PROCESS_TIMEOUT) for process in processes]
    finally:
        for process in processes:
            process.kill()
    assert [process.returncode for process in processes] == [0, 0, 0], outputs[0][1][-3000:]
    table = (tmp_path / "local" / "results.csv").read_text()
    assert table.count("\n") == rows + 1 and (tmp_path / "distributed" / "results.csv").read_text() == table
    exchange = json.loads((tmp_path / "distributed" / "exchange.json").read_text())
    assert [row["layer"] for row in exchange["layers"]] == [0, 1] and exchange["layers"][0]["backward_sent"] == 0
