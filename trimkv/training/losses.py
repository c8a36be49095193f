"""Distillation losses of TRIM-KV.

total = kl_weight * KL(teacher || student) + ntp_weight * next-token loss + capacity_weight * capacity

- KL: forward KL of the frozen model's next-token distribution (teacher) to the gated model's
  (student), summed over the vocabulary and averaged over label positions.
- Next-token loss: the student's cross-entropy on the labels.
- Capacity: a hinge on the soft occupancy S_t = sum_{i<=t} beta_i^(t-i) of every layer and KV
  head. `paper` normalisation: (1/T) sum_t max(0, S_t - M) / t with t counted from 1, averaged over
  layers, heads and sequences. `released` normalisation (the authors' released code):
  max(0, (S_t - M) / max(t - M, 1)) with t counted from 0, averaged over the positive entries only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    """The capacity hinge for one layer from its soft occupancy (batch, kv_heads, T) -> scalar."""
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
