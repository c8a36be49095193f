"""KeyDiff: keep the tokens whose keys differ most from the mean key direction.

Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
Resource-Constrained Environments" (arXiv 2504.15364).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trimkv.policies.base import Policy, register_policy


def keydiff_scores(keys: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """Negative cosine similarity of every key to the mean unit key of `members`.

    Args:
        keys: (batch, kv_heads, length, head_dim), float32.
        members: bool (batch, kv_heads, length), the slots that define the anchor.

    Returns:
        (batch, kv_heads, length); slots outside `members` are scored against the same anchor.
    """
    unit_keys = F.normalize(keys, p=2, dim=-1) * members[..., None]
    count = members.sum(dim=-1, keepdim=True).clamp(min=1)[..., None]
    anchor = unit_keys.sum(dim=2, keepdim=True) / count  # (batch, kv_heads, 1, head_dim)
    return -F.cosine_similarity(keys, anchor, dim=-1)


@register_policy("keydiff")
class KeyDiff(Policy):
    """Scores each token by the negative cosine similarity of its key to the anchor key.

    Score: anchor = mean over the row's held tokens of k_j / ||k_j||, score_i = -cos(k_i, anchor),
    per KV head in float32 on the cached (post-RoPE) keys, so tokens whose keys point away from the
    common direction are kept. This is kvpress's KeyDiffPress (0.5.5).

    Block-wise variant (`block_size` set): the KeyDiff paper processes a long input in blocks and
    cuts the cache back to the budget after each one. kvpress reproduces this with
    `BlockPress(KeyDiffPress(), block_size)`. Here, when a row must evict, its held tokens in
    position order start from the first `budget` as the kept set; each following block of
    `block_size` tokens joins the kept set, the anchor is recomputed over kept set + block, and
    the `budget` highest-scoring tokens stay. When more than `block_size` tokens arrived since the
    last eviction (a long prefill), this gives BlockPress's result. Otherwise it equals scoring
    everything at once.

    Variant: applied whenever a row holds budget + buffer tokens, at the end of prefill and during
    decoding; no sink or recent tokens are protected. Positions are the original ones.

    Args:
        block_size: tokens per block for the block-wise variant; None (default, as kvpress's
            KeyDiffPress) scores all held tokens against one anchor.
    """

    def __init__(self, block_size: int | None = None):
        self.block_size = None if block_size is None else int(block_size)

    def validate(self, budget, buffer):
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(
                f"method.block_size must be a positive integer or null, got {self.block_size} "
                "(e.g. method.block_size=128, or null to score all held tokens at once)"
            )

    def score(self, layer):
        keys = layer.keys.float()
        valid = layer.slot_positions >= 0
        if self.block_size is None:
            return keydiff_scores(keys, valid)
        return self._blockwise_scores(keys, valid, layer.budget)

    def _blockwise_scores(self, keys: torch.Tensor, valid: torch.Tensor, budget: int) -> torch.Tensor:
        """Scores whose top `budget` per row and KV head is the kept set of block-wise KeyDiff."""
        # Rank of each held token in its row (slots are in position order), -1 for empty slots.
        rank = valid.long().cumsum(dim=-1) - 1
        kept = valid & (rank < budget)
        scores = keydiff_scores(keys, kept)
        max_held = int(valid.sum(dim=-1).max())
        for start in range(budget, max_held, self.block_size):
            block = valid & (rank >= start) & (rank < start + self.block_size)
            candidates = kept | block
            scores = keydiff_scores(keys, candidates).masked_fill(~candidates, float("-inf"))
            # A stable sort breaks ties towards the earlier slot, as the cache's own selection does.
            top = scores.sort(dim=-1, descending=True, stable=True).indices[..., :budget]
            kept = torch.zeros_like(valid).scatter_(-1, top, True) & candidates
        # Only the final kept set may rank above the rest: its members keep their last scores.
        return scores.masked_fill(~kept, float("-inf"))

    def describe(self):
        return {"name": self.name, "block_size": self.block_size}
