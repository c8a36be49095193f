"""SnapKV: keep the tokens that an observation window of recent queries attends to.

Li et al., "SnapKV: LLM Knows What You Are Looking for Before Generation" (NeurIPS 2024,
arXiv 2404.14469).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trimkv.cache.statistics import attention_probabilities
from trimkv.policies.base import Policy, protect, recent_mask, reduce_groups, register_policy


@register_policy("snapkv")
class SnapKV(Policy):
    """Scores each token by the attention of the last `window` queries, pooled along the sequence.

    Score: softmax(q K^T / sqrt(d)) of each of the last `window` real queries over the cached
    tokens (causal), with the window's own tokens zeroed, averaged over those queries, pooled with
    a `kernel`-wide average or max filter (stride 1, zero padding), then reduced over each KV
    head's query group (mean by default, as kvpress does, so one kept set serves the group; the
    original code keeps one set per query head). The window's tokens are always kept.

    Variant: applied whenever a row holds budget + buffer tokens: at the end of prefill when the
    prompt reaches that size, and during decoding every `buffer` steps using the last `window`
    queries generated (the decode-time variant used for reasoning tasks). Positions are the
    original ones.

    Args:
        window: observation window size in tokens (default 32, as in the original code).
        kernel: pooling width, odd (default 5, as in the original code).
        pooling: "avg" or "max" (default "avg", as in the original code).
        gqa_reduce: "mean" or "max" over the query heads of a KV group.
    """

    def __init__(self, window: int = 32, kernel: int = 5, pooling: str = "avg", gqa_reduce: str = "mean"):
        self.window = int(window)
        self.kernel = int(kernel)
        self.pooling = str(pooling)
        self.group_reduce = str(gqa_reduce)

    def validate(self, budget, buffer):
        if self.window < 1:
            raise ValueError(f"method.window must be >= 1, got {self.window} (e.g. method.window=32)")
        if budget is not None and self.window > budget:
            raise ValueError(
                f"method.window={self.window} is larger than budget={budget}; the window is always kept, "
                f"so set method.window <= budget"
            )
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"method.kernel must be a positive odd number, got {self.kernel} (e.g. 7)")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"method.pooling must be avg or max, got {self.pooling!r}")
        if self.group_reduce not in ("mean", "max"):
            raise ValueError(f"method.gqa_reduce must be mean or max, got {self.group_reduce!r}")

    def on_append(self, layer, module, query, new_positions):
        # A ring of the post-RoPE queries of the last `window` tokens fed, (batch, heads, window, dim),
        # with their logical positions (-1 = empty or padding); the order inside the ring is irrelevant.
        queries = layer.state.get("window_queries")
        if queries is None:
            batch, heads, _, dim = query.shape
            queries = query.new_zeros(batch, heads, self.window, dim)
            layer.state["window_queries"] = queries
            layer.state["window_positions"] = torch.full((batch, self.window), -1, dtype=torch.long, device=query.device)
            layer.state["window_next"] = 0
            layer.state["scaling"] = module.scaling
        positions = layer.state["window_positions"]
        count = query.shape[2]
        if count >= self.window:
            queries.copy_(query[:, :, -self.window :])
            positions.copy_(new_positions[:, -self.window :])
            layer.state["window_next"] = 0
        else:
            start = layer.state["window_next"]
            slots = torch.arange(start, start + count, device=query.device) % self.window
            queries[:, :, slots] = query.detach()
            positions[:, slots] = new_positions
            layer.state["window_next"] = (start + count) % self.window

    def score(self, layer):
        queries = layer.state["window_queries"]
        query_positions = layer.state["window_positions"]  # (batch, window)
        batch, num_heads, window, head_dim = queries.shape
        kv_heads = layer.keys.shape[1]
        grouped = queries.view(batch, kv_heads, num_heads // kv_heads, window, head_dim)

        slot_positions = layer.slot_positions[:, :, None, :]
        query_pos = query_positions[:, None, :, None]
        visible = (slot_positions >= 0) & (slot_positions <= query_pos) & (query_pos >= 0)
        probabilities = attention_probabilities(grouped, layer.keys, visible, layer.state["scaling"])

        in_window = recent_mask(layer, self.window)
        probabilities = probabilities.masked_fill(in_window[:, :, None, None, :], 0.0)
        real_queries = (query_positions >= 0).sum(dim=1).clamp(min=1)
        mean = probabilities.sum(dim=3) / real_queries[:, None, None, None]  # (batch, kv_heads, group, length)

        flat = mean.reshape(-1, 1, mean.shape[-1])
        if self.pooling == "avg":
            pooled = F.avg_pool1d(flat, self.kernel, stride=1, padding=self.kernel // 2)
        else:
            pooled = F.max_pool1d(flat, self.kernel, stride=1, padding=self.kernel // 2)
        pooled = pooled.view_as(mean)
        scores = reduce_groups(pooled, self.group_reduce, dim=2)
        return protect(scores, in_window)

    def describe(self):
        return {
            "name": self.name,
            "window": self.window,
            "kernel": self.kernel,
            "pooling": self.pooling,
            "gqa_reduce": self.group_reduce,
        }
