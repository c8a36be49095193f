"""Saving and loading retention gates.

Two formats are read:
- trimkv's own: a folder with `gates.safetensors` (gate parameters only, under the model's
  parameter names) and `gate_config.json` (the GateConfig plus `base_model`, `budget`, `buffer`
  and training metadata).
- The TRIM-KV authors' released format: a folder with `trimkv_weights.pth` (a state dict whose
  keys include `model.layers.{i}.self_attn.retention_gate.{linear1.weight, linear1.bias,
  linear2.weight, bias}`) beside a `config.json` with `base_model`, `memory_size` and
  `buffer_size`. The gate shape is read from the tensors.

`gates=wandb:<entity>/<project>/<artifact name>:<version or alias>` names a W&B artifact of either
format (train.py logs its gates as artifacts of type `retention-gates`). It is downloaded into
`$TRIMKV_ARTIFACT_DIR` (default `~/.cache/trimkv/artifacts`) and loaded from there.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from trimkv.gates.gate import GateConfig, attach_gates, check_gate_fit, gate_state_dict
from trimkv.utils.io import atomic_write_folder

WEIGHTS_NAME = "gates.safetensors"
CONFIG_NAME = "gate_config.json"
RELEASED_WEIGHTS_NAME = "trimkv_weights.pth"
RELEASED_CONFIG_NAME = "config.json"

WANDB_PREFIX = "wandb:"
ARTIFACT_TYPE = "retention-gates"
_ARTIFACT_SPEC = re.compile(r"^[^/:\s]+/[^/:\s]+/[^/:\s]+:[^/:\s]+$")

_GATE_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.retention_gate\.(linear1\.weight|linear1\.bias|linear2\.weight|bias)$")


def save_gates(model: torch.nn.Module, path: str | os.PathLike, gate_config: GateConfig, metadata: dict[str, Any]) -> Path:
    """Write the model's gates to folder `path` atomically (a temporary folder, then a rename)."""
    path = Path(path)
    tensors = {name: tensor.contiguous().cpu() for name, tensor in gate_state_dict(model).items()}
    if not tensors:
        raise ValueError("the model has no retention gates to save")
    document = {"gate": gate_config.to_dict(), **metadata}

    def write_contents(folder: Path) -> None:
        save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "trimkv-gates"})
        (folder / CONFIG_NAME).write_text(json.dumps(document, indent=2) + "\n")

    atomic_write_folder(path, write_contents)
    return path


def load_gates(model: torch.nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Attach gates from a checkpoint folder to `model` and return the checkpoint's metadata.

    Raises FileNotFoundError when the folder holds neither format, and ValueError when the gates
    were trained for a model with a different layer count, KV head count or hidden size.
    """
    path = resolve_gates_path(path)
    if (path / WEIGHTS_NAME).is_file():
        return _load_own(model, path)
    if (path / RELEASED_WEIGHTS_NAME).is_file():
        return _load_released(model, path)
    raise FileNotFoundError(
        f"no retention gates found in {path}: expected {WEIGHTS_NAME} + {CONFIG_NAME} (trimkv) or "
        f"{RELEASED_WEIGHTS_NAME} + {RELEASED_CONFIG_NAME} (released TRIM-KV checkpoints); "
        "set gates=<folder written by train.py>"
    )


def resolve_gates_path(spec: str | os.PathLike) -> Path:
    """Return a local folder for `gates=`: the path itself, or a downloaded W&B artifact for `wandb:...`.

    Raises ValueError for a malformed artifact name and FileNotFoundError when W&B cannot
    return the artifact (unknown name, no network, not logged in).
    """
    text = str(spec)
    if not text.startswith(WANDB_PREFIX):
        return Path(spec).expanduser()
    name = text[len(WANDB_PREFIX):]
    if not _ARTIFACT_SPEC.match(name):
        raise ValueError(
            f"gates={text} is not a W&B artifact name; use gates=wandb:<entity>/<project>/<name>:<version>, "
            "e.g. gates=wandb:my-team/trimkv/gates-Qwen3-4B-M512:v3 (or :latest)"
        )
    import wandb

    root = Path(os.environ.get("TRIMKV_ARTIFACT_DIR", "~/.cache/trimkv/artifacts")).expanduser()
    target = root / name.replace("/", "--").replace(":", "--")
    try:
        artifact = wandb.Api().artifact(name, type=ARTIFACT_TYPE)
        return Path(artifact.download(root=str(target)))
    except (wandb.errors.CommError, wandb.errors.UsageError, ValueError) as error:
        raise FileNotFoundError(
            f"could not fetch W&B artifact {name!r} of type {ARTIFACT_TYPE!r}: {error}; check the name with "
            "`wandb artifact ls`, run `wandb login`, or download it and set gates=<folder>"
        ) from error


def _load_own(model: torch.nn.Module, path: Path) -> dict[str, Any]:
    document = json.loads((path / CONFIG_NAME).read_text())
    gate_config = GateConfig(**document["gate"])
    check_gate_fit(model, gate_config)
    attach_gates(model, gate_config)
    _copy_gate_tensors(model, load_file(str(path / WEIGHTS_NAME)), path / WEIGHTS_NAME)
    return {key: value for key, value in document.items() if key != "gate"} | {"gate": gate_config.to_dict()}


def _load_released(model: torch.nn.Module, path: Path) -> dict[str, Any]:
    state = torch.load(path / RELEASED_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _GATE_KEY.search(key)
        if match:
            per_layer.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    if not per_layer:
        raise ValueError(f"{path / RELEASED_WEIGHTS_NAME} holds no retention_gate parameters")
    first = per_layer[min(per_layer)]
    intermediate_size, hidden_size = first["linear1.weight"].shape
    num_kv_heads = first["linear2.weight"].shape[0]
    config_path = path / RELEASED_CONFIG_NAME
    released = json.loads(config_path.read_text()) if config_path.is_file() else {}
    gate_config = GateConfig(
        hidden_size=int(hidden_size),
        num_kv_heads=int(num_kv_heads),
        num_layers=len(per_layer),
        intermediate_size=int(intermediate_size),
        hidden_act=getattr(model.config, "hidden_act", "silu"),
        bias_init=float(released.get("retention_gate_bias_init", 18.0)),
    )
    check_gate_fit(model, gate_config)
    attach_gates(model, gate_config)
    tensors = {
        f"model.layers.{layer}.self_attn.retention_gate.{name}": tensor
        for layer, parameters in per_layer.items()
        for name, tensor in parameters.items()
    }
    _copy_gate_tensors(model, tensors, path / RELEASED_WEIGHTS_NAME)
    return {
        "base_model": released.get("base_model"),
        "budget": released.get("memory_size"),
        "buffer": released.get("buffer_size"),
        "gate": gate_config.to_dict(),
        "format": "released",
    }


def _copy_gate_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy gate tensors into the attached gates, matching by the suffix after `layers.{i}.`."""
    targets = {}
    for name, parameter in model.named_parameters():
        match = _GATE_KEY.search(name)
        if match:
            targets[(int(match.group(1)), match.group(2))] = parameter
    loaded = set()
    for name, tensor in tensors.items():
        match = _GATE_KEY.search(name)
        if not match:
            continue
        key = (int(match.group(1)), match.group(2))
        if key not in targets:
            raise ValueError(f"{source}: parameter {name} has no matching gate in the model")
        target = targets[key]
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}, the model's gate needs {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor.to(dtype=target.dtype, device=target.device))
        loaded.add(key)
    missing = sorted(set(targets) - loaded)
    if missing:
        layer, name = missing[0]
        raise ValueError(f"{source}: missing gate parameter layers.{layer}.self_attn.retention_gate.{name} "
                         f"({len(missing)} missing in total)")
