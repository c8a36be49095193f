"""Shared test setup: offline mode, one CPU thread, tiny random-weight models built from configs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# The session-scoped `slurm_cluster` fixture (a real single-node SLURM on 127.0.0.1).
pytest_plugins = ["slurm_cluster"]

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.fail(f"the shared test data folder is missing: {SHARED / 'data'} (CI provides ../shared)")
    return SHARED


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _save_tiny_qwen3(folder: Path, tokenizer, vocab_size: int, hidden: int = 64) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def synthetic_model_dir(tmp_path_factory) -> Path:
    """A random-weight tiny Qwen3 with the project's synthetic-task tokenizer."""
    from trimkv.models.synthetic_tokenizer import build_synthetic_tokenizer

    tokenizer = build_synthetic_tokenizer()
    return _save_tiny_qwen3(tmp_path_factory.mktemp("tiny-synthetic"), tokenizer, len(tokenizer))


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir(shared_dir) -> Path:
    return shared_dir / "models" / "qwen3-tokenizer"


@pytest.fixture(scope="session")
def qwen3_model_dir(tmp_path_factory, qwen3_tokenizer_dir) -> Path:
    """A random-weight tiny Qwen3 whose vocabulary matches the real Qwen3 tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)
    folder = tmp_path_factory.mktemp("tiny-qwen3-real-vocab")
    return _save_tiny_qwen3(folder, tokenizer, len(tokenizer), hidden=32)
