"""R-KV, KeyDiff and Knorm keep the tokens their formulas select, checked against plain-torch references.

The decode-time tests feed distinct tokens (teacher forcing, not greedy decoding): copies of one
token have equal layer-0 key norms in exact arithmetic, which would turn Knorm's reference into a
comparison of rounding noise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import trimkv.cache.statistics
from helpers import histories, prepare
from reference import masked_reference_logits, visibility_masks
from tiny_models import tiny_model
from trimkv.cache import build_cache
from trimkv.compat import cache_kwargs
from trimkv.policies import build_policy

REPO = Path(__file__).resolve().parents[1]


def kept_sets(positions):
    """(kv_heads, length) slot positions -> sorted kept positions per head."""
    return [sorted(int(p) for p in head if p >= 0) for head in positions]


def run_teacher_forced(model, tokens, prompt_length, method, budget, buffer, **params):
    """Prefill tokens[:, :prompt_length], then feed the rest one token per forward.

    Returns (cache, step bounds) with the kept positions recorded after every forward.
    """
    cache = build_cache(model, method, budget, buffer, record_history=True, **params)
    bounds = [(0, prompt_length)] + [(i, i + 1) for i in range(prompt_length, tokens.shape[1])]
    with torch.no_grad():
        for start, end in bounds:
            model(input_ids=tokens[:, start:end], **cache_kwargs(cache))
    return cache, bounds


def reference_states(model, tokens, masks):
    """Return post-RoPE queries (heads, T, dim) and keys (kv_heads, T, dim) of every layer from a
    no-cache forward in which each query attends to exactly the positions in `masks`."""
    captured = {}

    def capture(module, args, kwargs):
        hidden = kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        shape = (*hidden.shape[:-1], -1, module.head_dim)
        queries = module.q_proj(hidden).view(shape)
        keys = module.k_proj(hidden).view(shape)
        if hasattr(module, "k_norm"):
            queries, keys = module.q_norm(queries), module.k_norm(keys)
        queries, keys = apply_rotary_pos_emb(queries.transpose(1, 2), keys.transpose(1, 2), cos, sin)
        captured[module.layer_idx] = (queries[0].detach(), keys[0].detach())

    handles = [layer.self_attn.register_forward_pre_hook(capture, with_kwargs=True) for layer in model.model.layers]
    try:
        masked_reference_logits(model, tokens, masks)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def distinct_tokens(length, seed):
    return torch.randperm(128, generator=torch.Generator().manual_seed(seed))[:length][None]


def check_schedule(cache, bounds, budget, buffer, select):
    """Replay the eviction schedule per layer and KV head with `select(layer, head, held, end)`."""
    for layer_index, layer in enumerate(cache.layers):
        for head in range(layer.history[0].shape[1]):
            held: list[int] = []
            evictions = 0
            for step, (start, end) in enumerate(bounds):
                held = held + list(range(start, end))
                if len(held) >= budget + max(buffer, 1):
                    held = sorted(select(layer_index, head, held, end))
                    evictions += 1
                assert kept_sets(layer.history[step][0])[head] == held, (layer_index, head, step)
            assert evictions >= 3


def top_by_score(held, scores, count):
    """The `count` positions with the highest score, ties to the earlier position."""
    return sorted(held, key=lambda p: (-float(scores[p]), p))[:count]


# ---------------------------------------------------------------- Knorm


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_knorm_keeps_smallest_key_norms(family):
    model = prepare(tiny_model(family), "knorm")
    tokens = distinct_tokens(34, seed=1)
    budget, buffer = 7, 2
    cache, bounds = run_teacher_forced(model, tokens, 18, "knorm", budget, buffer)

    states = reference_states(model, tokens, visibility_masks(histories(cache), bounds, tokens.shape[1]))

    def select(layer_index, head, held, end):
        norms = states[layer_index][1][head].norm(dim=-1)
        return top_by_score(held, -norms, budget)

    check_schedule(cache, bounds, budget, buffer, select)


def test_knorm_keeps_earlier_copy_of_tied_norms():
    # Copies of one token have one layer-0 key norm in exact arithmetic; the earliest copies stay.
    model = prepare(tiny_model("llama"), "knorm")
    tokens = torch.tensor([[5] * 12 + [9, 17, 33]])
    cache, _ = run_teacher_forced(model, tokens, tokens.shape[1], "knorm", 6, 0)
    copies_kept = []
    for head_kept in kept_sets(cache.layers[0].history[0][0]):
        copies = [p for p in head_kept if p < 12]
        assert copies == list(range(len(copies))), head_kept
        copies_kept.append(len(copies))
    assert max(copies_kept) > 0


# ---------------------------------------------------------------- KeyDiff


def keydiff_reference(keys, held):
    """-cos(k_i, mean_j k_j / |k_j|) over the held positions, as a dict position -> score."""
    held_keys = keys[held]
    anchor = (held_keys / held_keys.norm(dim=-1, keepdim=True)).mean(dim=0)
    scores = held_keys @ anchor / (held_keys.norm(dim=-1) * anchor.norm())
    return {p: -float(s) for p, s in zip(held, scores)}


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_keydiff_keeps_keys_least_similar_to_mean_key(family):
    model = prepare(tiny_model(family), "keydiff")
    tokens = distinct_tokens(34, seed=2)
    budget, buffer = 7, 2
    cache, bounds = run_teacher_forced(model, tokens, 18, "keydiff", budget, buffer)

    states = reference_states(model, tokens, visibility_masks(histories(cache), bounds, tokens.shape[1]))

    def select(layer_index, head, held, end):
        return top_by_score(held, keydiff_reference(states[layer_index][1][head], held), budget)

    check_schedule(cache, bounds, budget, buffer, select)


def test_keydiff_blockwise_prefill_matches_iterative_blocks():
    model = prepare(tiny_model("qwen3"), "keydiff")
    tokens = distinct_tokens(45, seed=3)
    budget, block_size = 10, 8
    cache, bounds = run_teacher_forced(model, tokens, 45, "keydiff", budget, 0, block_size=block_size)
    states = reference_states(model, tokens, visibility_masks(histories(cache), bounds, 45))
    blockwise = []
    for layer_index, layer in enumerate(cache.layers):
        for head in range(2):
            keys = states[layer_index][1][head]
            # KeyDiff's block processing (as kvpress's BlockPress): start from the first `budget`
            # tokens, add a block, keep the best `budget` of the union, repeat.
            kept = list(range(budget))
            for start in range(budget, 45, block_size):
                candidates = kept + list(range(start, min(start + block_size, 45)))
                kept = top_by_score(candidates, keydiff_reference(keys, candidates), budget)
            assert kept_sets(layer.history[0][0])[head] == sorted(kept), (layer_index, head)
            blockwise.append(sorted(kept))

    # The check is sensitive: one anchor over all 45 tokens keeps different tokens.
    whole, _ = run_teacher_forced(model, tokens, 45, "keydiff", budget, 0)
    assert [kept for layer in whole.layers for kept in kept_sets(layer.history[0][0])] != blockwise


# ---------------------------------------------------------------- R-KV


def r1_kv_reference(queries, keys, held, window, kernel, mix_lambda, threshold, scaling):
    """R-KV's selection score for the held positions (in cache order), following r1_kv.py.

    Args:
        queries: (group, window, dim) post-RoPE queries of one KV head's query group, last `window` tokens.
        keys: (T, dim) post-RoPE keys of that KV head by position.

    Returns:
        dict position -> score for the non-window held positions.
    """
    held_keys = keys[held]  # (n, dim)
    candidates = held[:-window]

    # Importance: GQA max over the group on the logits, softmax over the candidates, mean over
    # the window queries, max filter along the candidates with -inf padding.
    logits = (queries @ held_keys[:-window].T) * scaling  # (group, window, n - window)
    probabilities = torch.softmax(logits.amax(dim=0), dim=-1).mean(dim=0)
    pooled = F.max_pool1d(probabilities[None, None], kernel, stride=1, padding=kernel // 2)[0, 0]

    # Redundancy: cosine similarity with a zero diagonal. Each row zeroes its most recent entry
    # above the threshold, or entry 0 when there is none. Then mean over rows, softmax over columns.
    unit = held_keys / (held_keys.norm(dim=-1, keepdim=True) + 1e-8)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(0.0)
    for row in range(len(held)):
        above = (similarity[row] > threshold).nonzero().flatten()
        similarity[row, int(above.max()) if len(above) else 0] = 0.0
    redundancy = torch.softmax(similarity.mean(dim=0), dim=-1)[:-window]

    final = mix_lambda * pooled - (1 - mix_lambda) * redundancy
    return {p: float(s) for p, s in zip(candidates, final)}


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "row-chunks"])
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_rkv_selection_matches_r1_kv_formula(family, chunked, monkeypatch):
    if chunked:
        # Force the redundancy matrix to be built one row at a time.
        monkeypatch.setattr(trimkv.cache.statistics, "MAX_BLOCK_ELEMENTS", 1)
    model = prepare(tiny_model(family), "rkv")
    tokens = distinct_tokens(40, seed=4)
    budget, buffer, window, kernel, mix_lambda, threshold = 9, 3, 3, 3, 0.4, 0.3
    cache, bounds = run_teacher_forced(model, tokens, 20, "rkv", budget, buffer, window=window, kernel=kernel,
                                       mix_lambda=mix_lambda, threshold=threshold)

    states = reference_states(model, tokens, visibility_masks(histories(cache), bounds, tokens.shape[1]))
    attention = model.model.layers[0].self_attn
    group = attention.config.num_attention_heads // attention.config.num_key_value_heads

    def select(layer_index, head, held, end):
        queries, keys = states[layer_index]
        window_queries = queries[head * group : (head + 1) * group, end - window : end]
        scores = r1_kv_reference(window_queries, keys[head], held, window, kernel, mix_lambda, threshold,
                                 attention.scaling)
        return top_by_score(held[:-window], scores, budget - window) + held[-window:]

    check_schedule(cache, bounds, budget, buffer, select)


def test_rkv_mix_lambda_changes_selection():
    model = prepare(tiny_model("qwen3"), "rkv")
    tokens = distinct_tokens(40, seed=5)
    kept = {}
    for mix_lambda in (0.0, 1.0):
        cache, _ = run_teacher_forced(model, tokens, 40, "rkv", 12, 0, window=4, mix_lambda=mix_lambda)
        kept[mix_lambda] = [kept_sets(layer.history[0][0]) for layer in cache.layers]
    assert kept[0.0] != kept[1.0]


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "method, params, budget, message",
    [
        ("rkv", {"window": 8}, 8, "method.window=8 leaves no room"),
        ("rkv", {"window": 0}, 8, "method.window must be >= 1"),
        ("rkv", {"kernel": 4}, 16, "method.kernel must be a positive odd number"),
        ("rkv", {"mix_lambda": 1.5}, 16, r"method.mix_lambda must be in \[0, 1\]"),
        ("rkv", {"threshold": 2.0}, 16, "method.threshold must be a cosine similarity"),
        ("keydiff", {"block_size": 0}, 16, "method.block_size must be a positive integer or null"),
        ("knorm", {"window": 4}, 16, "invalid settings for method 'knorm'"),
    ],
)
def test_invalid_settings_are_rejected(method, params, budget, message):
    model = tiny_model("qwen3")
    with pytest.raises(ValueError, match=message):
        build_cache(model, method, budget, 0, **params)


@pytest.mark.parametrize("name", ["rkv", "keydiff", "knorm"])
def test_method_config_builds_its_policy(name):
    config = OmegaConf.load(REPO / "conf" / "method" / f"{name}.yaml")
    policy = build_policy(config.name, **OmegaConf.to_container(config.params))
    policy.validate(512, 128)
    assert policy.describe()["name"] == name
