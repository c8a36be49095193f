"""Gate training as a SLURM job through Hydra's submitit launcher, on a real local cluster.

The job is preempted the way SLURM does it (SIGTERM, then submitit's SIGUSR2), saves a checkpoint,
is requeued by submitit, and the requeued job resumes from that checkpoint to the gates of an
uninterrupted run.
"""

from __future__ import annotations

import subprocess
import time

import pytest
import torch

from training_helpers import REPO, gate_tensors, read_log, run_train, tiny_overrides, train_command


@pytest.mark.slow
def test_preempted_job_requeues_and_resumes(slurm_cluster, synthetic_model_dir, tmp_path):
    overrides = tiny_overrides(synthetic_model_dir, "train.max_steps=150", "data.num_examples=600")
    sweep = tmp_path / "sweep"
    launch = train_command(
        "-m", *overrides, "hydra/launcher=slurm", f"hydra.launcher.partition={slurm_cluster.partition}",
        "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
        "hydra.launcher.timeout_min=20", f"hydra.sweep.dir={sweep}", f"hydra.launcher.submitit_folder={sweep}/.submitit/%j",
    )
    launcher = subprocess.Popen(launch, cwd=REPO, env=slurm_cluster.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    job_dir = sweep / "0"
    log_path = job_dir / "train_log.jsonl"
    deadline = time.monotonic() + 240
    while (not log_path.is_file() or len(read_log(job_dir)) < 3) and time.monotonic() < deadline:
        if launcher.poll() is not None:
            pytest.fail(f"the launcher exited early:\n{launcher.stdout.read()[-4000:]}\n{slurm_cluster.logs()}")
        time.sleep(0.05)
    job_id = slurm_cluster.run("squeue", "-h", "-o", "%i").split()[0]
    # The signal that submitit requests from SLURM before a timeout or preemption (`--signal=USR2@<s>`).
    slurm_cluster.run("scancel", job_id, "--signal", "USR2")

    # SLURM defers a requeued batch job by a couple of minutes (its begin time); make it eligible now.
    deadline = time.monotonic() + 120
    state = ""
    while time.monotonic() < deadline and launcher.poll() is None:
        state = slurm_cluster.run("squeue", "-h", "-j", job_id, "-o", "%T %r").strip()
        if state.startswith("PENDING"):
            slurm_cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
            break
        time.sleep(0.1)
    assert state.startswith("PENDING"), f"job {job_id} was not requeued (state {state!r})\n{slurm_cluster.logs()}"

    try:
        output, _ = launcher.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        launcher.kill()
        output, _ = launcher.communicate()
        pytest.fail(f"the SLURM sweep did not finish:\n{output[-4000:]}\n{slurm_cluster.logs()}")
    assert launcher.returncode == 0, output[-4000:]

    job_logs = "\n".join(path.read_text() for path in (sweep / ".submitit").rglob("*_log.*"))
    assert "Requeued job" in job_logs, job_logs[-4000:]
    assert "resumed from" in job_logs
    assert [entry["step"] for entry in read_log(job_dir)] == list(range(1, 151))

    whole = tmp_path / "whole"
    run_train(*overrides, f"hydra.run.dir={whole}")
    expected, resumed = gate_tensors(whole), gate_tensors(job_dir)
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), (name, (resumed[name] - tensor).abs().max())
