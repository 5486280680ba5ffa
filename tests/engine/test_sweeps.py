"""The experiment suite (scripts/figures.py): a two-point Hydra multirun of evaluate.py with an
evaluation-time channel override, the figure drawn from its points, a rerun that computes
nothing, a failing point named in one line while the others are kept, and bad CKPT / OUT.
A tiny token model trained for one epoch on 200 images; every point on 40 test images."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from support import REPO

from dmoe_torch.channel import ChannelConfig
from dmoe_torch.config import ConfigError
from dmoe_torch.config.eval import validate_eval_config
from dmoe_torch.engine import sweeps as figures


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_root) -> Path:
    run_dir = tmp_path_factory.mktemp("train")
    env = {**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "+experiment=quick",
            "model=tiny_vmoe",
            "data.limit_train=200",
            "data.limit_test=40",
            "device=cpu",
            "progress=false",
            f"data.root={data_root}",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir / "checkpoint.pt"


def settings(tmp_path: Path, text: str) -> str:
    path = tmp_path / "settings.yaml"
    path.write_text("limit_test: 40\ndraws: 1\nbatch_size: 64\n" + text)
    return str(path)


def run(*args: str) -> int:
    os.environ["OMP_NUM_THREADS"] = "1"
    return figures.main(list(args))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_two_point_multirun_then_figure_then_rerun_computes_nothing(checkpoint, data_root, tmp_path, capsys):
    spec = settings(tmp_path, "cell:\n  d_max_m: [150, 300]\n  policies: [topk@2, jesa]\n  gammas: [0.9]\n")
    out = tmp_path / "figs"
    args = (
        "--ckpt",
        str(checkpoint),
        "--out",
        str(out),
        "--config",
        spec,
        "--only",
        "4",
        "--jobs",
        "2",
        "--docs",
        str(tmp_path / "docs"),
        "device=cpu",
        f"data.root={data_root}",
    )
    assert run(*args) == 0
    printed = capsys.readouterr().out
    assert "sweep cell: 2 points over channel.d_max_m, 2 to compute" in printed

    points = sorted((out / "sweeps").glob("settings-*/cell/*/results.csv"))
    assert len(points) == 2  # one directory per point
    rows = read_csv(out / "fig4_cell_radius.csv")
    assert sorted({r["channel.d_max_m"] for r in rows}) == ["150.0", "300.0"]
    assert {r["policy"] for r in rows} == {"topk@2", "jesa"} and all(r["inputs"] == "40" for r in rows)
    topk = {float(r["channel.d_max_m"]): r for r in rows if r["policy"] == "topk@2"}
    # Same devices further out: more path loss, more energy, lower SNR at the edge.
    assert float(topk[300.0]["energy_uj_mean"]) > float(topk[150.0]["energy_uj_mean"])
    assert float(topk[150.0]["edge_snr_db"]) > float(topk[300.0]["edge_snr_db"]) + 5
    assert (out / "fig4_cell_radius.png").read_bytes()[:4] == b"\x89PNG"
    small = tmp_path / "docs" / "fig4_cell_radius.png"  # the README's copy
    assert small.read_bytes()[:4] == b"\x89PNG" and small.stat().st_size < (out / "fig4_cell_radius.png").stat().st_size
    # Evaluation-time override of the checkpoint's channel: recorded, and named in the title
    # only where it differs from training (d_max 300 m).
    titles = {p.parent.name: (p.parent / "results.md").read_text().splitlines()[0] for p in points}
    assert "d_max_m 300.0 -> 150.0" in titles["++channel.d_max_m=150.0"]
    assert "differs from training" not in titles["++channel.d_max_m=300.0"]

    stamps = [p.stat().st_mtime_ns for p in points]
    assert run(*args) == 0  # rerun: every point is found, none recomputed
    assert "2 to compute" not in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in points] == stamps


def test_failing_point_is_named_and_the_others_are_kept(checkpoint, data_root, tmp_path, capsys):
    # N = 0 * K subcarriers is invalid; N = K is fine.
    spec = settings(tmp_path, "subcarriers:\n  multiples: [0, 1]\n  policies: [topk@2]\n  gammas: [0.9]\n")
    out = tmp_path / "figs"
    status = run(
        "--ckpt", str(checkpoint), "--out", str(out), "--config", spec, "--only", "2", "device=cpu", f"data.root={data_root}"
    )
    captured = capsys.readouterr()
    assert status == 1, captured.out[-3000:] + captured.err[-3000:]
    errors = [line for line in captured.err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 2, captured.err  # the point, then the summary
    assert "point channel.num_subcarriers=0 failed" in errors[0] and "channel.num_subcarriers" in errors[0]
    assert "computed points are kept" in errors[1]
    assert len(list((out / "sweeps").glob("settings-*/subcarriers/*/results.csv"))) == 1
    rows = read_csv(out / "fig2_subcarriers.csv")  # drawn from the point that worked
    assert {r["channel.num_subcarriers"] for r in rows} == {"4"}


def test_bad_ckpt_and_out_are_one_line(checkpoint, tmp_path, capsys):
    assert run("--ckpt", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: CKPT=") and "missing.pt" in err[0]
    not_ckpt = tmp_path / "notes.txt"
    not_ckpt.write_text("hello")
    assert run("--ckpt", str(not_ckpt), "--out", str(tmp_path / "o")) == 2
    assert "not a dmoe-torch checkpoint" in capsys.readouterr().err
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert run("--ckpt", str(checkpoint), "--out", str(blocked / "sub")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: OUT=") and "not a writable directory" in err[0]


def test_sweeps_from_settings(checkpoint):
    facts = figures.checkpoint_facts(str(checkpoint))
    spec = OmegaConf.load(REPO / "conf" / "figures" / "default.yaml")
    sweeps = figures.build_sweeps(spec, facts)
    K, L = facts["K"], facts["L"]
    assert sweeps["subcarriers"].values == tuple(str(m * K) for m in (1, 2, 4, 8))  # N from K to 8K
    assert len(sweeps["layer_gammas"].values) == L
    first = figures.parse_overrides([f"x={sweeps['layer_gammas'].values[0]}"])["x"]
    assert all(v[0] != 0.9 or v[1:] == [0.9] * (L - 1) for v in first)  # layer 1 varies, the others stay at base
    assert "eval.policies=[jesa,optimal]" in sweeps["optimal"].fixed
    assert facts["T"] == 16  # tiny_vmoe: 7x7 patches of a 28x28 image
    assert f"data.limit_test={400 // 16}" in sweeps["optimal"].fixed  # a budget of 400 routed tokens
    assert "data.limit_test=null" in sweeps["accuracy_energy"].fixed  # figure 1 on the full test set


def test_evaluate_channel_section_lists_every_channel_field():
    evaluate_yaml = OmegaConf.load(REPO / "conf" / "evaluate.yaml")
    assert set(evaluate_yaml.channel) == {f.name for f in fields(ChannelConfig)}
    assert all(v is None for v in evaluate_yaml.channel.values())  # null: the checkpoint's value


def test_unknown_channel_override_names_the_key_and_the_fields():
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["ckpt=x.pt", "+channel.num_subcarier=8"])
    with pytest.raises(ConfigError) as error:
        validate_eval_config(cfg)
    message = str(error.value)
    assert "channel.num_subcarier" in message and "num_subcarriers" in message and "\n" not in message


@pytest.mark.skipif(not figures.frames_supported(), reason="needs channel.frame")
def test_figure8_sweeps_and_draw():
    """fig8: T_max under image frames, token frames as the reference (no topk_capacity there);
    the drawn rows carry frame and T_max, and results without frame_overrun_rate still draw."""
    from dmoe_torch.output import figures as figure_plots

    facts = {"path": "run/checkpoint.pt", "K": 8, "L": 2, "T": 49, "d_min_m": 50.0, "bandwidth_hz": 1e6, "latency_s": 1e-3}
    sweeps = figures.build_sweeps(OmegaConf.load(REPO / "conf" / "figures" / "default.yaml"), facts)
    image, token = sweeps["frame_latency_image"], sweeps["frame_latency_token"]
    assert image.key == token.key == "++channel.latency_budget_s"
    assert image.values == token.values == ("0.0005", "0.001", "0.002", "0.004", "0.008")
    assert figures.parse_overrides(image.overrides("0.0005"))["channel.frame"] == "image"
    assert figures.parse_overrides(token.overrides("0.0005"))["channel.frame"] == "token"
    assert "eval.policies=[topk@2,topk_capacity@2,des,jesa]" in image.fixed
    assert "eval.policies=[topk@2,des,jesa]" in token.fixed  # topk_capacity exists only for image frames
    assert "data.limit_test=1000" in image.fixed and "eval.gammas=[0.25,0.5]" in token.fixed
    quick = figures.build_sweeps(OmegaConf.load(REPO / "conf" / "figures" / "quick.yaml"), facts)
    assert (
        quick["frame_latency_image"].values == ("0.0005", "0.002") and "data.limit_test=100" in quick["frame_latency_token"].fixed
    )

    def row(policy, t_max, energy, overrun=None):
        r = {
            "policy": policy,
            "gamma": "" if policy.startswith("topk") else "0.5",
            "energy_uj_mean": energy,
            "energy_uj_ci95": 1.0,
            "accuracy_mean": 0.9,
            "accuracy_ci95": 0.01,
            "violation_rate": 0.1,
            "inputs": 100,
            "draws": 1,
            "seed": 0,
            "channel.latency_budget_s": t_max,
        }
        return r if overrun is None else {**r, "frame_overrun_rate": overrun}

    data = {
        "frame_latency_image": [
            ("0.0005", [row("topk@2", 5e-4, 900.0, 0.6), row("topk_capacity@2", 5e-4, 50.0, 0.0)]),
            ("0.002", [row("topk@2", 2e-3, 60.0, 0.0), row("topk_capacity@2", 2e-3, 55.0, 0.0)]),
        ],
        "frame_latency_token": [("0.0005", [row("topk@2", 5e-4, 40.0)])],
    }  # results without frame_overrun_rate
    figure, rows = figure_plots.draw_frame_latency(data, facts, sweeps)
    assert [(r["frame"], r["latency_budget_ms"], r["policy"]) for r in rows] == [
        ("image", 0.5, "topk@2"),
        ("image", 0.5, "topk_capacity@2"),
        ("image", 2.0, "topk@2"),
        ("image", 2.0, "topk_capacity@2"),
        ("token", 0.5, "topk@2"),
    ]
    assert rows[0]["frame_overrun_rate"] == 0.6 and math.isnan(rows[-1]["frame_overrun_rate"])
    assert figure_plots.FIGURES[8].sweeps == ("frame_latency_image", "frame_latency_token")
    figure_plots.pyplot().close(figure)
    figure, empty = figure_plots.draw_frame_latency({"frame_latency_image": [], "frame_latency_token": []}, facts, sweeps)
    assert empty == []
    figure_plots.pyplot().close(figure)
