"""Resumable training state: checkpoints written atomically, and preemption signals.

A checkpoint is a folder `<run>/checkpoints/step-<N>/` holding

- `gates.safetensors` + `gate_config.json`: the gates at step N, readable by `load_gates`;
- `trainer_state.pt`: optimizer, scheduler, step, data fingerprint and the RNG states of rank 0;
- `rng_rank<r>.pt` for the other ranks.

It is written into a temporary folder that is renamed into place. Then `checkpoints/latest`, a
text file with the folder name, is replaced atomically. A run killed at any moment therefore
leaves either the previous checkpoint or the new one.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from trimkv.utils.io import atomic_write_folder, atomic_write_text

log = logging.getLogger(__name__)

STATE_NAME = "trainer_state.pt"
LATEST_NAME = "latest"


def rng_state() -> dict[str, Any]:
    """Collect the RNG states of Python, NumPy and torch (CPU and every CUDA device)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(path: str | os.PathLike) -> Path | None:
    """Return the newest complete checkpoint under a run folder, or `path` itself if it is one."""
    path = Path(path)
    if (path / STATE_NAME).is_file():
        return path
    folder = checkpoints_dir(path)
    pointer = folder / LATEST_NAME
    if not pointer.is_file():
        return None
    checkpoint = folder / pointer.read_text().strip()
    return checkpoint if (checkpoint / STATE_NAME).is_file() else None


def write_checkpoint(run_dir: str | os.PathLike, step: int, write_contents: Callable[[Path], None],
                     keep_last: int | None = None) -> Path:
    """Create `checkpoints/step-<step>` atomically; `write_contents(staging_folder)` fills it.

    Then point `checkpoints/latest` at it and delete all but the `keep_last` newest checkpoints.
    """
    folder = checkpoints_dir(run_dir)
    name = f"step-{step:08d}"
    target = atomic_write_folder(folder / name, write_contents)
    atomic_write_text(folder / LATEST_NAME, name + "\n")
    if keep_last:
        finished = sorted(path for path in folder.glob("step-*") if path.is_dir())
        for old in finished[: -int(keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def save_torch(obj: Any, path: Path) -> None:
    """torch.save with an fsync, for files inside a staging folder."""
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


class PreemptionGuard:
    """Defers SIGTERM and SIGUSR2 to the next step boundary, where the trainer saves a checkpoint.

    SLURM sends SIGUSR2 (submitit's default signal, `--signal=USR2@90`) before a timeout and on
    preemption, and SIGTERM before a kill. The handler only records the signal. After the trainer
    has saved, `release()` calls the handler that was installed before. Submitit's handler requeues
    the job and exits. A handler that returns lets training go on. The default action of the
    signal (terminate) becomes a SystemExit with status 128 + signal number.
    """

    SIGNALS = tuple(sig for sig in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR2", None)) if sig)

    def __init__(self):
        self.requested: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "PreemptionGuard":
        try:
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self._record)
        except ValueError:  # signal.signal works only in the main thread
            self._restore()
            log.warning("not in the main thread: SIGTERM/SIGUSR2 will not save a checkpoint")
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _record(self, signum, frame) -> None:
        self.requested = signum

    def _restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def release(self) -> None:
        """Hand the recorded signal to the previous handler (after the checkpoint is on disk)."""
        signum, self.requested = self.requested, None
        if signum is None:
            return
        handler = self.previous.get(signum, signal.SIG_DFL)
        name = signal.Signals(signum).name
        if callable(handler):
            log.info("checkpoint saved after %s; passing the signal on", name)
            handler(signum, None)
            return
        if handler == signal.SIG_IGN:
            return
        log.info("checkpoint saved after %s; exiting", name)
        raise SystemExit(128 + signum)
