"""The policy interface: a policy scores cached tokens per KV head, the cache layer evicts.

Everything mechanical (budget, buffer, gather, positions, padding) lives in
`trimkv.cache.layer.EvictionLayer`. A policy only
- fills its per-slot fields when tokens arrive (`on_append`),
- optionally observes attention probabilities (`needs_attention`, `observe_attention`),
- returns a score per slot when the layer must evict (`score`): higher is kept, +inf is always
  kept (sinks, recent windows), empty slots are handled by the layer.

Policies are shared by all layers of a cache; per-layer state lives on the layer
(`layer.fields` for per-slot tensors, `layer.state` for anything else).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from trimkv.cache.layer import EvictionLayer


class Policy:
    """Base class. Subclasses set `name` and override the hooks they need."""

    name = "base"
    evicts = True
    # When True, the attention function passes the attention probabilities of every real query
    # of the step to `observe_attention`.
    needs_attention = False
    # How attention probabilities are reduced over the query heads that share a KV head.
    group_reduce = "mean"

    def validate(self, budget: int | None, buffer: int) -> None:
        """Raise ValueError when the policy's settings do not fit this budget."""

    def bind_model(self, model: torch.nn.Module) -> None:
        """Read what the policy needs from the model (called once when the cache is built)."""

    def on_append(
        self,
        layer: "EvictionLayer",
        module: torch.nn.Module,
        query: torch.Tensor,
        new_positions: torch.Tensor,
    ) -> None:
        """Record state for the tokens just appended.

        Args:
            layer: the cache layer; the new tokens occupy its last q slots.
            module: the attention module (holds `scaling` and, with gates, the step's log beta).
            query: post-RoPE queries of this step, (batch, num_heads, q, head_dim).
            new_positions: logical positions of the new tokens, (batch, q), -1 for padding.
        """

    def observe_attention(self, layer: "EvictionLayer", weights: torch.Tensor) -> None:
        """Receive attention, (batch, kv_heads, length): the sum over this step's real queries of the
        softmax probabilities, reduced over each KV head's query group with `group_reduce`."""

    def score(self, layer: "EvictionLayer") -> torch.Tensor:
        """Return the keep score of every used slot, (batch, kv_heads, length)."""
        raise NotImplementedError

    def before_compact(self, layer: "EvictionLayer", index: torch.Tensor, filled: torch.Tensor) -> None:
        """Called before the kept slots are gathered: `index` (batch, kv_heads, new_length) lists them."""

    def after_compact(self, layer: "EvictionLayer") -> None:
        """Called after the buffers were compacted."""

    def describe(self) -> dict[str, Any]:
        """The policy's settings, for logs and result files."""
        return {"name": self.name}


def recent_mask(layer: "EvictionLayer", window: int) -> torch.Tensor:
    """Slots holding one of the `window` most recent real tokens of their row, (batch, kv_heads, length)."""
    positions = layer.slot_positions
    return positions >= (layer.valid_seen[:, None, None] - window)


def protect(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Give the masked slots an infinite score so that eviction always keeps them."""
    return scores.masked_fill(mask, float("inf"))


def reduce_groups(weights: torch.Tensor, how: str, dim: int) -> torch.Tensor:
    """Reduce attention over the query heads of a KV group (`how` is "mean" or "max")."""
    if how == "mean":
        return weights.mean(dim=dim)
    if how == "max":
        return weights.amax(dim=dim)
    raise ValueError(f"unknown GQA reduction {how!r}; use mean or max")


POLICY_REGISTRY: dict[str, Callable[..., Policy]] = {}


def register_policy(name: str) -> Callable[[type[Policy]], type[Policy]]:
    def decorator(cls: type[Policy]) -> type[Policy]:
        cls.name = name
        POLICY_REGISTRY[name] = cls
        return cls

    return decorator


def build_policy(name: str, **params: Any) -> Policy:
    """Instantiate the policy registered as `name` with its settings."""
    import trimkv.policies  # noqa: F401  (registers the built-in policies)

    if name not in POLICY_REGISTRY:
        known = ", ".join(sorted(POLICY_REGISTRY))
        raise ValueError(f"unknown eviction method {name!r}; choose one of: {known} (set method=<name>)")
    try:
        return POLICY_REGISTRY[name](**params)
    except TypeError as error:
        raise ValueError(f"invalid settings for method {name!r}: {error}") from None
