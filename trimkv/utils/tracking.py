"""Experiment tracking: W&B when `logger=wandb`, nothing extra when `logger=none`.

Progress always goes to the `logging` module (Hydra writes it to the run's log file); W&B adds
charts, the resolved config, summary metrics and sample tables.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class Tracker:
    """A thin wrapper over a W&B run, or a no-op when W&B is not configured."""

    def __init__(self, logger_cfg: Any, run_config: dict, output_dir: str, job_type: str):
        self.run = None
        name = (logger_cfg or {}).get("name", "none") if logger_cfg is not None else "none"
        if name == "none":
            return
        if name != "wandb":
            raise ValueError(f"unknown logger {name!r}; use logger=none or logger=wandb")
        import wandb

        self.run = wandb.init(
            project=logger_cfg.get("project", "trimkv"),
            entity=logger_cfg.get("entity"),
            group=logger_cfg.get("group"),
            name=logger_cfg.get("run_name"),
            tags=list(logger_cfg.get("tags") or []),
            mode=logger_cfg.get("mode"),
            dir=output_dir,
            job_type=job_type,
            config=run_config,
            reinit="finish_previous",
        )
        log.info("W&B run %s (mode %s)", getattr(self.run, "id", "?"), logger_cfg.get("mode"))

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Table(columns=columns, data=rows)})

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            for key, value in metrics.items():
                self.run.summary[key] = value

    def log_artifact(self, path: str, name: str, artifact_type: str, metadata: dict | None = None,
                     aliases: list[str] | None = None) -> None:
        if self.run is not None:
            import wandb

            artifact = wandb.Artifact(name, type=artifact_type, metadata=metadata or {})
            artifact.add_dir(path)
            self.run.log_artifact(artifact, aliases=["latest", *(aliases or [])])

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
