"""The config schema's promises (docs/architecture.md, "How to add a config key" and "How to
add a model"): a new model is one config dataclass and one MODELS entry, a new key is one
schema field (plus a migration line when old runs lack it), and both are strict."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

import dmoe_torch.config as config
from dmoe_torch.config import ConfigError, load_train_config
from dmoe_torch.config.migration import ADDED_KEY_DEFAULTS
from dmoe_torch.config.schema import TrainConfig
from dmoe_torch.data import DataInfo
from dmoe_torch.engine.build import build_model, router_specs
from dmoe_torch.models import MODELS, ModelConfig, ModelOutput
from dmoe_torch.models.common import layer_inputs
from dmoe_torch.moe import MoELayer, perfect_costs
from dmoe_torch.utils import check_int

CONF = str(Path(__file__).resolve().parents[2] / "conf")
FASHION = DataInfo("fashion_mnist", 1, 10, 28, tuple(str(i) for i in range(10)))


class ToyClassifier(nn.Module):
    """Mean-pooled pixels -> linear to d_model -> ``layers`` MoE layers -> head."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, config: ToyConfig) -> None:
        super().__init__()
        self.config, self.num_experts, self.num_moe_layers, self.tokens_per_input = config, config.num_experts, config.layers, 1
        self.embed = nn.Linear(in_channels, config.d_model)
        self.moe_layers = nn.ModuleList(
            MoELayer(config.d_model, config.num_experts, **config.moe_kwargs()) for _ in range(config.layers)
        )
        self.head = nn.Linear(config.d_model, num_classes)

    def forward(self, x, costs, specs, generator=None, delivered=None) -> ModelOutput:
        h = self.embed(x.mean((2, 3)))
        results = []
        for layer, (layer_costs, spec, layer_delivered) in zip(
            self.moe_layers, layer_inputs(x, costs, specs, delivered, self.num_moe_layers), strict=True
        ):
            results.append(layer(h, layer_costs, spec, generator=generator, delivered=layer_delivered))
            h = results[-1].out
        return ModelOutput.from_layers(self.head(h), results)


@dataclass(frozen=True)
class ToyConfig(ModelConfig):
    """The toy model's keys: those of every model and ``layers``."""

    classifier = ToyClassifier
    layers: int = 1

    def check_fields(self) -> None:
        check_int(self.layers, "model.layers", minimum=1, maximum=3)

    @property
    def num_moe_layers(self) -> int:
        return self.layers


@dataclass(frozen=True)
class ToyTrainConfig(TrainConfig):
    """train.* with one more key, checked where it is declared."""

    toy_coef: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        config.check_float(self.toy_coef, "train.toy_coef", minimum=0.0, maximum=1.0)


TOY_MODEL = {"name": "toy", "d_model": 16, "num_experts": 4, "hidden_mult": 2, "layers": 2}


def toy_cfg(*overrides: str, model: dict | None = None, train: dict | None = None):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["device=cpu", *overrides])
    cfg = OmegaConf.to_container(cfg)
    cfg["model"] = dict(TOY_MODEL if model is None else model)
    cfg["train"].update(train or {})
    return OmegaConf.create(cfg)


@pytest.fixture
def toy_tables(monkeypatch):
    """The toy model in the model table and train.toy_coef in the schema, for one test."""
    monkeypatch.setitem(MODELS, "toy", ToyConfig)
    monkeypatch.setattr(config, "TrainConfig", ToyTrainConfig)


def test_a_new_model_and_key_validate_and_build(toy_tables):
    cfg = toy_cfg(train={"toy_coef": 0.25})
    run = load_train_config(cfg)
    assert run.model == ToyConfig(d_model=16, num_experts=4, hidden_mult=2, layers=2)
    assert run.train.toy_coef == 0.25 and run.model_name == "toy"
    model = build_model(cfg, FASHION)
    assert isinstance(model, ToyClassifier) and len(model.moe_layers) == 2
    specs = router_specs(cfg, "router", 0.0)
    assert len(specs) == 2
    x = torch.randn(3, 1, 28, 28)
    costs = [perfect_costs(3, 4, 16) for _ in range(2)]
    assert model(x, costs, specs).logits.shape == (3, 10)


def test_a_new_key_is_checked_and_old_runs_read_its_migration_value(toy_tables, monkeypatch):
    with pytest.raises(ConfigError, match=r"^train\.toy_coef=2\.0: must be a finite number >= 0 and <= 1$"):
        load_train_config(toy_cfg(train={"toy_coef": 2.0}))
    without = toy_cfg()  # a run recorded before the key existed
    with pytest.raises(ConfigError, match=r"^train\.toy_coef is missing from the config$"):
        load_train_config(without)
    monkeypatch.setitem(ADDED_KEY_DEFAULTS, "train.toy_coef", 0.5)  # the migration line
    assert load_train_config(without).train.toy_coef == 0.5


def test_a_new_models_keys_are_strict_and_checked(toy_tables):
    with pytest.raises(ConfigError) as info:
        load_train_config(toy_cfg(model={**TOY_MODEL, "depth": 2}))
    message = str(info.value)
    assert message.startswith("model.depth: unknown key; allowed: name, d_model, num_experts, ") and message.endswith(", layers")
    assert "\n" not in message
    with pytest.raises(ConfigError, match=r"^model\.layers=4: must be an integer in \[1, 3\]$"):
        load_train_config(toy_cfg(model={**TOY_MODEL, "layers": 4}))
    with pytest.raises(ConfigError, match=r"^model\.name='toy2': must be one of cnn, convmoe, vmoe, toy$"):
        load_train_config(toy_cfg(model={**TOY_MODEL, "name": "toy2"}))


def test_without_the_tables_the_toy_model_and_key_are_refused():
    with pytest.raises(ConfigError, match=r"^model\.name='toy': must be one of cnn, convmoe, vmoe$"):
        load_train_config(toy_cfg())
    cfg = toy_cfg(
        model={"name": "cnn", "d_model": 16, "num_experts": 4, "num_moe_layers": 1, "hidden_mult": 2}, train={"toy_coef": 0.1}
    )
    with pytest.raises(ConfigError, match=r"^train\.toy_coef: unknown key .*; allowed: epochs, lr, "):
        load_train_config(cfg)


def test_the_model_table_matches_the_model_yamls():
    """Every conf/model/*.yaml names a model of the table and has its keys; a key it
    leaves out is one with a migration value (read as that value)."""
    for path in sorted(Path(CONF, "model").glob("*.yaml")):
        section = OmegaConf.to_container(OmegaConf.load(path))
        keys = MODELS[section["name"]].keys()
        assert set(section) <= set(keys), path.name
        assert all(f"model.{k}" in ADDED_KEY_DEFAULTS for k in keys if k not in section), path.name
