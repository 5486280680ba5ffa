"""Train a distributed-MoE classifier:  python train.py [key=value ...]   (python train.py --help)."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dmoe_torch.cli import report_errors, run_entry_point, serve_if_worker
from dmoe_torch.runtime import ExchangeError, launch


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from dmoe_torch.data import DataUnavailableError
    from dmoe_torch.engine.training import NonFiniteLossError, fit

    # One stderr line per error: a bad config exits 2, missing data or a diverging loss 1.
    with report_errors(DataUnavailableError, NonFiniteLossError, ExchangeError):
        status = launch(cfg, fit, HydraConfig.get().runtime.output_dir)  # validates the whole config first
    if status:
        sys.exit(status)


if __name__ == "__main__":
    serve_if_worker("train")  # torchrun ranks >= 1 of runtime=distributed: expert workers, no run directory
    run_entry_point(main, "train")  # Hydra's own errors (foo=1, router=nope): one line, exit 2
