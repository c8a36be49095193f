"""The transformers facts trimkv relies on (see trimkv/compat.py); a new release that breaks one fails here."""

from __future__ import annotations

import torch
from transformers import AttentionInterface, DynamicCache

from tiny_models import tiny_model
from trimkv.compat import (
    cache_from_attention_kwargs,
    cache_kwargs,
    check_transformers_version,
    output_cache,
    register_attention_function,
)


def test_installed_transformers_is_in_supported_range():
    check_transformers_version()


def test_attention_module_receives_the_cache_as_keyword():
    model = tiny_model("qwen3")
    seen = []
    handle = model.model.layers[1].self_attn.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(cache_from_attention_kwargs(kwargs)), with_kwargs=True
    )
    cache = DynamicCache()
    with torch.no_grad():
        out = model(input_ids=torch.randint(0, 128, (1, 5)), **cache_kwargs(cache))
    handle.remove()
    assert seen == [cache], "the attention forward no longer receives the cache as `cache` or `past_key_values`"
    assert output_cache(out) is cache


def test_registered_attention_name_receives_the_2d_padding_mask():
    received = []

    def probe(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        received.append(attention_mask)
        sdpa = AttentionInterface()["sdpa"]
        batch, _, length, _ = query.shape
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        mask = causal[None, None] & attention_mask[:, None, None, -length:].bool()
        return sdpa(module, query, key, value, mask, scaling=scaling, dropout=dropout)

    register_attention_function("trimkv_test_probe", probe)
    model = tiny_model("llama")
    model.set_attn_implementation("trimkv_test_probe")
    padding = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        model(input_ids=torch.randint(1, 128, (2, 5)), attention_mask=padding, use_cache=False)
    assert len(received) == len(model.model.layers)
    for mask in received:
        assert mask is not None, "the mask function registered under the same name is no longer called"
        assert mask.dim() == 2 and mask.dtype == torch.bool
        assert torch.equal(mask, padding.bool())
