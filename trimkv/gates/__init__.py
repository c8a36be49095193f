"""TRIM-KV retention gates: the module, attaching it to a model, and checkpoints."""

from trimkv.gates.checkpoint import load_gates, save_gates
from trimkv.gates.gate import (
    GateConfig,
    RetentionGate,
    attach_gates,
    check_gate_fit,
    gate_config_for,
    gate_mode,
    gate_state_dict,
    gates_of,
    set_gate_mode,
)

__all__ = [
    "GateConfig",
    "RetentionGate",
    "attach_gates",
    "check_gate_fit",
    "gate_config_for",
    "gate_mode",
    "gate_state_dict",
    "gates_of",
    "load_gates",
    "save_gates",
    "set_gate_mode",
]
