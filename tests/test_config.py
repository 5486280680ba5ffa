"""Config composition (Hydra compose API) and validation: every bad value names its key."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dmoe_torch.channel import ChannelConfig
from dmoe_torch.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from dmoe_torch.config import (
    ConfigError,
    build_channel,
    build_model,
    channel_config,
    eval_policies,
    parse_policy,
    router_specs,
    validate_eval_config,
    validate_train_config,
)
from dmoe_torch.data import DataInfo
from dmoe_torch.moe import RouterSpec

REPO = Path(__file__).resolve().parents[1]
CONF = str(REPO / "conf")
FASHION = DataInfo("fashion_mnist", 1, 10, 28, tuple(str(i) for i in range(10)))


def compose_cfg(name: str, overrides: list[str] = ()):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


# --------------------------------------------------------------------------------------------
# Composition


def test_train_defaults_compose_validate_and_build():
    cfg = compose_cfg("train")
    validate_train_config(cfg)
    assert cfg.data.name == "fashion_mnist" and cfg.data.batch_size == 256
    assert (cfg.router.policy, cfg.router.k) == ("topk", 2)
    assert cfg.train.epochs == 8 and cfg.train.lr == pytest.approx(2e-3)
    assert cfg.device == "auto"
    model = build_model(cfg, FASHION)
    assert model.num_experts == cfg.model.num_experts == 8
    assert model.num_moe_layers == cfg.model.num_moe_layers == 2
    channel = build_channel(cfg)
    assert channel.num_devices == 8 and channel.num_subcarriers == 16
    specs = router_specs(cfg, "router", channel.failure_energy_j)
    assert [s.policy for s in specs] == ["topk", "topk"] and all(s.k == 2 for s in specs)
    assert specs[0].failure_energy == pytest.approx(0.2 * 1e-3)


def test_channel_defaults_match_channel_config_defaults():
    assert channel_config(compose_cfg("train")) == ChannelConfig()


@pytest.mark.parametrize("router", ["top1", "top2", "channel_top2", "random_top2", "dense", "des", "jesa", "optimal"])
def test_every_router_group_option_validates_and_builds_specs(router):
    cfg = compose_cfg("train", [f"router={router}"])
    validate_train_config(cfg)
    specs = router_specs(cfg, "router", 0.0)
    assert len(specs) == cfg.model.num_moe_layers
    assert all(isinstance(s, RouterSpec) and s.policy == cfg.router.policy for s in specs)
    # The validation policy follows the training policy unless told otherwise.
    assert cfg.eval_router.policy == cfg.router.policy


@pytest.mark.parametrize("experiment", ["quick", "channel_aware"])
def test_experiment_presets_compose_and_validate(experiment):
    cfg = compose_cfg("train", [f"+experiment={experiment}"])
    validate_train_config(cfg)
    if experiment == "quick":
        assert cfg.model.d_model == 32 and cfg.train.epochs == 1 and cfg.data.limit_train == 2000
    else:
        assert cfg.router.policy == cfg.eval_router.policy == "jesa" and cfg.router.gamma == 0.9


def test_eval_router_overrides_are_independent_of_the_training_router():
    cfg = compose_cfg("train", ["router=des", "router.gamma=0.8", "eval_router.policy=jesa"])
    validate_train_config(cfg)
    assert cfg.router.policy == "des" and cfg.eval_router.policy == "jesa"
    assert cfg.eval_router.gamma == 0.8  # fields not overridden follow router.*
    cfg = compose_cfg("train", ["router@eval_router=dense"])
    assert cfg.router.policy == "topk" and cfg.eval_router.policy == "dense"


def test_interface_overrides_reach_the_built_objects():
    cfg = compose_cfg(
        "train",
        [
            "data.name=mnist", "data.batch_size=32", "data.limit_train=400", "data.limit_test=50",
            "data.num_workers=1", "model.num_experts=4", "model.num_moe_layers=3", "model.d_model=16",
            "channel.num_subcarriers=6", "channel.ap_power_w=0.5", "router.policy=des",
            "router.gamma=[0.9,0.7,0.5]", "router.k_min=2", "router.k_max=3", "train.epochs=3",
            "train.lr=0.01", "seed=7",
        ],
    )
    validate_train_config(cfg)
    channel = build_channel(cfg)
    assert (channel.num_devices, channel.num_subcarriers, channel.seed) == (4, 6, 7)
    assert channel.cfg.ap_power_w == 0.5
    specs = router_specs(cfg, "router", 0.0)
    assert [s.gamma for s in specs] == [0.9, 0.7, 0.5]
    assert all((s.policy, s.k_min, s.k_max) == ("des", 2, 3) for s in specs)
    model = build_model(cfg, FASHION)
    assert len(model.moe_layers) == 3 and model.num_experts == 4


def test_evaluate_config_composes_and_validates():
    cfg = compose_cfg("evaluate", ["ckpt=some/checkpoint.pt"])
    validate_eval_config(cfg)
    assert list(cfg.eval.policies) == ["topk@1", "topk@2", "channel_topk@2", "dense", "des", "jesa"]
    assert cfg.eval.channel_draws == 3 and len(cfg.eval.gammas) == 5
    # Default grid against the default model: 4 fixed policies + 5 gammas x (des, jesa).
    settings = eval_policies(cfg, compose_cfg("train"))
    assert len(settings) == 4 + 2 * 5
    assert {s.label for s in settings} == {"topk@1", "topk@2", "channel_topk@2", "dense", "des", "jesa"}
    assert sorted({s.gamma for s in settings if s.policy == "des"}) == [0.3, 0.5, 0.7, 0.9, 0.99]


def test_data_root_defaults_to_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("DMOE_DATA_ROOT", str(tmp_path))
    assert compose_cfg("train").data.root == str(tmp_path)
    assert compose_cfg("evaluate", ["ckpt=x"]).data.root == str(tmp_path)


# --------------------------------------------------------------------------------------------
# Validation errors


TRAIN_ERRORS = [
    (["router.gamma=1.5"], "router.gamma"),
    (["router.gamma=0"], "router.gamma"),
    (["router.gamma=[0.9,0.5,0.3]"], "router.gamma"),
    (["router.gamma=abc"], "router.gamma"),
    (["router.k_min=3", "router.k_max=2"], "router.k_min"),
    (["router.k_max=9"], "router.k_max"),
    (["router.k=9"], "router.k"),
    (["router.k=0"], "router.k"),
    (["router.policy=fastest"], "router.policy"),
    (["eval_router.gamma=2.0"], "eval_router.gamma"),
    (["eval_router.policy=nope"], "eval_router.policy"),
    (["channel.ap_power_w=-0.1"], "channel.ap_power_w"),
    (["channel.device_power_w=0"], "channel.device_power_w"),
    (["channel.subcarrier_bandwidth_hz=0"], "channel.subcarrier_bandwidth_hz"),
    (["channel.num_subcarriers=0"], "channel.num_subcarriers"),
    (["channel.latency_budget_s=-1e-3"], "channel.latency_budget_s"),
    (["channel.d_min_m=-5"], "channel.d_min_m"),
    (["channel.d_min_m=300", "channel.d_max_m=100"], "channel.d_min_m"),
    (["+channel.colour=blue"], "channel.colour"),
    (["channel.num_subcarriers=4"], "channel.num_subcarriers"),  # static plan needs N >= K
    (["model.num_experts=0"], "model.num_experts"),
    (["model.d_model=0"], "model.d_model"),
    (["data.name=imagenet"], "data.name"),
    (["data.batch_size=0"], "data.batch_size"),
    (["data.limit_train=0"], "data.limit_train"),
    (["data.num_workers=-1"], "data.num_workers"),
    (["train.epochs=0"], "train.epochs"),
    (["train.lr=0"], "train.lr"),
    (["train.lr=-0.001"], "train.lr"),
    (["train.lr=fast"], "train.lr"),
    (["train.weight_decay=-1"], "train.weight_decay"),
    (["seed=-1"], "seed"),
    (["device=tpu"], "device"),
    (["resume=/nonexistent/checkpoint.pt"], "resume"),
]


@pytest.mark.parametrize("overrides,key", TRAIN_ERRORS, ids=[" ".join(o) for o, _ in TRAIN_ERRORS])
def test_train_validation_error_names_the_key(overrides, key):
    cfg = compose_cfg("train", overrides)
    with pytest.raises(ConfigError) as info:
        validate_train_config(cfg)
    message = str(info.value)
    assert key in message
    assert "\n" not in message


def test_cuda_device_rejected_when_absent():
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    with pytest.raises(ConfigError, match="device"):
        validate_train_config(compose_cfg("train", ["device=cuda"]))


def _eval_settings(overrides, train_overrides=()):
    cfg = compose_cfg("evaluate", ["ckpt=x.pt", *overrides])
    validate_eval_config(cfg)
    return eval_policies(cfg, compose_cfg("train", list(train_overrides)))


EVAL_ERRORS = [
    (["eval.policies=[topk@2,fastest]"], "eval.policies[1]"),
    (["eval.policies=[topk@9]"], "eval.policies[0]"),
    (["eval.policies=[topk@two]"], "eval.policies[0]"),
    (["eval.policies=[des@2]"], "eval.policies[0]"),
    (["eval.policies=[topk@2,topk@2]"], "eval.policies"),
    (["eval.gammas=[0.5,1.5]"], "eval.gammas[1]"),
    (["eval.gammas=[[0.5,0.5,0.5]]"], "eval.gammas[0]"),
    (["eval.k_max=9"], "eval.k_max"),
]


@pytest.mark.parametrize("overrides,key", EVAL_ERRORS, ids=[" ".join(o) for o, _ in EVAL_ERRORS])
def test_eval_policy_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        _eval_settings(overrides)
    assert key in str(info.value)


@pytest.mark.parametrize(
    "overrides,key",
    [
        ([], "ckpt"),  # ckpt is mandatory (???)
        (["ckpt=x", "eval.channel_draws=0"], "eval.channel_draws"),
        (["ckpt=x", "eval.policies=[]"], "eval.policies"),
        (["ckpt=x", "eval.gammas=[]"], "eval.gammas"),
        (["ckpt=x", "eval.k_min=3", "eval.k_max=2"], "eval.k_min"),
        (["ckpt=x", "data.batch_size=0"], "data.batch_size"),
        (["ckpt=x", "data.limit_test=0"], "data.limit_test"),
    ],
)
def test_evaluate_validation_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        validate_eval_config(compose_cfg("evaluate", overrides))
    assert key in str(info.value)


def test_policy_syntax():
    assert parse_policy("topk@3", "p", num_experts=8, default_k=2) == ("topk", 3)
    assert parse_policy("channel_topk", "p", num_experts=8, default_k=2) == ("channel_topk", 2)
    assert parse_policy("jesa", "p", num_experts=8, default_k=2) == ("jesa", None)
    settings = _eval_settings(["eval.policies=[random_topk@1,dense,optimal]", "eval.gammas=[0.5,[0.9,0.4]]"])
    assert [(s.label, s.gamma) for s in settings] == [
        ("random_topk@1", None), ("dense", None), ("optimal", 0.5), ("optimal", [0.9, 0.4])
    ]


# --------------------------------------------------------------------------------------------
# Checkpoints


def _tiny_cfg(*overrides):
    return compose_cfg("train", ["model=tiny", *overrides])


def _save_tiny_checkpoint(path, cfg):
    model = build_model(cfg, FASHION)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(
        path, model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler={}, epoch=1,
        step_in_epoch=0, global_step=1, config=OmegaConf.to_container(cfg, resolve=True),
        metrics={"history": []}, rng={},
    )
    return model


def test_checkpoint_round_trip(tmp_path):
    cfg = _tiny_cfg()
    model = _save_tiny_checkpoint(tmp_path / "checkpoint.pt", cfg)
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    assert payload["config"]["model"]["d_model"] == 32
    other = build_model(cfg, FASHION)
    load_model_state(other, payload["model"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, other.state_dict()[name])


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", "truncate", "foreign"])
def test_unreadable_checkpoint_is_a_config_error(tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    if content == "truncate":
        _save_tiny_checkpoint(path, _tiny_cfg())
        path.write_bytes(path.read_bytes()[:1000])
    elif content == "foreign":
        torch.save({"state_dict": {}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_checkpoint(path, key="ckpt")
    assert "ckpt=" in str(info.value) and str(path) in str(info.value)


def test_missing_checkpoint_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_checkpoint(tmp_path / "absent.pt", key="ckpt")


def test_model_shape_mismatch_is_a_config_error(tmp_path):
    _save_tiny_checkpoint(tmp_path / "checkpoint.pt", _tiny_cfg())
    payload = load_checkpoint(tmp_path / "checkpoint.pt", key="resume")
    wider = build_model(_tiny_cfg("model.d_model=48"), FASHION)
    with pytest.raises(ConfigError, match=r"resume: .*shape"):
        load_model_state(wider, payload["model"], key="resume")
    deeper = build_model(_tiny_cfg("model.num_moe_layers=3"), FASHION)
    with pytest.raises(ConfigError, match="resume: checkpoint lacks"):
        load_model_state(deeper, payload["model"], key="resume")


# --------------------------------------------------------------------------------------------
# Entry points: one line on stderr, exit status 2, no traceback


def _run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})},
    )


def test_entry_points_report_config_errors_without_traceback(tmp_path):
    train = _run("train.py", "router.gamma=1.5", f"hydra.run.dir={tmp_path / 'train'}")
    assert train.returncode == 2
    assert "Traceback" not in train.stderr
    error_lines = [line for line in train.stderr.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1 and "router.gamma=1.5" in error_lines[0] and "(0, 1]" in error_lines[0]
    assert not (tmp_path / "train" / "checkpoint.pt").exists()

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage")
    evaluate = _run("evaluate.py", f"ckpt={corrupt}", f"hydra.run.dir={tmp_path / 'eval'}")
    assert evaluate.returncode == 2
    assert "Traceback" not in evaluate.stderr
    assert "ckpt=" in evaluate.stderr and "corrupt" in evaluate.stderr


def test_full_error_env_shows_the_traceback(tmp_path):
    result = _run("train.py", "train.epochs=0", f"hydra.run.dir={tmp_path}", env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "train.epochs" in result.stderr
