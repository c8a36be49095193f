"""Resumable evaluation: finished samples persist in samples.jsonl and a rerun skips them.

A run folder holds `run_config.json`, the settings that determine its results. A rerun into the
same folder with the same settings continues where the previous run stopped; with different
settings it is rejected, so results of two configurations never mix in one file.

Records are appended one batch at a time and each append is flushed and fsynced, so a killed run
leaves whole batches plus at most one torn last line, which `load_finished` cuts off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from trimkv.utils.io import atomic_write_json

log = logging.getLogger(__name__)

RUN_CONFIG_FILE = "run_config.json"

# Settings that change which samples exist or what they contain. Bookkeeping (logger, device,
# threads, batch size for greedy decoding excepted below) is left out so a run can be resumed on
# another machine.
_RESULT_KEYS = ("model", "method", "task", "budget", "buffer", "gates", "limit", "seed", "batch_size",
                "attn_implementation", "prefill_chunk")


def result_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved evaluation config that determines its results."""
    settings = {key: cfg.get(key) for key in _RESULT_KEYS}
    if isinstance(settings.get("model"), dict):
        settings["model"] = {key: settings["model"].get(key) for key in ("path", "tokenizer", "dtype")}
    method = settings.get("method")
    if isinstance(method, dict) and method.get("name") == "trimkv":
        # Retraining writes new gates into the same folder, so the path alone would let a rerun
        # continue with results of the old gates.
        settings["gates_sha256"] = gates_digest(settings.get("gates"))
    return settings


def gates_digest(gates: Any) -> str | None:
    """SHA-256 over the files of a local gates folder; None for no gates or a W&B artifact name.

    NOTE: a W&B alias such as `:latest` can point to new weights under the same name; only
    local folders are hashed.
    """
    if not gates or str(gates).startswith("wandb:"):
        return None
    folder = Path(str(gates)).expanduser()
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(item for item in folder.iterdir() if item.is_file()):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_run_config(output_dir: Path, settings: dict[str, Any]) -> None:
    """Record the settings of a new run folder, or check that a rerun uses the same ones."""
    path = output_dir / RUN_CONFIG_FILE
    document = {"fingerprint": fingerprint(settings), "settings": settings}
    if path.exists():
        previous = json.loads(path.read_text())
        if previous.get("fingerprint") != document["fingerprint"]:
            changed = sorted(key for key in settings if previous.get("settings", {}).get(key) != settings.get(key))
            raise ValueError(
                f"{output_dir} holds results of different settings (changed: {', '.join(changed)}); "
                "run into a new folder (hydra.run.dir=...) or delete this one"
            )
        return
    atomic_write_json(path, document)


def load_finished(samples_path: Path) -> list[dict[str, Any]]:
    """Read the records of earlier runs, cutting off a torn last line left by a killed run."""
    if not samples_path.exists():
        return []
    data = samples_path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        log.warning("%s ends with an incomplete record (the previous run was interrupted); dropping it", samples_path)
        with samples_path.open("r+b") as handle:
            handle.truncate(len(complete))
            handle.flush()
            os.fsync(handle.fileno())
    records = [json.loads(line) for line in complete.decode("utf-8").splitlines() if line.strip()]
    return records


def finished_keys(records: list[dict[str, Any]]) -> set[tuple[str, int]]:
    return {(str(record["id"]), int(record["sample"])) for record in records}
