"""channel.frame=image wired through the MoE layer, the evaluation and the configs.

The solver itself (P3, its exact references and baselines) is tested in test_frame.py; here:
the MoE layer routes image frames with the frame's capacity, a frame of one token gives the
token-frame optimum, frame_overrun_rate counts what it claims, and the configs fail clearly.
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from support import check_ok, run_cli

from dmoe_torch.channel import ChannelConfig, WirelessChannel
from dmoe_torch.channel.links import frame_links, layer_links
from dmoe_torch.config import ConfigError, channel_config
from dmoe_torch.engine.evaluation import EvalTotals
from dmoe_torch.moe import FrameLinks, MoELayer, RouterSpec


def layer_and_tokens(seed: int, frames: int, tokens: int, K: int = 4, d: int = 16):
    torch.manual_seed(seed)
    layer = MoELayer(d, K).eval()
    return layer, torch.randn(frames * tokens, d)


def random_links(seed: int, F: int, K: int, N: int, max_cap: int, outage: float = 0.2) -> FrameLinks:
    rng = np.random.default_rng(seed)
    down = rng.random((F, K, N)) < outage
    costs = np.where(down, np.inf, rng.uniform(1e-5, 3e-5, size=(F, K, N)))
    capacity = np.where(down, 0, rng.integers(1, max_cap + 1, size=(F, K, N)))
    return FrameLinks(torch.from_numpy(costs), torch.from_numpy(capacity))


@pytest.mark.parametrize("policy", ["topk", "topk_capacity", "des", "jesa_tokenwise", "jesa"])
def test_layer_respects_each_frames_band_and_capacity(policy):
    F, T, K, N = 6, 5, 4, 4
    layer, h = layer_and_tokens(0, F, T, K)
    links = random_links(1, F, K, N, max_cap=2)
    out = layer(h, links, RouterSpec(policy, gamma=0.6, k=2, k_max=3, failure_energy=2e-4))
    sel = out.selection
    sent = (sel.mask & ~sel.failed).view(F, T, K)
    sub = sel.subcarrier.view(F, T, K)
    carried = torch.zeros(F, K, N, dtype=torch.int64)
    owners = torch.full((F, N), -1, dtype=torch.int64)
    for f, t, k in sent.nonzero().tolist():
        n = int(sub[f, t, k])
        assert n >= 0 and links.capacity[f, k, n] > 0
        assert owners[f, n] in (-1, k), "a subcarrier serves two devices in one frame"
        owners[f, n] = k
        carried[f, k, n] += 1
    assert (carried <= links.capacity).all(), "a link carries more tokens than fit in T_max"
    if policy != "topk":  # only the capacity-ignoring baseline sends links that miss T_max
        assert not sel.failed.any() and not sel.frame_overrun.any()
    assert torch.equal(sel.frame_overrun.view(F, T), sel.frame_overrun.view(F, T)[:, :1].expand(F, T)), (
        "every token of a frame carries its frame's overrun flag"
    )


def test_one_token_frames_reach_the_token_frame_optimum():
    """With T = 1 and capacity >= 1 on every finite link, P3 is P2: the exact solvers agree."""
    F, K, N = 12, 4, 5
    layer, h = layer_and_tokens(2, F, 1, K)
    links = random_links(3, F, K, N, max_cap=3)
    spec = RouterSpec("optimal", gamma=0.7, k_max=3)
    image = layer(h, links, spec).selection
    token = layer(h, links.costs, spec).selection
    torch.testing.assert_close(image.energy, token.energy, rtol=1e-9, atol=0)
    assert torch.equal(image.violation, token.violation)


def test_overrun_counts_frames_that_miss_the_latency_budget():
    """Two tokens, both wanting the same two devices, on links that carry one token each."""
    F, T, K, N = 3, 2, 2, 2
    layer, h = layer_and_tokens(4, F, T, K)
    costs = torch.full((F, K, N), 1e-5, dtype=torch.float64)
    capacity = torch.ones(F, K, N, dtype=torch.int64)
    capacity[0] = 2  # frame 0 fits top-2 on the static partition; frames 1 and 2 do not
    links = FrameLinks(costs, capacity)
    topk = layer(h, links, RouterSpec("topk", k=2, failure_energy=2e-4))
    assert topk.selection.frame_overrun.view(F, T)[:, 0].tolist() == [False, True, True]
    assert float(topk.metrics["frame_overrun_rate"]) == pytest.approx(2 / 3)
    capped = layer(h, links, RouterSpec("topk_capacity", k=2))
    assert float(capped.metrics["frame_overrun_rate"]) == 0.0
    assert (capped.selection.mask.view(F, T, K)[1:].sum((1, 2)) == 2).all(), "each device takes one token"
    # the evaluation's count: overrun tokens / tokens, i.e. overrun frames / frames
    totals = EvalTotals(num_layers=1, tokens_per_input=T)
    totals.update(torch.zeros(F, 3), torch.zeros(F, dtype=torch.int64), [topk.selection])
    assert totals.compute()["frame_overrun_rate"] == pytest.approx(2 / 3)


def test_token_frames_count_failed_links_as_overruns():
    layer, h = layer_and_tokens(5, 8, 1, 4)
    costs = torch.full((8, 4, 4), 1e-5, dtype=torch.float64)
    costs[:3, :, :] = torch.inf  # rows 0-2: every link in outage
    sel = layer(h, costs, RouterSpec("topk", k=2, failure_energy=2e-4)).selection
    assert sel.frame_overrun.tolist() == [True] * 3 + [False] * 5


def test_layer_links_give_one_draw_per_image_independent_of_the_batch():
    channel = WirelessChannel(ChannelConfig(num_subcarriers=8, frame="image"), num_devices=4, d_model=32, seed=7)
    specs = [RouterSpec("jesa", gamma=0.5)] * 2
    ids = torch.arange(10, 30)
    whole, delivered = layer_links(channel, ids, specs, stream=3, tokens_per_input=49)
    assert delivered == [None, None] and all(isinstance(x, FrameLinks) for x in whole)
    assert tuple(whole[1].costs.shape) == (20, 4, 8)
    part, _ = layer_links(channel, ids[5:9], specs, stream=3, tokens_per_input=49)
    assert torch.equal(part[1].costs, whole[1].costs[5:9]) and torch.equal(part[1].capacity, whole[1].capacity[5:9])
    costs, capacity = frame_links(channel, ids, 1, 3)
    assert np.array_equal(whole[1].capacity.numpy(), capacity)
    assert not torch.equal(whole[0].costs, whole[1].costs), "layers draw their own channel"


def test_frame_config_fails_clearly():
    base = OmegaConf.create({"channel": {"frame": "image"}})
    assert channel_config(base).frame == "image"
    with pytest.raises(ConfigError, match=r"channel.frame='tile': must be one of token, image"):
        channel_config(OmegaConf.create({"channel": {"frame": "tile"}}))
    with pytest.raises(ConfigError, match=r"channel.frame='image'.*perfect CSI"):
        channel_config(OmegaConf.create({"channel": {"frame": "image", "csi_error_std": 0.1}}))
    with pytest.raises(ValueError, match="only for image frames"):
        from dmoe_torch.selection import route

        route("topk_capacity", torch.full((2, 3), 1 / 3), torch.ones(2, 3, 3, dtype=torch.float64))


def test_router_policy_must_fit_the_frame_mode():
    from dmoe_torch.config import validate_model, validate_router

    cfg = OmegaConf.create(
        {
            "model": {
                "name": "convmoe",
                "d_model": 16,
                "num_experts": 4,
                "depth": 2,
                "hidden_mult": 2,
                "kernel_size": 3,
                "link_dropout": 0.0,
                "combine": "renormalized",
                "balance_on": "selection",
            },
            "router": {"policy": "topk_capacity", "k": 2, "gamma": 0.5, "k_min": 1, "k_max": None, "outage_target": None},
        }
    )
    shape = validate_model(cfg)
    assert validate_router(cfg, "router", shape, 16, "image")["policy"] == "topk_capacity"
    with pytest.raises(ConfigError, match=r"router.policy='topk_capacity': exists only with channel.frame=image"):
        validate_router(cfg, "router", shape, 16, "token")
    cfg.router.policy = "dense"
    with pytest.raises(ConfigError, match=r"router.policy='dense': not available with channel.frame=image"):
        validate_router(cfg, "router", shape, 16, "image")


def test_train_with_image_frames_then_evaluate_any_batch_size(tmp_path, data_root):  # noqa: F811
    """router=jesa under channel.frame=image trains; evaluation keeps the frame mode of the
    checkpoint, counts overruns, skips the policies without an image-frame form, and gives the
    same table whatever the batch size (one draw per image and layer, keyed by sample id)."""
    run = tmp_path / "run"
    check_ok(
        run_cli(
            "train.py",
            "model=tiny_convmoe",
            "data.limit_train=200",
            "data.limit_test=60",
            "data.batch_size=50",
            "train.epochs=1",
            "train.warmup_steps=2",
            "device=cpu",
            "progress=false",
            "router=jesa",
            "router.gamma=0.5",
            "router.k_max=2",
            "channel.frame=image",
            "channel.latency_budget_s=5e-4",
            f"data.root={data_root}",
            f"hydra.run.dir={run}",
        )
    )
    train_router = json.loads((run / "metrics.json").read_text())["history"][0]["train"]["router"]
    assert 0.0 <= train_router["frame_overrun_rate"] <= 1.0
    tables = []
    for batch in (30, 60):
        result = check_ok(
            run_cli(
                "evaluate.py",
                f"ckpt={run}/checkpoint.pt",
                "eval.policies=[none,topk@2,topk_capacity@2,jesa,dense]",
                "eval.gammas=[0.5]",
                "eval.channel_draws=1",
                "data.limit_test=60",
                f"data.batch_size={batch}",
                "device=cpu",
                "progress=false",
                f"data.root={data_root}",
                f"hydra.run.dir={tmp_path}/eval{batch}",
            )
        )
        assert "skipped dense: no image-frame form" in result.stdout + result.stderr
        tables.append((tmp_path / f"eval{batch}" / "results.csv").read_text())
    # Routing, energies and rates are identical; the CPU kernels' float rounding (~1e-7)
    # depends on the batch size and reaches only the mean loss (as for token frames).
    small, large = (list(csv.DictReader(io.StringIO(table))) for table in tables)
    for row_a, row_b in zip(small, large, strict=True):
        assert float(row_a.pop("loss")) == pytest.approx(float(row_b.pop("loss")), rel=1e-5)
        assert row_a == row_b
    rows = {row["policy"]: row for row in small}
    assert set(rows) == {"none", "topk@2", "topk_capacity@2", "jesa"}
    assert all(row["channel.frame"] == "image" for row in rows.values())
    # at 0.5 ms a device's two static subcarriers often cannot carry every token's top-2 link
    assert float(rows["topk@2"]["frame_overrun_rate"]) > 0.1
    assert float(rows["topk_capacity@2"]["frame_overrun_rate"]) == float(rows["jesa"]["frame_overrun_rate"]) == 0.0
    assert float(rows["topk_capacity@2"]["drop_rate"]) > 0.0
