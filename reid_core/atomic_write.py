"""Writing a file so that its readers see the old content or the new, never a part of it.

The content goes to a temporary file next to the target, which then replaces the target in one
``os.replace`` (atomic within a file system). A writer that fails or is interrupted leaves the
old file as it was; the temporary file is removed, except after a kill (SIGKILL), when the next
write of the same file overwrites it. Every file that another process reads while it may be
rewritten (``progress.json``, checkpoints, a job's config, ...) is written this way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_atomic"]


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync: bool = False) -> Iterator[Path]:
    """A temporary path to write the new ``path`` at; it replaces ``path`` when the block ends,
    and is deleted if the block raises.

    ``fsync``: flush the new content to the disk before the replace, so that a machine that
    loses power keeps one of the two versions too (checkpoints); a crash of the process alone
    needs no flush.
    """
    target = Path(path)
    tmp = _temporary(target)
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike[str], data: str | bytes, *, fsync: bool = False) -> None:
    """Replace ``path``'s content by ``data`` (text as UTF-8), atomically: see :func:`atomic_path`."""
    content = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(content)
