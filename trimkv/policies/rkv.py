"""R-KV: keep tokens that are attended to and not redundant, for long reasoning outputs.

Cai et al., "R-KV: Redundancy-aware KV Cache Compression for Training-Free Reasoning Models
Acceleration" (arXiv 2505.24133). Reference code: github.com/Zefan-Cai/R-KV,
`rkv/compression/r1_kv.py` and `rkv/utils.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trimkv.cache.statistics import query_chunks
from trimkv.policies.base import Policy, protect, recent_mask, register_policy
from trimkv.policies.snapkv import SnapKV


@register_policy("rkv")
class RKV(Policy):
    """Scores each token by `mix_lambda` * importance - (1 - mix_lambda) * redundancy.

    Importance: the logits q K^T * scale of each of the last `window` queries over the held tokens
    outside the window, maximum over each KV head's query group. The maximum is taken on the
    logits, before the softmax, as r1_kv.py does. Then softmax over those tokens, mean over the
    queries, and a `kernel`-wide max filter along the cache slots.

    Redundancy: cosine similarity between every pair of held keys with the diagonal zeroed. For
    each key i, the entry of the most recent key j with similarity > `threshold` is zeroed, so the
    newest of a group of near-duplicates looks least redundant. A key with no such j zeroes its
    entry for the first held token instead, as r1_kv.py's index fallback of 0 does. Each token's
    redundancy is the softmax over held tokens of its mean similarity to all held keys.

    The `window` most recent tokens are always kept. The score is computed per KV head in float32
    from the cached (post-RoPE) keys and the stored post-RoPE queries.

    Variant: decode-time, applied whenever a row holds budget + buffer tokens (at the end of
    prefill too when the prompt reaches that size). The paper compresses every 128 generated
    tokens, which is buffer=128 here. r1_kv.py instead compresses when the total length is a
    multiple of 128 and the cache holds at least `budget` tokens, so its first compression can
    fall at a different step; between compressions both hold budget to budget + 127 tokens.
    Positions are the original ones. Only r1_kv.py's default retain direction, "last", is
    implemented. Its `retain_ratio` is read only by the `*_percent` directions, which the
    repository's `run_math.py` does not offer, so it has no counterpart here.

    Args:
        window: observation window in tokens, the queries that score and the keys always kept
            (default 8, as in the paper and r1_kv.py).
        kernel: max-filter width, odd (default 7, as in r1_kv.py).
        mix_lambda: weight of importance against redundancy (default 0.1, the paper's setting;
            r1_kv.py's default is 0.07).
        threshold: cosine similarity above which two keys count as near-duplicates (default 0.5,
            as in r1_kv.py).
    """

    def __init__(self, window: int = 8, kernel: int = 7, mix_lambda: float = 0.1, threshold: float = 0.5):
        self.window = int(window)
        self.kernel = int(kernel)
        self.mix_lambda = float(mix_lambda)
        self.threshold = float(threshold)

    def validate(self, budget, buffer):
        if self.window < 1:
            raise ValueError(f"method.window must be >= 1, got {self.window} (e.g. method.window=8)")
        if budget is not None and self.window >= budget:
            raise ValueError(
                f"method.window={self.window} leaves no room for scored tokens in budget={budget}; "
                "set method.window below the budget"
            )
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"method.kernel must be a positive odd number, got {self.kernel} (e.g. 7)")
        if not 0.0 <= self.mix_lambda <= 1.0:
            raise ValueError(f"method.mix_lambda must be in [0, 1], got {self.mix_lambda} (e.g. 0.1)")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"method.threshold must be a cosine similarity in [-1, 1], got {self.threshold} (e.g. 0.5)")

    # The window queries are kept in SnapKV's ring of the last `window` post-RoPE queries with
    # their positions; it reads only `self.window`.
    on_append = SnapKV.on_append

    def score(self, layer):
        keys = layer.keys.float()
        valid = layer.slot_positions >= 0
        in_window = recent_mask(layer, self.window) & valid
        importance = self._importance(layer, keys, valid & ~in_window)
        redundancy = self._redundancy(keys, valid)
        scores = self.mix_lambda * importance - (1.0 - self.mix_lambda) * redundancy
        return protect(scores, in_window)

    def _importance(self, layer, keys: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Pooled attention of the window queries on the candidate slots, (batch, kv_heads, length)."""
        queries = layer.state["window_queries"]
        query_positions = layer.state["window_positions"]  # (batch, window), -1 for padding
        batch, num_heads, window, head_dim = queries.shape
        kv_heads = keys.shape[1]
        grouped = queries.float().view(batch, kv_heads, num_heads // kv_heads, window, head_dim)

        logits = torch.einsum("bhgnd,bhld->bhgnl", grouped, keys) * layer.state["scaling"]
        logits = logits.amax(dim=2)  # (batch, kv_heads, window, length)
        logits = logits.masked_fill(~candidates[:, :, None, :], float("-inf"))
        probabilities = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)

        real_queries = (query_positions >= 0).float()
        weighted = probabilities * real_queries[:, None, :, None]
        mean = weighted.sum(dim=2) / real_queries.sum(dim=1).clamp(min=1)[:, None, None]
        # Non-candidate slots are 0, which never exceeds a real probability, so max pooling over
        # them equals r1_kv.py's pooling over the candidates alone.
        pooled = F.max_pool1d(mean.reshape(-1, 1, mean.shape[-1]), self.kernel, stride=1, padding=self.kernel // 2)
        return pooled.view_as(mean)

    def _redundancy(self, keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Softmax over held slots of each key's mean similarity to the others, (batch, kv_heads, length)."""
        batch, kv_heads, length, _ = keys.shape
        unit = keys / (keys.norm(dim=-1, keepdim=True) + 1e-8)
        slot_index = torch.arange(length, device=keys.device)
        first_held = valid.float().argmax(dim=-1)  # (batch, kv_heads)
        column_sums = torch.zeros(batch, kv_heads, length, dtype=torch.float32, device=keys.device)

        # Rows in chunks, so a long prefill never materialises the whole (length x length) matrix.
        for rows in query_chunks(batch, kv_heads, length, length):
            similarity = unit[:, :, rows] @ unit.transpose(-1, -2)  # (batch, kv_heads, chunk, length)
            row_index = slot_index[rows]
            similarity = similarity.masked_fill(row_index[:, None] == slot_index[None, :], 0.0)
            similarity = similarity.masked_fill(~valid[:, :, None, :], 0.0)

            similar = similarity > self.threshold
            latest = torch.where(similar, slot_index, -1).amax(dim=-1)  # (batch, kv_heads, chunk)
            retained = torch.where(latest >= 0, latest, first_held[:, :, None])
            similarity = similarity.scatter(-1, retained[..., None], 0.0)

            similarity = similarity * valid[:, :, rows, None]
            column_sums += similarity.sum(dim=2)

        mean = column_sums / valid.sum(dim=-1, keepdim=True).clamp(min=1)
        redundancy = torch.softmax(mean.masked_fill(~valid, float("-inf")), dim=-1)
        return torch.nan_to_num(redundancy, nan=0.0)

    def describe(self):
        return {
            "name": self.name,
            "window": self.window,
            "kernel": self.kernel,
            "mix_lambda": self.mix_lambda,
            "threshold": self.threshold,
        }
