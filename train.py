"""Train a distributed-MoE classifier:  python train.py [key=value ...]   (see conf/train.yaml)."""
from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dmoe_torch.config import report_errors, validate_train_config


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    with report_errors():
        validate_train_config(cfg)  # the whole config, before any import of torch models or data

        from dmoe_torch.data import DataUnavailableError
        from dmoe_torch.training import NonFiniteLossError, fit

        with report_errors(DataUnavailableError, NonFiniteLossError):
            status = fit(cfg, HydraConfig.get().runtime.output_dir)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
