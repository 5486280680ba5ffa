"""Fixtures the tests share; plain helpers are in support.py (importable from every test folder,
since pytest puts this folder on sys.path)."""

from __future__ import annotations

import pytest

from dmoe_torch.data import DEBIAN_FASHION_MNIST_DIR


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    """A fresh data.root: data.py fills it from the Debian package's Fashion-MNIST files."""
    if not (DEBIAN_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not installed in {DEBIAN_FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)")
    return str(tmp_path_factory.mktemp("data"))
