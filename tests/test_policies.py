"""Each policy keeps the tokens its paper's formula selects, checked against plain-torch references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import histories, prepare, run_greedy
from reference import masked_reference_logits, visibility_masks
from tiny_models import tiny_model
from trimkv.cache import build_cache, enable_eviction
from trimkv.compat import cache_kwargs
from trimkv.gates import gate_mode
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def kept_sets(positions):
    """(kv_heads, length) slot positions -> list of sorted kept positions per head."""
    return [sorted(int(p) for p in head if p >= 0) for head in positions]


def topk_sets(scores, budget, protected=None):
    """Reference selection: per head the `budget` highest scores (ties to the earlier position)."""
    if protected is not None:
        scores = scores.masked_fill(protected, float("inf"))
    result = []
    for head_scores in scores:
        order = sorted(range(len(head_scores)), key=lambda i: (-float(head_scores[i]), i))
        result.append(sorted(order[:budget]))
    return result


def test_streamingllm_keeps_sinks_and_recent_tokens():
    model = prepare(tiny_model("qwen3"), "streamingllm")
    budget, buffer, n_sink = 7, 2, 3
    fed, _, cache, bounds = run_greedy(model, torch.randint(0, 128, (1, 12)), "streamingllm", budget, buffer,
                                       steps=20, n_sink=n_sink)
    # Pure-Python simulation of the rule: once budget + buffer tokens are held, keep the first
    # n_sink tokens and the most recent budget - n_sink.
    held = []
    for step, (start, end) in enumerate(bounds):
        held += list(range(start, end))
        if len(held) >= budget + max(buffer, 1):
            held = held[:n_sink] + held[-(budget - n_sink):]
        for layer in cache.layers:
            for head in kept_sets(layer.history[step][0]):
                assert head == held, (step, head, held)


def test_trimkv_keeps_highest_decayed_retention_at_prefill():
    model = prepare(tiny_model("qwen3"), "trimkv")
    prompt = torch.randint(0, 128, (1, 30))
    budget = 9
    _, _, cache, _ = run_greedy(model, prompt, "trimkv", budget, 0, steps=0)

    # Reference: gate outputs from a plain no-cache forward (prefill attention is never masked
    # by eviction), score (t - i) * log beta_i with t = 30, the next position.
    with torch.no_grad(), gate_mode(model, "off"):
        hidden = model(prompt, output_hidden_states=True, use_cache=False).hidden_states
    for index, layer in enumerate(cache.layers):
        attention = model.model.layers[index].self_attn
        normed = model.model.layers[index].input_layernorm(hidden[index])
        log_beta = attention.retention_gate(normed)[0].T.detach()  # (kv_heads, T)
        scores = (30 - torch.arange(30)).float() * log_beta
        assert kept_sets(layer.history[0][0]) == topk_sets(scores, budget)


def test_trimkv_decode_keeps_highest_decayed_retention():
    model = prepare(tiny_model("llama"), "trimkv")
    budget, buffer = 6, 2
    fed, _, cache, bounds = run_greedy(model, torch.randint(0, 128, (1, 10)), "trimkv", budget, buffer, steps=16)
    # log beta per position from the reference forward under the cache's own visibility: the
    # gate input of token j is the hidden state computed when j was the query.
    masks = visibility_masks(histories(cache), bounds, fed.shape[1])
    captured = {}

    def capture(module, args, kwargs):
        captured[module.layer_idx] = module.retention_gate(kwargs["hidden_states"])[0].T.detach()

    handles = [layer.self_attn.register_forward_pre_hook(capture, with_kwargs=True) for layer in model.model.layers]
    try:
        with gate_mode(model, "off"):
            masked_reference_logits(model, fed, masks)
    finally:
        for handle in handles:
            handle.remove()

    for index, layer in enumerate(cache.layers):
        for head in range(captured[index].shape[0]):
            held: list[int] = []
            for step, (start, end) in enumerate(bounds):
                held = held + list(range(start, end))
                if len(held) >= budget + buffer:
                    # Score at the next position `end`: (t - i) * log beta_i.
                    scores = {p: (end - p) * float(captured[index][head, p]) for p in held}
                    held = sorted(sorted(held, key=lambda p: (-scores[p], p))[:budget])
                assert kept_sets(layer.history[step][0])[head] == held, (index, head, step)


def test_h2o_prefill_scores_are_accumulated_attention():
    model = tiny_model("qwen3", attn="eager")
    with torch.no_grad():
        prompt = torch.randint(0, 128, (1, 24))
        attentions = model(prompt, output_attentions=True, use_cache=False).attentions
    enable_eviction(model)
    budget = 10
    cache = build_cache(model, "h2o", budget, 0, record_history=True, recent_ratio=0.4)
    with torch.no_grad():
        model(prompt, **cache_kwargs(cache))
    recent = 4
    for index, layer in enumerate(cache.layers):
        probabilities = attentions[index][0]  # (heads, T, T)
        per_kv_head = probabilities.view(2, 2, 24, 24).mean(dim=1)  # mean over the query group
        scores = per_kv_head.sum(dim=1)  # accumulated over every prefill query
        protected = torch.zeros(2, 24, dtype=torch.bool)
        protected[:, -recent:] = True
        assert kept_sets(layer.history[0][0]) == topk_sets(scores, budget, protected)


@pytest.mark.parametrize("gqa_reduce", ["mean", "max"])
def test_h2o_decode_eviction_follows_reference_attention(gqa_reduce):
    model = prepare(tiny_model("qwen3"), "h2o")
    budget, buffer = 8, 0
    fed, _, cache, bounds = run_greedy(model, torch.randint(0, 128, (1, 12)), "h2o", budget, buffer, steps=14,
                                       gqa_reduce=gqa_reduce)
    masks = visibility_masks(histories(cache), bounds, fed.shape[1])
    _, attentions = masked_reference_logits(model, fed, masks, return_attentions=True)
    recent = budget // 2
    for index, layer in enumerate(cache.layers):
        grouped = attentions[index][0].view(2, 2, fed.shape[1], fed.shape[1])
        per_query = grouped.mean(dim=1) if gqa_reduce == "mean" else grouped.amax(dim=1)  # (kv_heads, T, T)
        for head in range(2):
            held: list[int] = []
            for step, (start, end) in enumerate(bounds):
                held = held + list(range(start, end))
                if len(held) >= budget + 1:
                    accumulated = per_query[head, :end].sum(dim=0)  # every query so far
                    recent_set = held[-recent:]
                    others = sorted(set(held) - set(recent_set), key=lambda p: (-float(accumulated[p]), p))
                    held = sorted(others[: budget - recent] + recent_set)
                assert kept_sets(layer.history[step][0])[head] == held, (index, head, step)


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_snapkv_prefill_selection_matches_formula(pooling):
    model = tiny_model("qwen3", attn="eager")
    prompt = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        attentions = model(prompt, output_attentions=True, use_cache=False).attentions
    enable_eviction(model)
    budget, window, kernel = 12, 5, 3
    cache = build_cache(model, "snapkv", budget, 0, record_history=True, window=window, kernel=kernel, pooling=pooling)
    with torch.no_grad():
        model(prompt, **cache_kwargs(cache))
    for index, layer in enumerate(cache.layers):
        # kvpress-style reference: window queries' attention on the prefix, averaged over the
        # window, pooled along the prefix, averaged over the GQA group; the window is kept.
        observed = attentions[index][0, :, -window:, :-window].mean(dim=1)  # (heads, T - window)
        pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
        pooled = pool(observed[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]
        per_kv_head = pooled.view(2, 2, -1).mean(dim=1)
        scores = torch.cat([per_kv_head, torch.full((2, window), float("inf"))], dim=1)
        assert kept_sets(layer.history[0][0]) == topk_sets(scores, budget)


def test_streamingllm_rerotate_matches_in_cache_positions():
    model = prepare(tiny_model("llama"), "streamingllm")
    budget, buffer, n_sink = 6, 0, 2
    prompt = torch.randint(0, 128, (1, 9))
    fed, _, cache, _ = run_greedy(model, prompt, "streamingllm", budget, buffer, steps=10,
                                            n_sink=n_sink, rerotate=True)
    # Layer-0 keys depend only on the token, so after the last eviction the cached keys must
    # equal the kept tokens' layer-0 keys rotated at contiguous positions ending at the newest.
    layer0 = model.model.layers[0].self_attn
    with torch.no_grad():
        normed = model.model.layers[0].input_layernorm(model.model.embed_tokens(fed))
        raw_keys = layer0.k_proj(normed).view(1, fed.shape[1], -1, layer0.head_dim).transpose(1, 2)
    kept = kept_sets(cache.layers[0].history[-1][0])[0]
    newest = fed.shape[1] - 1
    new_positions = torch.arange(newest - len(kept) + 1, newest + 1)
    cos, sin = model.model.rotary_emb(raw_keys, new_positions[None])
    expected_keys, _ = apply_rotary_pos_emb(raw_keys[:, :, kept], raw_keys[:, :, kept], cos, sin)
    stored = cache.layers[0].keys[:, :, : len(kept)]
    assert torch.allclose(stored, expected_keys, atol=1e-5), (stored - expected_keys).abs().max()
    assert cache.layers[0].evictions >= 3
