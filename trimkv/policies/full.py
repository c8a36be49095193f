"""Full cache: the no-eviction reference."""

from __future__ import annotations

from trimkv.policies.base import Policy, register_policy


@register_policy("full")
class FullCache(Policy):
    """Keeps every token. `budget` and `buffer` are ignored; use it as the accuracy reference."""

    evicts = False

    def score(self, layer):
        raise RuntimeError("the full cache never evicts")
