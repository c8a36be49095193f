"""The eviction cache passed to `model(...)` and `model.generate(...)`, and how models are prepared."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache

from trimkv.cache.attention import IMPLEMENTATIONS, register_attention_functions
from trimkv.cache.layer import EvictionLayer
from trimkv.compat import cache_from_attention_kwargs, check_transformers_version, decoder_attention_modules
from trimkv.policies.base import Policy, build_policy

_HOOKS_ATTRIBUTE = "_trimkv_hook_handles"


class EvictionCache(Cache):
    """A transformers Cache whose layers keep at most `budget` tokens per KV head.

    Build it with `build_cache` (which validates settings and binds the policy to the model) and
    pass it as `cache=` to the model or to `generate`. The model must have been prepared with
    `enable_eviction`.
    """

    def __init__(
        self,
        num_layers: int,
        policy: Policy,
        budget: int | None,
        buffer: int = 0,
        record_history: bool = False,
    ):
        layers = [EvictionLayer(index, policy, budget, buffer, record_history) for index in range(num_layers)]
        super().__init__(layers=layers)
        self.policy = policy
        self.budget = budget
        self.buffer = buffer

    def stats(self) -> dict[str, Any]:
        """Retained-token statistics.

        Every layer keeps the same number of real tokens per row (all heads keep `budget`), so the
        per-row numbers come from the first layer. `retained_peak` and `retained_mean` are the max
        and mean over forward passes of real tokens held after eviction; `peak_slots` is the most
        slots any layer held while attending (before eviction, padding included).
        """
        layers = [layer for layer in self.layers if layer.is_initialized]
        if not layers or layers[0].forward_steps == 0:
            return {"retained_peak": [], "retained_mean": [], "peak_slots": 0, "evictions": 0, "tokens_seen": 0}
        first = layers[0]
        return {
            "retained_peak": first.retained_peak.tolist(),
            "retained_mean": (first.retained_sum.float() / first.forward_steps).tolist(),
            "peak_slots": max(layer.peak_slots for layer in layers),
            "evictions": sum(layer.evictions for layer in layers),
            "tokens_seen": first.seen,
        }


def validate_budget(budget: Any, buffer: Any) -> tuple[int | None, int]:
    """Check the budget and buffer settings and return them as ints (budget None = no limit)."""
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
            raise ValueError(f"budget must be a positive integer, got {budget!r} (e.g. budget=512)")
    if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 0:
        raise ValueError(f"buffer must be an integer >= 0, got {buffer!r} (e.g. buffer=0 evicts every step)")
    return budget, buffer


def build_cache(
    model: torch.nn.Module,
    method: str | Policy,
    budget: int | None,
    buffer: int = 0,
    record_history: bool = False,
    **policy_params: Any,
) -> EvictionCache:
    """Create an EvictionCache for `model` with the named policy (or a Policy instance)."""
    budget, buffer = validate_budget(budget, buffer)
    policy = method if isinstance(method, Policy) else build_policy(method, **policy_params)
    policy.validate(budget, buffer)
    policy.bind_model(model)
    num_layers = len(decoder_attention_modules(model))
    return EvictionCache(num_layers, policy, budget, buffer, record_history)


def _bind_cache_layer(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    cache = cache_from_attention_kwargs(kwargs)
    module.trimkv_layer = cache.layers[module.layer_idx] if isinstance(cache, EvictionCache) else None
    gate = getattr(module, "retention_gate", None)
    if gate is not None and getattr(module, "trimkv_gate_mode", "score") != "off":
        hidden_states = kwargs.get("hidden_states", args[0] if args else None)
        module.trimkv_log_beta = gate(hidden_states).transpose(1, 2)  # (batch, kv_heads, q)
    else:
        module.trimkv_log_beta = None


def _release_cache_layer(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    module.trimkv_layer = None
    module.trimkv_log_beta = None


def enable_eviction(model: torch.nn.Module, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """Prepare `model` to run with EvictionCache (idempotent) and return it.

    Switches the model to the trimkv attention function (`sdpa` or `eager` flavour). It also adds
    a forward pre-hook to every attention module that binds the module to its cache layer and,
    when retention gates are attached, computes the step's log beta from the attention input. The
    attention implementation is stored on `model.config`, so models that share one config object
    switch together; load each model with its own config.
    """
    check_transformers_version()
    if attn_implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {attn_implementation!r}; use one of {sorted(IMPLEMENTATIONS)}"
        )
    register_attention_functions()
    model.set_attn_implementation(IMPLEMENTATIONS[attn_implementation])
    if getattr(model, _HOOKS_ATTRIBUTE, None) is None:
        handles = []
        for module in decoder_attention_modules(model):
            handles.append(module.register_forward_pre_hook(_bind_cache_layer, with_kwargs=True))
            handles.append(module.register_forward_hook(_release_cache_layer, with_kwargs=True))
        setattr(model, _HOOKS_ATTRIBUTE, handles)
    return model


def disable_eviction(model: torch.nn.Module, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """Remove the hooks added by `enable_eviction` and restore a transformers attention implementation."""
    for handle in getattr(model, _HOOKS_ATTRIBUTE, None) or []:
        handle.remove()
    setattr(model, _HOOKS_ATTRIBUTE, None)
    model.set_attn_implementation(attn_implementation)
    return model
