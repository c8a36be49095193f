"""Distillation losses of TRIM-KV.

total = kl_weight * KL(teacher || student) + ntp_weight * next-token loss + capacity_weight * capacity

- KL: forward KL of the frozen model's next-token distribution (teacher) to the gated model's
  (student), summed over the vocabulary and averaged over label positions.
- Next-token loss: the student's cross-entropy on the labels.
- Capacity: a hinge on the soft occupancy S_t = sum_{i<=t} beta_i^(t-i) of every layer and KV
  head. `paper` normalisation: (1/T) sum_t max(0, S_t - M) / t with t counted from 1, averaged over
  layers, heads and sequences. `released` normalisation (the authors' released code):
  max(0, (S_t - M) / max(t - M, 1)) with t counted from 0, averaged over the positive entries only.

The functions named `*_sums` return sums, not means, so that the trainer can divide by counts
taken over the whole global batch (all micro-batches and ranks). `soft_occupancy` and
`capacity_loss` are the direct O(T^2) forms that the blockwise ones are tested against. With
packed sequences t is the position inside the token's document and only tokens of the same
document count in S_t.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trimkv.training.data import IGNORE_INDEX


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets shifted by one and the positions whose logits predict a label, both (batch, T-1)."""
    targets = labels[:, 1:]
    return targets, targets != IGNORE_INDEX


def forward_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) averaged over the positions that predict a label."""
    _, mask = label_positions(labels)
    teacher = F.log_softmax(teacher_logits[:, :-1][mask].float(), dim=-1)
    student = F.log_softmax(student_logits[:, :-1][mask].float(), dim=-1)
    if teacher.numel() == 0:
        return student_logits.sum() * 0.0
    return (teacher.exp() * (teacher - student)).sum(dim=-1).mean()


def next_token_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student on the labels (mean over label tokens)."""
    targets, mask = label_positions(labels)
    if not bool(mask.any()):
        return student_logits.sum() * 0.0
    return F.cross_entropy(student_logits[:, :-1][mask].float(), targets[mask])


def soft_occupancy(log_beta: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """S_t = sum over real tokens i <= t of beta_i^(t - i).

    Args:
        log_beta: (batch, kv_heads, T) log retention of each token.
        valid: bool (batch, T), real tokens (right padding).

    Returns:
        (batch, kv_heads, T), zero at padding positions.
    """
    length = log_beta.shape[-1]
    index = torch.arange(length, device=log_beta.device)
    age = (index[:, None] - index[None, :]).to(log_beta.dtype)  # (T query, T key)
    causal = age >= 0
    exponent = age.clamp(min=0) * log_beta[:, :, None, :]  # (batch, heads, T, T)
    weights = exponent.exp() * (causal & valid[:, None, None, :])
    return weights.sum(dim=-1) * valid[:, None, :]


def capacity_loss(occupancy: torch.Tensor, valid: torch.Tensor, budget: float, normalization: str = "paper") -> torch.Tensor:
    """Compute the capacity hinge of one layer from its soft occupancy (batch, kv_heads, T) -> scalar."""
    steps = torch.arange(occupancy.shape[-1], device=occupancy.device, dtype=occupancy.dtype)
    real = valid[:, None, :].expand_as(occupancy)
    if normalization == "paper":
        hinge = (occupancy - budget).clamp(min=0) / (steps + 1)
        per_sequence = (hinge * real).sum(dim=-1) / real.sum(dim=-1).clamp(min=1)
        return per_sequence.mean()
    if normalization == "released":
        hinge = ((occupancy - budget) / (steps - budget).clamp(min=1)).clamp(min=0)
        active = (hinge > 0) & real
        if not bool(active.any()):
            return hinge.sum() * 0.0
        return hinge[active].mean()
    raise ValueError(f"unknown loss.capacity_normalization {normalization!r}; use paper or released")


def _occupancy_weights(log_beta, valid, document_ids, start, end):
    """Compute beta_i^(t - i) for keys i < end and queries t in [start, end), zero where S_t omits i.

    Returns the weights (batch, kv_heads, end, n), keys first, and the ages t - i, (end, n).
    """
    positions = torch.arange(end, device=log_beta.device, dtype=log_beta.dtype)
    age = positions[None, start:end] - positions[:, None]
    weights = torch.mul(age.clamp(min=0), log_beta[:, :, :end, None]).exp_()
    if document_ids is None:
        # Right padding only follows the real tokens, so every key i <= t of a real query t is real
        # (padding queries are zeroed by the caller), and only the diagonal square has future keys.
        future = torch.ones(end - start, end - start, dtype=torch.bool, device=log_beta.device).tril(diagonal=-1)
        weights[:, :, start:].masked_fill_(future, 0.0)
    else:
        same = document_ids[:, None, :end, None] == document_ids[:, None, None, start:end]
        weights.masked_fill_(~((age >= 0) & same & valid[:, None, :end, None]), 0.0)
    return weights, age


class _BlockwiseOccupancy(torch.autograd.Function):
    """S_t in query blocks, forward and backward, keeping nothing but log beta between them.

    dS_t / dlog beta_i = (t - i) beta_i^(t - i), so the backward recomputes each block's weights
    once and contracts them with the incoming gradient. No autograd graph of a block is built.
    """

    @staticmethod
    def forward(ctx, log_beta, valid, document_ids, block):
        ctx.save_for_backward(log_beta, valid, document_ids)
        ctx.block = block
        occupancy = torch.empty_like(log_beta)
        length = log_beta.shape[-1]
        for start in range(0, length, block):
            end = min(length, start + block)
            weights, _ = _occupancy_weights(log_beta, valid, document_ids, start, end)
            occupancy[..., start:end] = weights.sum(dim=-2)
        return occupancy.mul_(valid[:, None, :])

    @staticmethod
    def backward(ctx, grad_occupancy):
        log_beta, valid, document_ids = ctx.saved_tensors
        grad_occupancy = grad_occupancy * valid[:, None, :]
        grad_log_beta = torch.zeros_like(log_beta)
        length = log_beta.shape[-1]
        for start in range(0, length, ctx.block):
            end = min(length, start + ctx.block)
            weights, age = _occupancy_weights(log_beta, valid, document_ids, start, end)
            weights.mul_(age)
            grad_log_beta[..., :end] += torch.matmul(weights, grad_occupancy[..., start:end, None]).squeeze(-1)
        return grad_log_beta, None, None, None


def blockwise_soft_occupancy(log_beta: torch.Tensor, valid: torch.Tensor, document_ids: torch.Tensor | None = None,
                             block_size: int | None = 512) -> torch.Tensor:
    """S_t = sum over real tokens i <= t of the same document of beta_i^(t - i), in query blocks.

    Forward and backward hold the (block_size x T) terms of one block at a time; the backward
    recomputes them. `block_size=None` computes all positions in one block. The sum runs in
    float32 whatever the dtype of `log_beta`.

    Args:
        log_beta: (batch, kv_heads, T).
        valid: bool (batch, T).
        document_ids: (batch, T) or None (one document per row).

    Returns:
        (batch, kv_heads, T) float32, zero at padding positions.
    """
    length = log_beta.shape[-1]
    block = length if block_size is None else int(block_size)
    if block <= 0:
        raise ValueError(f"loss.capacity_block_size must be a positive integer or null, got {block_size}")
    return _BlockwiseOccupancy.apply(log_beta.float(), valid, document_ids, max(block, 1))


def capacity_sums(occupancy: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor, document_weights: torch.Tensor,
                  budget: float, normalization: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Hinge sum of one layer and the count it is divided by, before any reduction across batches.

    Args:
        occupancy: (batch, kv_heads, T) soft occupancy S_t.
        valid: bool (batch, T).
        positions: (batch, T) position t of each token inside its document, from 0.
        document_weights: (batch, T) 1 / length of the token's document (0 at padding).

    Returns:
        `paper`: (sum over documents and heads of (1/len) sum_t max(0, S_t - M) / (t + 1), number of
        heads). The trainer divides by the number of documents times heads.
        `released`: (sum of the active hinges max(0, (S_t - M) / max(t - M, 1)), number of active hinges).
    """
    real = valid[:, None, :].expand_as(occupancy)
    steps = positions[:, None, :].to(occupancy.dtype)
    if normalization == "paper":
        hinge = (occupancy - budget).clamp(min=0) / (steps + 1)
        total = (hinge * document_weights[:, None, :] * real).sum()
        return total, torch.tensor(float(occupancy.shape[1]), device=occupancy.device)
    if normalization == "released":
        hinge = ((occupancy - budget) / (steps - budget).clamp(min=1)).clamp(min=0)
        active = (hinge > 0) & real
        return (hinge * active).sum(), active.sum().to(occupancy.dtype).detach()
    raise ValueError(f"unknown loss.capacity_normalization {normalization!r}; use paper or released")


def _distillation_block(student_hidden, teacher_hidden, targets, output_head):
    with torch.no_grad():
        teacher = F.log_softmax(output_head(teacher_hidden).float(), dim=-1)
    student = F.log_softmax(output_head(student_hidden).float(), dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum()
    ntp = F.nll_loss(student, targets, reduction="sum")
    return kl, ntp


def distillation_sums(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, output_head: torch.nn.Module,
                      labels: torch.Tensor, block_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Forward-KL and next-token sums over the label positions, computing logits in blocks.

    Only the positions that predict a label get logits. With `block_size` set, each block of that
    many positions runs under activation checkpointing, so the (positions, vocab) logits of the
    teacher and the student exist one block at a time, in forward and in backward.

    Args:
        student_hidden, teacher_hidden: (batch, T, hidden) final hidden states.
        output_head: the model's output embedding (hidden -> vocab).
        labels: (batch, T) with IGNORE_INDEX where no loss is taken.

    Returns:
        (KL sum, NTP sum, number of label positions).
    """
    targets, mask = label_positions(labels)
    student = student_hidden[:, :-1][mask]  # (N, hidden)
    teacher = teacher_hidden[:, :-1][mask]
    targets = targets[mask]
    count = int(targets.numel())
    if count == 0:
        zero = student_hidden.sum() * 0.0
        return zero, zero, 0
    block = count if block_size is None else int(block_size)
    if block <= 0:
        raise ValueError(f"train.logit_block_size must be a positive integer or null, got {block_size}")
    needs_grad = torch.is_grad_enabled() and student.requires_grad and block < count
    compute = partial(_distillation_block, output_head=output_head)
    kl_total = ntp_total = None
    for start in range(0, count, block):
        pieces = (student[start:start + block], teacher[start:start + block], targets[start:start + block])
        kl, ntp = checkpoint(compute, *pieces, use_reentrant=False) if needs_grad else compute(*pieces)
        kl_total = kl if kl_total is None else kl_total + kl
        ntp_total = ntp if ntp_total is None else ntp_total + ntp
    return kl_total, ntp_total, count
