"""Checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the model, the objective (memory banks, agents), optimiser, LR scheduler, AMP
scaler, the RNG states of python/numpy/torch(/CUDA), the epoch and step, and the metric history.
Files are written atomically (:mod:`reid_core.atomic_write`), so a crash or a full disk never leaves
a half-written file under a real name; the tag file ``last_checkpoint`` names the newest complete one,
which makes "resume" mean one thing.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reid_core.atomic_write import atomic_path, write_atomic

__all__ = ["CheckpointError", "Checkpointer", "capture_rng_state", "restore_rng_state"]

log = logging.getLogger(__name__)

LAST_TAG = "last_checkpoint"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the file."""


def capture_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Save and load ``{name: object with state_dict()}`` plus extra plain data in ``directory``."""

    def __init__(self, directory: Path, keep_last: int = 2) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last

    def save(self, name: str, objects: dict[str, Any], extra: dict[str, Any]) -> Path:
        """Write ``<name>.pt`` atomically and point ``last_checkpoint`` at it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        payload: dict[str, Any] = {
            key: obj.state_dict() for key, obj in objects.items() if obj is not None
        }
        payload["extra"] = extra
        path = self.directory / f"{name}.pt"
        try:
            with atomic_path(path, fsync=True) as tmp, tmp.open("wb") as f:
                # Through a Python file, so a full disk shows as OSError(ENOSPC) (torch may wrap
                # it in a RuntimeError); given a path, torch's writer says nothing of the disk.
                torch.save(payload, f)
            write_atomic(self.directory / LAST_TAG, path.name)
        except (OSError, RuntimeError) as exc:
            os_error = _os_error(exc)
            if os_error is None:
                raise
            raise CheckpointError(
                f"could not write checkpoint {path}: {os_error}. The previous checkpoint "
                f"({self.last_checkpoint()}) is intact."
            ) from os_error
        self._prune(keep=path)
        return path

    def last_checkpoint(self) -> Path | None:
        tag = self.directory / LAST_TAG
        if not tag.is_file():
            return None
        path = self.directory / tag.read_text().strip()
        return path if path.is_file() else None

    def load(self, path: Path, objects: dict[str, Any]) -> dict[str, Any]:
        """Restore ``objects`` in place from ``path``; returns the checkpoint's ``extra`` data."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        try:
            # weights_only=False: the file holds RNG states (numpy tuples); we only load our own files
            payload = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
        for key, obj in objects.items():
            if obj is None:
                continue
            if key not in payload:
                raise CheckpointError(f"checkpoint {path} has no {key!r} state")
            obj.load_state_dict(payload[key])
        extra: dict[str, Any] = payload.get("extra", {})
        return extra

    def _prune(self, keep: Path) -> None:
        rolling = sorted(
            (p for pattern in ("epoch_*.pt", "step_*.pt") for p in self.directory.glob(pattern)),
            key=lambda p: p.stat().st_mtime,
        )
        older = [p for p in rolling if p != keep]
        for old in older[: max(0, len(older) + 1 - self.keep_last)]:
            old.unlink(missing_ok=True)


def _os_error(exc: BaseException | None) -> OSError | None:
    """``exc`` if it is an OSError, else the first OSError it was raised from or during."""
    while exc is not None and not isinstance(exc, OSError):
        exc = exc.__cause__ or exc.__context__
    return exc
