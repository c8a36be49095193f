"""Data-parallel training with real torch.distributed (gloo, 2 CPU processes started by torchrun).

The global batch is the same in every run, so 2 processes must end with the gates of 1 process
(up to float reduction order).
"""

from __future__ import annotations

import pytest
import torch

from training_helpers import gate_tensors, read_log, run_train, tiny_overrides

ENGINE_SETTINGS = ["train.attention=blockwise", "train.attention_block_size=16", "train.logit_block_size=64",
                   "train.gradient_checkpointing=true", "loss.capacity_block_size=32", "train.max_steps=4"]


@pytest.fixture(scope="module")
def single_process_run(synthetic_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    run_train(*tiny_overrides(synthetic_model_dir, *ENGINE_SETTINGS), f"hydra.run.dir={run_dir}")
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "micro_batch_size"), [("ddp", 2), ("ddp", 1), ("fsdp", 2)])
def test_two_processes_match_one(synthetic_model_dir, single_process_run, tmp_path, strategy, micro_batch_size):
    # Global batch 4 over 2 processes: micro-batches of 2, or of 1 with 2 accumulation steps (DDP no_sync).
    run_train(*tiny_overrides(synthetic_model_dir, *ENGINE_SETTINGS), f"train.strategy={strategy}",
              f"train.micro_batch_size={micro_batch_size}", f"hydra.run.dir={tmp_path}", processes=2)
    single, distributed = gate_tensors(single_process_run), gate_tensors(tmp_path)
    assert set(single) == set(distributed)
    for name, tensor in single.items():
        assert torch.allclose(distributed[name], tensor, atol=1e-5), (name, (distributed[name] - tensor).abs().max())
    single_log, distributed_log = read_log(single_process_run), read_log(tmp_path)
    assert [entry["tokens"] for entry in distributed_log] == [entry["tokens"] for entry in single_log]
    assert distributed_log[-1]["loss"] == pytest.approx(single_log[-1]["loss"], rel=1e-5)
