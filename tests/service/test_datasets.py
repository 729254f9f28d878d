"""Registering datasets: server folders under the roots only; archives checked before
extraction, and nothing written outside the scratch folder when one is refused."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.core.settings import Settings
from tests.service.conftest import Headers, write_image_folder, write_jpeg, write_market_folder


def _register(client: TestClient, headers: Headers, path: Path | str, name: str = "d") -> Any:
    return client.post("/v1/datasets", json={"name": name, "path": str(path)}, headers=headers)


def _error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


def _assert_error(response: Any, status: int, code: str, *fragments: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    for fragment in fragments:
        assert fragment in error["message"]


# ----------------------------------------------------------------------------------------------
# server folders
# ----------------------------------------------------------------------------------------------


def test_register_an_image_folder(client: TestClient, alice: Headers, image_folder: Path) -> None:
    response = _register(client, alice, image_folder, name="crops")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["kind"] == "path"
    assert body["format"] == "image_folder"
    assert body["status"] == "ready"
    assert body["path"] == str(image_folder.resolve())
    assert (body["image_count"], body["identity_count"], body["camera_count"]) == (4, 0, 2)
    assert body["unreadable_count"] == 1
    assert body["unreadable_sample"] == ["broken_0.jpg"]
    assert body["splits"]["train"] == {"images": 4, "identities": 0, "cameras": 2}
    assert client.get(f"/v1/datasets/{body['id']}", headers=alice).json() == body


def test_register_a_market_layout_folder(
    client: TestClient, alice: Headers, dataset_root: Path
) -> None:
    folder = write_market_folder(dataset_root / "market")
    body = _register(client, alice, folder).json()
    assert body["format"] == "market_folder"
    assert (body["image_count"], body["identity_count"], body["camera_count"]) == (12, 2, 2)
    assert body["splits"]["query"]["images"] == 4


def test_a_link_inside_the_root_is_stored_resolved(
    client: TestClient, alice: Headers, dataset_root: Path, image_folder: Path
) -> None:
    (dataset_root / "alias").symlink_to(image_folder, target_is_directory=True)
    body = _register(client, alice, dataset_root / "alias").json()
    assert body["path"] == str(image_folder.resolve())


@pytest.mark.parametrize(
    ("make_path", "fragment"),
    [
        (lambda root, tmp: f"{root}/../outside", "contains '..'"),
        (lambda root, tmp: f"{root}/crops/../crops", "contains '..'"),
        (lambda root, tmp: str(tmp / "outside"), "not under an allowed dataset root"),
        (lambda root, tmp: str(root / "escape"), "a symbolic link on the way leads outside"),
        (lambda root, tmp: str(root / "missing"), "does not exist"),
        (lambda root, tmp: str(root / "crops" / "cam1" / "img_0.jpg"), "is not a folder"),
        (lambda root, tmp: "crops", "is not absolute"),
        (lambda root, tmp: "/etc", "not under an allowed dataset root"),
    ],
    ids=["dotdot", "dotdot-inside", "outside", "symlink-out", "missing", "file", "relative", "etc"],
)
def test_bad_paths_are_refused_with_the_path_named(
    client: TestClient,
    alice: Headers,
    tmp_path: Path,
    dataset_root: Path,
    image_folder: Path,
    make_path: Any,
    fragment: str,
) -> None:
    outside = write_image_folder(tmp_path / "outside")
    (dataset_root / "escape").symlink_to(outside, target_is_directory=True)
    path = make_path(dataset_root, tmp_path)
    response = _register(client, alice, path)
    _assert_error(response, 400, "invalid_dataset_path", repr(path), fragment)
    # the client's own path is named, never where a link of it leads
    assert str(outside) not in response.json()["error"]["message"] or str(outside) in path
    assert client.get("/v1/datasets", headers=alice).json()["total"] == 0


def test_a_folder_without_images_is_refused(
    client: TestClient, alice: Headers, dataset_root: Path
) -> None:
    (dataset_root / "empty" / "sub").mkdir(parents=True)
    _assert_error(_register(client, alice, dataset_root / "empty"), 400, "invalid_dataset")
    only_bad = dataset_root / "bad"
    only_bad.mkdir()
    (only_bad / "x.jpg").write_bytes(b"garbage")
    _assert_error(_register(client, alice, only_bad), 400, "invalid_dataset", "x.jpg")


def test_an_incomplete_market_layout_names_what_is_missing(
    client: TestClient, alice: Headers, dataset_root: Path
) -> None:
    write_jpeg(dataset_root / "half" / "bounding_box_train" / "0001_c1s1_000001_00.jpg")
    _assert_error(_register(client, alice, dataset_root / "half"), 400, "invalid_dataset", "query")


def test_names_are_unique_per_owner_and_validated(
    client: TestClient, alice: Headers, bob: Headers, image_folder: Path
) -> None:
    assert _register(client, alice, image_folder, "same").status_code == 201
    _assert_error(_register(client, alice, image_folder, "same"), 409, "dataset_name_taken")
    assert _register(client, bob, image_folder, "same").status_code == 201
    response = _register(client, alice, image_folder, "../bad name")
    assert response.status_code == 422
    detail = response.json()["error"]["details"][0]
    assert detail["field"] == "body.name"
    assert detail["value"] == "../bad name"


def test_unsupported_content_type(client: TestClient, alice: Headers) -> None:
    response = client.post("/v1/datasets", content=b"name=x", headers=alice)
    _assert_error(response, 415, "unsupported_media_type", "multipart/form-data")
    bad_json = client.post(
        "/v1/datasets",
        content=b"{not json",
        headers={**alice, "Content-Type": "application/json"},
    )
    assert bad_json.status_code == 422
    assert bad_json.json()["error"]["code"] == "validation_error"


def test_list_and_delete(client: TestClient, alice: Headers, image_folder: Path) -> None:
    ids = [_register(client, alice, image_folder, f"d{i}").json()["id"] for i in range(3)]
    page = client.get("/v1/datasets", params={"limit": 2}, headers=alice).json()
    assert page["total"] == 3
    assert len(page["items"]) == 2
    rest = client.get("/v1/datasets", params={"limit": 2, "offset": 2}, headers=alice).json()
    assert {d["id"] for d in page["items"] + rest["items"]} == set(ids)
    assert client.delete(f"/v1/datasets/{ids[0]}", headers=alice).status_code == 204
    assert client.get(f"/v1/datasets/{ids[0]}", headers=alice).status_code == 404
    assert image_folder.is_dir(), "a server folder is never deleted"


def test_delete_is_refused_while_a_job_uses_the_dataset(
    client: TestClient, alice: Headers, dataset: dict[str, Any]
) -> None:
    job = client.post("/v1/jobs", json={"dataset_id": dataset["id"]}, headers=alice).json()
    response = client.delete(f"/v1/datasets/{dataset['id']}", headers=alice)
    _assert_error(response, 409, "dataset_in_use", job["id"])
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
    etag = client.get(f"/v1/jobs/{job['id']}", headers=alice).headers["ETag"]
    assert client.delete(f"/v1/datasets/{dataset['id']}", headers=alice).status_code == 204
    # The job changed (no dataset any more): a dashboard's conditional GET gets the new body.
    after = client.get(f"/v1/jobs/{job['id']}", headers={**alice, "If-None-Match": etag})
    assert after.status_code == 200
    assert after.json()["dataset_id"] is None


# ----------------------------------------------------------------------------------------------
# uploads
# ----------------------------------------------------------------------------------------------


def _jpeg_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 32), (seed * 40 % 256, 80, 120)).save(buffer, format="JPEG")
    return buffer.getvalue()


CROPS = {f"crops/cam{i % 2 + 1}/img_{i}.jpg": _jpeg_bytes(i) for i in range(4)}


def _zip(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buffer.getvalue()


def _tar(
    members: dict[str, bytes],
    symlinks: dict[str, str] | None = None,
    hardlinks: dict[str, str] | None = None,
) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for kind, links in ((tarfile.SYMTYPE, symlinks), (tarfile.LNKTYPE, hardlinks)):
            for name, target in (links or {}).items():
                info = tarfile.TarInfo(name)
                info.type = kind
                info.linkname = target
                tf.addfile(info)
    return buffer.getvalue()


def _upload(
    client: TestClient, headers: Headers, data: bytes, name: str = "up", filename: str = "a.zip"
) -> Any:
    return client.post(
        "/v1/datasets",
        data={"name": name},
        files={"file": (filename, data, "application/octet-stream")},
        headers=headers,
    )


def _assert_nothing_kept(settings: Settings, *outside: Path) -> None:
    uploads = settings.upload_path
    assert sorted(p.name for p in uploads.iterdir()) == [".scratch"]
    assert list((uploads / ".scratch").iterdir()) == []
    for path in outside:
        assert not path.exists(), f"{path} was written"


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_upload_an_archive(
    client: TestClient, alice: Headers, settings: Settings, fmt: str
) -> None:
    data = _zip(CROPS) if fmt == "zip" else _tar(CROPS)
    response = _upload(client, alice, data, filename=f"crops.{fmt}")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["kind"] == "upload"
    assert body["image_count"] == 4
    assert body["size_bytes"] == sum(len(v) for v in CROPS.values())
    # The archive's single top folder becomes the dataset folder, under upload_dir/<id>.
    assert body["path"] == str(settings.upload_path / body["id"] / "crops")
    assert sorted(p.name for p in Path(body["path"]).iterdir()) == ["cam1", "cam2"]
    assert list((settings.upload_path / ".scratch").iterdir()) == []
    assert client.delete(f"/v1/datasets/{body['id']}", headers=alice).status_code == 204
    assert not (settings.upload_path / body["id"]).exists()


def test_upload_a_market_layout(client: TestClient, alice: Headers, tmp_path: Path) -> None:
    folder = write_market_folder(tmp_path / "m")
    members = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*.jpg")}
    body = _upload(client, alice, _tar(members), filename="m.tgz").json()
    assert body["format"] == "market_folder"
    assert body["identity_count"] == 2


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (lambda tmp: _zip({**CROPS, "../x": b"escaped"}), "'..'"),
        (lambda tmp: _tar({**CROPS, "../../../../escaped.txt": b"escaped"}), "'..'"),
        (lambda tmp: _zip({**CROPS, "crops/..\\..\\x": b"escaped"}), "'..'"),
        (lambda tmp: _zip({**CROPS, str(tmp / "abs.txt"): b"escaped"}), "absolute path"),
        (lambda tmp: _tar({**CROPS, str(tmp / "abs.txt"): b"escaped"}), "absolute path"),
        (lambda tmp: _zip(CROPS, links={"crops/link": str(tmp)}), "symbolic link"),
        (lambda tmp: _tar(CROPS, symlinks={"crops/link": "/etc/passwd"}), "symbolic link"),
        (lambda tmp: _tar(CROPS, hardlinks={"crops/hard": "/etc/passwd"}), "hard link"),
    ],
    ids=[
        "zip-dotdot",
        "tar-dotdot",
        "zip-backslash",
        "zip-abs",
        "tar-abs",
        "zip-sym",
        "tar-sym",
        "tar-hard",
    ],
)
def test_unsafe_archives_are_refused_before_extraction(
    client: TestClient,
    alice: Headers,
    settings: Settings,
    tmp_path: Path,
    build: Any,
    fragment: str,
) -> None:
    response = _upload(client, alice, build(tmp_path))
    _assert_error(response, 400, "unsafe_member", fragment)
    _assert_nothing_kept(
        settings, tmp_path / "abs.txt", tmp_path / "escaped.txt", settings.upload_path / "x"
    )
    assert client.get("/v1/datasets", headers=alice).json()["total"] == 0


def _damaged_zip() -> bytes:
    """A zip whose headers are fine but whose one member's deflate data are not."""
    name = "crops/cam1/img.jpg"
    data = bytearray(_zip({name: bytes(5000)}))
    start = 30 + len(name)  # the data follow the local header (30 bytes, the name, no extra)
    data[start : start + 8] = b"\xff" * 8  # a deflate block of the reserved type
    return bytes(data)


@pytest.mark.parametrize(
    ("build", "status", "code", "fragment"),
    [
        (lambda: _zip({**CROPS, "../x": b"escaped"}), 400, "unsafe_member", "'../x'"),
        (
            _damaged_zip,
            400,
            "corrupt_archive",
            "archive member 'crops/cam1/img.jpg' cannot be extracted: ",
        ),
        (
            lambda: _zip({"a": b"a file", "a/b.jpg": _jpeg_bytes(0)}),
            400,
            "corrupt_archive",
            "archive member 'a/b.jpg' cannot be extracted: ",
        ),
        (
            lambda: _zip({"notes/readme.txt": b"no image here"}),
            400,
            "invalid_dataset",
            "<archive>/notes holds no image",
        ),
        (
            lambda: _zip({"crops/x.jpg": b"garbage", "crops/y.jpg": b"garbage"}),
            400,
            "invalid_dataset",
            "dataset folder '<archive>/crops' holds no readable image (2 unreadable",
        ),
        (
            lambda: _tar(
                {
                    "m/bounding_box_train/0001_c1s1_000101_00.jpg": _jpeg_bytes(1),
                    "m/bounding_box_test/0001_c2s1_000101_00.jpg": _jpeg_bytes(2),
                }
            ),
            400,
            "invalid_dataset",
            "dataset root <archive>/m has no query",
        ),
    ],
    ids=["dotdot", "damaged-data", "file-and-folder", "no-image", "unreadable", "market-no-query"],
)
def test_upload_errors_name_no_server_folder(
    client: TestClient,
    alice: Headers,
    settings: Settings,
    build: Any,
    status: int,
    code: str,
    fragment: str,
) -> None:
    """The archive is extracted in upload_dir/.scratch/<random>/: a refusal names what is wrong
    inside the archive (<archive>/its/folder), never that server folder."""
    response = _upload(client, alice, build())
    _assert_error(response, status, code, fragment)
    message = response.json()["error"]["message"]
    for server_folder in (settings.upload_path, settings.data_dir, settings.jobs_path):
        assert str(server_folder) not in message
    assert ".scratch" not in message
    _assert_nothing_kept(settings)


def test_too_many_files(client: TestClient, alice: Headers, settings: Settings) -> None:
    members = {
        f"many/{i}.jpg": _jpeg_bytes(i) for i in range(settings.limits.max_archive_files + 1)
    }
    response = _upload(client, alice, _zip(members))
    _assert_error(response, 413, "archive_too_many_files", "more than 20 members")
    _assert_nothing_kept(settings)


def test_too_large_once_uncompressed(
    client: TestClient, alice: Headers, settings: Settings
) -> None:
    bomb = {**CROPS, "crops/zeros.bin": bytes(settings.limits.max_uncompressed_bytes)}
    data = _zip(bomb)
    assert len(data) < 20_000  # small on the wire, large on disk
    _assert_error(_upload(client, alice, data), 413, "archive_too_large", "uncompressed")
    _assert_nothing_kept(settings)


def test_upload_above_the_body_limit(
    client: TestClient, alice: Headers, settings: Settings
) -> None:
    data = os.urandom(settings.limits.max_upload_bytes + 1)
    _assert_error(_upload(client, alice, data), 413, "upload_too_large", "REID_LIMITS")
    _assert_nothing_kept(settings)


def test_not_an_archive(client: TestClient, alice: Headers, settings: Settings) -> None:
    _assert_error(_upload(client, alice, b"just text"), 400, "unsupported_archive", ".tar.gz")
    _assert_nothing_kept(settings)


def test_upload_form_fields_are_checked(
    client: TestClient, alice: Headers, settings: Settings
) -> None:
    no_file = client.post("/v1/datasets", data={"name": "x"}, files={}, headers=alice)
    assert no_file.status_code in (415, 422)
    missing_name = client.post(
        "/v1/datasets", files={"file": ("a.zip", _zip(CROPS), "application/zip")}, headers=alice
    )
    assert missing_name.status_code == 422
    assert missing_name.json()["error"]["details"][0]["field"] == "body.name"
    wrong_part = client.post(
        "/v1/datasets",
        data={"name": "x"},
        files={"archive": ("a.zip", _zip(CROPS), "application/zip")},
        headers=alice,
    )
    error = _error_of(wrong_part, 422)
    assert error["details"][0]["field"] == "body.file"
    assert "'archive'" in error["message"]
    _assert_nothing_kept(settings)
