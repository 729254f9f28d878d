"""Plain records of a re-ID dataset: one :class:`ImageRecord` per image, grouped into splits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["UNKNOWN", "ImageRecord", "ReIDSplits", "split_stats"]

#: Value of ``pid`` / ``camid`` when the identity or the camera is not known.
UNKNOWN = -1


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One image.

    ``pid`` is the identity label (``-1``: unknown/unlabeled, ``0`` in a Market-style gallery: a
    distractor) and ``camid`` the 0-based camera index (``-1``: unknown). Training code never reads
    ``pid``; it is kept for analysis and benchmarks only.
    """

    path: Path
    pid: int = UNKNOWN
    camid: int = UNKNOWN


def split_stats(records: Sequence[ImageRecord]) -> dict[str, int]:
    """Image, identity and camera counts of one split (unknown ``-1`` values are not counted)."""
    return {
        "images": len(records),
        "identities": len({r.pid for r in records if r.pid != UNKNOWN}),
        "cameras": len({r.camid for r in records if r.camid != UNKNOWN}),
    }


@dataclass
class ReIDSplits:
    """The three splits of a dataset; ``query``/``gallery`` are empty for unlabeled folders."""

    train: list[ImageRecord]
    query: list[ImageRecord] = field(default_factory=list)
    gallery: list[ImageRecord] = field(default_factory=list)
    name: str = ""
    root: Path | None = None

    @property
    def has_eval(self) -> bool:
        """True when there is something to evaluate: a non-empty query and gallery."""
        return bool(self.query) and bool(self.gallery)

    def summary(self) -> dict[str, dict[str, int]]:
        """Counts per split: ``{"train": {"images": n, "identities": k, "cameras": c}, ...}``
        for ``train``, ``query`` and ``gallery`` (unknown ``-1`` pids/cameras not counted)."""
        return {
            "train": split_stats(self.train),
            "query": split_stats(self.query),
            "gallery": split_stats(self.gallery),
        }

    def describe(self) -> str:
        """A small table of :meth:`summary` for logs."""
        title = f"dataset {self.name or '?'}" + (f" ({self.root})" if self.root else "")
        lines = [title, f"  {'split':<8} {'images':>8} {'ids':>7} {'cams':>5}"]
        for split, stats in self.summary().items():
            lines.append(
                f"  {split:<8} {stats['images']:>8} {stats['identities']:>7} {stats['cameras']:>5}"
            )
        return "\n".join(lines)
