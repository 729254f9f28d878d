"""Reading images safely: one clear error per unreadable file, and a scan that drops bad files."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from reid_core.data.records import ImageRecord, ReIDSplits
from reid_core.data.registry import DatasetError

__all__ = [
    "IMAGE_EXTENSIONS",
    "CorruptImageError",
    "TooManyCorruptImagesError",
    "check_image",
    "load_image",
    "scan_images",
    "scan_splits",
]

#: File extensions read as images (lower case).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})

_LOG = logging.getLogger("reid_core.data")
_SCAN_CHUNK = 128

# What PIL raises for a file it cannot read: OSError (truncated, unidentified, missing),
# SyntaxError/ValueError (malformed headers), DecompressionBombError, and friends.
_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    Image.DecompressionBombError,
)


class CorruptImageError(DatasetError):
    """An image that cannot be read; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: Path | str, reason: str | None = None) -> None:
        # The one-argument form is used when the error is rebuilt from its message (e.g. by a
        # DataLoader worker re-raising it in the main process).
        message = str(path) if reason is None else f"cannot read image {path}: {reason}"
        super().__init__(message)
        self.path = Path(path) if reason is not None else None
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        if self.reason is None or self.path is None:
            return (type(self), (self.args[0],))
        return (type(self), (self.path, self.reason))


class TooManyCorruptImagesError(DatasetError):
    """More unreadable images than ``data.max_bad_fraction`` allows."""


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_image(path: Path | str) -> Image.Image:
    """Open and fully decode ``path`` as an RGB image; raise :class:`CorruptImageError` if not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. PIL's "palette images with transparency"
            with Image.open(path) as img:
                rgb = img.convert("RGB")  # forces the decode of the whole file
    except _READ_ERRORS as exc:
        raise CorruptImageError(path, _reason(exc)) from exc
    if rgb.width < 1 or rgb.height < 1:
        raise CorruptImageError(path, f"empty image ({rgb.width}x{rgb.height})")
    return rgb


def check_image(path: Path | str, full_decode: bool = False) -> str | None:
    """Return ``None`` when ``path`` looks readable, else the reason it is not.

    The default checks the header and runs PIL's ``verify()`` (a checksum pass for PNG; for JPEG
    it does not decode the data). ``full_decode=True`` also decodes the pixels, for JPEG at 1/8
    scale (cheap), which catches truncated files at about twice the cost.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                width, height = img.size
                img.verify()
            if width < 1 or height < 1:
                return f"empty image ({width}x{height})"
            if full_decode:
                with Image.open(path) as img:
                    img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                    img.load()
    except _READ_ERRORS as exc:
        return _reason(exc)
    return None


def _format_bad(bad: Sequence[tuple[Path, str]], limit: int = 20, reasons: bool = False) -> str:
    shown = [f"{p.name} ({why})" if reasons else p.name for p, why in bad[:limit]]
    more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
    return ", ".join(shown) + more


def scan_images(
    records: Sequence[ImageRecord],
    max_bad_fraction: float,
    logger: logging.Logger | None = None,
    *,
    full_decode: bool = False,
    num_threads: int | None = None,
    split: str = "images",
) -> tuple[list[ImageRecord], list[tuple[Path, str]]]:
    """Open every image, drop the unreadable ones, and fail above ``max_bad_fraction``.

    Returns ``(good_records, [(path, reason), ...])`` in the input order. Bad files are logged
    (count, then the first 20 names and "and N more"). Raises :class:`TooManyCorruptImagesError`
    naming the share, the limit (``data.max_bad_fraction``) and some file names when the share of
    bad images is above ``max_bad_fraction``. See :func:`check_image` for ``full_decode``.
    """
    log = logger or _LOG
    if not records:
        return [], []
    workers = num_threads or min(8, os.cpu_count() or 1)
    paths = [r.path for r in records]

    def check_chunk(chunk: Sequence[Path]) -> list[str | None]:
        return [check_image(p, full_decode) for p in chunk]

    if workers <= 1 or len(paths) < 2 * _SCAN_CHUNK:
        reasons = check_chunk(paths)
    else:
        # Chunks, not one task per file: the header checks are short and mostly hold the GIL;
        # the threads pay off when the storage is slow (network or cold disks).
        chunks = [paths[i : i + _SCAN_CHUNK] for i in range(0, len(paths), _SCAN_CHUNK)]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scan") as pool:
            reasons = [why for part in pool.map(check_chunk, chunks) for why in part]
    good = [r for r, why in zip(records, reasons, strict=True) if why is None]
    bad = [(r.path, why) for r, why in zip(records, reasons, strict=True) if why is not None]
    if not bad:
        return good, bad
    share = len(bad) / len(records)
    log.warning(
        "%s: skipping %d unreadable of %d images (%.2f%%): %s",
        split,
        len(bad),
        len(records),
        100.0 * share,
        _format_bad(bad),
    )
    if share > max_bad_fraction:
        raise TooManyCorruptImagesError(
            f"{split}: {len(bad)} of {len(records)} images are unreadable ({100.0 * share:.2f}%), "
            f"above the limit data.max_bad_fraction={max_bad_fraction:g} "
            f"({100.0 * max_bad_fraction:.2f}%): {_format_bad(bad, limit=5, reasons=True)}. "
            "Fix or remove these files, or raise data.max_bad_fraction."
        )
    return good, bad


def scan_splits(
    splits: ReIDSplits,
    max_bad_fraction: float,
    logger: logging.Logger | None = None,
    **kwargs: Any,
) -> tuple[ReIDSplits, dict[str, list[tuple[Path, str]]]]:
    """:func:`scan_images` on each split; returns the cleaned splits and the bad files per split."""
    cleaned: dict[str, list[ImageRecord]] = {}
    bad: dict[str, list[tuple[Path, str]]] = {}
    for split in ("train", "query", "gallery"):
        cleaned[split], bad[split] = scan_images(
            getattr(splits, split), max_bad_fraction, logger, split=split, **kwargs
        )
    out = ReIDSplits(
        train=cleaned["train"],
        query=cleaned["query"],
        gallery=cleaned["gallery"],
        name=splits.name,
        root=splits.root,
    )
    return out, bad
