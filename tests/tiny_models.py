"""Tiny random-weight models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 128


def tiny_model(family: str = "qwen3", vocab_size: int = VOCAB, layers: int = 3, seed: int = 0, attn: str = "sdpa"):
    """Return a fp32 eval-mode model. qwen3 and qwen2 use GQA (4 query heads, 2 KV heads);
    llama and phi3 use MHA (4 heads, 4 KV heads)."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=1024,
        attn_implementation=attn,
    )
    torch.manual_seed(seed)
    if family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(num_key_value_heads=2, head_dim=16, **common))
        # Fresh q_norm/k_norm weights are all 1, which gives every key the norm sqrt(head_dim) up
        # to rounding, so key-norm scores would only compare rounding noise. Trained models have
        # varied weights.
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **common))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=4, **common))
    elif family == "phi3":
        model = Phi3ForCausalLM(Phi3Config(num_key_value_heads=4, pad_token_id=0, **common))
    else:
        raise ValueError(family)
    return model.eval()
