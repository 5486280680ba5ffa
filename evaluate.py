"""Evaluate routing policies on a trained checkpoint:  python evaluate.py ckpt=PATH [key=value ...]

Writes results.csv, results.md and results.png (accuracy vs. energy) to the Hydra output
directory and prints the table (see conf/evaluate.yaml for the policy syntax).
"""
from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dmoe_torch.config import report_errors, validate_eval_config


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with report_errors():
        validate_eval_config(cfg)

        from dmoe_torch.data import DataUnavailableError
        from dmoe_torch.evaluation import run_evaluation

        with report_errors(DataUnavailableError):
            run_evaluation(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
