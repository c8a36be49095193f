"""StreamingLLM: attention sinks plus a recent window.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024,
arXiv 2309.17453).
"""

from __future__ import annotations

import torch

from trimkv.compat import rotary_inverse_frequencies
from trimkv.policies.base import Policy, protect, register_policy


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


@register_policy("streamingllm")
class StreamingLLM(Policy):
    """Keeps the first `n_sink` real tokens of each row and the most recent ones.

    Variant: decode-time, evicts whenever a row holds budget + buffer tokens (every step with
    buffer 0); the same tokens are kept in every layer and KV head.

    Positions: by default kept keys keep their original RoPE positions (as TRIM-KV, SnapKV and
    H2O do). With `rerotate=True` the kept keys are re-rotated after every eviction so that their
    positions are contiguous and end at the newest token, i.e. queries see positions within the
    cache as in the original paper. Re-rotation needs a RoPE whose attention scaling is 1
    (default, linear and dynamic RoPE; not YaRN or LongRoPE).

    Args:
        n_sink: number of initial tokens always kept (default 4, as in the paper).
        rerotate: re-rotate kept keys to in-cache positions (default False).
    """

    def __init__(self, n_sink: int = 4, rerotate: bool = False):
        self.n_sink = int(n_sink)
        self.rerotate = bool(rerotate)
        self.inverse_frequencies: torch.Tensor | None = None

    def validate(self, budget, buffer):
        if self.n_sink < 0:
            raise ValueError(f"method.n_sink must be >= 0, got {self.n_sink} (e.g. method.n_sink=4)")
        if budget is not None and self.n_sink >= budget:
            raise ValueError(
                f"method.n_sink={self.n_sink} leaves no room for recent tokens in budget={budget}; "
                f"set method.n_sink below the budget"
            )

    def bind_model(self, model):
        if not self.rerotate:
            return
        inverse_frequencies, attention_scaling = rotary_inverse_frequencies(model)
        if abs(attention_scaling - 1.0) > 1e-6:
            raise ValueError(
                f"method.rerotate=true needs a RoPE with attention scaling 1, but this model scales by "
                f"{attention_scaling:g} (YaRN/LongRoPE); set method.rerotate=false"
            )
        self.inverse_frequencies = inverse_frequencies

    def on_append(self, layer, module, query, new_positions):
        if self.rerotate:
            rope_positions = layer.add_field("rope_position", dtype=torch.long)
            start = layer.length - new_positions.shape[1]
            rope_positions[:, :, start : layer.length] = new_positions[:, None, :]

    def score(self, layer):
        positions = layer.slot_positions
        return protect(positions.float(), (positions >= 0) & (positions < self.n_sink))

    def after_compact(self, layer):
        if not self.rerotate:
            return
        # Kept slots get contiguous positions ending at the newest token of their row, so the
        # distance between a query and a kept key equals their distance inside the cache.
        filled = layer.slot_positions >= 0
        kept = filled.sum(dim=-1, keepdim=True)
        slot_index = torch.arange(layer.length, device=layer.device)
        target = layer.valid_seen[:, None, None] - kept + slot_index
        current = layer.field("rope_position")
        delta = torch.where(filled, target - current, torch.zeros_like(current))
        if not bool(delta.any()):
            return
        layer.key_buffer[:, :, : layer.length] = self._rotate(layer.keys, delta)
        layer.fields["rope_position"][:, :, : layer.length] = torch.where(filled, target, current)
        layer._refresh_views()

    def _rotate(self, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Rotate keys (batch, heads, length, dim) by `delta` positions (batch, heads, length)."""
        frequencies = self.inverse_frequencies.to(keys.device)
        angles = delta.to(torch.float32)[..., None] * frequencies  # (batch, heads, length, rotary_dim / 2)
        angles = torch.cat((angles, angles), dim=-1)
        rotary_dim = angles.shape[-1]
        rotated_part = keys[..., :rotary_dim].float()
        rotated_part = rotated_part * angles.cos() + rotate_half(rotated_part) * angles.sin()
        return torch.cat((rotated_part.to(keys.dtype), keys[..., rotary_dim:]), dim=-1)

    def describe(self):
        return {"name": self.name, "n_sink": self.n_sink, "rerotate": self.rerotate}
