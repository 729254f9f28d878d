"""Dataset folders on disk: where they may be, and what they hold (via reid_core.data).

A folder with ``bounding_box_train/`` is read as a Market-1501-layout folder (``market_folder``),
anything else as an unlabeled image folder (``image_folder``, searched recursively). Unreadable
images are counted and a sample of their names kept; they do not make the registration fail.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_LOG = logging.getLogger("service.datasets")

#: How many unreadable file names are kept on the dataset row.
UNREADABLE_SAMPLE = 20


class DatasetFolderError(ValueError):
    """A path or folder that cannot be registered; the message names the path and the fix."""


@dataclass
class ScanResult:
    format: str
    root: Path
    image_count: int
    identity_count: int
    camera_count: int
    splits: dict[str, dict[str, int]]
    unreadable_count: int
    unreadable_sample: list[str] = field(default_factory=list)


def resolve_registered_path(raw: str, roots: Sequence[Path]) -> Path:
    """The real folder ``raw`` names, if it lies under one of ``roots``.

    Refused, in this order (so nothing is said about folders outside the roots): a relative path,
    a ``..`` component, a path whose real location (symlinks resolved) is outside every root, a
    missing path, a file.
    """
    shown = f"{raw!r}"
    if not roots:
        raise DatasetFolderError(
            "no dataset roots are configured (REID_DATASET_ROOTS), so folders cannot be "
            "registered by path; upload an archive instead"
        )
    path = Path(raw)
    if not path.is_absolute():
        raise DatasetFolderError(
            f"dataset path {shown} is not absolute; give the full path of a folder under "
            f"{_roots_text(roots)}"
        )
    if ".." in path.parts:
        raise DatasetFolderError(f"dataset path {shown} contains '..'; give the folder's own path")
    try:
        real = path.resolve(strict=False)
        exists, is_dir = real.exists(), real.is_dir()
    except ValueError:  # "embedded null byte"
        raise DatasetFolderError(f"dataset path {shown} contains a NUL character") from None
    except RuntimeError:  # pathlib's "Symlink loop from ..."
        raise DatasetFolderError(f"dataset path {shown} is a loop of symbolic links") from None
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise DatasetFolderError(f"dataset path {shown} cannot be used: {exc.strerror}") from None
    real_roots = [Path(r).resolve(strict=False) for r in roots]
    if not any(real == r or real.is_relative_to(r) for r in real_roots):
        # where a link leads is not said: that would name a folder outside the roots
        via_link = "" if real == path else " (a symbolic link on the way leads outside them)"
        raise DatasetFolderError(
            f"dataset path {shown} is not under an allowed dataset root{via_link}; "
            f"allowed: {_roots_text(roots)}"
        )
    if not exists:
        raise DatasetFolderError(f"dataset path {shown} does not exist")
    if not is_dir:
        raise DatasetFolderError(f"dataset path {shown} is not a folder")
    return real


def _roots_text(roots: Sequence[Path]) -> str:
    return ", ".join(str(r) for r in roots)


def single_top_folder(folder: Path) -> Path:
    """``folder/X`` when ``folder`` holds only the folder ``X`` (archives often wrap their
    content in one folder), else ``folder``. Hidden entries (``__MACOSX``, ``.DS_Store``) aside."""
    entries = [e for e in folder.iterdir() if not e.name.startswith((".", "__MACOSX"))]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return single_top_folder(entries[0])
    return folder


def _detect_format(root: Path) -> str:
    return "market_folder" if (root / "bounding_box_train").is_dir() else "image_folder"


def scan_dataset_folder(root: Path, shown: str | None = None) -> ScanResult:
    """Read ``root`` with reid_core's dataset registry and open every image once.

    Raises :class:`DatasetFolderError` when the folder is not a usable dataset (a Market layout
    with a split missing, no image at all, no readable image). Its message calls the folder
    ``shown`` when given: an uploaded archive's folder is a server path the client never saw
    (reid_core's messages, written for the person who set ``data.root``, name it in full).
    """
    try:
        return _scan_folder(root)
    except DatasetFolderError as exc:
        if shown is None:
            raise
        raise DatasetFolderError(str(exc).replace(str(root), shown)) from None


def _scan_folder(root: Path) -> ScanResult:
    # reid_core.data imports torch: loaded on the first scan, not when the API starts.
    from reid_core.data.image_io import scan_images
    from reid_core.data.records import UNKNOWN
    from reid_core.data.registry import DatasetError, build_dataset

    fmt = _detect_format(root)
    try:
        splits = build_dataset(fmt, root)
    except DatasetError as exc:
        raise DatasetFolderError(str(exc)) from None
    except OSError as exc:
        raise DatasetFolderError(f"dataset folder {str(root)!r} cannot be read: {exc}") from None

    readable: dict[str, list[Any]] = {}
    bad: list[Path] = []
    for split in ("train", "query", "gallery"):
        records = getattr(splits, split)
        # max_bad_fraction=1: count the bad files here; a training run applies its own limit.
        good, bad_split = scan_images(records, max_bad_fraction=1.0, logger=_LOG, split=split)
        readable[split] = good
        bad.extend(p for p, _why in bad_split)
    everything = [r for split in readable.values() for r in split]
    if not everything:
        sample = ", ".join(relative_path(p, root) for p in bad[:5])
        raise DatasetFolderError(
            f"dataset folder {str(root)!r} holds no readable image ({len(bad)} unreadable"
            + (f": {sample}" if sample else "")
            + ")"
        )
    summary = type(splits)(
        train=readable["train"], query=readable["query"], gallery=readable["gallery"]
    ).summary()
    return ScanResult(
        format=fmt,
        root=root,
        image_count=len(everything),
        identity_count=len({r.pid for r in everything if r.pid not in (UNKNOWN, 0)}),
        camera_count=len({r.camid for r in everything if r.camid != UNKNOWN}),
        splits=summary,
        unreadable_count=len(bad),
        unreadable_sample=[relative_path(p, root) for p in bad[:UNREADABLE_SAMPLE]],
    )


def relative_path(path: str | Path, root: str | Path) -> str:
    """``path`` relative to the dataset's folder ``root`` (its name alone when outside it)."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).name
