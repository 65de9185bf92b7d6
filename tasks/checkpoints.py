"""Checkpoint I/O of the train stage: the full training state every `checkpoint_every` steps, the EMA weights
of the finished run under `final/` (read back by `t2i.models.loading`).

A checkpoint holds everything a resumed run needs to continue exactly (model, EMA, optimizer, scheduler,
gradient scaler, step, torch RNG states) as plain tensors and numbers, so it loads with
`torch.load(weights_only=True)`: opening a checkpoint never runs code from the file.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import torch

from t2i.data.store import CHECKPOINTS, FINAL, atomic_path, checkpoint_dirs


def save_checkpoint(root: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    final = root / CHECKPOINTS / f"step-{step:08d}"
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        torch.save(state, tmp / "state.pt")
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_final(root: Path, model: torch.nn.Module, meta: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    final = root / FINAL
    if final.exists():
        shutil.rmtree(final)
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return final


def load_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state, memory-mapped: tensors are read from the file when used, and the page cache is
    shared by the ranks of a node instead of each rank holding its own copy in RAM."""
    return torch.load(path / "state.pt", map_location="cpu", weights_only=True, mmap=True)


def to_cpu(obj: Any) -> Any:
    """A CPU copy of every tensor in nested dicts/lists, so training can go on changing the originals."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints on a background thread from a CPU copy of the state: the process that saves goes
    back to training once the copy is made, and no other rank waits for the disk. `failure` tells the
    training loop at its next health check that a write failed; a save first waits for the previous write
    and re-raises its error."""

    def __init__(self, root: Path, keep: int) -> None:
        self.root, self.keep = root, keep
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._step = 0

    def save(self, step: int, state: dict[str, Any]) -> None:
        self.wait()
        snapshot = to_cpu(state)
        self._step = step
        self._thread = threading.Thread(target=self._write, args=(step, snapshot), name="checkpoint-writer")
        self._thread.start()

    def _write(self, step: int, state: dict[str, Any]) -> None:
        try:
            save_checkpoint(self.root, step, state, self.keep)
        except BaseException as exc:  # reported by `failure`, re-raised in the training thread by wait()
            self._error = exc

    @property
    def failure(self) -> str | None:
        """What went wrong with the last write, once it has failed (without waiting for a write in flight)."""
        if self._error is None:
            return None
        return f"writing checkpoint step-{self._step:08d} failed: {type(self._error).__name__}: {self._error}"

    def wait(self, raise_error: bool = True) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None and raise_error:
            error, self._error = self._error, None
            raise error
