"""The eviction cache inside `generate`: no-op budgets, continuation positions, padded batches."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import POLICIES, POLICY_PARAMS, histories, prepare
from reference import masked_reference_logits, visibility_masks
from tiny_models import tiny_model
from trimkv.cache import build_cache
from trimkv.compat import cache_kwargs

PAD = 0


def generate(model, input_ids, cache, new_tokens, attention_mask=None):
    return model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=PAD,
        output_logits=True,
        return_dict_in_generate=True,
        **cache_kwargs(cache),
    )


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("method", POLICIES)
def test_large_budget_reproduces_full_cache(method, family):
    plain = tiny_model(family)
    model = prepare(copy.deepcopy(plain), method)
    prompt = torch.randint(1, 128, (1, 17))

    expected = plain.generate(input_ids=prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                              pad_token_id=PAD, output_logits=True, return_dict_in_generate=True)
    cache = build_cache(model, method, budget=64, buffer=0, **POLICY_PARAMS[method])
    result = generate(model, prompt, cache, 12)

    assert torch.equal(result.sequences, expected.sequences)
    for got, want in zip(result.logits, expected.logits):
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert cache.stats()["evictions"] == 0


@pytest.mark.parametrize("method", ["streamingllm", "h2o", "snapkv", "trimkv"])
def test_plain_forward_after_generate_continues_at_right_positions(method):
    model = prepare(tiny_model("qwen3"), method)
    prompt = torch.randint(1, 128, (1, 19))
    new_tokens = 15
    cache = build_cache(model, method, budget=8, buffer=2, record_history=True, **POLICY_PARAMS[method])
    result = generate(model, prompt, cache, new_tokens)
    assert cache.get_seq_length() == prompt.shape[1] + new_tokens - 1  # generate never feeds its last token

    continuation = torch.cat([result.sequences[:, -1:], torch.randint(1, 128, (1, 3))], dim=1)
    with torch.no_grad():
        continued = model(input_ids=continuation, **cache_kwargs(cache)).logits[0]

    fed = torch.cat([result.sequences, continuation[:, 1:]], dim=1)
    prompt_length = prompt.shape[1]
    bounds = [(0, prompt_length)] + [(prompt_length + i, prompt_length + i + 1) for i in range(new_tokens - 1)]
    bounds.append((prompt_length + new_tokens - 1, fed.shape[1]))
    reference = masked_reference_logits(model, fed, visibility_masks(histories(cache), bounds, fed.shape[1]))[0]

    for step, logits in enumerate(result.logits):
        assert torch.allclose(logits[0], reference[prompt_length - 1 + step], atol=1e-5, rtol=0)
    assert torch.allclose(continued, reference[-continuation.shape[1]:], atol=1e-5, rtol=0)
    assert cache.stats()["evictions"] > 0


def left_pad(prompts):
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.tensor(prompt)
        mask[row, longest - len(prompt):] = 1
    return ids, mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("method", POLICIES)
def test_left_padded_batch_matches_each_prompt_alone(method, family, attn):
    model = prepare(tiny_model(family), method, attn)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 128, (length,), generator=generator).tolist() for length in (23, 15, 9)]
    new_tokens, budget, buffer = 20, 10, 3

    ids, mask = left_pad(prompts)
    batch_cache = build_cache(model, method, budget, buffer, **POLICY_PARAMS[method])
    batched = generate(model, ids, batch_cache, new_tokens, attention_mask=mask)

    for row, prompt in enumerate(prompts):
        solo_cache = build_cache(model, method, budget, buffer, **POLICY_PARAMS[method])
        solo = generate(model, torch.tensor([prompt]), solo_cache, new_tokens)
        assert batched.sequences[row, -new_tokens:].tolist() == solo.sequences[0, -new_tokens:].tolist()
        for got, want in zip(batched.logits, solo.logits):
            assert torch.allclose(got[row], want[0], atol=1e-4, rtol=0), (got[row] - want[0]).abs().max()
    if method != "full":
        assert batch_cache.stats()["evictions"] > 0
