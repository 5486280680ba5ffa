"""Evaluate routing policies on a trained checkpoint:  python evaluate.py ckpt=RUN_DIR [key=value ...]

Writes results.csv, results.md and results.png (accuracy vs. energy) to the Hydra output
directory and logs the table to the console and evaluate.log (python evaluate.py --help).
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dmoe_torch.cli import report_errors, run_entry_point, serve_if_worker
from dmoe_torch.config.eval import validate_eval_config
from dmoe_torch.runtime import ExchangeError, launch


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from dmoe_torch.data import DataUnavailableError

    # One stderr line per error: a bad config or checkpoint exits 2, missing data 1.
    with report_errors(DataUnavailableError, ExchangeError):
        validate_eval_config(cfg)
        from dmoe_torch.engine.evaluation import run_evaluation

        launch(cfg, run_evaluation, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    serve_if_worker("evaluate")  # torchrun ranks >= 1 of runtime=distributed: expert workers, no run directory
    run_entry_point(main, "evaluate")  # Hydra's own errors (foo=1, +model=tiny): one line, exit 2
