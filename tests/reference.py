"""Reference computations for the eviction tests, in plain torch and independent of trimkv.cache.

`masked_reference_logits` runs one no-cache forward over a whole sequence in which every query
row of every layer attends to exactly the key positions of a given boolean mask
(layer -> (batch, kv_heads, T, T)). With the mask built from what an eviction cache kept at each
step, its logits must equal the cached run's logits step by step.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

REFERENCE_NAME = "trimkv_test_reference"
_MASKS: dict[int, torch.Tensor] = {}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    mask = _MASKS[module.layer_idx]  # (batch, kv_heads, T, T)
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    mask = mask.repeat_interleave(group, dim=1)
    logits = (query @ key.transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~mask, float("-inf"))
    probabilities = torch.softmax(logits.float(), dim=-1)
    probabilities = torch.nan_to_num(probabilities, nan=0.0).to(value.dtype)
    return (probabilities @ value).transpose(1, 2).contiguous(), probabilities


AttentionInterface.register(REFERENCE_NAME, _reference_attention)


def masked_reference_logits(model, input_ids, masks, position_ids=None, return_attentions=False):
    """Logits (and per-layer attention probabilities) of a no-cache forward under per-layer masks."""
    previous = model.config._attn_implementation
    _MASKS.clear()
    _MASKS.update(masks)
    model.set_attn_implementation(REFERENCE_NAME)
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                        output_attentions=return_attentions)
    finally:
        model.set_attn_implementation(previous)
        _MASKS.clear()
    if return_attentions:
        return out.logits, out.attentions
    return out.logits


def visibility_masks(histories, step_bounds, total_length):
    """Per-layer masks (1, kv_heads, T, T) from what a batch-1 cache kept after each step.

    Args:
        histories: per layer, a list with one tensor per forward step: the kept logical
            positions (1, kv_heads, length), -1 for empty slots, after that step's eviction.
        step_bounds: per step, (first position, end position) of the tokens fed in that step.
        total_length: T, the number of tokens fed overall.
    """
    masks = {}
    for layer_index, history in enumerate(histories):
        kv_heads = history[0].shape[1]
        mask = torch.zeros(1, kv_heads, total_length, total_length, dtype=torch.bool)
        kept_before = torch.zeros(kv_heads, total_length, dtype=torch.bool)
        for step, (start, end) in enumerate(step_bounds):
            for row in range(start, end):
                mask[0, :, row] = kept_before
                mask[0, :, row, start : row + 1] = True
            kept_before = torch.zeros(kv_heads, total_length, dtype=torch.bool)
            positions = history[step][0]
            for head in range(kv_heads):
                held = positions[head][positions[head] >= 0]
                kept_before[head, held] = True
        masks[layer_index] = mask
    return masks
