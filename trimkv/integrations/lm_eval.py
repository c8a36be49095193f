"""lm-evaluation-harness model `trimkv`: Hugging Face generation under a trimkv eviction policy.

`TrimKVLM` is lm-eval's HFLM with every `generate` call given a fresh EvictionCache, so each
batch of prompts is generated with at most `budget` tokens per layer and KV head (plus `buffer`
between evictions). Everything else (tokenization, batching with left padding, stop sequences,
chat templates, `enable_thinking`/`think_end_token`) is HFLM's.

Command line: lm-eval 0.4.13 loads no model plugins from entry points, so `trimkv-lm-eval`
registers this model and then runs lm-eval's CLI, with the same arguments as `lm_eval`:

    trimkv-lm-eval --model trimkv \\
        --model_args pretrained=Qwen/Qwen3-4B,method=trimkv,budget=512,buffer=128,gates=<folder>,max_gen_toks=32768,max_length=40960 \\
        --tasks gsm8k --batch_size 8

Python: `lm_eval.simple_evaluate(model=TrimKVLM(pretrained=..., method="snapkv", budget=512), ...)`.

Model arguments besides HFLM's:
    method: eviction policy name (full, streamingllm, h2o, snapkv, trimkv, rkv, keydiff, knorm).
    budget: tokens kept per layer and KV head; required unless method=full.
    buffer: extra tokens allowed before an eviction runs (default 0, evict every step).
    gates: retention-gate checkpoint folder, required for method=trimkv.
    method.<name>: a policy setting, e.g. method.window=16 for snapkv.
    max_gen_toks: new-token limit for every request; replaces the task's `max_gen_toks`
        (HFLM takes the task's value, else 256).
    attn_implementation: "sdpa" (default) or "eager" attention under eviction.

After a run, `TrimKVLM.cache_stats` lists the retained-token statistics of every generate call
(EvictionCache.stats()), and the results' `config["trimkv"]` records method, budget, buffer and gates.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from trimkv.cache import build_cache, enable_eviction, validate_budget
from trimkv.compat import cache_kwargs
from trimkv.gates import load_gates, set_gate_mode
from trimkv.policies import build_policy

log = logging.getLogger(__name__)

POLICY_ARGUMENT_PREFIX = "method."
# The generation-length keys that lm-eval's normalize_gen_kwargs reads (0.4.13), in its order.
MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
HFLM_DEFAULT_MAX_GEN_TOKS = 256


@register_model("trimkv")
class TrimKVLM(HFLM):
    """HFLM whose generation runs with a trimkv EvictionCache; see the module docstring for arguments."""

    def __init__(
        self,
        pretrained: Any,
        method: str = "full",
        budget: int | None = None,
        buffer: int = 0,
        gates: str | None = None,
        max_gen_toks: int | None = None,
        max_length: int | None = None,
        attn_implementation: str = "sdpa",
        **kwargs: Any,
    ) -> None:
        policy_params = {
            key[len(POLICY_ARGUMENT_PREFIX) :]: kwargs.pop(key)
            for key in list(kwargs)
            if key.startswith(POLICY_ARGUMENT_PREFIX)
        }
        # Check every setting before the model is loaded, so a typo fails in seconds.
        self.budget, self.buffer = validate_budget(budget, buffer)
        self.policy = build_policy(method, **policy_params)
        if self.policy.evicts and self.budget is None:
            raise ValueError(f"method={method} needs a budget: set budget=<tokens per KV head>, e.g. budget=512")
        self.policy.validate(self.budget if self.policy.evicts else None, self.buffer)
        if method == "trimkv" and not gates:
            raise ValueError(
                "method=trimkv needs trained retention gates: set gates=<folder written by train.py or a "
                "released TRIM-KV checkpoint>"
            )
        self._max_gen_toks = _check_generation_limits(max_gen_toks, max_length)
        self.gates = gates
        self.cache_stats: list[dict[str, Any]] = []
        self._warned_loglikelihood = False

        super().__init__(pretrained=pretrained, max_length=max_length, **kwargs)

        if method == "trimkv":
            gate_info = load_gates(self.model, gates)
            set_gate_mode(self.model, "score")
            log.info("loaded gates from %s (trained for %s, M=%s)", gates, gate_info.get("base_model"), gate_info.get("budget"))
        elif gates:
            log.warning("gates=%s ignored: method %s does not use retention gates", gates, method)
        enable_eviction(self.model, attn_implementation)
        log.info("trimkv eviction: %s, budget %s, buffer %d", self.policy.describe(), self.budget, self.buffer)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks if self._max_gen_toks is not None else HFLM_DEFAULT_MAX_GEN_TOKS

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        if self._max_gen_toks is not None:
            requests = [self._with_max_gen_toks(request) for request in requests]
        return super().generate_until(requests, disable_tqdm=disable_tqdm)

    def _with_max_gen_toks(self, request: Any) -> Any:
        """Copy a generate_until request with this model's max_gen_toks as its generation limit."""
        context, generation_kwargs = request.arguments
        generation_kwargs = {key: value for key, value in generation_kwargs.items() if key not in MAX_TOKEN_KEYS}
        generation_kwargs["max_gen_toks"] = self._max_gen_toks
        return dataclasses.replace(request, arguments=(context, generation_kwargs))

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs: Any):
        # A fresh cache per call, so no eviction state carries over from one batch to the next.
        cache = build_cache(self.model, self.policy, self.budget if self.policy.evicts else None, self.buffer)
        output = super()._model_generate(context, max_length, stop, **generation_kwargs, **cache_kwargs(cache))
        self.cache_stats.append(cache.stats())
        return output

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
        self._warn_no_eviction("loglikelihood")
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list:
        self._warn_no_eviction("loglikelihood_rolling")
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def _warn_no_eviction(self, request_type: str) -> None:
        if self.policy.evicts and not self._warned_loglikelihood:
            log.warning(
                "%s requests are scored in one forward pass without a cache, so method %s evicts nothing "
                "for them; eviction applies to generate_until tasks",
                request_type,
                self.policy.name,
            )
            self._warned_loglikelihood = True

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["trimkv"] = {"method": self.policy.describe(), "budget": self.budget, "buffer": self.buffer,
                          "gates": str(self.gates) if self.gates else None}
        return info


def _check_generation_limits(max_gen_toks: Any, max_length: Any) -> int | None:
    """Validate max_gen_toks against max_length and return it as an int (None when unset)."""
    if max_gen_toks is None:
        return None
    if isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int) or max_gen_toks < 1:
        raise ValueError(f"max_gen_toks must be a positive integer, got {max_gen_toks!r} (e.g. max_gen_toks=32768)")
    if max_length is not None and max_gen_toks >= int(max_length):
        raise ValueError(
            f"max_gen_toks={max_gen_toks} leaves no room for the prompt within max_length={max_length}; "
            "raise max_length (prompt + generated tokens) or lower max_gen_toks"
        )
    return max_gen_toks


def cli_main() -> None:
    """Run lm-eval's command line (same arguments as `lm_eval`) with the `trimkv` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
