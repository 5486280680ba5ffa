"""Robustness of the engine: stop signals, non-finite losses, unreachable experts, atomic
writes and RNG checkpointing (in process, on tiny synthetic data unless stated)."""

from __future__ import annotations

import os
import random
import signal
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from dmoe_torch.channel import ChannelConfig, WirelessChannel
from dmoe_torch.cli import report_errors
from dmoe_torch.data import DEBIAN_FASHION_MNIST_DIR
from dmoe_torch.engine import training as engine
from dmoe_torch.engine.checkpoint import capture_rng_state, restore_rng_state
from dmoe_torch.engine.evaluation import evaluate
from dmoe_torch.engine.training import EpochProgress, NonFiniteLossError, StopSignal, lr_lambda, train_one_epoch
from dmoe_torch.models import DMoEClassifier
from dmoe_torch.moe import MoELayer, RouterSpec, drop_links
from dmoe_torch.selection import route
from dmoe_torch.utils import atomic_write, atomic_write_text

CONF = str(Path(__file__).resolve().parents[2] / "conf")

K, L, D = 4, 2, 16


def tiny_model(seed: int = 0) -> DMoEClassifier:
    torch.manual_seed(seed)
    return DMoEClassifier(1, 10, 28, d_model=D, num_experts=K, num_moe_layers=L)


def synthetic_batches(num_batches: int = 2, batch: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 1, 28, 28, generator=generator),
            torch.randint(0, 10, (batch,), generator=generator),
            torch.arange(i * batch, (i + 1) * batch),
        )
        for i in range(num_batches)
    ]


def spec_for(policy: str, failure_energy: float) -> list[RouterSpec]:
    return [RouterSpec(policy, gamma=0.7, k=2, failure_energy=failure_energy)] * L


# --------------------------------------------------------------------------------------------
# Signals


def test_stop_signal_sets_a_flag_then_aborts_on_the_second_signal():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


def test_training_stops_after_the_step_in_which_a_signal_arrives():
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(10, 0))
    channel = WirelessChannel(ChannelConfig(), K, D, seed=0)
    progress = EpochProgress()
    with StopSignal() as stop:
        finished = train_one_epoch(
            model,
            synthetic_batches(4),
            optimizer,
            scheduler,
            channel=channel,
            specs=spec_for("topk", channel.failure_energy_j),
            stream=0,
            device=torch.device("cpu"),
            aux_loss_coef=0.01,
            grad_clip=1.0,
            generator=None,
            progress=progress,
            stop=stop,
            on_step=lambda p, loss: os.kill(os.getpid(), signal.SIGINT) if p.steps == 2 else None,
        )
    assert not finished
    assert progress.steps == 2 and progress.inputs == 16
    assert scheduler.last_epoch == 2  # two optimizer/scheduler steps, none after the signal


# --------------------------------------------------------------------------------------------
# Link dropout


def _routed(rows: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.softmax(torch.randn(rows, K, generator=generator), 1)
    costs = torch.rand(rows, K, 6, generator=generator, dtype=torch.float64)
    return scores, route("topk", scores, costs, k=2)


def test_drop_links_drops_at_the_rate_but_never_a_rows_last_expert():
    scores, selection = _routed(20000)
    dropped = drop_links(selection, scores, 0.3, torch.Generator().manual_seed(7))
    effective = dropped.mask & ~dropped.failed
    assert torch.equal(dropped.mask, selection.mask) and torch.equal(dropped.energy, selection.energy)
    assert effective.any(1).all()  # every routed row keeps an expert
    assert not (effective & ~selection.mask).any()
    # Two experts per row: both survive w.p. 0.7^2; otherwise one, the best-scored one when both were drawn.
    both = effective.sum(1) == 2
    assert abs(both.double().mean().item() - 0.49) < 0.015
    best = scores.masked_fill(~selection.mask, -1).argmax(1)
    kept_best = effective[torch.arange(len(best)), best]
    assert abs(kept_best[~both].double().mean().item() - 0.3 / 0.51) < 0.02  # P(best kept | one kept) = (0.09 + 0.21) / 0.51
    again = drop_links(selection, scores, 0.3, torch.Generator().manual_seed(7))
    assert torch.equal(again.failed, dropped.failed)


@pytest.mark.parametrize("link_dropout", [0.0, 0.5])
def test_link_dropout_acts_in_training_only(link_dropout):
    torch.manual_seed(0)
    layer = MoELayer(D, K, link_dropout=link_dropout)
    channel = WirelessChannel(ChannelConfig(), K, D, seed=0)
    spec = RouterSpec("topk", k=2, failure_energy=channel.failure_energy_j)
    h, costs = torch.randn(4000, D), channel.costs(torch.arange(4000), 0, 0)
    train_sel = layer(h, costs, spec, generator=torch.Generator().manual_seed(7)).selection
    layer.eval()
    eval_sel = layer(h, costs, spec, generator=torch.Generator().manual_seed(7)).selection
    assert torch.equal(train_sel.mask, eval_sel.mask)
    train_experts = (train_sel.mask & ~train_sel.failed).sum(1).double().mean().item()
    eval_experts = (eval_sel.mask & ~eval_sel.failed).sum(1).double().mean().item()
    assert eval_experts > 1.9
    # p = 0.5 on two experts: both kept w.p. 1/4, else one (never none): 1.25 on average
    assert abs(train_experts - (eval_experts if link_dropout == 0 else 1.25)) < 0.05


# --------------------------------------------------------------------------------------------
# Non-finite loss


class NaNModel(DMoEClassifier):
    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * float("nan")
        return output


def test_non_finite_loss_stops_before_the_optimizer_step():
    torch.manual_seed(0)
    model = NaNModel(1, 10, 28, d_model=D, num_experts=K, num_moe_layers=L)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(10, 0))
    channel = WirelessChannel(ChannelConfig(), K, D, seed=0)
    with pytest.raises(NonFiniteLossError, match="loss is nan"):
        train_one_epoch(
            model,
            synthetic_batches(),
            optimizer,
            scheduler,
            channel=channel,
            specs=spec_for("topk", 0.0),
            stream=0,
            device=torch.device("cpu"),
            aux_loss_coef=0.01,
            grad_clip=None,
            generator=None,
            progress=EpochProgress(),
        )
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name


def test_non_finite_loss_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    if not (DEBIAN_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed")
    overrides = [
        f"data.root={tmp_path}",
        "data.limit_train=200",
        "data.limit_test=50",
        "data.batch_size=40",
        "model=tiny",
        "train.epochs=2",
        "progress=false",
        "device=cpu",
    ]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        first_epoch_cfg = compose("train", overrides=[*overrides, "train.stop_after_epochs=1"])
        cfg = compose("train", overrides=overrides)
    run_dir = tmp_path / "run"
    assert engine.fit(first_epoch_cfg, run_dir) == 0
    good = (run_dir / "checkpoint.pt").read_bytes()

    real_cross_entropy = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda *a, **kw: real_cross_entropy(*a, **kw) * float("nan"))
    with pytest.raises(NonFiniteLossError):
        engine.fit(cfg, run_dir)  # resumes epoch 2 from the checkpoint
    assert (run_dir / "checkpoint.pt").read_bytes() == good
    assert not (run_dir / "metrics.json").exists()


class DivergedRouting(DMoEClassifier):
    """Routing that refuses its scores, as the image-frame and MILP solvers refuse NaN ones."""

    def forward(self, *args, **kwargs):
        super().forward(*args, **kwargs)
        raise ValueError("scores contain NaN or inf; they must be finite probabilities")


@pytest.mark.parametrize(
    "gate_weight,error,match",
    [
        (
            float("inf"),
            NonFiniteLossError,
            r"^training diverged at step 1 of this epoch: the router's gate scores are NaN or "
            r"infinite; stopped without saving, .* \(try a smaller train.lr or train.grad_clip\)$",
        ),
        (0.1, ValueError, r"^scores contain NaN or inf"),  # finite gates: a routing bug is not blamed on divergence
    ],
)
def test_a_routing_error_on_diverged_gate_scores_is_the_divergence_line(gate_weight, error, match):
    torch.manual_seed(0)
    model = DivergedRouting(1, 10, 28, d_model=D, num_experts=K, num_moe_layers=L)
    with torch.no_grad():
        model.moe_layers[1].gate.weight.fill_(gate_weight)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(10, 0))
    channel = WirelessChannel(ChannelConfig(), K, D, seed=0)
    with pytest.raises(error, match=match) as info:
        train_one_epoch(
            model,
            synthetic_batches(),
            optimizer,
            scheduler,
            channel=channel,
            specs=spec_for("topk", 0.0),
            stream=0,
            device=torch.device("cpu"),
            aux_loss_coef=0.01,
            grad_clip=None,
            generator=None,
            progress=EpochProgress(),
        )
    assert type(info.value) is error
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name
    assert not any(layer.gate._forward_hooks for layer in model.moe_layers)  # the watch removed its hooks


def test_runtime_errors_are_reported_in_one_line(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as info:
        with report_errors(NonFiniteLossError):
            raise NonFiniteLossError("training loss is nan at step 3")
    assert info.value.code == 1  # a runtime failure, not a configuration error (2)
    err = capsys.readouterr().err
    assert err.strip() == "Error: training loss is nan at step 3"


# --------------------------------------------------------------------------------------------
# Every expert unreachable


@pytest.mark.parametrize("policy", ["topk", "channel_topk", "random_topk", "dense", "des", "jesa"])
def test_training_and_evaluation_survive_a_channel_where_every_expert_is_unreachable(policy):
    # A latency budget no link can meet: every (expert, subcarrier) link is in outage.
    channel = WirelessChannel(ChannelConfig(latency_budget_s=1e-9), K, D, seed=0)
    assert torch.isinf(channel.costs(torch.arange(8), 0, 0)).all()
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(10, 0))
    specs = spec_for(policy, channel.failure_energy_j)
    generator = torch.Generator().manual_seed(0)
    progress = EpochProgress()
    assert train_one_epoch(
        model,
        synthetic_batches(),
        optimizer,
        scheduler,
        channel=channel,
        specs=specs,
        stream=0,
        device=torch.device("cpu"),
        aux_loss_coef=0.01,
        grad_clip=1.0,
        generator=generator,
        progress=progress,
    )
    assert progress.steps == 2 and np.isfinite(progress.loss_sum)
    assert progress.summary()["router"]["drop_rate"] == 1.0
    metrics = evaluate(
        model, synthetic_batches(seed=1), channel=channel, specs=specs, stream=1, device=torch.device("cpu"), generator=generator
    )
    assert metrics["drop_rate"] == 1.0 and metrics["experts_per_token"] == 0.0
    assert 0.0 <= metrics["accuracy"] <= 1.0 and np.isfinite(metrics["loss"])
    if policy in ("topk", "random_topk"):
        # Channel-unaware: k attempts per layer fail and each wastes P_ap * T_max.
        expected = 1e6 * L * 2 * channel.failure_energy_j
        assert metrics["energy_uj"] == pytest.approx(expected) and metrics["outage_rate"] == 1.0
    else:
        assert metrics["energy_uj"] == 0.0


# --------------------------------------------------------------------------------------------
# Small pieces


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "results.csv"
    atomic_write_text(target, "old\n")

    def failing(handle):
        handle.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]  # no temp file left


def test_rng_state_round_trip():
    generator = torch.Generator().manual_seed(3)
    state = capture_rng_state({"router": generator})
    first = (random.random(), np.random.rand(), torch.rand(3), torch.rand(2, generator=generator))
    random.seed(99), np.random.seed(99), torch.manual_seed(99), generator.manual_seed(99)
    restore_rng_state(state, {"router": generator})
    second = (random.random(), np.random.rand(), torch.rand(3), torch.rand(2, generator=generator))
    assert first[0] == second[0] and first[1] == second[1]
    assert torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])


def test_learning_rate_schedule_warms_up_then_decays_to_zero():
    factor = lr_lambda(total_steps=100, warmup_steps=10)
    values = [factor(step) for step in range(101)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in pairwise(values[:10]))
    assert all(a >= b for a, b in pairwise(values[9:]))
    assert values[100] == pytest.approx(0.0, abs=1e-12)
    # Warm-up never takes more than a tenth of a short run.
    assert lr_lambda(total_steps=10, warmup_steps=100)(1) == pytest.approx(1.0)


def test_locking_a_run_directory_removes_the_temp_files_of_killed_writes(tmp_path):
    from dmoe_torch.engine.rundir import lock_run_dir

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"")  # a SIGKILL inside atomic_write
    (run_dir / ".metrics.json.x7.tmp").write_text("{")
    (run_dir / "notes.tmp").write_text("the user's")  # not atomic_write's
    lock_run_dir(run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "notes.tmp"]


def test_the_image_frame_compile_is_announced_once_and_only_when_the_cache_is_cold(monkeypatch, caplog):
    import logging

    from dmoe_torch.channel import links as evaluation

    channel = WirelessChannel(ChannelConfig(frame="image"), K, D, seed=0)

    def stub_links(channel, ids, layer, stream):  # no numba here
        return np.zeros((len(ids), K, 16)), np.ones((len(ids), K, 16), dtype=np.int64)

    monkeypatch.setattr(evaluation, "frame_links", stub_links)
    for cached, expected in ((False, 1), (True, 0)):
        monkeypatch.setattr(evaluation, "_frame_compile_checked", False)  # a fresh process
        monkeypatch.setattr(evaluation, "frame_kernels_cached", lambda cached=cached: cached)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dmoe_torch.channel.links"):
            for batch in range(3):
                evaluation.layer_links(channel, torch.arange(batch * 4, batch * 4 + 4), spec_for("topk", 0.0), stream=0)
        notes = [r for r in caplog.records if r.getMessage() == evaluation.FRAME_COMPILE_NOTE]
        assert len(notes) == expected


def test_outages_and_link_dropout_are_shown_apart():
    from dmoe_torch.engine.evaluation import combine_layers
    from dmoe_torch.engine.training import epoch_line, router_summary

    layer = {
        "energy_j": 1e-5,
        "experts_per_input": 1.5,
        "violation_rate": 0.0,
        "drop_rate": 0.0,
        "certified_rate": 1.0,
        "nodes": 0.0,
        "gate_entropy": 1.0,
        "utilisation": [0.5, 0.5],
    }
    per_layer = [
        {**layer, "selected_links": 100.0, "outage_rate": 0.02, "link_dropout_rate": 0.30},
        {**layer, "selected_links": 300.0, "outage_rate": 0.06, "link_dropout_rate": 0.10},
    ]
    router = combine_layers(per_layer)
    assert router["outage_rate"] == pytest.approx(0.05) and router["link_dropout_rate"] == pytest.approx(0.15)
    # the progress bar's figures: per-step layer metrics as the MoE layers report them
    steps = [[{"count": torch.tensor(8.0), **{k: torch.tensor(v) for k, v in m.items()}} for m in per_layer]] * 3
    summary = router_summary(steps)
    assert summary["outage_rate"] == pytest.approx(0.05) and summary["link_dropout_rate"] == pytest.approx(0.15)
    record = {"epoch": 1, "train": {"loss": 1.0, "accuracy": 0.5, "router": router}, "val": {}, "epoch_time_s": 2.0}
    line = epoch_line(record, 2)
    assert "outage 5.00%" in line and "train link dropout 15.00%" in line and line.endswith("| 2.0 s")
    del router["link_dropout_rate"]  # a record from before the metric: no dropout
    assert "train link dropout 0.00%" in epoch_line(record, 2)
