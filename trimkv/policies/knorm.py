"""Knorm: keep the tokens whose keys have the smallest L2 norm.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"
(EMNLP 2024, arXiv 2406.11430).
"""

from __future__ import annotations

import torch

from trimkv.policies.base import Policy, register_policy

# Significant bits kept of each key norm (float32 has 24). Float rounding noise in the keys is
# far below this, so norms that are equal in exact arithmetic compare equal.
NORM_SIGNIFICANT_BITS = 16


def round_significand(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Round positive float32 values to `bits` significant bits."""
    mantissa, exponent = torch.frexp(values)
    return torch.ldexp(torch.round(mantissa * 2.0**bits) / 2.0**bits, exponent)


@register_policy("knorm")
class KeyNorm(Policy):
    """Scores each token by the negative L2 norm of its key, so low-norm keys are kept.

    Score: -||k_i||_2 of the cached (post-RoPE) key in float32, per KV head, as kvpress's
    KnormPress (0.5.5) scores. The method has no settings.

    Ties: RoPE rotates pairs of channels, so every copy of a repeated token has the same layer-0
    key norm in exact arithmetic. In float32 the copies differ by rounding noise, and that noise
    changes with the batch shape. The norm is therefore rounded to NORM_SIGNIFICANT_BITS
    significant bits, and the cache keeps the earlier copy of an exact tie, so a padded batch
    keeps the same copies as each prompt alone. kvpress leaves such ties to the noise, so its
    choice among exactly tied copies can differ from ours.

    Variant: applied whenever a row holds budget + buffer tokens, at the end of prefill and during
    decoding; no sink or recent tokens are protected, so with buffer 0 the newest token can be
    evicted right after the step that produced it has attended to it. Positions are the original
    ones.
    """

    def score(self, layer):
        norms = torch.linalg.vector_norm(layer.keys.float(), dim=-1)
        return -round_significand(norms, NORM_SIGNIFICANT_BITS)
