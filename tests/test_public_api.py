"""The public names of ``dmoe_torch``: complete ``__all__``, importable, cheap to import."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import dmoe_torch

REPO = Path(__file__).resolve().parents[1]


def test_the_names_of_the_readme_import_from_the_package():
    from dmoe_torch import ChannelConfig, MoELayer, RouterSpec, Selection, WirelessChannel, des, jesa, route
    from dmoe_torch.channel import geometry
    from dmoe_torch.moe import MoELayer as HomeLayer
    from dmoe_torch.selection import registry

    assert MoELayer is HomeLayer and route is registry.route
    assert ChannelConfig is geometry.ChannelConfig and WirelessChannel is geometry.WirelessChannel
    assert {des.__name__, jesa.__name__, Selection.__name__, RouterSpec.__name__} == {"des", "jesa", "Selection", "RouterSpec"}


def test_the_class_of_every_conf_model_is_public():
    """A model of conf/model/ built as train.py builds it is a public name of the package."""
    from omegaconf import OmegaConf

    from dmoe_torch.engine.build import build_model

    dataset = SimpleNamespace(in_channels=1, num_classes=10, image_size=28)
    classes = set()
    for path in sorted((REPO / "conf" / "model").glob("*.yaml")):
        model = build_model(OmegaConf.create({"model": OmegaConf.load(path)}), dataset)
        assert getattr(dmoe_torch, type(model).__name__, None) is type(model), path.name
        classes.add(type(model).__name__)
    assert classes == {"ConvMoEClassifier", "DMoEClassifier", "VMoEClassifier"}


def test_all_lists_every_public_name_and_each_is_its_modules_object():
    public = set(dmoe_torch.__all__) - {"__version__"}
    assert public == set(dmoe_torch._HOME_OF)
    assert len(dmoe_torch.__all__) == len(set(dmoe_torch.__all__))
    for name in public:
        home = importlib.import_module(dmoe_torch._HOME_OF[name])
        assert getattr(dmoe_torch, name) is getattr(home, name), name
    assert public <= set(dir(dmoe_torch))
    namespace: dict = {}
    exec("from dmoe_torch import *", namespace)
    assert public <= set(namespace)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'MoeLayer'"):
        _ = dmoe_torch.MoeLayer


def test_importing_the_package_loads_no_torch_and_sets_numbas_threading_layer():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    code = "import sys, numba, dmoe_torch; print('torch' in sys.modules, numba.config.THREADING_LAYER)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "workqueue"]
    env["NUMBA_THREADING_LAYER"] = "omp"  # a user's choice wins
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "omp"]
