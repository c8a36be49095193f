"""Attention probabilities for scoring policies, computed only for the queries a policy needs.

The model's own attention runs through SDPA, which never returns probabilities; these helpers
recompute softmax(q K^T * scale) for a few queries (a decode step, a SnapKV window) or, in query
chunks of bounded memory, for a whole prompt (H2O's prefill statistics).
"""

from __future__ import annotations

from typing import Iterator

import torch

# Upper bound on the elements of one probability block (batch * heads * queries * keys);
# 2**26 float32 values are 256 MiB.
MAX_BLOCK_ELEMENTS = 2**26


def attention_probabilities(
    query: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Softmax attention probabilities in float32.

    Args:
        query: (batch, kv_heads, group, n, head_dim) queries, grouped by the KV head they read.
        keys: (batch, kv_heads, length, head_dim).
        visible: bool (batch, kv_heads, n, length), which slots each query may attend to.
        scaling: the softmax scale (1/sqrt(head_dim) for these models).

    Returns:
        (batch, kv_heads, group, n, length); rows of queries that see no slot are all zero.
    """
    logits = torch.einsum("bhgnd,bhld->bhgnl", query.float(), keys.float()) * scaling
    logits = logits.masked_fill(~visible[:, :, None], float("-inf"))
    probabilities = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probabilities, nan=0.0)


def query_chunks(batch: int, heads: int, queries: int, length: int) -> Iterator[slice]:
    """Split `queries` into slices whose probability block stays under MAX_BLOCK_ELEMENTS."""
    per_query = max(1, batch * heads * length)
    chunk = max(1, MAX_BLOCK_ELEMENTS // per_query)
    for start in range(0, queries, chunk):
        yield slice(start, min(start + chunk, queries))
