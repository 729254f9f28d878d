"""Checking and extracting uploaded dataset archives (.zip, .tar, .tar.gz/.tgz, .tar.bz2, .tar.xz).

Everything is checked *before* the first byte is extracted: every member name (no absolute path,
no drive letter, no ``..``), its type (plain files and folders only: no symlink, hard link,
device or FIFO), the number of members and the total uncompressed size. Extraction then writes
each file itself (never ``extractall``) below the destination, counting the bytes actually
decompressed, so an archive that lies about its sizes still stops at the limit.
"""

from __future__ import annotations

import functools
import lzma
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Literal

_CHUNK = 1024 * 1024
_DRIVE = re.compile(r"^[A-Za-z]:")

ArchiveKind = Literal["zip", "tar"]
_Opener = Callable[[], IO[bytes] | None]

#: What reading a damaged archive raises: the formats' own errors, a truncated stream, and the
#: decompressors' (zlib for zip and gzip, lzma for xz; bz2 raises OSError).
_DAMAGED = (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)


class ArchiveError(ValueError):
    """An archive refused; ``status`` is the HTTP status to answer with (400 or 413)."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True)
class ArchiveLimits:
    max_files: int
    max_uncompressed_bytes: int


@dataclass(frozen=True)
class ArchiveSummary:
    kind: ArchiveKind
    members: int
    files: int
    uncompressed_bytes: int


@dataclass(frozen=True)
class _Member:
    name: str  # as written in the archive (for messages)
    path: PurePosixPath  # safe relative path
    is_dir: bool
    size: int


def _reason(exc: BaseException) -> str:
    """What went wrong reading or writing, in words a client can use: an OSError's own reason
    without its file name, which is a server path (the upload's scratch folder)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def safe_member_path(name: str) -> PurePosixPath | None:
    """The relative path a member may be extracted to; ``None`` for the root entry (``./``).

    Raises :class:`ArchiveError` for an absolute path, a drive letter or a ``..`` component
    (backslashes count as separators: ``..\\x`` is refused too).
    """
    if "\x00" in name:
        raise ArchiveError("unsafe_member", f"archive member {name!r} has a NUL byte in its name")
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or _DRIVE.match(normalized):
        raise ArchiveError(
            "unsafe_member",
            f"archive member {name!r} has an absolute path; archives must hold relative paths",
        )
    parts = [p for p in normalized.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(
            "unsafe_member",
            f"archive member {name!r} points outside the archive ('..'); refused",
        )
    return PurePosixPath(*parts) if parts else None


def _link_error(name: str, what: str) -> ArchiveError:
    return ArchiveError(
        "unsafe_member",
        f"archive member {name!r} is a {what}; only plain files and folders are accepted",
    )


def detect_kind(path: Path) -> ArchiveKind:
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except (OSError, EOFError, tarfile.TarError):
        pass
    raise ArchiveError(
        "unsupported_archive",
        "the upload is not a zip or tar archive; send a .zip, .tar, .tar.gz (.tgz), "
        ".tar.bz2 or .tar.xz file",
    )


def _zip_members(zf: zipfile.ZipFile) -> Iterator[tuple[_Member, zipfile.ZipInfo]]:
    for info in zf.infolist():
        # Unix attributes (create_system 3) may carry a file type; many writers leave it 0.
        file_type = stat.S_IFMT(info.external_attr >> 16) if info.create_system == 3 else 0
        if file_type == stat.S_IFLNK:
            raise _link_error(info.filename, "symbolic link")
        if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise _link_error(info.filename, "special file (device, FIFO or socket)")
        if info.flag_bits & 0x1:
            raise ArchiveError(
                "encrypted_archive", f"archive member {info.filename!r} is encrypted"
            )
        path = safe_member_path(info.filename)
        if path is None:
            continue
        yield _Member(info.filename, path, info.is_dir(), info.file_size), info


def _tar_members(tf: tarfile.TarFile) -> Iterator[tuple[_Member, tarfile.TarInfo]]:
    # Iterating (not getmembers()) reads headers one by one: the limits stop a bomb early.
    for info in tf:
        if info.issym():
            raise _link_error(info.name, "symbolic link")
        if info.islnk():
            raise _link_error(info.name, "hard link")
        if not (info.isreg() or info.isdir()):
            raise _link_error(info.name, "special file (device, FIFO or socket)")
        path = safe_member_path(info.name)
        if path is None:
            continue
        yield _Member(info.name, path, info.isdir(), info.size if info.isreg() else 0), info


class _Budget:
    """Counts members and bytes against the limits; raises the moment one is passed."""

    def __init__(self, limits: ArchiveLimits) -> None:
        self.limits = limits
        self.members = 0
        self.files = 0
        self.bytes = 0
        self.seen: set[PurePosixPath] = set()

    def add_member(self, member: _Member) -> None:
        self.members += 1
        if self.members > self.limits.max_files:
            raise ArchiveError(
                "archive_too_many_files",
                f"the archive holds more than {self.limits.max_files} members "
                "(REID_LIMITS__MAX_ARCHIVE_FILES); split it or register a server folder",
                status=413,
            )
        if member.path in self.seen and not member.is_dir:
            raise ArchiveError(
                "duplicate_member", f"archive member {member.name!r} appears more than once"
            )
        self.seen.add(member.path)
        if not member.is_dir:
            self.files += 1
            self.add_bytes(member.size)

    def add_bytes(self, n: int) -> None:
        self.bytes += n
        if self.bytes > self.limits.max_uncompressed_bytes:
            raise ArchiveError(
                "archive_too_large",
                f"the archive's files add up to more than {self.limits.max_uncompressed_bytes} "
                "bytes uncompressed (REID_LIMITS__MAX_UNCOMPRESSED_BYTES); split it or register "
                "a server folder",
                status=413,
            )


def check_archive(path: Path, limits: ArchiveLimits) -> ArchiveSummary:
    """Check every member of the archive at ``path`` without extracting anything."""
    kind = detect_kind(path)
    budget = _Budget(limits)
    try:
        if kind == "zip":
            with zipfile.ZipFile(path) as zf:
                for member, _ in _zip_members(zf):
                    budget.add_member(member)
        else:
            with tarfile.open(path, mode="r:*") as tf:
                for member, _ in _tar_members(tf):
                    budget.add_member(member)
    except _DAMAGED as exc:
        raise ArchiveError(
            "corrupt_archive", f"the archive cannot be read: {_reason(exc)}"
        ) from None
    if budget.files == 0:
        raise ArchiveError("empty_archive", "the archive holds no file")
    return ArchiveSummary(kind, budget.members, budget.files, budget.bytes)


def _copy(src: IO[bytes], dest: Path, declared: int, budget: _Budget, name: str) -> None:
    written = 0
    with dest.open("xb") as out:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            if written > declared:
                raise ArchiveError(
                    "corrupt_archive",
                    f"archive member {name!r} holds more data than its header says "
                    f"({declared} bytes); refused",
                )
            budget.add_bytes(len(chunk))
            out.write(chunk)


def _target(root: Path, member: _Member) -> Path:
    target = root.joinpath(*member.path.parts)
    # Belt and braces: nothing extracted is a link, so resolve() stays inside the root.
    if not target.resolve().is_relative_to(root.resolve()):
        raise ArchiveError("unsafe_member", f"archive member {member.name!r} leaves the archive")
    return target


def extract_archive(path: Path, dest: Path, limits: ArchiveLimits) -> ArchiveSummary:
    """Check the archive (:func:`check_archive`), then extract it into the new folder ``dest``.

    On any error ``dest`` is removed and :class:`ArchiveError` raised.
    """
    summary = check_archive(path, limits)
    dest.mkdir(parents=True, exist_ok=False)
    budget = _Budget(limits)
    try:
        if summary.kind == "zip":
            with zipfile.ZipFile(path) as zf:
                for member, info in _zip_members(zf):
                    _extract_one(dest, member, budget, functools.partial(zf.open, info))
        else:
            with tarfile.open(path, mode="r:*") as tf:
                for member, tinfo in _tar_members(tf):
                    _extract_one(dest, member, budget, functools.partial(tf.extractfile, tinfo))
    except _DAMAGED as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise ArchiveError(
            "corrupt_archive", f"the archive cannot be extracted: {_reason(exc)}"
        ) from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return ArchiveSummary(summary.kind, budget.members, budget.files, budget.bytes)


def _extract_one(root: Path, member: _Member, budget: _Budget, open_member: _Opener) -> None:
    # The budget was checked on the headers; counted again on the bytes actually written.
    budget.members += 1
    target = _target(root, member)
    try:
        if member.is_dir:
            target.mkdir(parents=True, exist_ok=True)
            return
        budget.files += 1
        target.parent.mkdir(parents=True, exist_ok=True)
        src = open_member()
        if src is None:
            raise ArchiveError("corrupt_archive", f"archive member {member.name!r} has no data")
        with src:
            _copy(src, target, member.size, budget, member.name)
    except _DAMAGED as exc:
        # e.g. a member's data that does not decompress, or a file and a folder of one name
        raise ArchiveError(
            "corrupt_archive",
            f"archive member {member.name!r} cannot be extracted: {_reason(exc)}",
        ) from None
