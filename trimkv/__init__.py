"""trimkv: memory-bounded LLM inference with learned KV-cache retention."""

__version__ = "0.1.0"
