"""Adapters that plug trimkv's eviction cache into other tools (lm-evaluation-harness)."""
