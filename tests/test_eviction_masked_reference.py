"""Every cached forward equals a no-cache forward that hides exactly the evicted tokens."""

from __future__ import annotations

import pytest
import torch

from helpers import POLICIES, histories, prepare, run_greedy
from reference import masked_reference_logits, visibility_masks
from tiny_models import tiny_model

FAMILIES = ["qwen3", "llama", "qwen2", "phi3"]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", POLICIES)
def test_logits_match_masked_reference(method, family, attn):
    model = prepare(tiny_model(family), method, attn)
    prompt = torch.randint(0, 128, (1, 21))
    budget, buffer, steps = 8, 3, 20

    fed, logits, cache, bounds = run_greedy(model, prompt, method, budget, buffer, steps)
    masks = visibility_masks(histories(cache), bounds, fed.shape[1])
    reference = masked_reference_logits(model, fed, masks)[0]

    assert torch.allclose(logits, reference, atol=1e-5, rtol=0), (logits - reference).abs().max()
    if method != "full":
        assert cache.stats()["evictions"] > 0
        # The check is sensitive: the same run without eviction gives different logits.
        full_masks = visibility_masks([[torch.arange(fed.shape[1]).expand(1, m.shape[1], -1)
                                        for _ in bounds] for m in masks.values()], bounds, fed.shape[1])
        unevicted = masked_reference_logits(model, fed, full_masks)[0]
        assert (unevicted - logits).abs().max() > 1e-3


@pytest.mark.parametrize("method", POLICIES)
def test_retained_tokens_never_exceed_budget_plus_buffer(method):
    model = prepare(tiny_model("qwen3"), method)
    budget, buffer = 6, 4
    _, _, cache, _ = run_greedy(model, torch.randint(0, 128, (1, 15)), method, budget, buffer, steps=25)
    for layer in cache.layers:
        for kept in layer.history[1:] if method == "full" else layer.history:
            held = (kept >= 0).sum(dim=-1)
            if method == "full":
                continue
            assert int(held.max()) <= budget + buffer
        if method != "full":
            assert layer.peak_retained <= budget + buffer
            assert layer.evictions > 0
