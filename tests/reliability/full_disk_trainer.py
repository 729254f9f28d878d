"""The job's real training process (``python -m worker.train_job``) on a disk that fills up while
the second checkpoint is written: half of it reaches the disk, then ``ENOSPC``.

For machines where the test cannot mount a small tmpfs (it needs root); the checkpoint writer
sees the same error a full file system gives.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Any

import torch

import reid_core.engine.checkpoint as checkpoint_module
from worker.train_job import main

#: The checkpoint whose write runs out of space (1-based).
FAILING_SAVE = 2


class _TorchFillingTheDisk:
    """``torch`` as reid_core's checkpointer sees it, with ``save`` failing like a full disk."""

    def __init__(self) -> None:
        self.saves = 0

    def save(self, obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        self.saves += 1
        if self.saves == FAILING_SAVE:
            half = b"the first half of a checkpoint"
            if hasattr(f, "write"):  # a file object, or a path
                f.write(half)
            else:
                Path(f).write_bytes(half)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(getattr(f, "name", f)))
        torch.save(obj, f, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


if __name__ == "__main__":
    checkpoint_module.torch = _TorchFillingTheDisk()  # type: ignore[assignment]
    sys.exit(main(sys.argv[1:]))
