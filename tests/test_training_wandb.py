"""W&B integration of gate training, with W&B in offline mode.

A training run logs its metrics and gate checkpoints as artifacts into an offline run file. The
test reads that file back (its records are protobuf messages in W&B's LevelDB-style log) and
loads the logged gates through `gates=wandb:...`. Offline W&B has no API server, so the test
replaces `wandb.Api` with one that serves the offline run's artifact files; what a real server
download does beyond that (authentication, the GraphQL lookup of the name) is not covered.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch

from training_helpers import compose_train_config, gate_tensors, tiny_overrides
from trimkv.training.distributed import DistributedContext
from trimkv.training.trainer import Trainer

BLOCK_SIZE = 32768  # W&B's transaction log: LevelDB log blocks after a 7-byte file header
HEADER_SIZE = 7


def read_wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    records, pending, position = [], b"", HEADER_SIZE
    while position + 7 <= len(data):
        left_in_block = BLOCK_SIZE - position % BLOCK_SIZE
        if left_in_block < 7:
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:  # zero padding up to the end of a block
            position += left_in_block
            continue
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL, FIRST / MIDDLE, LAST
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


class OfflineArtifact:
    """What `wandb.Api().artifact(...)` returns, built from an artifact record of an offline run."""

    def __init__(self, record):
        self.record = record

    def download(self, root: str) -> str:
        for entry in self.record.manifest.contents:
            target = Path(root) / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(entry.local_path, target)
            digest = base64.b64encode(hashlib.md5(target.read_bytes()).digest()).decode()
            assert digest == entry.digest, f"{entry.path}: the staged copy changed after logging"
        return root


@pytest.fixture
def offline_run(synthetic_model_dir, tmp_path, monkeypatch):
    for variable, folder in (("WANDB_DIR", "wandb"), ("WANDB_DATA_DIR", "wandb-data"), ("WANDB_CACHE_DIR", "wandb-cache"),
                             ("WANDB_CONFIG_DIR", "wandb-config")):
        monkeypatch.setenv(variable, str(tmp_path / folder))
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    cfg = compose_train_config(tiny_overrides(synthetic_model_dir, "logger=wandb", "logger.mode=offline",
                                              "train.save_every=2", "train.max_steps=3"))
    trainer = Trainer(cfg, run_dir, DistributedContext())
    trainer.setup()
    trainer.run()
    [log_file] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    # W&B's service process may still be appending when finish() returns; the exit record comes last.
    deadline = time.monotonic() + 60
    records = read_wandb_records(log_file)
    while not any(record.WhichOneof("record_type") == "exit" for record in records) and time.monotonic() < deadline:
        time.sleep(0.2)
        records = read_wandb_records(log_file)
    return run_dir, records


def test_offline_run_logs_metrics_and_gate_artifacts(offline_run, synthetic_model_dir):
    run_dir, records = offline_run
    history_keys = {item.key or "/".join(item.nested_key) for record in records
                    if record.WhichOneof("record_type") == "history" for item in record.history.item}
    for key in ("loss/kl", "loss/ntp", "loss/capacity", "lr", "beta_mean/layer0", "beta_mean/layer1",
                "occupancy/layer0", "grad_norm"):
        assert key in history_keys, key

    artifacts = [record.artifact for record in records if record.WhichOneof("record_type") == "artifact"]
    assert [(a.type, sorted(a.aliases)) for a in artifacts] == [
        ("retention-gates", ["latest", "step-2"]), ("retention-gates", ["final", "latest"])]
    assert {a.name for a in artifacts} == {f"gates-{synthetic_model_dir.name}-M4"}
    assert {entry.path for entry in artifacts[0].manifest.contents} == {"gates.safetensors", "gate_config.json",
                                                                        "trainer_state.pt"}
    assert {entry.path for entry in artifacts[1].manifest.contents} == {"gates.safetensors", "gate_config.json"}


def test_gates_load_from_wandb_artifact_name(offline_run, synthetic_model_dir, tmp_path, monkeypatch):
    import wandb
    from transformers import AutoModelForCausalLM

    from trimkv.gates import gate_state_dict, load_gates

    run_dir, records = offline_run
    final = [record.artifact for record in records
             if record.WhichOneof("record_type") == "artifact" and "final" in record.artifact.aliases][0]
    requests = []

    class OfflineApi:
        def artifact(self, name, type=None):
            requests.append((name, type))
            return OfflineArtifact(final)

    monkeypatch.setattr(wandb, "Api", OfflineApi)
    monkeypatch.setenv("TRIMKV_ARTIFACT_DIR", str(tmp_path / "artifacts"))
    model = AutoModelForCausalLM.from_pretrained(synthetic_model_dir)
    info = load_gates(model, f"wandb:my-team/trimkv/{final.name}:final")

    assert requests == [(f"my-team/trimkv/{final.name}:final", "retention-gates")]
    assert (tmp_path / "artifacts" / f"my-team--trimkv--{final.name}--final" / "gates.safetensors").is_file()
    assert info["budget"] == 4
    trained = gate_tensors(run_dir)
    loaded = gate_state_dict(model)
    assert set(loaded) == set(trained)
    for name, tensor in trained.items():
        assert torch.equal(loaded[name], tensor), name


def test_wandb_gate_names_are_validated(monkeypatch):
    import wandb
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from trimkv.gates import load_gates

    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    with pytest.raises(ValueError, match="wandb:<entity>/<project>/<name>:<version>"):
        load_gates(model, "wandb:gates-only")

    class UnreachableApi:
        def artifact(self, name, type=None):
            raise wandb.errors.CommError("could not reach the W&B server")

    monkeypatch.setattr(wandb, "Api", UnreachableApi)
    with pytest.raises(FileNotFoundError, match="wandb login"):
        load_gates(model, "wandb:team/project/gates:v0")
