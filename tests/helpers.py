"""Helpers shared by the eviction tests: cached runs driven step by step, random gates."""

from __future__ import annotations

import torch

from trimkv.cache import build_cache, enable_eviction
from trimkv.compat import cache_kwargs
from trimkv.gates import attach_gates, gate_config_for

POLICY_PARAMS = {
    "full": {},
    "streamingllm": {"n_sink": 2},
    "h2o": {"recent_ratio": 0.5},
    "snapkv": {"window": 4, "kernel": 3},
    "trimkv": {},
    "rkv": {"window": 4},
    "keydiff": {"block_size": 8},
    "knorm": {},
}
POLICIES = list(POLICY_PARAMS)


def attach_random_gates(model, seed: int = 1, bias_init: float = 2.0):
    """Attach gates whose log beta varies clearly across tokens and heads (untrained gates stay near 0)."""
    gates = attach_gates(model, gate_config_for(model, intermediate_size=32, bias_init=bias_init))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in gates:
            for parameter in (gate.linear1.weight, gate.linear2.weight):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter.shape[1] ** 0.5)
    return gates


def prepare(model, method: str, attn: str = "sdpa"):
    enable_eviction(model, attn)
    if method == "trimkv" and not hasattr(model.model.layers[0].self_attn, "retention_gate"):
        attach_random_gates(model)
    return model


def run_greedy(model, prompt_ids, method, budget, buffer, steps, prefill_chunk=None, **overrides):
    """Prefill `prompt_ids` (batch 1, in chunks of `prefill_chunk` tokens when set), then `steps`
    greedy decode steps, one forward each.

    Returns (fed ids (1, T), logits of every fed position (T, vocab), cache, step bounds).
    """
    params = {**POLICY_PARAMS[method], **overrides}
    cache = build_cache(model, method, budget, buffer, record_history=True, **params)
    prompt_length = prompt_ids.shape[1]
    chunk = prefill_chunk or prompt_length
    with torch.no_grad():
        rows, fed, bounds = [], [], []
        for start in range(0, prompt_length, chunk):
            piece = prompt_ids[:, start : start + chunk]
            out = model(input_ids=piece, **cache_kwargs(cache))
            rows.append(out.logits[0])
            fed.append(piece)
            bounds.append((start, start + piece.shape[1]))
        for step in range(steps):
            next_id = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            out = model(input_ids=next_id, **cache_kwargs(cache))
            rows.append(out.logits[0])
            fed.append(next_id)
            bounds.append((prompt_length + step, prompt_length + step + 1))
    return torch.cat(fed, dim=1), torch.cat(rows), cache, bounds


def histories(cache):
    return [layer.history for layer in cache.layers]
