"""Chunked prefill: eviction after every chunk bounds prefill memory and stays exact."""

from __future__ import annotations

import pytest
import torch

from helpers import POLICIES, POLICY_PARAMS, histories, prepare, run_greedy
from reference import masked_reference_logits, visibility_masks
from tiny_models import tiny_model
from trimkv.cache import build_cache
from trimkv.compat import cache_kwargs


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("method", POLICIES)
def test_chunked_prefill_matches_masked_reference(method, family):
    model = prepare(tiny_model(family), method)
    prompt = torch.randint(0, 128, (1, 47))
    budget, chunk = 10, 8
    fed, logits, cache, bounds = run_greedy(model, prompt, method, budget, 0, steps=12, prefill_chunk=chunk)
    assert bounds[:6] == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 40), (40, 47)]

    reference = masked_reference_logits(model, fed, visibility_masks(histories(cache), bounds, fed.shape[1]))[0]
    assert torch.allclose(logits, reference, atol=1e-5, rtol=0), (logits - reference).abs().max()
    for layer in cache.layers:
        if method == "full":
            assert layer.peak_slots == fed.shape[1]
        else:
            # At most `budget` tokens survive a chunk, then the next chunk's tokens arrive.
            assert layer.peak_slots <= budget + chunk
            assert layer.evictions >= 5  # after most prefill chunks, not only at the end


def test_generate_prefill_chunk_size_bounds_prefill_memory():
    model = prepare(tiny_model("qwen3"), "snapkv")
    prompt = torch.randint(1, 128, (1, 64))
    budget, chunk = 12, 16
    chunked = build_cache(model, "snapkv", budget, 0, **POLICY_PARAMS["snapkv"])
    model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False, prefill_chunk_size=chunk,
                   **cache_kwargs(chunked))
    whole = build_cache(model, "snapkv", budget, 0, **POLICY_PARAMS["snapkv"])
    model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False, **cache_kwargs(whole))
    assert chunked.stats()["peak_slots"] <= budget + chunk
    assert whole.stats()["peak_slots"] == 64
