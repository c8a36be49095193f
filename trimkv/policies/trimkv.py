"""TRIM-KV: learned per-token retention with exponential decay.

Bui et al., "Cache What Lasts: Token Retention for Memory-Bounded KV Cache in LLMs"
(ICLR 2026, arXiv 2512.03324).
"""

from __future__ import annotations

import torch

from trimkv.policies.base import Policy, protect, recent_mask, register_policy


@register_policy("trimkv")
class TrimKV(Policy):
    """Keeps, per KV head, the tokens with the highest retention beta_i^(t - i).

    Each token's log beta comes from the layer's retention gate when the token is created and
    never changes. The score is (t - i) * log beta_i with t the position of the next token, as in
    the authors' released cache (they write t + 1 - i with t the newest token). Ranking by the
    decayed retention beta_i^(t - i) itself gives the same order. Eviction runs whenever a row
    holds budget + buffer tokens (the paper uses buffer 128 for math); positions are the original ones.

    Args:
        window: number of most recent tokens always kept (default 0, the paper's setting).
    """

    def __init__(self, window: int = 0):
        self.window = int(window)

    def validate(self, budget, buffer):
        if self.window < 0:
            raise ValueError(f"method.window must be >= 0, got {self.window}")
        if budget is not None and self.window > budget:
            raise ValueError(f"method.window={self.window} is larger than budget={budget}; set method.window <= budget")

    def on_append(self, layer, module, query, new_positions):
        log_beta = getattr(module, "trimkv_log_beta", None)
        if log_beta is None:
            raise ValueError(
                "method=trimkv needs retention gates but the model has none attached; "
                "pass gates=<checkpoint folder> (a trained gate checkpoint)"
            )
        field = layer.add_field("log_beta")
        start = layer.length - new_positions.shape[1]
        field[:, :, start : layer.length] = log_beta.float()

    def score(self, layer):
        age = (layer.valid_seen[:, None, None] - layer.slot_positions).float()
        scores = age * layer.field("log_beta")
        if self.window:
            scores = protect(scores, recent_mask(layer, self.window))
        return scores

    def describe(self):
        return {"name": self.name, "window": self.window}
