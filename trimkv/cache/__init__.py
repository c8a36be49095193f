"""The eviction engine: a transformers Cache with per-head eviction and its attention functions."""

from trimkv.cache.cache import EvictionCache, build_cache, disable_eviction, enable_eviction, validate_budget
from trimkv.cache.layer import EvictionLayer

__all__ = ["EvictionCache", "EvictionLayer", "build_cache", "disable_eviction", "enable_eviction", "validate_budget"]
