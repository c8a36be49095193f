"""Every place where trimkv depends on transformers internals, in one module.

The supported range is declared in pyproject.toml (transformers >=5.2,<5.26) and CI tests both
ends. The facts relied on, checked against transformers 5.2.0 and 5.25.0:

- The attention module's forward receives the cache as the keyword argument `cache` (5.25) or
  `past_key_values` (5.2). A forward pre-hook reads it from there; transformers does not pass the
  cache to the attention function.
- A custom name registered with `AttentionInterface.register` is accepted by
  `set_attn_implementation`. The mask builder returns no mask at all for a name that is missing
  from `AttentionMaskInterface._global_mapping`, so the same name is registered there too, with a
  function that hands the 2D padding mask through unchanged.
- `Cache.get_mask_sizes` is called with the query length (5.25) or with a `cache_position` tensor
  (5.2).
- `generate` and the model forward take the cache as `cache=` (5.25; `past_key_values=` is a
  deprecated alias until 5.40) or `past_key_values=` (5.2).

`tests/test_compat.py` checks each fact on the installed release and fails with a message naming
the broken assumption.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import transformers
from packaging.version import Version
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

TRANSFORMERS_VERSION = Version(transformers.__version__)
MIN_TRANSFORMERS = Version("5.2.0")
MAX_TRANSFORMERS_EXCLUSIVE = Version("5.26.0")



def _model_cache_argument() -> str:
    # Releases before the "remove cache_position" series name the model's cache argument
    # `past_key_values`; later ones name it `cache` and keep the old name as a deprecated alias.
    from transformers.models.llama.modeling_llama import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


CACHE_ARGUMENT = _model_cache_argument()
_CACHE_KWARG_NAMES = ("cache", "past_key_values")


def check_transformers_version() -> None:
    """Raise if the installed transformers release is outside the tested range."""
    if not (MIN_TRANSFORMERS <= TRANSFORMERS_VERSION < MAX_TRANSFORMERS_EXCLUSIVE):
        raise RuntimeError(
            f"trimkv supports transformers >={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS_EXCLUSIVE}, "
            f"found {TRANSFORMERS_VERSION}; install a supported release, e.g. pip install 'transformers<5.26'"
        )


def cache_from_attention_kwargs(kwargs: dict[str, Any]) -> Any:
    """Return the cache object passed to an attention module's forward, or None."""
    for name in _CACHE_KWARG_NAMES:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """Keyword arguments that pass `cache` to `model(...)` or `model.generate(...)`."""
    return {CACHE_ARGUMENT: cache}


def output_cache(outputs: Any) -> Any:
    """The cache returned in a model output, under either attribute name."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else getattr(outputs, "past_key_values", None)


def query_length_from_mask_size_argument(argument: int | torch.Tensor) -> int:
    """`get_mask_sizes` receives an int query length (5.25) or a cache_position tensor (5.2)."""
    if isinstance(argument, torch.Tensor):
        return int(argument.shape[-1])
    return int(argument)


def passthrough_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """Mask function that returns the 2D padding mask (bool, (batch, kv_length)) unchanged.

    trimkv's attention functions build their own per-head masks from the positions stored in
    the cache, so the 4D mask transformers would build is never needed.
    """
    return attention_mask


def register_attention_function(name: str, function: Callable) -> None:
    """Register an attention function and its pass-through mask under the same name."""
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, passthrough_mask)


def decoder_attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Return the self-attention module of every decoder layer, in layer order.

    Works for the Llama-style layout shared by Qwen2, Qwen3, Llama and Phi-3
    (`model.model.layers[i].self_attn` with a `layer_idx` attribute).
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(
            f"{type(model).__name__} has no decoder `layers`; trimkv supports Llama-style decoders "
            "(Qwen3, Qwen2, Llama, Phi-3)"
        )
    modules = []
    for index, layer in enumerate(layers):
        attention = getattr(layer, "self_attn", None)
        if attention is None or getattr(attention, "layer_idx", None) != index:
            raise ValueError(
                f"decoder layer {index} of {type(model).__name__} has no `self_attn` with layer_idx={index}; "
                "trimkv supports Llama-style decoders (Qwen3, Qwen2, Llama, Phi-3)"
            )
        modules.append(attention)
    return modules


def rotary_inverse_frequencies(model: torch.nn.Module) -> tuple[torch.Tensor, float]:
    """Return the decoder's RoPE inverse frequencies and its attention scaling factor."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise ValueError(f"{type(model).__name__} has no rotary embedding with `inv_freq`; cannot re-rotate keys")
    return rotary.inv_freq.detach().float(), float(getattr(rotary, "attention_scaling", 1.0))
