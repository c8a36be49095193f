"""Our policies keep the same tokens as NVIDIA kvpress's presses after one prefill.

Runs only in the kvpress virtualenv, through `make parity` (pyproject.toml's addopts ignore this
file elsewhere). kvpress is imported unconditionally, so a venv without it fails at collection
instead of skipping.

Each case compresses the same prompt once after prefill: kvpress with its press as a context
manager around `model(...)`, trimkv with an EvictionCache whose budget equals kvpress's kept
count. kvpress returns gathered keys, not indices, so its kept positions are recovered by
matching each kept key row exactly against the keys of an uncompressed prefill. The kept
positions must be identical per layer and KV head.
"""

from __future__ import annotations

import copy
from importlib.metadata import version

import kvpress
import pytest
import torch
from kvpress import BlockPress, KeyDiffPress, KnormPress, SnapKVPress, StreamingLLMPress
from transformers import DynamicCache

from tiny_models import tiny_model
from trimkv.cache import build_cache, enable_eviction
from trimkv.compat import cache_kwargs

# The release whose presses docs/kvpress_parity.md describes.
KVPRESS_VERSION = "0.5.5"
PROMPT_LENGTH = 61
BUDGETS = [13, 40]

# (case id, our method, our settings, kvpress press for a compression ratio)
CASES = [
    ("snapkv", "snapkv", {"window": 8, "kernel": 5, "pooling": "avg", "gqa_reduce": "mean"},
     lambda ratio: SnapKVPress(compression_ratio=ratio, window_size=8, kernel_size=5)),
    ("snapkv-w4-k3", "snapkv", {"window": 4, "kernel": 3, "pooling": "avg", "gqa_reduce": "mean"},
     lambda ratio: SnapKVPress(compression_ratio=ratio, window_size=4, kernel_size=3)),
    ("streamingllm", "streamingllm", {"n_sink": 4},
     lambda ratio: StreamingLLMPress(compression_ratio=ratio, n_sink=4)),
    ("knorm", "knorm", {},
     lambda ratio: KnormPress(compression_ratio=ratio)),
    ("keydiff", "keydiff", {},
     lambda ratio: KeyDiffPress(compression_ratio=ratio)),
    ("keydiff-block16", "keydiff", {"block_size": 16},
     lambda ratio: BlockPress(press=KeyDiffPress(compression_ratio=ratio), block_size=16)),
]


def distinct_token_prompt(seed: int) -> torch.Tensor:
    """A prompt without repeated tokens, (1, PROMPT_LENGTH).

    Copies of one token have equal layer-0 key norms in exact arithmetic, because RoPE preserves
    norms. kvpress leaves Knorm's choice among them to float rounding, so parity is only defined
    where scores differ.
    """
    return torch.randperm(128, generator=torch.Generator().manual_seed(seed))[:PROMPT_LENGTH][None]


def compression_ratio(length: int, kept: int) -> float:
    """The ratio for which kvpress keeps `kept` of `length` tokens: int(length * (1 - ratio)) == kept."""
    ratio = (length - kept - 0.5) / length
    assert int(length * (1 - ratio)) == kept
    return ratio


def kvpress_kept_positions(model, prompt, press) -> list[list[list[int]]]:
    """Positions kvpress keeps, per layer and KV head, recovered by exact key matching."""
    full_cache = DynamicCache()
    compressed_cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=prompt, past_key_values=full_cache)
        with press(model):
            model(input_ids=prompt, past_key_values=compressed_cache)

    kept = []
    for layer_index in range(len(compressed_cache.layers)):
        full_keys = full_cache.layers[layer_index].keys[0]  # (kv_heads, T, head_dim)
        kept_keys = compressed_cache.layers[layer_index].keys[0]  # (kv_heads, n_kept, head_dim)
        per_head = []
        for head in range(full_keys.shape[0]):
            matches = (kept_keys[head][:, None, :] == full_keys[head][None, :, :]).all(dim=-1)  # (n_kept, T)
            assert bool((matches.sum(dim=1) == 1).all()), (
                f"layer {layer_index} head {head}: a kept key matches no prompt position or several"
            )
            per_head.append(sorted(matches.nonzero()[:, 1].tolist()))
        kept.append(per_head)
    return kept


def trimkv_kept_positions(model, prompt, method, budget, attn, params) -> list[list[list[int]]]:
    """Positions our cache keeps after the prefill, per layer and KV head."""
    ours = enable_eviction(copy.deepcopy(model), attn)
    cache = build_cache(ours, method, budget, buffer=0, record_history=True, **params)
    with torch.no_grad():
        ours(input_ids=prompt, **cache_kwargs(cache))
    assert cache.stats()["evictions"] == len(cache.layers)
    return [[sorted(p for p in head.tolist() if p >= 0) for head in layer.history[0][0]] for layer in cache.layers]


def test_kvpress_release_is_the_documented_one():
    assert version("kvpress") == KVPRESS_VERSION
    assert hasattr(kvpress, "SnapKVPress")


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_kept_tokens_match_kvpress(case, family, budget):
    _, method, params, make_press = case
    model = tiny_model(family)
    prompt = distinct_token_prompt(seed=budget)

    expected = kvpress_kept_positions(model, prompt, make_press(compression_ratio(PROMPT_LENGTH, budget)))
    got = trimkv_kept_positions(model, prompt, method, budget, "sdpa", params)

    for layer_index, (want_heads, got_heads) in enumerate(zip(expected, got, strict=True)):
        for head, (want, have) in enumerate(zip(want_heads, got_heads, strict=True)):
            assert len(have) == budget
            assert have == want, f"layer {layer_index} KV head {head}: trimkv kept {have}, kvpress kept {want}"


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_snapkv_matches_kvpress_with_eager_attention_weights(family):
    # With eager attention kvpress slices the layer's attention weights instead of recomputing the
    # window's attention, a second independent path to the same scores.
    model = tiny_model(family, attn="eager")
    prompt = distinct_token_prompt(seed=7)
    budget = 20
    press = SnapKVPress(compression_ratio=compression_ratio(PROMPT_LENGTH, budget), window_size=8, kernel_size=5)

    expected = kvpress_kept_positions(model, prompt, press)
    got = trimkv_kept_positions(model, prompt, "snapkv", budget, "eager", {"window": 8, "kernel": 5})

    assert got == expected
