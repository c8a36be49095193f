"""The retention gate of TRIM-KV and how gates are attached to a model.

One gate per decoder layer, an MLP on the attention input (the hidden state after the layer's
input norm, the tensor fed to the q/k/v projections):

    log beta = logsigmoid(linear2(act(linear1(x))) + bias)     shape (batch, seq, num_kv_heads)

linear1: hidden -> intermediate (512) with bias; act: the model's `hidden_act`; linear2:
intermediate -> num_kv_heads without bias; `bias`: a separate vector initialised to `bias_init`
(18 gives beta ~ 1 - 1.5e-8, i.e. no forgetting at the start of training). Parameter names match
the authors' released checkpoints: `model.layers.{i}.self_attn.retention_gate.{linear1.weight,
linear1.bias, linear2.weight, bias}`.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from trimkv.compat import decoder_attention_modules


@dataclass
class GateConfig:
    """Shape and initialisation of the gates; stored with every gate checkpoint."""

    hidden_size: int
    num_kv_heads: int
    num_layers: int
    intermediate_size: int = 512
    hidden_act: str = "silu"
    bias_init: float = 18.0

    def to_dict(self) -> dict:
        return asdict(self)


class RetentionGate(nn.Module):
    """Maps attention inputs (batch, seq, hidden) to log beta (batch, seq, num_kv_heads)."""

    def __init__(self, hidden_size: int, num_kv_heads: int, intermediate_size: int = 512,
                 hidden_act: str = "silu", bias_init: float = 18.0):
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, intermediate_size, bias=True)
        self.act = ACT2FN[hidden_act]
        self.linear2 = nn.Linear(intermediate_size, num_kv_heads, bias=False)
        self.bias = nn.Parameter(torch.full((num_kv_heads,), float(bias_init)))
        nn.init.normal_(self.linear1.weight, std=0.02)
        nn.init.zeros_(self.linear1.bias)
        nn.init.normal_(self.linear2.weight, std=0.02)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # The gate runs in float32 whatever the model dtype: log beta near 0 needs the precision.
        if hidden_states.dtype != self.linear1.weight.dtype:
            hidden_states = hidden_states.to(self.linear1.weight.dtype)
        logits = F.linear(self.act(self.linear1(hidden_states)), self.linear2.weight, self.bias)
        return F.logsigmoid(logits)


def gate_config_for(model: nn.Module, intermediate_size: int = 512, bias_init: float = 18.0) -> GateConfig:
    """Return the GateConfig matching `model`'s hidden size, KV heads and depth."""
    config = model.config
    return GateConfig(
        hidden_size=config.hidden_size,
        num_kv_heads=config.num_key_value_heads,
        num_layers=len(decoder_attention_modules(model)),
        intermediate_size=intermediate_size,
        hidden_act=getattr(config, "hidden_act", "silu"),
        bias_init=bias_init,
    )


def attach_gates(model: nn.Module, gate_config: GateConfig) -> list[RetentionGate]:
    """Add a fresh RetentionGate as `self_attn.retention_gate` to every decoder layer.

    The gates are created in float32 on the model's device. Raises ValueError when the gate
    shape does not fit the model (a checkpoint trained for another model).
    """
    modules = decoder_attention_modules(model)
    check_gate_fit(model, gate_config)
    device = next(model.parameters()).device
    gates = []
    for module in modules:
        gate = RetentionGate(
            gate_config.hidden_size,
            gate_config.num_kv_heads,
            gate_config.intermediate_size,
            gate_config.hidden_act,
            gate_config.bias_init,
        ).to(device=device, dtype=torch.float32)
        module.retention_gate = gate
        gates.append(gate)
    return gates


def check_gate_fit(model: nn.Module, gate_config: GateConfig) -> None:
    """Raise ValueError naming the mismatch when gates of `gate_config` cannot serve `model`."""
    config = model.config
    num_layers = len(decoder_attention_modules(model))
    problems = []
    if gate_config.num_layers != num_layers:
        problems.append(f"{gate_config.num_layers} layers vs the model's {num_layers}")
    if gate_config.num_kv_heads != config.num_key_value_heads:
        problems.append(f"{gate_config.num_kv_heads} KV heads vs the model's {config.num_key_value_heads}")
    if gate_config.hidden_size != config.hidden_size:
        problems.append(f"hidden size {gate_config.hidden_size} vs the model's {config.hidden_size}")
    if problems:
        raise ValueError(
            "the retention gates were trained for a different model: " + "; ".join(problems)
            + " (use gates trained for this model, or train them with train.py)"
        )


def gates_of(model: nn.Module) -> list[RetentionGate]:
    """Return the attached gates in layer order (empty when none are attached)."""
    gates = [getattr(module, "retention_gate", None) for module in decoder_attention_modules(model)]
    return [gate for gate in gates if gate is not None]


def gate_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the gate parameters, under the model's parameter names."""
    return {name: tensor.detach() for name, tensor in model.state_dict().items() if ".retention_gate." in name}


def set_gate_mode(model: nn.Module, mode: str) -> None:
    """Select how attached gates act: "score" (inference: log beta feeds the trimkv policy),
    "train" (the student attention adds (t - i) log beta_i to its logits) or "off" (not run)."""
    if mode not in ("score", "train", "off"):
        raise ValueError(f"unknown gate mode {mode!r}; use score, train or off")
    for module in decoder_attention_modules(model):
        module.trimkv_gate_mode = mode


@contextlib.contextmanager
def gate_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Temporarily set the gate mode (e.g. "off" for the teacher forward in distillation)."""
    previous = [getattr(module, "trimkv_gate_mode", "score") for module in decoder_attention_modules(model)]
    set_gate_mode(model, mode)
    try:
        yield
    finally:
        for module, value in zip(decoder_attention_modules(model), previous):
            module.trimkv_gate_mode = value
