"""Per-token retention and kept-token matrices for one sequence (the paper's Figure 4 view).

The sequence is fed one token per forward, so step t of a policy's eviction record is exactly the
cache after token t, and `kept[t, i]` says whether token i was still cached after step t.
"""

from __future__ import annotations

from typing import Any

import torch

from trimkv.cache import build_cache
from trimkv.compat import cache_kwargs
from trimkv.gates import gates_of


def run_token_by_token(model: Any, input_ids: torch.Tensor, method: str, budget: int, buffer: int = 0,
                       **policy_params: Any):
    """Feed `input_ids` (1, T) one token per forward through a recording cache.

    Returns (cache, log_beta) where log_beta[layer] is (kv_heads, T) from the attached gates, or
    None when the model has no gates.
    """
    gates = gates_of(model)
    captured: dict[int, list[torch.Tensor]] = {index: [] for index in range(len(gates))}
    handles = [gate.register_forward_hook(_collect(captured[index])) for index, gate in enumerate(gates)]
    cache = build_cache(model, method, None if method == "full" else budget, buffer, record_history=True,
                        **policy_params)
    try:
        with torch.no_grad():
            for position in range(input_ids.shape[1]):
                model(input_ids=input_ids[:, position : position + 1], **cache_kwargs(cache))
    finally:
        for handle in handles:
            handle.remove()
    log_beta = None
    if gates:
        log_beta = [torch.cat(outputs, dim=1)[0].T.float() for outputs in captured.values()]  # (kv_heads, T)
    return cache, log_beta


def _collect(store: list[torch.Tensor]):
    def hook(module, inputs, output):
        store.append(output.detach())

    return hook


def kept_matrix(history: list[torch.Tensor], length: int, row: int = 0) -> torch.Tensor:
    """Bool (kv_heads, steps, length): token i cached after step t, from one layer's eviction record."""
    kv_heads = history[0].shape[1]
    kept = torch.zeros(kv_heads, len(history), length, dtype=torch.bool)
    for step, positions in enumerate(history):
        for head in range(kv_heads):
            held = positions[row, head]
            kept[head, step, held[held >= 0]] = True
    return kept


def retention_matrix(log_beta: torch.Tensor) -> torch.Tensor:
    """(kv_heads, T, T) with beta_i^(t - i) below the diagonal and 0 above it."""
    length = log_beta.shape[-1]
    steps = torch.arange(length)
    age = (steps[:, None] - steps[None, :]).float()
    values = torch.exp(age.clamp(min=0)[None] * log_beta[:, None, :])
    return values * (age >= 0)[None]
