"""Archive checks without the HTTP layer: member names, member types, duplicates, limits."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

import pytest

from service.core.archives import (
    ArchiveError,
    ArchiveLimits,
    check_archive,
    extract_archive,
    safe_member_path,
)

LIMITS = ArchiveLimits(max_files=10, max_uncompressed_bytes=1000)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a/b.jpg", PurePosixPath("a/b.jpg")),
        ("./a//b.jpg", PurePosixPath("a/b.jpg")),
        ("a/", PurePosixPath("a")),
        ("./", None),
    ],
)
def test_safe_names(name: str, expected: PurePosixPath | None) -> None:
    assert safe_member_path(name) == expected


@pytest.mark.parametrize(
    "name", ["../x", "a/../../x", "a\\..\\x", "/etc/passwd", "C:/x", "c:\\x", "a\x00b"]
)
def test_unsafe_names(name: str) -> None:
    with pytest.raises(ArchiveError) as info:
        safe_member_path(name)
    assert info.value.code == "unsafe_member"


def _tar(path: Path, *infos: tuple[tarfile.TarInfo, bytes]) -> Path:
    with tarfile.open(path, "w") as tf:
        for info, data in infos:
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data else None)
    return path


def test_special_files_are_refused(tmp_path: Path) -> None:
    fifo = tarfile.TarInfo("a/fifo")
    fifo.type = tarfile.FIFOTYPE
    device = tarfile.TarInfo("a/dev")
    device.type = tarfile.CHRTYPE
    for info in (fifo, device):
        path = _tar(tmp_path / f"{info.name.replace('/', '_')}.tar", (info, b""))
        with pytest.raises(ArchiveError, match="special file"):
            check_archive(path, LIMITS)


def test_duplicates_are_refused(tmp_path: Path) -> None:
    path = _tar(
        tmp_path / "dup.tar", (tarfile.TarInfo("a/x"), b"1"), (tarfile.TarInfo("a/./x"), b"2")
    )
    with pytest.raises(ArchiveError, match="more than once"):
        check_archive(path, LIMITS)


def test_limits_count_members_and_bytes(tmp_path: Path) -> None:
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(11):
            zf.writestr(f"f{i}", b"x")
    with pytest.raises(ArchiveError) as info:
        check_archive(many, LIMITS)
    assert (info.value.code, info.value.status) == ("archive_too_many_files", 413)
    big = _tar(
        tmp_path / "big.tar", (tarfile.TarInfo("a"), b"x" * 600), (tarfile.TarInfo("b"), b"y" * 600)
    )
    with pytest.raises(ArchiveError) as info:
        check_archive(big, LIMITS)
    assert (info.value.code, info.value.status) == ("archive_too_large", 413)


def test_extract_writes_below_the_destination_only(tmp_path: Path) -> None:
    path = _tar(
        tmp_path / "ok.tar", (tarfile.TarInfo("top/a.txt"), b"hello"), (tarfile.TarInfo("b"), b"!")
    )
    summary = extract_archive(path, tmp_path / "out", LIMITS)
    assert (summary.files, summary.uncompressed_bytes) == (2, 6)
    assert (tmp_path / "out" / "top" / "a.txt").read_bytes() == b"hello"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.tar", "out"]


def test_a_failed_extraction_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "conflict.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a", b"file first")
        zf.writestr("a/b", b"then a file below it")
    with pytest.raises(ArchiveError):
        extract_archive(path, tmp_path / "out", LIMITS)
    assert not (tmp_path / "out").exists()


def test_empty_and_corrupt_archives(tmp_path: Path) -> None:
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("folder/", b"")
    with pytest.raises(ArchiveError, match="no file"):
        check_archive(empty, LIMITS)
    truncated = tmp_path / "cut.tar.gz"
    with tarfile.open(truncated, "w:gz") as tf:
        info = tarfile.TarInfo("a")
        info.size = 500
        tf.addfile(info, io.BytesIO(b"z" * 500))
    truncated.write_bytes(truncated.read_bytes()[:40])
    with pytest.raises(ArchiveError) as info_:
        check_archive(truncated, LIMITS)
    assert info_.value.code in ("corrupt_archive", "unsupported_archive")
