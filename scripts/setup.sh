#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the package and its test tools,
# and the Fashion-MNIST files from Debian's `dataset-fashion-mnist` where apt exists.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
# The tested versions of torch / torchvision are pinned in constraints.txt (pyproject.toml
# gives ranges); pip resolves them from the local disk here.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'

fmnist=/usr/share/datasets/fashion-mnist
if [ ! -f "$fmnist/train-images-idx3-ubyte.gz" ] && command -v apt-get >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    echo "installing Fashion-MNIST from Debian's dataset-fashion-mnist package" >&2
    $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
        || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
        || echo "warning: could not install dataset-fashion-mnist; torchvision will try to download the data" >&2
fi
