"""A 2-job evaluate.py multirun through Hydra's submitit launcher on a real local SLURM cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_evaluate_multirun_runs_as_slurm_array(slurm_cluster, synthetic_model_dir, tmp_path):
    sweep = tmp_path / "sweep"
    command = [
        sys.executable, str(REPO / "evaluate.py"), "-m", f"model.path={synthetic_model_dir}", "limit=3",
        "num_threads=1", "method=streamingllm,h2o", "budget=32",
        "hydra/launcher=slurm", f"hydra.launcher.partition={slurm_cluster.partition}",
        "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
        "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep}",
        f"hydra.launcher.submitit_folder={sweep}/.submitit/%j",
    ]
    result = subprocess.run(command, cwd=REPO, env=slurm_cluster.env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{slurm_cluster.logs()}"

    # One SLURM job array with one task per configuration.
    scripts = list((sweep / ".submitit").rglob("*_submission.sh"))
    assert len(scripts) == 1 and "#SBATCH --array=0-1" in scripts[0].read_text()
    task_logs = sorted((sweep / ".submitit").rglob("*_log.out"))
    assert [log.name.split("_")[1] for log in task_logs] == ["0", "1"]

    for method in ("streamingllm", "h2o"):
        run_dir = sweep / "synthetic" / "tiny" / f"{method}_b32_buf0_seed0"
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["method"]["name"] == method and metrics["budget"] == 32 and metrics["num_problems"] == 3
        samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == 3
        assert all(sample["kv"]["retained_peak"] <= 33 for sample in samples)
    # The array tasks leave the queue once SLURM has finished tearing them down.
    deadline = time.monotonic() + 60
    while slurm_cluster.run("squeue", "-h").strip() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert slurm_cluster.run("squeue", "-h").strip() == ""
