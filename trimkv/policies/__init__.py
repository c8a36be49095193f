"""Eviction policies. Importing this package registers every built-in policy."""

from trimkv.policies import full, h2o, keydiff, knorm, rkv, snapkv, streamingllm, trimkv  # noqa: F401
from trimkv.policies.base import POLICY_REGISTRY, Policy, build_policy, register_policy

__all__ = ["POLICY_REGISTRY", "Policy", "build_policy", "register_policy"]
