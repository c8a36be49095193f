"""Retention-gated attention for gate training, without T x T tensors.

The student attention of TRIM-KV (Bui et al., arXiv 2512.03324; the additive form of the authors'
FlexAttention kernel) is

    softmax(q_t k_i / sqrt(d) + (t - i) log beta_i)    over keys i <= t of the same document,

where query head h reads the log beta of its KV head h // (heads / kv_heads). Three backends
compute it:

- `flex`: torch's FlexAttention with the age bias as a `score_mod` and the causal and document
  masks as a block mask, compiled with `torch.compile`. Gradients need a GPU: torch 2.13 raises
  NotImplementedError for FlexAttention backward on the CPU.
- `sdpa`: torch's fused scaled_dot_product_attention (the flash kernel on the CPU). The age bias
  (t - i) log beta_i = (t - c) log beta_i - (i - c) log beta_i is a sum of two products of a query
  term and a key term, so it rides along in two extra head dimensions: the query gets
  (t - c, 1) / scale and the key gets (log beta_i, -(i - c) log beta_i), where c is the middle
  position. Float32 only: the two products grow with T, and their rounding (about
  6e-8 * T/2 * |log beta_i| in the logit) would be too coarse in 16-bit types.
- `blockwise`: pure torch. Queries go in blocks of `block_size`, and each block attends to the
  keys up to its end under activation checkpointing. Forward and backward therefore hold
  O(block_size * T) scores at a time instead of T x T.
- `naive`: one (heads, T, T) bias tensor through SDPA, the reference the others are tested against.

With `log_beta=None` (the teacher) the same masks apply without the bias; without documents that
is plain causal SDPA.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trimkv.compat import decoder_attention_modules

BACKENDS = ("auto", "flex", "sdpa", "blockwise", "naive")
# The attribute of each attention module that trimkv.cache.attention reads to route the uncached
# attention of a training forward here.
MODULE_ATTRIBUTE = "trimkv_training_attention"


def resolve_backend(backend: str, device: torch.device, precision: str = "fp32") -> str:
    """`auto` is flex on CUDA (fused kernel with backward), sdpa elsewhere in float32, else blockwise."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown train.attention {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type == "cuda":
            return "flex"
        return "sdpa" if precision == "fp32" else "blockwise"
    if backend == "sdpa" and precision != "fp32":
        raise ValueError(f"train.attention=sdpa needs train.precision=fp32 (got {precision}): the folded age bias "
                         "loses precision in 16-bit types; use train.attention=blockwise or auto")
    return backend


@dataclass
class TrainingAttention:
    """How the attention modules of one training forward attend.

    `document_ids` (batch, T) marks packed documents: a query attends only to keys with its own id.
    None means one document per row (right padding needs no mask under causal attention, because
    real queries never see the padding after them).
    """

    backend: str
    block_size: int = 512
    document_ids: torch.Tensor | None = None
    _block_mask: object = field(default=None, repr=False)

    def attend(self, query, key, value, log_beta, scaling):
        """Attention output (batch, heads, T, dim) for the whole sequence at once."""
        if log_beta is None and self.document_ids is None:
            # The teacher of an unpacked batch: plain causal attention, whose fused kernels are memory-efficient.
            return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        if self.backend == "flex":
            if self._block_mask is None:
                # One block mask serves every layer of the forward.
                self._block_mask = flex_block_mask(self.document_ids, query.shape[0], query.shape[2], query.device)
            return flex_gated_attention(query, key, value, log_beta, scaling, block_mask=self._block_mask)
        if self.backend == "sdpa":
            return sdpa_gated_attention(query, key, value, log_beta, scaling, self.document_ids, self.block_size)
        if self.backend == "blockwise":
            return blockwise_gated_attention(query, key, value, log_beta, scaling, self.document_ids, self.block_size)
        if self.backend == "naive":
            return naive_gated_attention(query, key, value, log_beta, scaling, self.document_ids)
        raise ValueError(f"unknown attention backend {self.backend!r}; use flex, sdpa, blockwise or naive")


@contextlib.contextmanager
def training_attention(model: torch.nn.Module, attention: TrainingAttention) -> Iterator[TrainingAttention]:
    """Route the uncached attention of every decoder layer through `attention` inside the block.

    The backward pass of a checkpointed forward re-runs the layers, so it must run inside this
    block too.
    """
    modules = decoder_attention_modules(model)
    for module in modules:
        setattr(module, MODULE_ATTRIBUTE, attention)
    try:
        yield attention
    finally:
        for module in modules:
            setattr(module, MODULE_ATTRIBUTE, None)


def _allowed(query_positions, key_positions, document_ids, query_slice):
    """Bool mask (batch or 1, q, k): causal, and same document when documents are given."""
    allowed = (query_positions[:, None] >= key_positions[None, :])[None]
    if document_ids is not None:
        same = document_ids[:, query_slice, None] == document_ids[:, None, : key_positions.shape[0]]
        allowed = allowed & same
    return allowed


def _attend_block(query_block, key, value, log_beta, document_ids, start, scaling):
    """Attend one query block, query_block (batch, kv_heads, group, n, dim), to the keys [0, end)."""
    batch, kv_heads, group, length_q, dim = query_block.shape
    length_k = key.shape[2]
    device = key.device

    # Scaling the queries costs n x dim multiplications instead of n x T on the logits.
    scaled = (query_block * scaling).reshape(batch, kv_heads, group * length_q, dim)
    logits = torch.matmul(scaled, key.transpose(-1, -2)).view(batch, kv_heads, group, length_q, length_k).float()
    if log_beta is not None:
        query_positions = torch.arange(start, start + length_q, device=device)
        age = (query_positions[:, None] - torch.arange(length_k, device=device)[None, :]).clamp(min=0)
        logits = logits + age.to(torch.float32) * log_beta.float()[:, :, None, None, :]  # (batch, kv_heads, 1, n, k)

    if document_ids is None:
        # Keys before the block are all visible, so only the diagonal n x n square needs the causal mask.
        future = torch.ones(length_q, length_q, dtype=torch.bool, device=device).triu(diagonal=1)
        logits[..., start:start + length_q] = logits[..., start:start + length_q].masked_fill(future, float("-inf"))
    else:
        query_positions = torch.arange(start, start + length_q, device=device)
        allowed = _allowed(query_positions, torch.arange(length_k, device=device), document_ids,
                           slice(start, start + length_q))
        logits = logits.masked_fill(~allowed[:, None, None], float("-inf"))
    probabilities = torch.softmax(logits, dim=-1).to(value.dtype)
    output = torch.matmul(probabilities.view(batch, kv_heads, group * length_q, length_k), value)
    return output.view(batch, kv_heads, group, length_q, dim)


def blockwise_gated_attention(query, key, value, log_beta, scaling, document_ids=None, block_size=512):
    """Retention-gated attention in query blocks with activation checkpointing (pure torch).

    Args:
        query: (batch, heads, T, dim); key, value: (batch, kv_heads, T, dim).
        log_beta: (batch, kv_heads, T) or None for plain causal attention.
        document_ids: (batch, T) or None.

    Returns:
        (batch, heads, T, dim).
    """
    if log_beta is None and document_ids is None:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    if block_size <= 0:
        raise ValueError(f"train.attention_block_size must be a positive integer, got {block_size}")
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.view(batch, kv_heads, heads // kv_heads, length, dim)
    # One block holds at most block_size x T scores anyway, so only several blocks need checkpointing.
    needs_grad = length > block_size and torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad for tensor in (query, key, value, log_beta)
    )
    outputs = []
    for start in range(0, length, block_size):
        end = min(length, start + block_size)
        arguments = (
            grouped[:, :, :, start:end],
            key[:, :, :end],
            value[:, :, :end],
            None if log_beta is None else log_beta[:, :, :end],
            None if document_ids is None else document_ids[:, :end],
            start,
            scaling,
        )
        if needs_grad:
            # Only the inputs are kept; the block's scores are recomputed during backward.
            outputs.append(checkpoint(_attend_block, *arguments, use_reentrant=False))
        else:
            outputs.append(_attend_block(*arguments))
    return torch.cat(outputs, dim=3).reshape(batch, heads, length, dim)


def fold_age_bias(query, key, value, log_beta, scaling):
    """Append the two head dimensions that make scaling * q'.k' = scaling * q.k + (t - i) log beta_i.

    Returns the query and key with head dimension dim + 2, and the value padded with two zeros
    because the fused kernels need equal head dimensions. The last two output features are zero.
    """
    batch, heads, length, _ = query.shape
    if query.dtype != torch.float32 or log_beta.dtype != torch.float32:
        raise ValueError(f"the sdpa training attention needs float32 inputs, got {query.dtype} and {log_beta.dtype}; "
                         "use train.attention=blockwise")
    # Centred positions halve the size of the two products, and with it their rounding error.
    positions = torch.arange(length, device=query.device, dtype=torch.float32) - (length - 1) / 2
    unscale = 1.0 / scaling
    query_extra = torch.stack([positions * unscale, torch.full_like(positions, unscale)], dim=-1)
    query = torch.cat([query, query_extra.expand(batch, heads, length, 2)], dim=-1)
    key = torch.cat([key, torch.stack([log_beta, -positions * log_beta], dim=-1)], dim=-1)
    return query, key, F.pad(value, (0, 2))


def sdpa_gated_attention(query, key, value, log_beta, scaling, document_ids=None, block_size=512):
    """Compute retention-gated attention with the fused SDPA kernel, the age bias folded into the heads.

    Without documents this is one causal call. With packed documents the queries go in blocks of
    `block_size`, each with a boolean (block x keys) mask, so no T x T tensor exists. Arguments
    and result are those of `blockwise_gated_attention`.
    """
    dim = value.shape[-1]
    if log_beta is not None:
        query, key, value = fold_age_bias(query, key, value, log_beta, scaling)
    if document_ids is None:
        output = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        return output[..., :dim]
    if block_size <= 0:
        raise ValueError(f"train.attention_block_size must be a positive integer, got {block_size}")
    length = query.shape[2]
    key_positions = torch.arange(length, device=query.device)
    outputs = []
    for start in range(0, length, block_size):
        end = min(length, start + block_size)
        allowed = _allowed(key_positions[start:end], key_positions[:end], document_ids, slice(start, end))
        outputs.append(F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, :end], value[:, :, :end],
                                                      attn_mask=allowed[:, None], scale=scaling, enable_gqa=True))
    return torch.cat(outputs, dim=2)[..., :dim]


def naive_gated_attention(query, key, value, log_beta, scaling, document_ids=None):
    """Compute the reference: a full (batch, kv_heads, T, T) additive bias through SDPA."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    positions = torch.arange(length, device=query.device)
    allowed = _allowed(positions, positions, document_ids, slice(0, length))  # (batch or 1, T, T)
    age = (positions[:, None] - positions[None, :]).clamp(min=0).to(torch.float32)
    if log_beta is None:
        bias = torch.zeros(1, 1, length, length, device=query.device)
    else:
        bias = age * log_beta.float()[:, :, None, :]  # (batch, kv_heads, T, T)
    bias = bias.masked_fill(~allowed[:, None], float("-inf")).to(query.dtype)
    bias = bias.repeat_interleave(heads // kv_heads, dim=1) if bias.shape[1] > 1 else bias
    return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scaling, enable_gqa=True)


_COMPILED_FLEX = None


def _flex_function(compiled: bool):
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if _COMPILED_FLEX is None:
        # dynamic=True: sequence lengths change from batch to batch and should not recompile.
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=True)
    return _COMPILED_FLEX


def flex_block_mask(document_ids, batch: int, length: int, device: torch.device):
    """FlexAttention block mask: causal, and within documents when `document_ids` is given."""
    from torch.nn.attention.flex_attention import create_block_mask

    if document_ids is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        return create_block_mask(mask_mod, None, None, length, length, device=device)

    def document_mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (document_ids[b, q_idx] == document_ids[b, kv_idx])

    return create_block_mask(document_mask_mod, batch, None, length, length, device=device)


def flex_gated_attention(query, key, value, log_beta, scaling, document_ids=None, block_mask=None, compiled=True):
    """Compute retention-gated attention through FlexAttention, with the age bias as a score_mod.

    `compiled=False` runs torch's unfused reference implementation (it builds the full score
    matrix), which is only meant for checking the score_mod and masks on small inputs.
    """
    # NOTE: the gradient of log_beta (a captured tensor) through the compiled kernel runs only on
    # CUDA, so the CPU tests do not cover it. They cover the blockwise backend's gradients.
    batch, heads, length, _ = query.shape
    group = heads // key.shape[1]
    if block_mask is None:
        block_mask = flex_block_mask(document_ids, batch, length, query.device)
    score_mod = None
    if log_beta is not None:
        # Within a document positions are contiguous, so q_idx - kv_idx is the age t - i.
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + log_beta[b, h // group, kv_idx] * (q_idx - kv_idx)

    flex = _flex_function(compiled)
    return flex(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling, enable_gqa=True)
