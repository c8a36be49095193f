"""Retention gates: the formula, parameter names, and both checkpoint formats."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tiny_models import tiny_model
from trimkv.gates import attach_gates, gate_config_for, gate_state_dict, load_gates, save_gates


def test_gate_computes_logsigmoid_of_mlp_plus_bias():
    model = tiny_model("qwen3")
    gates = attach_gates(model, gate_config_for(model, intermediate_size=32, bias_init=5.0))
    gate = gates[0]
    hidden = torch.randn(2, 7, 64)
    expected = F.logsigmoid(F.silu(hidden @ gate.linear1.weight.T + gate.linear1.bias) @ gate.linear2.weight.T + gate.bias)
    assert torch.allclose(gate(hidden), expected, atol=1e-6)
    assert gate(hidden).shape == (2, 7, 2)  # one log beta per KV head


def test_gate_parameter_names_and_shapes_match_released_checkpoints():
    model = tiny_model("qwen3")
    attach_gates(model, gate_config_for(model))
    state = gate_state_dict(model)
    assert set(state) == {
        f"model.layers.{layer}.self_attn.retention_gate.{name}"
        for layer in range(3)
        for name in ("linear1.weight", "linear1.bias", "linear2.weight", "bias")
    }
    assert state["model.layers.0.self_attn.retention_gate.linear1.weight"].shape == (512, 64)
    assert state["model.layers.0.self_attn.retention_gate.linear2.weight"].shape == (2, 512)
    assert torch.all(state["model.layers.0.self_attn.retention_gate.bias"] == 18.0)


def test_default_initialisation_keeps_every_token():
    model = tiny_model("qwen3")
    gate = attach_gates(model, gate_config_for(model))[0]
    beta = gate(torch.randn(1, 50, 64)).exp()
    assert float(beta.detach().min()) > 1 - 1e-6


def test_own_checkpoint_round_trip(tmp_path):
    model = tiny_model("qwen3")
    config = gate_config_for(model, intermediate_size=16, bias_init=3.0)
    attach_gates(model, config)
    with torch.no_grad():
        for tensor in gate_state_dict(model).values():
            tensor.normal_()
    save_gates(model, tmp_path / "gates", config, {"base_model": "tiny", "budget": 32, "buffer": 4})
    assert sorted(p.name for p in (tmp_path / "gates").iterdir()) == ["gate_config.json", "gates.safetensors"]

    fresh = tiny_model("qwen3")
    info = load_gates(fresh, tmp_path / "gates")
    assert info["budget"] == 32 and info["buffer"] == 4 and info["base_model"] == "tiny"
    for name, tensor in gate_state_dict(model).items():
        assert torch.equal(gate_state_dict(fresh)[name], tensor), name


def test_released_checkpoint_format_loads(tmp_path):
    # Written the way the TRIM-KV authors publish gates: trimkv_weights.pth beside config.json.
    generator = torch.Generator().manual_seed(0)
    state = {"lm_head.weight": torch.randn(128, 64)}  # non-gate entries must be ignored
    for layer in range(3):
        prefix = f"model.layers.{layer}.self_attn.retention_gate."
        state[prefix + "linear1.weight"] = torch.randn(512, 64, generator=generator)
        state[prefix + "linear1.bias"] = torch.randn(512, generator=generator)
        state[prefix + "linear2.weight"] = torch.randn(2, 512, generator=generator)
        state[prefix + "bias"] = torch.full((2,), 8.0)
    folder = tmp_path / "TrimKV-tiny"
    folder.mkdir()
    torch.save(state, folder / "trimkv_weights.pth")
    (folder / "config.json").write_text(json.dumps({"base_model": "Qwen/Qwen3-4B", "memory_size": 512.0,
                                                    "buffer_size": 128, "retention_gate_bias_init": 8.0}))

    model = tiny_model("qwen3")
    info = load_gates(model, folder)
    assert info["budget"] == 512.0 and info["buffer"] == 128 and info["base_model"] == "Qwen/Qwen3-4B"
    loaded = gate_state_dict(model)
    for name, tensor in state.items():
        if "retention_gate" in name:
            assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize("other, message", [("layers", "layers"), ("heads", "KV heads")])
def test_gates_for_another_model_are_rejected(tmp_path, other, message):
    source = tiny_model("qwen3", layers=2) if other == "layers" else tiny_model("llama")
    config = gate_config_for(source, intermediate_size=8)
    attach_gates(source, config)
    save_gates(source, tmp_path / "gates", config, {})
    with pytest.raises(ValueError, match=message):
        load_gates(tiny_model("qwen3"), tmp_path / "gates")


def test_missing_gate_folder_names_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="gates.safetensors.*trimkv_weights.pth"):
        load_gates(tiny_model("qwen3"), tmp_path)
