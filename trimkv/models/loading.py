"""Loading models and tokenizers from the `model` config group."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama", "phi3")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on GPU and float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown model.dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[dtype]


def resolve_model_path(path: str) -> str:
    """Return a local folder for `path` when one exists (as given, or relative to the repository
    root for the bundled assets); otherwise return `path` unchanged as a Hub model id."""
    candidate = Path(path).expanduser()
    if candidate.exists():
        return str(candidate)
    bundled = REPO_ROOT / path
    if bundled.exists():
        return str(bundled)
    if candidate.is_absolute() or path.startswith((".", "~")) or path.startswith("assets/"):
        raise FileNotFoundError(f"model folder not found: {path} (set model.path to a local folder or a Hub id)")
    return path


def load_tokenizer(model_cfg: Any):
    """The tokenizer of `model_cfg.tokenizer` (default: the model path), set up for left padding."""
    path = resolve_model_path(model_cfg.get("tokenizer") or model_cfg.path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=bool(model_cfg.get("trust_remote_code", False)))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_cfg: Any, device: str = "auto"):
    """Load the causal LM of `model_cfg.path` in eval mode on `device`, with frozen weights."""
    torch_device = resolve_device(device)
    dtype = resolve_dtype(str(model_cfg.get("dtype", "auto")), torch_device)
    path = resolve_model_path(model_cfg.path)
    log.info("loading model %s (%s) on %s", path, dtype, torch_device)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        attn_implementation="sdpa",
        trust_remote_code=bool(model_cfg.get("trust_remote_code", False)),
    )
    model_type = getattr(model.config, "model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        log.warning("model type %r is untested; supported families: %s", model_type, ", ".join(SUPPORTED_MODEL_TYPES))
    model.to(torch_device).eval()
    model.requires_grad_(False)
    return model
