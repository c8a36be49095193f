"""The memory-efficient training paths against plain-torch reference computations.

Each memory-saving computation must give the values of the direct O(T^2) or O(T x vocab) one:
blockwise, SDPA and FlexAttention student attention, the blockwise soft occupancy and the blocked
logits. Gradients are compared too, except for FlexAttention (no CPU backward in torch 2.13).
The cases include packed documents and GQA.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trimkv.training.attention import (
    blockwise_gated_attention,
    flex_gated_attention,
    naive_gated_attention,
    resolve_backend,
    sdpa_gated_attention,
)
from trimkv.training.data import IGNORE_INDEX
from trimkv.training.losses import (
    blockwise_soft_occupancy,
    capacity_loss,
    capacity_sums,
    distillation_sums,
    forward_kl,
    next_token_loss,
    soft_occupancy,
)


def reference_attention(query, key, value, log_beta, scaling, document_ids=None):
    """softmax(q k * scale + (t - i) log beta_i) over i <= t of the same document, with loops over nothing
    but explicit (heads, T, T) tensors."""
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    length = query.shape[2]
    t = torch.arange(length)[:, None]
    i = torch.arange(length)[None, :]
    logits = query @ key.transpose(-1, -2) * scaling
    if log_beta is not None:
        logits = logits + (t - i).clamp(min=0) * log_beta.repeat_interleave(group, dim=1)[:, :, None, :]
    allowed = (i <= t)[None, None]
    if document_ids is not None:
        allowed = allowed & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1) @ value


def random_inputs(batch=2, heads=4, kv_heads=2, length=23, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, length, dim, generator=generator).requires_grad_(True)
    key = torch.randn(batch, kv_heads, length, dim, generator=generator).requires_grad_(True)
    value = torch.randn(batch, kv_heads, length, dim, generator=generator).requires_grad_(True)
    # log beta spread over [-3, 0): short and long memories side by side.
    log_beta = F.logsigmoid(2 * torch.randn(batch, kv_heads, length, generator=generator)).requires_grad_(True)
    return query, key, value, log_beta


def packed_documents(batch: int, length: int, lengths_per_row: list[list[int]]) -> torch.Tensor:
    documents = torch.empty(batch, length, dtype=torch.long)
    for row, lengths in enumerate(lengths_per_row):
        assert sum(lengths) == length
        documents[row] = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return documents


def assert_close_with_gradients(output, expected, inputs, tolerance=1e-5):
    assert torch.allclose(output, expected, atol=tolerance), (output - expected).abs().max()
    weights = torch.randn_like(expected)
    grads = torch.autograd.grad((output * weights).sum(), inputs)
    expected_grads = torch.autograd.grad((expected * weights).sum(), inputs)
    for name, got, want in zip("qkvb", grads, expected_grads):
        assert torch.allclose(got, want, atol=tolerance), (name, (got - want).abs().max())


@pytest.mark.parametrize("block_size", [1, 5, 8, 23, 64])
def test_blockwise_attention_matches_reference(block_size):
    query, key, value, log_beta = random_inputs()
    scaling = 8**-0.5
    output = blockwise_gated_attention(query, key, value, log_beta, scaling, block_size=block_size)
    expected = reference_attention(query, key, value, log_beta, scaling)
    assert_close_with_gradients(output, expected, (query, key, value, log_beta))


def test_blockwise_attention_with_documents():
    query, key, value, log_beta = random_inputs()
    documents = packed_documents(2, 23, [[7, 9, 7], [23]])
    scaling = 8**-0.5
    output = blockwise_gated_attention(query, key, value, log_beta, scaling, documents, block_size=6)
    expected = reference_attention(query, key, value, log_beta, scaling, documents)
    assert_close_with_gradients(output, expected, (query, key, value, log_beta))


@pytest.mark.parametrize("block_size", [1, 5, 64])
def test_sdpa_attention_matches_reference(block_size):
    # The fused kernel with the age bias folded into two extra head dimensions, with and without
    # packed documents (query blocks with boolean masks).
    query, key, value, log_beta = random_inputs()
    documents = packed_documents(2, 23, [[7, 9, 7], [23]])
    for document_ids in (None, documents):
        output = sdpa_gated_attention(query, key, value, log_beta, 8**-0.5, document_ids, block_size)
        expected = reference_attention(query, key, value, log_beta, 8**-0.5, document_ids)
        assert_close_with_gradients(output, expected, (query, key, value, log_beta))
        output = sdpa_gated_attention(query, key, value, None, 0.3, document_ids, block_size)
        assert torch.allclose(output, reference_attention(query, key, value, None, 0.3, document_ids), atol=1e-5)


def test_sdpa_attention_precision_at_4096():
    # The folded products grow with T; at T = 4096 with strong and weak decay side by side the
    # output and the log beta gradient must still match a float64 reference.
    generator = torch.Generator().manual_seed(3)
    length = 4096
    query = torch.randn(1, 2, length, 16, generator=generator).requires_grad_(True)
    key = torch.randn(1, 1, length, 16, generator=generator).requires_grad_(True)
    value = torch.randn(1, 1, length, 16, generator=generator).requires_grad_(True)
    log_beta = F.logsigmoid(4 * torch.randn(1, 1, length, generator=generator) + 4).requires_grad_(True)
    output = sdpa_gated_attention(query, key, value, log_beta, 0.25)
    expected = blockwise_gated_attention(*(tensor.double() for tensor in (query, key, value, log_beta)), 0.25,
                                         block_size=1024)
    assert torch.allclose(output.double(), expected, atol=1e-4), (output.double() - expected).abs().max()
    weights = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    got = torch.autograd.grad((output.double() * weights).sum(), log_beta)[0].double()
    want = torch.autograd.grad((expected * weights).sum(), log_beta)[0].double()
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max())), (got - want).abs().max()


def test_sdpa_attention_rejects_16_bit_inputs():
    query, key, value, log_beta = (tensor.detach().bfloat16() for tensor in random_inputs())
    with pytest.raises(ValueError, match="float32"):
        sdpa_gated_attention(query, key, value, log_beta, 0.3)


def test_blockwise_attention_without_gates_is_causal():
    query, key, value, _ = random_inputs()
    documents = packed_documents(2, 23, [[10, 13], [3, 20]])
    for document_ids in (None, documents):
        output = blockwise_gated_attention(query, key, value, None, 0.3, document_ids, block_size=4)
        expected = reference_attention(query, key, value, None, 0.3, document_ids)
        assert torch.allclose(output, expected, atol=1e-5)


def test_naive_attention_matches_reference():
    query, key, value, log_beta = random_inputs()
    documents = packed_documents(2, 23, [[12, 11], [23]])
    output = naive_gated_attention(query, key, value, log_beta, 0.35, documents)
    expected = reference_attention(query, key, value, log_beta, 0.35, documents)
    assert_close_with_gradients(output, expected, (query, key, value, log_beta))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_score_mod_and_masks_match_reference():
    # torch 2.13 has no FlexAttention backward on the CPU, and compiling takes about half a minute
    # there, so this checks the score_mod and the block masks through the unfused implementation.
    query, key, value, log_beta = (tensor.detach() for tensor in random_inputs(length=37))
    documents = packed_documents(2, 37, [[20, 17], [5, 32]])
    with torch.no_grad():
        for document_ids in (None, documents):
            output = flex_gated_attention(query, key, value, log_beta, 0.35, document_ids, compiled=False)
            expected = reference_attention(query, key, value, log_beta, 0.35, document_ids)
            assert torch.allclose(output, expected, atol=1e-5), (output - expected).abs().max()


def direct_occupancy(log_beta, valid, documents):
    batch, heads, length = log_beta.shape
    result = torch.zeros(batch, heads, length, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for t in range(length):
                if not valid[b, t]:
                    continue
                result[b, h, t] = sum(
                    math.exp((t - i) * float(log_beta[b, h, i]))
                    for i in range(t + 1)
                    if valid[b, i] and (documents is None or documents[b, i] == documents[b, t])
                )
    return result


@pytest.mark.parametrize("block_size", [1, 4, 19, None])
def test_blockwise_occupancy_matches_direct_sum(block_size):
    _, _, _, log_beta = random_inputs(length=19)
    valid = torch.ones(2, 19, dtype=torch.bool)
    valid[1, 15:] = False
    documents = packed_documents(2, 19, [[6, 13], [9, 10]])
    for document_ids in (None, documents):
        occupancy = blockwise_soft_occupancy(log_beta, valid, document_ids, block_size)
        expected = direct_occupancy(log_beta.detach(), valid, document_ids)
        assert torch.allclose(occupancy.double(), expected, atol=1e-5)

    for document_ids in (None, documents):
        reference = masked_occupancy(log_beta, valid, document_ids)
        blockwise = blockwise_soft_occupancy(log_beta, valid, document_ids, block_size)
        weights = torch.rand_like(reference)
        got = torch.autograd.grad((blockwise * weights).sum(), log_beta)[0]
        want = torch.autograd.grad((reference * weights).sum(), log_beta)[0]
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def masked_occupancy(log_beta, valid, documents):
    """The O(T^2) formula with an explicit (batch, T, T) mask, differentiable by autograd."""
    length = log_beta.shape[-1]
    t = torch.arange(length)[:, None]
    i = torch.arange(length)[None, :]
    allowed = (i <= t)[None] & valid[:, None, :] & valid[:, :, None]
    if documents is not None:
        allowed = allowed & (documents[:, :, None] == documents[:, None, :])
    terms = torch.exp((t - i).clamp(min=0) * log_beta[:, :, None, :]) * allowed[:, None]
    return terms.sum(dim=-1)


def test_capacity_sums_reproduce_capacity_loss():
    _, _, _, log_beta = random_inputs(length=17)
    log_beta = log_beta.detach()
    valid = torch.ones(2, 17, dtype=torch.bool)
    valid[0, 12:] = False
    occupancy = soft_occupancy(log_beta, valid)
    positions = torch.arange(17).expand(2, 17)
    weights = valid.float() / valid.sum(dim=1, keepdim=True)
    budget = 3.0

    total, heads = capacity_sums(occupancy, valid, positions, weights, budget, "paper")
    assert torch.allclose(total / (2 * heads), capacity_loss(occupancy, valid, budget, "paper"), atol=1e-6)
    total, active = capacity_sums(occupancy, valid, positions, weights, budget, "released")
    assert float(active) > 0
    assert torch.allclose(total / active, capacity_loss(occupancy, valid, budget, "released"), atol=1e-6)


def test_capacity_sums_restart_positions_per_document():
    # A packed row [doc A | doc B] must give the sum of the two rows [doc A] and [doc B].
    _, _, _, log_beta = random_inputs(batch=1, length=15)
    log_beta = log_beta.detach()
    lengths = [6, 9]
    documents = packed_documents(1, 15, [lengths])
    valid = torch.ones(1, 15, dtype=torch.bool)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    weights = torch.cat([torch.full((n,), 1.0 / n) for n in lengths])[None]
    packed = blockwise_soft_occupancy(log_beta, valid, documents, 4)
    packed_total, _ = capacity_sums(packed, valid, positions, weights, 2.0, "paper")

    separate_total = 0.0
    start = 0
    for n in lengths:
        piece = log_beta[:, :, start:start + n]
        row_valid = torch.ones(1, n, dtype=torch.bool)
        occupancy = soft_occupancy(piece, row_valid)
        assert torch.allclose(packed[:, :, start:start + n], occupancy, atol=1e-5)
        total, _ = capacity_sums(occupancy, row_valid, torch.arange(n)[None], torch.full((1, n), 1.0 / n), 2.0, "paper")
        separate_total += float(total)
        start += n
    assert abs(float(packed_total) - separate_total) < 1e-5


@pytest.mark.parametrize("block_size", [None, 1, 3, 100])
def test_blocked_logits_match_full_losses(block_size):
    torch.manual_seed(0)
    hidden, vocab = 6, 31
    head = torch.nn.Linear(hidden, vocab, bias=False)
    student = torch.randn(2, 9, hidden, requires_grad=True)
    teacher = student.detach() + 0.3 * torch.randn(2, 9, hidden)
    labels = torch.randint(0, vocab, (2, 9))
    labels[0, :4] = IGNORE_INDEX
    labels[1, 7:] = IGNORE_INDEX

    kl_sum, ntp_sum, count = distillation_sums(student, teacher, head, labels, block_size)
    expected_kl = forward_kl(head(teacher), head(student), labels)
    expected_ntp = next_token_loss(head(student), labels)
    assert count == int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert torch.allclose(kl_sum / count, expected_kl, atol=1e-5)
    assert torch.allclose(ntp_sum / count, expected_ntp, atol=1e-5)
    got = torch.autograd.grad((kl_sum + 2 * ntp_sum) / count, student)[0]
    want = torch.autograd.grad(expected_kl + 2 * expected_ntp, student)[0]
    assert torch.allclose(got, want, atol=1e-6)


def test_auto_backend_per_device_and_precision():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu, "fp32") == "sdpa"
    assert resolve_backend("auto", cpu, "bf16") == "blockwise"
    assert resolve_backend("auto", cuda, "bf16") == "flex"
    assert resolve_backend("blockwise", cpu, "bf16") == "blockwise"
    with pytest.raises(ValueError, match="train.precision=fp32"):
        resolve_backend("sdpa", cpu, "bf16")
    with pytest.raises(ValueError, match="unknown train.attention 'fused'"):
        resolve_backend("fused", cpu, "fp32")
