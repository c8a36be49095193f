"""The training presets compose with Hydra and carry the released gates' settings."""

from __future__ import annotations

import pytest

from training_helpers import compose_train_config

PRESETS = {
    "train_qwen3_4b_math": ("Qwen/Qwen3-4B", 512, 16384, "open-r1/OpenR1-Math-220k"),
    "train_qwen3_1.7b_math": ("Qwen/Qwen3-1.7B", 512, 16384, "open-r1/OpenR1-Math-220k"),
    "train_qwen3_8b_math": ("Qwen/Qwen3-8B", 512, 16384, "open-r1/OpenR1-Math-220k"),
    "train_qwen3_14b_math": ("Qwen/Qwen3-14B", 512, 16384, "open-r1/OpenR1-Math-220k"),
    "train_r1_llama_8b_math": ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", 512, 32768, "open-r1/OpenR1-Math-220k"),
    "train_qwen3_4b_instruct_long": ("Qwen/Qwen3-4B-Instruct-2507", 4096, 131072, None),
    "train_phi3_mini_long": ("microsoft/Phi-3-mini-128k-instruct", 2048, 131072, None),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_composes_with_released_settings(name):
    model_path, budget, max_length, hub_path = PRESETS[name]
    cfg = compose_train_config([f"experiment={name}"])
    assert cfg.model.path == model_path
    assert cfg.budget == budget
    assert cfg.train.max_length == max_length
    assert cfg.data.get("hub_path") == hub_path
    assert cfg.optim.lr == 2.0e-4
    assert cfg.optim.min_lr == 1.0e-6
    assert cfg.optim.warmup_steps == 100
    assert cfg.train.gradient_checkpointing and cfg.train.logit_block_size == 8192
    assert cfg.train.attention == "auto"
    assert cfg.train.precision == "auto"


def test_default_tiny_recipe_keeps_the_fast_path():
    cfg = compose_train_config([])
    assert cfg.model.name == "tiny"
    assert cfg.data.source == "synthetic"
    assert cfg.train.attention == "naive"
    assert not cfg.train.gradient_checkpointing
    assert cfg.train.logit_block_size is None
    assert cfg.loss.capacity_block_size is None


def test_paper_model_defaults_use_memory_saving_engines():
    cfg = compose_train_config(["model=qwen3", "budget=512"])
    assert cfg.data.hub_path == "open-r1/OpenR1-Math-220k"
    assert cfg.train.gradient_checkpointing
    assert cfg.train.logit_block_size == 8192
    assert cfg.train.attention == "auto"
