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
from dmoe_torch.config import (
    EVAL_DATA_KEYS,
    EVAL_KEYS,
    EVAL_TOP_KEYS,
    ROUTER_KEYS,
    TRAIN_DATA_KEYS,
    TRAIN_KEYS,
    TRAIN_TOP_KEYS,
    ConfigError,
    channel_config,
    check_keys,
    validate_model,
    validate_train_config,
)
from dmoe_torch.config.eval import eval_policies, parse_policy, validate_eval_config
from dmoe_torch.data import DATASET_TRAIN_SIZES, DataInfo
from dmoe_torch.engine.build import build_channel, build_model, router_specs
from dmoe_torch.engine.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from dmoe_torch.moe import RouterSpec
from dmoe_torch.selection.policies import POLICY_TABLE

STATIC_POLICIES = tuple(n for n, p in POLICY_TABLE.items() if p.static_plan and p.token_solver is not None)

REPO = Path(__file__).resolve().parents[2]
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
    assert cfg.train.epochs == 16 and cfg.train.lr == pytest.approx(2e-3)
    assert cfg.device == "auto"
    model = build_model(cfg, FASHION)
    assert model.num_experts == cfg.model.num_experts == 8
    assert cfg.model.name == "convmoe" and model.num_moe_layers == cfg.model.depth == 2
    assert model.tokens_per_input == 49  # every position of the 7x7 feature map is a routed token
    channel = build_channel(cfg)
    assert channel.num_devices == 8 and channel.num_subcarriers == 16
    specs = router_specs(cfg, "router", channel.failure_energy_j)
    assert [s.policy for s in specs] == ["topk", "topk"] and all(s.k == 2 for s in specs)
    assert specs[0].failure_energy == pytest.approx(0.2 * 1e-3)


def test_channel_defaults_match_channel_config_defaults():
    assert channel_config(compose_cfg("train")) == ChannelConfig()


ROUTER_FILES = sorted(p.stem for p in (REPO / "conf" / "router").glob("*.yaml"))


def test_router_group_files_are_named_after_their_policies():
    """A router file per built-in token-frame policy of the policy table (none needs no settings)."""
    builtin = [n for n, p in POLICY_TABLE.items() if p.builtin and p.token_solver is not None and n != "none"]
    assert ROUTER_FILES == sorted(builtin)
    eval_files = sorted(p.stem for p in (REPO / "conf" / "eval_router").glob("*.yaml"))
    assert eval_files == sorted([*ROUTER_FILES, "same_as_train"])


@pytest.mark.parametrize("router", ROUTER_FILES)
def test_every_router_group_option_validates_and_builds_specs(router):
    cfg = compose_cfg("train", [f"router={router}"])
    validate_train_config(cfg)
    assert cfg.router.policy == router
    specs = router_specs(cfg, "router", 0.0)
    assert len(specs) == validate_model(cfg).num_moe_layers == 2
    assert all(isinstance(s, RouterSpec) and s.policy == cfg.router.policy for s in specs)
    # The validation policy follows the training policy unless told otherwise.
    assert cfg.eval_router.policy == cfg.router.policy


@pytest.mark.parametrize("router", ROUTER_FILES)
def test_eval_router_group_takes_the_router_files(router):
    cfg = compose_cfg("train", [f"eval_router={router}"])
    validate_train_config(cfg)
    assert cfg.router.policy == "topk"
    assert OmegaConf.to_container(cfg.eval_router) == OmegaConf.to_container(compose_cfg("train", [f"router={router}"]).router)


def test_top1_is_topk_with_k_1():
    cfg = compose_cfg("train", ["router=topk", "router.k=1"])
    validate_train_config(cfg)
    assert [(s.policy, s.k) for s in router_specs(cfg, "router", 0.0)] == [("topk", 1)] * 2
    assert cfg.eval_router.k == 1  # same_as_train follows field by field


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
    cfg = compose_cfg("train", ["eval_router=jesa", "eval_router.gamma=0.5"])
    validate_train_config(cfg)
    assert cfg.router.policy == "topk" and (cfg.eval_router.policy, cfg.eval_router.gamma) == ("jesa", 0.5)


def test_interface_overrides_reach_the_built_objects():
    cfg = compose_cfg(
        "train",
        [
            "data.name=mnist",
            "data.batch_size=32",
            "data.limit_train=400",
            "data.limit_test=50",
            "data.num_workers=1",
            "model=cnn",
            "model.num_experts=4",
            "model.num_moe_layers=3",
            "model.d_model=16",
            "channel.num_subcarriers=6",
            "channel.ap_power_w=0.5",
            "router.policy=des",
            "router.gamma=[0.9,0.7,0.5]",
            "router.k_min=2",
            "router.k_max=3",
            "train.epochs=3",
            "train.lr=0.01",
            "seed=7",
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
    assert list(cfg.eval.policies) == [
        "none",
        "random_topk@1",
        "topk@1",
        "topk@2",
        "channel_topk@1",
        "channel_topk@2",
        "dense",
        "des",
        "jesa",
        "greedy",
        "lagrangian",
    ]
    assert cfg.eval.channel_draws == 2 and len(cfg.eval.gammas) == 6 and cfg.eval.k_max == 2
    # Default grid against the default model: 7 fixed policies + 6 gammas x (des, jesa, greedy) + the lams of lagrangian.
    settings = eval_policies(cfg, compose_cfg("train"))
    assert len(settings) == 7 + 3 * 6 + len(cfg.eval.lams)
    assert {s.label for s in settings} == {
        "none",
        "random_topk@1",
        "topk@1",
        "topk@2",
        "channel_topk@1",
        "channel_topk@2",
        "dense",
        "des",
        "jesa",
        "greedy",
        "lagrangian",
    }
    assert sorted(s.lam for s in settings if s.policy == "lagrangian") == sorted(cfg.eval.lams)
    assert sorted({s.gamma for s in settings if s.policy == "des"}) == [0.05, 0.25, 0.35, 0.5, 0.75, 0.95]


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
    (["model.link_dropout=1.0"], "model.link_dropout"),
    (["model=vmoe", "model.link_dropout=-0.1"], "model.link_dropout"),
    (["model.combine=mean"], "model.combine"),
    (["model=vmoe", "model.combine=null"], "model.combine"),
    (["model=vmoe", "model.balance_on=channel"], "model.balance_on"),
    (["train.z_loss_coef=-0.001"], "train.z_loss_coef"),
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


# Strict keys: every section rejects a key it does not know, `+key=` additions included, with
# the same one-line message naming the key and listing the allowed ones.

UNKNOWN_TRAIN_KEYS = [
    ("+train.epoch=1", "train.epoch", "epochs"),
    ("+router.gama=0.5", "router.gama", "gamma"),
    ("+eval_router.kmax=2", "eval_router.kmax", "k_max"),
    ("+data.nme=mnist", "data.nme", "name"),
    ("+channel.colour=blue", "channel.colour", "num_subcarriers"),
    ("+epochs=3", "epochs", "train"),
]


@pytest.mark.parametrize("override,key,allowed", UNKNOWN_TRAIN_KEYS, ids=[o for o, _, _ in UNKNOWN_TRAIN_KEYS])
def test_every_train_section_rejects_unknown_keys(override, key, allowed):
    with pytest.raises(ConfigError) as info:
        validate_train_config(compose_cfg("train", ["router=des", override]))
    message = str(info.value)
    assert message.startswith(f"{key}: unknown key") and "allowed: " in message and allowed in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "override,key",
    [
        ("+eval.polices=[des]", "eval.polices"),
        ("+data.name=mnist", "data.name"),
        ("+model.d_model=8", "model"),
        ("+router.policy=des", "router"),
    ],
)
def test_every_evaluate_section_rejects_unknown_keys(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: unknown key.*; allowed: "):
        validate_eval_config(compose_cfg("evaluate", ["ckpt=x", override]))


def test_allowed_keys_are_exactly_the_configs_keys():
    # A key added to a config file must be added to the allowed keys (and so be validated).
    train = compose_cfg("train")
    assert set(train) == set(TRAIN_TOP_KEYS)
    assert set(train.train) == set(TRAIN_KEYS)
    for name in ("fashion_mnist", "mnist", "cifar10"):
        assert set(compose_cfg("train", [f"data={name}"]).data) == set(TRAIN_DATA_KEYS), name
    for name in ROUTER_FILES:
        cfg = compose_cfg("train", [f"router={name}", f"eval_router={name}"])
        assert set(cfg.router) == set(cfg.eval_router) == set(ROUTER_KEYS), name
    evaluate = compose_cfg("evaluate", ["ckpt=x"])
    assert set(evaluate) == set(EVAL_TOP_KEYS)
    assert set(evaluate.data) == set(EVAL_DATA_KEYS) and set(evaluate.eval) == set(EVAL_KEYS)


def test_check_keys_names_the_key_and_the_allowed_ones():
    check_keys({"a": 1, "b": 2}, "sec", ["a", "b"])
    with pytest.raises(ConfigError, match=r"^sec\.bb: unknown key \(did you mean b\?\); allowed: a, b$"):
        check_keys({"a": 1, "bb": 2}, "sec", ["a", "b"])
    with pytest.raises(ConfigError, match=r"^sec=3: must be a mapping"):
        check_keys(3, "sec", ["a"])


# Data: errors before any loading


def test_val_size_must_leave_training_images():
    size = DATASET_TRAIN_SIZES["fashion_mnist"]
    with pytest.raises(ConfigError, match=rf"^data.val_size={size}: must be smaller than the {size} training images"):
        validate_train_config(compose_cfg("train", [f"data.val_size={size}"]))
    validate_train_config(compose_cfg("train", [f"data.val_size={size - 2}"]))
    # With data.limit_train the validation set is capped at limit_train // 5 (see build_datasets).
    validate_train_config(compose_cfg("train", [f"data.val_size={size}", "data.limit_train=500"]))


@pytest.mark.parametrize(
    "overrides,key,fix",
    [
        (["data.limit_train=1"], "data.limit_train=1", "data.limit_train=2 or more"),
        (
            [f"data.val_size={DATASET_TRAIN_SIZES['fashion_mnist'] - 1}"],
            f"data.val_size={DATASET_TRAIN_SIZES['fashion_mnist'] - 1}",
            f"data.val_size={DATASET_TRAIN_SIZES['fashion_mnist'] - 2} or less",
        ),
    ],
)
def test_a_training_set_of_one_image_is_refused_for_batchnorm_not_the_batch_size(overrides, key, fix):
    # One image is one batch of one, which train.py must drop (BatchNorm): not a batch-size problem.
    with pytest.raises(ConfigError) as info:
        validate_train_config(compose_cfg("train", [*overrides, "data.batch_size=50"]))
    message = str(info.value)
    assert message.startswith(f"{key}: leaves 1 training image") and "BatchNorm" in message and message.endswith(fix)
    assert "batch_size" not in message
    validate_train_config(compose_cfg("train", ["data.limit_train=2", "data.batch_size=50"]))  # two images train


def test_data_root_must_exist_unless_it_is_the_default(tmp_path, monkeypatch):
    monkeypatch.delenv("DMOE_DATA_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)  # the default root, ./data, does not exist here: created on first use
    validate_train_config(compose_cfg("train"))
    validate_eval_config(compose_cfg("evaluate", ["ckpt=x"]))
    typo = tmp_path / "x" / "dtaa"
    for name, extra in (("train", []), ("evaluate", ["ckpt=x"])):
        with pytest.raises(ConfigError, match=r"^data.root=.*dtaa.*: no such directory"):
            (validate_train_config if name == "train" else validate_eval_config)(compose_cfg(name, [f"data.root={typo}", *extra]))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        validate_train_config(compose_cfg("train", [f"data.root={tmp_path / 'file'}"]))
    validate_train_config(compose_cfg("train", [f"data.root={tmp_path}"]))
    assert not typo.exists() and not (tmp_path / "data").exists()  # validation creates nothing


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
        ("random_topk@1", None),
        ("dense", None),
        ("optimal", 0.5),
        ("optimal", [0.9, 0.4]),
    ]


def test_static_plan_policies_are_skipped_with_a_note_when_subcarriers_are_fewer_than_experts():
    train = compose_cfg("train", ["model=tiny", "router=jesa", "channel.num_subcarriers=2"])
    validate_train_config(train)
    cfg = compose_cfg("evaluate", ["ckpt=x"])  # the default policies: none, random_topk@1, topk@1, ..., des, jesa
    notes: list[str] = []
    settings = eval_policies(cfg, train, notes)
    # none needs no subcarrier; jesa, greedy and lagrangian choose their own
    assert {s.policy for s in settings} == {"none", "jesa", "greedy", "lagrangian"}
    assert len(settings) == 1 + 2 * len(cfg.eval.gammas) + len(cfg.eval.lams)
    assert len(notes) == 1
    for label in ("random_topk@1", "topk@1", "topk@2", "channel_topk@2", "dense", "des"):
        assert label in notes[0]
    assert "2 subcarriers for 4 experts" in notes[0]
    # Nothing left to evaluate: say what to pass.
    only_static = compose_cfg("evaluate", ["ckpt=x", f"eval.policies=[{','.join(STATIC_POLICIES)}]"])
    with pytest.raises(ConfigError, match=r"^eval.policies=.*eval.policies=\[jesa\]$"):
        eval_policies(only_static, train)
    # The same evaluation of a checkpoint with enough subcarriers skips nothing.
    notes = []
    assert {s.policy for s in eval_policies(cfg, compose_cfg("train", ["model=tiny"]), notes)} >= set(STATIC_POLICIES) - {
        "random_topk"
    }
    assert notes == []


def test_gamma_policy_needing_more_subcarriers_names_eval_k_min():
    train = compose_cfg("train", ["model=tiny", "router=jesa", "channel.num_subcarriers=2"])
    with pytest.raises(ConfigError, match=r"^eval.k_min=3: jesa needs .* pass eval.k_min=2 or less"):
        eval_policies(compose_cfg("evaluate", ["ckpt=x", "eval.policies=[jesa]", "eval.k_min=3"]), train)


# --------------------------------------------------------------------------------------------
# Checkpoints


def _tiny_cfg(*overrides):
    return compose_cfg("train", ["model=tiny", *overrides])


def _save_tiny_checkpoint(path, cfg):
    model = build_model(cfg, FASHION)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(
        path,
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        scheduler={},
        epoch=1,
        step_in_epoch=0,
        global_step=1,
        config=OmegaConf.to_container(cfg, resolve=True),
        metrics={"history": []},
        rng={},
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


PNG = b"\x89PNG\r\n\x1a\n" + bytes(32)


@pytest.mark.parametrize(
    "name,content",
    [
        ("six.txt", b"hello\n"),
        ("config.yaml", b"seed: 0\nmodel:\n  d_model: 32\n"),
        ("metrics.json", b'{"test": {}}'),
        ("results.png", PNG),
        ("model.pt", "pickled"),
    ],
)
def test_a_file_that_is_not_a_checkpoint_says_so(tmp_path, name, content):
    path = tmp_path / name
    if content == "pickled":  # a torch file holding a module: never unpickled
        torch.save({"model": torch.nn.Linear(2, 2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_checkpoint(path, key="ckpt")
    message = str(info.value)
    assert message.startswith(f"ckpt={str(path)!r}: not a dmoe-torch checkpoint")
    assert "weights_only" not in message and "\n" not in message


def test_a_run_directory_stands_for_its_checkpoint(tmp_path):
    _save_tiny_checkpoint(tmp_path / "checkpoint.pt", _tiny_cfg())
    assert load_checkpoint(tmp_path, key="ckpt")["config"]["model"]["d_model"] == 32
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"^ckpt=.*empty': a directory without checkpoint.pt; pass a run directory"):
        load_checkpoint(empty, key="ckpt")
    # resume= accepts a run directory too
    validate_train_config(compose_cfg("train", [f"resume={tmp_path}"]))
    with pytest.raises(ConfigError, match="^resume=.*a directory without checkpoint.pt"):
        validate_train_config(compose_cfg("train", [f"resume={empty}"]))


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
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
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


def test_combine_error_lists_the_allowed_rules():
    with pytest.raises(ConfigError, match=r"^model\.combine='mean': must be one of renormalized, raw, renormalized_st$"):
        validate_train_config(compose_cfg("train", ["model.combine=mean"]))


@pytest.mark.parametrize("model", ["cnn", "vmoe"])
def test_combine_and_balance_on_reach_every_moe_layer(model):
    cfg = compose_cfg("train", [f"model={model}", "model.combine=raw", "model.balance_on=scores"])
    validate_train_config(cfg)
    layers = list(build_model(cfg, FASHION).moe_layers)
    assert layers and all((m.combine, m.balance_on) == ("raw", "scores") for m in layers)


def test_checkpoint_config_without_combine_keys_means_what_older_runs_did():
    from dmoe_torch.config import validate_checkpoint_config

    cfg = OmegaConf.to_container(compose_cfg("train", ["model=vmoe"]), resolve=True)
    for key in ("combine", "balance_on"):
        del cfg["model"][key]
    cfg = OmegaConf.create(cfg)
    validate_checkpoint_config(cfg)
    layers = build_model(cfg, FASHION).moe_layers
    assert all((m.combine, m.balance_on) == ("renormalized", "selection") for m in layers)


# --------------------------------------------------------------------------------------------
# Huge values: one line naming the key, never a traceback after the run started


def integer_keys(cfg, prefix: str = "") -> list[str]:
    """Dotted keys of every integer value in ``cfg`` (bools aside)."""
    keys = []
    for name, value in OmegaConf.to_container(cfg, resolve=True).items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            keys += integer_keys(OmegaConf.create(value), f"{key}.")
        elif isinstance(value, int) and not isinstance(value, bool):
            keys.append(key)
    return keys


# Integer keys whose default is null
NULL_INTEGER_KEYS = ("data.limit_train", "data.limit_test", "train.stop_after_epochs", "router.k_max", "eval_router.k_max")
MODEL_GROUPS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))
# Every integer key of train.yaml with the default model, then the model keys of the other architectures.
HUGE_CASES = [("convmoe", key) for key in sorted({*integer_keys(compose_cfg("train")), *NULL_INTEGER_KEYS})] + [
    (model, key) for model in ("cnn", "vmoe") for key in integer_keys(compose_cfg("train", [f"model={model}"]).model, "model.")
]


@pytest.mark.parametrize("model,key", HUGE_CASES, ids=[f"{m}-{k}" for m, k in HUGE_CASES])
def test_every_integer_key_beyond_int64_is_refused_naming_it(model, key):
    with pytest.raises(ConfigError) as info:
        validate_train_config(compose_cfg("train", [f"model={model}", f"{key}={2**64}"]))
    message = str(info.value)
    assert message.startswith(f"{key}={2**64}") and "must be" in message  # an integer range, int64 at most


@pytest.mark.parametrize(
    "key", ["eval.channel_draws", "eval.k_min", "eval.k_max", "data.batch_size", "data.limit_test", "data.num_workers", "seed"]
)
def test_every_evaluate_integer_key_beyond_int64_is_refused_naming_it(key):
    with pytest.raises(ConfigError, match=rf"^{key}={2**64}: must be an integer"):
        validate_eval_config(compose_cfg("evaluate", ["ckpt=x", f"{key}={2**64}"]))


def test_data_loader_workers_are_capped_per_core():
    cores = os.cpu_count() or 1
    validate_train_config(compose_cfg("train", [f"data.num_workers={4 * cores}"]))
    with pytest.raises(ConfigError, match=rf"^data.num_workers=1000000: must be an integer in \[0, {4 * cores}\]"):
        validate_train_config(compose_cfg("train", ["data.num_workers=1000000"]))  # spawned a million processes


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("train.lr", "1e38", r"^train.lr=1e\+38: must be a finite number > 0 and <= 3.40282e\+37"),
        ("channel.csi_delay_frames", str(10**20), r"^channel.csi_delay_frames=100000000000000000000: must be an integer"),
    ],
)
def test_floats_that_overflow_later_are_refused(key, value, match):
    with pytest.raises(ConfigError, match=match):
        validate_train_config(compose_cfg("train", [f"{key}={value}"]))


# (overrides, the keys the message names first): each would allocate terabytes or more
MEMORY_CASES = [
    (["model=convmoe", "model.d_model=100000"], "model.num_experts=8, model.d_model=100000, model.hidden_mult=2, model.depth=2"),
    (
        ["model=tiny", "model.num_moe_layers=100000000000"],
        "model.num_experts=4, model.d_model=32, model.hidden_mult=2, model.num_moe_layers=100000000000",
    ),
    (["model=tiny_convmoe", "model.kernel_size=100001"], "model.depth=2, model.d_model=16, model.kernel_size=100001"),
    (["model=tiny", "model.num_experts=10000000", "router=jesa"], "model.num_experts=10000000, model.d_model=32"),
    (
        ["router=jesa", "channel.num_subcarriers=100000000000"],
        "data.batch_size=256, model.num_experts=8, channel.num_subcarriers=100000000000, model.depth=2",
    ),
    (["model=tiny_vmoe", "model.patch_size=1", "data.batch_size=100000"], "data.batch_size=100000, model.patch_size=1"),
]


@pytest.mark.parametrize("overrides,named", MEMORY_CASES, ids=[" ".join(o) for o, _ in MEMORY_CASES])
def test_configs_that_cannot_fit_in_memory_are_refused_before_allocating(overrides, named):
    with pytest.raises(ConfigError) as info:
        validate_train_config(compose_cfg("train", [*overrides, "device=cpu"]))
    message = str(info.value)
    assert message.startswith(named) and ": training needs at least " in message and "of RAM" in message


@pytest.mark.parametrize("model", MODEL_GROUPS)
def test_the_memory_estimate_is_a_lower_bound_of_the_weights(model):
    from dmoe_torch.config import TRAINING_WEIGHT_COPIES, memory_terms

    cfg = compose_cfg("train", [f"model={model}"])
    terms = {
        t.what: t.size
        for t in memory_terms(validate_model(cfg), batch_size=1, images=1, num_subcarriers=16, frame="token", training=True)
    }
    built = build_model(cfg, FASHION)
    expert_params = sum(p.numel() for layer in built.moe_layers for p in layer.experts.parameters())
    all_params = sum(p.numel() for p in built.parameters())
    weight_bytes = 4 * TRAINING_WEIGHT_COPIES  # float32, with gradients and AdamW's two moments
    assert 0.9 * expert_params * weight_bytes <= terms["expert weights"] <= expert_params * weight_bytes
    assert terms["expert weights"] + terms.get("block weights", 0) <= all_params * weight_bytes


def test_an_evaluation_that_cannot_fit_in_memory_is_refused():
    train = compose_cfg("train", ["router=jesa"])
    cfg = compose_cfg("evaluate", ["ckpt=x", "eval.policies=[jesa]", "device=cpu", "channel.num_subcarriers=1000000000"])
    train = OmegaConf.merge(train, {"channel": {"num_subcarriers": 1000000000}})
    # one channel draw's link costs for the 10000 test images are kept for every setting
    with pytest.raises(
        ConfigError,
        match=r"^data.limit_test=None, model.num_experts=8, channel.num_subcarriers=1000000000, "
        r"model.depth=2: evaluation needs at least .* of RAM \(link costs",
    ):
        eval_policies(cfg, train)
    eval_policies(compose_cfg("evaluate", ["ckpt=x", "eval.policies=[jesa]", "device=cpu"]), compose_cfg("train"))
