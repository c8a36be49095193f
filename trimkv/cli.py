"""Hydra entry points for training gates and evaluating eviction policies."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
log = logging.getLogger("trimkv")


def _run(function, cfg: DictConfig):
    """Call `function(cfg, output_dir)`; user errors become one log line and a non-zero exit."""
    output_dir = HydraConfig.get().runtime.output_dir
    try:
        return function(cfg, output_dir)
    except (ValueError, FileNotFoundError) as error:
        log.error("%s", error)
        if HydraConfig.get().mode.name == "MULTIRUN":
            raise
        sys.exit(2)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def train_main(cfg: DictConfig) -> float | None:
    from trimkv.training.trainer import train

    OmegaConf.resolve(cfg)
    summary = _run(train, cfg)
    return summary["final_loss"] if summary else None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def evaluate_main(cfg: DictConfig) -> float | None:
    from trimkv.evaluation.runner import evaluate

    OmegaConf.resolve(cfg)
    metrics = _run(evaluate, cfg)
    return metrics["accuracy"] if metrics else None
