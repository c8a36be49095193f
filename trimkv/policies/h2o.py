"""H2O: heavy hitters by accumulated attention plus a recent window.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models" (NeurIPS 2023, arXiv 2306.14048).
"""

from __future__ import annotations

from trimkv.policies.base import Policy, protect, recent_mask, register_policy


@register_policy("h2o")
class H2O(Policy):
    """Keeps the tokens with the largest accumulated attention plus the most recent tokens.

    Variant: the real-eviction ("real_drop") form, per KV head. Every forward adds to each cached
    token the attention it received from every real query of that forward (the whole prompt at
    prefill, one query per decode step); eviction runs whenever a row holds budget + buffer tokens.
    The original code keeps one score per query head; here a KV head's score is the sum over its
    query group, reduced per query with `gqa_reduce` (mean by default, max as option), so one
    kept set serves the whole group. Positions are the original ones.

    Args:
        recent_ratio: fraction of the budget reserved for the most recent tokens (default 0.5, the
            paper's equal heavy/recent split); the rest goes to heavy hitters.
        gqa_reduce: "mean" or "max" over the query heads of a KV group.
    """

    needs_attention = True

    def __init__(self, recent_ratio: float = 0.5, gqa_reduce: str = "mean"):
        self.recent_ratio = float(recent_ratio)
        self.group_reduce = str(gqa_reduce)
        self.recent = 0

    def validate(self, budget, buffer):
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"method.recent_ratio must be in [0, 1], got {self.recent_ratio} (e.g. 0.5)")
        if self.group_reduce not in ("mean", "max"):
            raise ValueError(f"method.gqa_reduce must be mean or max, got {self.group_reduce!r}")
        if budget is not None:
            self.recent = int(round(self.recent_ratio * budget))

    def on_append(self, layer, module, query, new_positions):
        layer.add_field("attention_sum")

    def observe_attention(self, layer, weights):
        layer.fields["attention_sum"][:, :, : layer.length] += weights

    def score(self, layer):
        return protect(layer.field("attention_sum"), recent_mask(layer, self.recent))

    def describe(self):
        return {"name": self.name, "recent_ratio": self.recent_ratio, "gqa_reduce": self.group_reduce}
