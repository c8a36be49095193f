"""The attention functions registered with transformers' AttentionInterface.

`trimkv_sdpa` and `trimkv_eager` compute the same attention (SDPA kernel vs an explicit softmax).
Each handles three situations:

1. The layer's cache is an EvictionLayer (inference with eviction): register the new tokens,
   attend with a per-KV-head mask built from the stored positions, hand the policy what it needs,
   then evict.
2. No eviction cache, retention gates in training mode: the student attention of TRIM-KV,
   softmax(q k / sqrt(d) + (t - i) log beta_i), with each query head using its KV head's beta.
3. Anything else (no cache, or a DynamicCache): plain causal attention with the padding mask,
   equal to transformers' sdpa/eager.

GQA is handled without repeating keys: the query heads of a KV head are packed along the query
axis, (batch, heads, q, dim) -> (batch, kv_heads, group * q, dim), matching the order in which
transformers' repeat_kv assigns query heads to KV heads.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from trimkv.cache.layer import EvictionLayer
from trimkv.cache.statistics import attention_probabilities, query_chunks
from trimkv.compat import register_attention_function
from trimkv.policies.base import reduce_groups

SDPA_NAME = "trimkv_sdpa"
EAGER_NAME = "trimkv_eager"
IMPLEMENTATIONS = {"sdpa": SDPA_NAME, "eager": EAGER_NAME}


def trimkv_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    return _attention(module, query, key, value, attention_mask, scaling, dropout, kwargs, eager=False)


def trimkv_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    return _attention(module, query, key, value, attention_mask, scaling, dropout, kwargs, eager=True)


def register_attention_functions() -> None:
    """Register both implementations (idempotent)."""
    register_attention_function(SDPA_NAME, trimkv_sdpa)
    register_attention_function(EAGER_NAME, trimkv_eager)


def _attention(module, query, key, value, attention_mask, scaling, dropout, kwargs, eager):
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    sliding_window = kwargs.get("sliding_window")
    padding_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            "trimkv attention builds its own masks and takes only a 2D padding mask, "
            f"got a {attention_mask.dim()}D attention_mask"
        )

    layer = getattr(module, "trimkv_layer", None)
    if isinstance(layer, EvictionLayer):
        if layer.pending != query.shape[2]:
            raise RuntimeError(
                f"layer {layer.layer_idx}: {query.shape[2]} queries but {layer.pending} tokens pending in the cache"
            )
        return _cached_attention(module, layer, query, key, value, padding_mask, scaling, sliding_window, eager)

    dropout = dropout if module.training else 0.0
    log_beta = getattr(module, "trimkv_log_beta", None)
    gated = log_beta is not None and getattr(module, "trimkv_gate_mode", "score") == "train"
    training = getattr(module, "trimkv_training_attention", None)
    if training is not None and not eager:
        # Gate training (trimkv.training.attention): memory-efficient backends and packed documents.
        if query.shape[2] != key.shape[2] or sliding_window is not None:
            raise ValueError("gate training attends over the whole sequence in one forward, without a cache "
                             "or a sliding window")
        output = training.attend(query, key, value, log_beta if gated else None, scaling)
        return output.transpose(1, 2).contiguous(), None
    return _uncached_attention(
        module, query, key, value, padding_mask, scaling, sliding_window, log_beta if gated else None, dropout, eager
    )


def _pack_queries(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    batch, heads, length, dim = query.shape
    return query.reshape(batch, kv_heads, (heads // kv_heads) * length, dim)


def _unpack_output(output: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, kv_heads, group * q, dim) -> (batch, q, heads, dim), the layout transformers expects."""
    batch, _, _, dim = output.shape
    return output.reshape(batch, heads, -1, dim).transpose(1, 2).contiguous()


def _expand_groups(mask: torch.Tensor, group: int) -> torch.Tensor:
    """Repeat a per-KV-head mask (batch, kv_heads, q, length) for the packed query axis."""
    batch, kv_heads, length_q, length_k = mask.shape
    return mask[:, :, None].expand(batch, kv_heads, group, length_q, length_k).reshape(
        batch, kv_heads, group * length_q, length_k
    )


def _explicit_attention(packed_query, key, value, mask, scaling, dropout=0.0):
    """Eager attention: explicit logits and float32 softmax. `mask` is bool or an additive float bias."""
    logits = torch.matmul(packed_query, key.transpose(-1, -2)) * scaling
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask
    probabilities = torch.softmax(logits, dim=-1, dtype=torch.float32).to(value.dtype)
    if dropout:
        probabilities = F.dropout(probabilities, p=dropout, training=True)
    return torch.matmul(probabilities, value), probabilities


def _cached_attention(module, layer, query, key, value, padding_mask, scaling, sliding_window, eager):
    batch, heads, length_q, _ = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    policy = layer.policy

    new_positions = layer.register_new_tokens(padding_mask)
    started = _clock(layer)
    policy.on_append(layer, module, query, new_positions)
    _stop_clock(layer, started)

    packed = _pack_queries(query, kv_heads)
    simple = not layer.has_invalid_slots and sliding_window is None
    probabilities = None
    if simple and length_q == 1 and policy.needs_attention:
        # A decode step whose policy wants attention probabilities: one explicit softmax gives
        # both the output and the statistics.
        output, probabilities = _explicit_attention(packed, key, value, None, scaling)
    elif eager:
        mask = _expand_groups(layer.visibility_mask(sliding_window), group)
        output, probabilities = _explicit_attention(packed, key, value, mask, scaling)
    elif simple and length_q == 1:
        # One query per KV group row and every slot visible: no mask at all.
        output = F.scaled_dot_product_attention(packed, key, value, scale=scaling)
    elif simple and layer.length == length_q:
        # A fresh prefill without padding is plain causal attention.
        output = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        output = output.reshape(batch, kv_heads, group * length_q, -1)
    else:
        mask = _expand_groups(layer.visibility_mask(sliding_window), group)
        output = F.scaled_dot_product_attention(packed, key, value, attn_mask=mask, scale=scaling)

    started = _clock(layer)
    if policy.needs_attention:
        weights = _attention_weights(layer, query, key, scaling, sliding_window, probabilities, policy.group_reduce)
        policy.observe_attention(layer, weights)
    layer.evict()
    _stop_clock(layer, started)
    return _unpack_output(output, heads), None


def _clock(layer: EvictionLayer) -> float | None:
    if not layer.timing:
        return None
    if layer.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _stop_clock(layer: EvictionLayer, started: float | None) -> None:
    if started is not None:
        if layer.device.type == "cuda":
            torch.cuda.synchronize()
        layer.policy_seconds += time.perf_counter() - started


def _attention_weights(layer, query, key, scaling, sliding_window, probabilities, group_reduce):
    """Sum over this step's real queries of group-reduced attention probabilities, (batch, kv_heads, length)."""
    batch, heads, length_q, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    real_queries = (layer.new_positions >= 0).to(torch.float32)  # (batch, q)

    if probabilities is not None:
        grouped = probabilities.float().view(batch, kv_heads, group, length_q, -1)
        reduced = reduce_groups(grouped, group_reduce, dim=2)
        if length_q == 1 and not layer.has_invalid_slots:
            return reduced[:, :, 0]
        return (reduced * real_queries[:, None, :, None]).sum(dim=2)

    visible = layer.visibility_mask(sliding_window)
    grouped_query = query.view(batch, kv_heads, group, length_q, dim)
    total = torch.zeros(batch, kv_heads, key.shape[2], dtype=torch.float32, device=key.device)
    for chunk in query_chunks(batch, heads, length_q, key.shape[2]):
        chunk_probabilities = attention_probabilities(grouped_query[:, :, :, chunk], key, visible[:, :, chunk], scaling)
        reduced = reduce_groups(chunk_probabilities, group_reduce, dim=2)
        total += (reduced * real_queries[:, None, chunk, None]).sum(dim=2)
    return total


def _uncached_attention(module, query, key, value, padding_mask, scaling, sliding_window, log_beta, dropout, eager):
    batch, heads, length_q, _ = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    length_k = key.shape[2]
    device = query.device

    # Query i sits at stream index length_k - length_q + i; keys are stream indices 0..length_k-1.
    query_index = torch.arange(length_k - length_q, length_k, device=device)
    key_index = torch.arange(length_k, device=device)
    distance = query_index[:, None] - key_index[None, :]  # (q, length_k)
    allowed = distance >= 0
    if sliding_window is not None:
        allowed = allowed & (distance < sliding_window)
    mask = allowed[None, None].expand(batch, 1, length_q, length_k)
    if padding_mask is not None:
        key_valid = padding_mask[:, -length_k:].to(device=device, dtype=torch.bool)
        query_valid = key_valid[:, -length_q:]
        mask = mask & key_valid[:, None, None, :]
        # Padding queries see every key so that their (unused) outputs stay finite.
        mask = mask | ~query_valid[:, None, :, None]

    packed = _pack_queries(query, kv_heads)
    if log_beta is not None:
        if length_q != length_k:
            raise ValueError("retention-gated training attention needs the whole sequence in one forward, without a cache")
        # TRIM-KV student: add (t - i) * log beta_i to the scaled logits of the allowed pairs.
        bias = distance.to(log_beta.dtype)[None, None] * log_beta[:, :, None, :]  # (batch, kv_heads, q, k)
        bias = bias.masked_fill(~mask, float("-inf"))
        attn_mask = _expand_groups(bias.to(query.dtype), group)
    else:
        attn_mask = _expand_groups(mask.expand(batch, kv_heads, length_q, length_k), group)

    if eager:
        output, _ = _explicit_attention(packed, key, value, attn_mask, scaling, dropout)
    else:
        output = F.scaled_dot_product_attention(packed, key, value, attn_mask=attn_mask, scale=scaling, dropout_p=dropout)
    return _unpack_output(output, heads), None
