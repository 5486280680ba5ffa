"""Evaluation sweeps of a trained checkpoint and the figures (make figures; --help for options).

python scripts/figures.py                              # outputs/default/checkpoint.pt -> outputs/figures/
python scripts/figures.py --quick --ckpt RUN_DIR --out DIR
python scripts/figures.py --jobs 2                     # two sweep points at a time (Hydra joblib launcher)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmoe_torch.engine.sweeps import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
