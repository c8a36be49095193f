"""Shared by the gate-training tests: composing the real train config and running train.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


def compose_train_config(overrides: list[str]):
    """conf/train.yaml composed by Hydra with `overrides`, resolved."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    OmegaConf.resolve(cfg)
    return cfg


def tiny_overrides(model_dir: Path, *extra: str) -> list[str]:
    """A few fast steps of the tiny recipe on a random-weight model from conftest."""
    return [f"model.path={model_dir}", "budget=4", "data.num_examples=16", "train.batch_size=4", "train.max_steps=3",
            "gate.bias_init=2.0", "gate.intermediate_size=16", "optim.lr=3e-2", "optim.warmup_steps=1",
            "train.log_every=1", *extra]


def train_command(*overrides: str, processes: int = 1) -> list[str]:
    if processes == 1:
        return [sys.executable, str(REPO / "train.py"), *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            str(REPO / "train.py"), *overrides]


def run_train(*overrides: str, processes: int = 1, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(train_command(*overrides, processes=processes), capture_output=True, text=True, cwd=REPO,
                            timeout=timeout, env=env)
    if result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def gate_tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "gates" / "gates.safetensors"))
