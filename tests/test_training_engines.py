"""Training engines: memory-saving paths, packing, gradient accumulation, checkpoints and resume."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch

from helpers import attach_random_gates
from training_helpers import (
    REPO,
    compose_train_config,
    gate_tensors,
    read_log,
    run_train,
    tiny_overrides,
    train_command,
)
from trimkv.cache import enable_eviction
from trimkv.gates import gate_mode
from trimkv.training.attention import TrainingAttention, training_attention
from trimkv.training.data import TrainingExample, collate, pack_examples
from trimkv.training.distributed import DistributedContext
from trimkv.training.trainer import Trainer

MEMORY_SAVING = ["train.attention=blockwise", "train.attention_block_size=7", "train.logit_block_size=5",
                 "train.gradient_checkpointing=true", "loss.capacity_block_size=6"]
# The CPU default of train.attention=auto: the fused kernel with the folded age bias.
FUSED = ["train.attention=sdpa", "train.logit_block_size=5", "loss.capacity_block_size=6"]


def train_in_process(model_dir, run_dir, *overrides):
    cfg = compose_train_config(tiny_overrides(model_dir, *overrides))
    trainer = Trainer(cfg, run_dir, DistributedContext())
    trainer.setup()
    summary = trainer.run()
    return summary, gate_tensors(run_dir)


def test_memory_saving_paths_train_identical_gates(synthetic_model_dir, tmp_path):
    _, reference = train_in_process(synthetic_model_dir, tmp_path / "naive")
    _, saving = train_in_process(synthetic_model_dir, tmp_path / "saving", *MEMORY_SAVING)
    _, accumulated = train_in_process(synthetic_model_dir, tmp_path / "accumulated", *MEMORY_SAVING,
                                      "train.micro_batch_size=1")
    _, fused = train_in_process(synthetic_model_dir, tmp_path / "fused", *FUSED)

    initial_bias = torch.full_like(reference["model.layers.0.self_attn.retention_gate.bias"], 2.0)
    assert not torch.allclose(reference["model.layers.0.self_attn.retention_gate.bias"], initial_bias, atol=1e-3)
    for name, tensor in reference.items():
        assert torch.allclose(saving[name], tensor, atol=1e-5), (name, (saving[name] - tensor).abs().max())
        assert torch.allclose(accumulated[name], tensor, atol=1e-5), (name, (accumulated[name] - tensor).abs().max())
        assert torch.allclose(fused[name], tensor, atol=1e-5), (name, (fused[name] - tensor).abs().max())
    assert read_log(tmp_path / "naive")[-1]["loss"] == pytest.approx(read_log(tmp_path / "saving")[-1]["loss"], rel=1e-5)


def test_released_normalization_same_on_both_paths(synthetic_model_dir, tmp_path):
    released = "loss.capacity_normalization=released"
    _, reference = train_in_process(synthetic_model_dir, tmp_path / "naive", released)
    _, saving = train_in_process(synthetic_model_dir, tmp_path / "saving", released, *MEMORY_SAVING)
    for name, tensor in reference.items():
        assert torch.allclose(saving[name], tensor, atol=1e-5), (name, (saving[name] - tensor).abs().max())
    assert read_log(tmp_path / "naive")[0]["loss/capacity"] > 0


@pytest.mark.parametrize("backend", ["blockwise", "sdpa", "naive"])
def test_packed_row_matches_separate_documents(synthetic_model_dir, backend):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(synthetic_model_dir).eval()
    enable_eviction(model, "sdpa")
    attach_random_gates(model)
    generator = torch.Generator().manual_seed(3)
    documents = [torch.randint(5, 60, (length,), generator=generator).tolist() for length in (7, 12, 5)]
    examples = [TrainingExample(ids, ids) for ids in documents]
    packed = pack_examples(examples, max_length=24)
    assert len(packed) == 1
    assert packed[0].document_lengths == [7, 12, 5]
    batch = collate(packed, pad_token_id=0)
    assert batch["position_ids"][0].tolist() == list(range(7)) + list(range(12)) + list(range(5))
    assert batch["labels"][0, 7].item() == -100
    assert batch["labels"][0, 19].item() == -100  # document starts

    def hidden(input_ids, position_ids, document_ids):
        attention = TrainingAttention(backend, block_size=5, document_ids=document_ids)
        with torch.no_grad(), gate_mode(model, "train"), training_attention(model, attention):
            return model.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state

    packed_hidden = hidden(batch["input_ids"], batch["position_ids"], batch["document_ids"])
    start = 0
    for ids in documents:
        alone = hidden(torch.tensor([ids]), torch.arange(len(ids))[None], None)
        assert torch.allclose(packed_hidden[:, start:start + len(ids)], alone, atol=1e-5)
        start += len(ids)


def test_packed_training_runs_and_logs_gate_statistics(synthetic_model_dir, tmp_path):
    summary, _ = train_in_process(synthetic_model_dir, tmp_path, "data.packing=true", "train.max_length=200",
                                  "train.batch_size=2", *MEMORY_SAVING)
    log = read_log(tmp_path)
    assert summary["steps"] == 3
    assert len(log) == 3
    for key in ("loss/kl", "loss/ntp", "loss/capacity", "lr", "beta_mean/layer1", "occupancy/layer0", "grad_norm"):
        assert key in log[0], key
    assert log[0]["tokens"] > 2 * 100  # several synthetic examples per packed row


def test_checkpoint_folder_contents_and_latest_pointer(synthetic_model_dir, tmp_path):
    train_in_process(synthetic_model_dir, tmp_path, "train.save_every=1", "train.keep_checkpoints=1")
    folder = tmp_path / "checkpoints"
    assert (folder / "latest").read_text().strip() == "step-00000002"
    assert sorted(path.name for path in folder.iterdir()) == ["latest", "step-00000002"]
    state = torch.load(folder / "step-00000002" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2
    assert set(state) >= {"optimizer", "scheduler", "rng", "data"}
    assert json.loads((folder / "step-00000002" / "gate_config.json").read_text())["steps"] == 2


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.micro_batch_size=3"], "must be a multiple of train.micro_batch_size=3"),
    (["train.batch_size=0"], "must be a positive multiple"),
])
def test_batch_settings_are_validated(synthetic_model_dir, tmp_path, overrides, message):
    cfg = compose_train_config(tiny_overrides(synthetic_model_dir, *overrides))
    with pytest.raises(ValueError, match=message):
        Trainer(cfg, tmp_path, DistributedContext())


def test_resume_requires_a_checkpoint(synthetic_model_dir, tmp_path):
    cfg = compose_train_config(tiny_overrides(synthetic_model_dir, "resume=true"))
    trainer = Trainer(cfg, tmp_path, DistributedContext())
    trainer.setup()
    with pytest.raises(FileNotFoundError, match="resume=true"):
        trainer.run()


@pytest.mark.slow
def test_killed_run_resumes_to_identical_gates(synthetic_model_dir, tmp_path):
    overrides = tiny_overrides(synthetic_model_dir, "train.max_steps=12", "train.save_every=3", "data.num_examples=48",
                               *MEMORY_SAVING)
    run_train(*overrides, f"hydra.run.dir={tmp_path / 'whole'}")

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(train_command(*overrides, f"hydra.run.dir={interrupted}"), cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = interrupted / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not latest.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)  # no chance to save anything more
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (interrupted / "gates").exists()
    killed_at = len(read_log(interrupted))
    assert 3 <= killed_at < 12

    result = run_train(*overrides, f"hydra.run.dir={interrupted}", "resume=true")
    assert "resumed from" in result.stdout + result.stderr
    assert [entry["step"] for entry in read_log(interrupted)] == list(range(1, 13))
    whole, resumed = gate_tensors(tmp_path / "whole"), gate_tensors(interrupted)
    for name, tensor in whole.items():
        assert torch.equal(resumed[name], tensor), (name, (resumed[name] - tensor).abs().max())


def test_sigterm_saves_a_checkpoint_and_exits(synthetic_model_dir, tmp_path):
    overrides = tiny_overrides(synthetic_model_dir, "train.max_steps=400", "data.num_examples=40")
    process = subprocess.Popen(train_command(*overrides, f"hydra.run.dir={tmp_path}"), cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log_path = tmp_path / "train_log.jsonl"
    deadline = time.monotonic() + 120
    while not log_path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    saved_step = int(latest.split("-")[1])
    assert saved_step == len(read_log(tmp_path))
    assert saved_step < 10
