"""Security checks the other service tests leave out, listed from the OpenAPI spec where they
concern every operation (so a new route is covered the day it is added):

* API keys: every ``/v1`` operation refuses a missing, wrong or revoked key, and keys in any
  place but the two documented headers; the admin operations refuse API keys.
* Owners: on every operation with a job or dataset id, another owner's id answers the same 404
  as an id that does not exist, and changes nothing; idempotency keys are per owner.
* Dataset paths the file system itself refuses (a NUL byte, a name too long, a symlink loop).
* Archives: no image inside, a member name too long, a zip whose header understates a member's
  size, too many folders; refused with nothing left behind.
* Config bounds not covered elsewhere: the image width, a config nested absurdly deep.
"""

from __future__ import annotations

import io
import struct
import tarfile
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import select

from service.app import create_app
from service.core.api_keys import hash_key, revoke_api_key
from service.core.db import session_scope
from service.core.models import ApiKey
from service.core.settings import Settings
from tests.service.conftest import Headers, TestClient, make_settings

ADMIN_TOKEN = "security-admin-token-0123456789"


def _operations(prefix: str) -> list[tuple[str, str]]:
    """(method, path template) of every operation in the spec whose path starts with ``prefix``."""
    spec = create_app(Settings(_env_file=None, database_url="sqlite://")).openapi()
    return [
        (method.upper(), path)
        for path, operations in spec["paths"].items()
        if path.startswith(prefix)
        for method in operations
    ]


V1_OPERATIONS = [op for op in _operations("/v1/") if not op[1].startswith("/v1/admin/")]
ADMIN_OPERATIONS = _operations("/v1/admin/")
ANY_ID = "00000000-0000-4000-8000-000000000000"


def _fill(path: str, **ids: str) -> str:
    """The path with its parameters: ``ids`` where given, else an id that exists nowhere."""
    for name in [part[1:-1] for part in path.split("/") if part.startswith("{")]:
        path = path.replace(f"{{{name}}}", ids.get(name, ANY_ID))
    return path


def _op_id(op: tuple[str, str]) -> str:
    return f"{op[0]} {op[1]}"


def _error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


# ----------------------------------------------------------------------------------------------
# API keys
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def revoked(app: FastAPI, make_key: Callable[[str], str]) -> Headers:
    token = make_key("mallory")
    with session_scope(app.state.session_factory) as session:
        key = session.execute(select(ApiKey).where(ApiKey.key_hash == hash_key(token))).scalar_one()
        revoke_api_key(session, key.prefix)
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("op", V1_OPERATIONS, ids=_op_id)
def test_every_v1_operation_refuses_missing_wrong_and_revoked_keys(
    client: TestClient, revoked: Headers, op: tuple[str, str]
) -> None:
    method, path = op
    for headers, fragment in [
        ({}, "missing API key"),
        ({"X-API-Key": "reid_" + uuid.uuid4().hex}, "invalid API key"),
        (revoked, "was revoked"),
    ]:
        response = client.request(method, _fill(path), headers=headers)
        error = _error(response, 401)
        assert error["code"] == "unauthorized"
        assert fragment in error["message"]
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("place", "fragment"),
    [
        ("basic scheme", "the Authorization header is malformed"),
        ("no scheme", "the Authorization header is malformed"),
        ("query string", "missing API key"),
        ("cookie", "missing API key"),
    ],
)
def test_a_key_counts_only_in_the_documented_headers(
    client: TestClient, alice: Headers, place: str, fragment: str
) -> None:
    token = alice["Authorization"].removeprefix("Bearer ")
    request: dict[str, Any] = {
        "basic scheme": {"headers": {"Authorization": f"Basic {token}"}},
        "no scheme": {"headers": {"Authorization": token}},
        "query string": {"params": {"api_key": token, "key": token}},
        "cookie": {"headers": {"Cookie": f"X-API-Key={token}; api_key={token}"}},
    }[place]
    error = _error(client.get("/v1/jobs", **request), 401)
    assert fragment in error["message"]


@pytest.fixture
def admin_client(tmp_path: Path, settings: Settings) -> Iterator[TestClient]:
    with TestClient(
        create_app(make_settings(tmp_path, settings.database_url, admin_token=ADMIN_TOKEN))
    ) as client:
        yield client


@pytest.mark.parametrize("op", ADMIN_OPERATIONS, ids=_op_id)
def test_admin_operations_refuse_api_keys(
    admin_client: TestClient, alice: Headers, op: tuple[str, str]
) -> None:
    method, path = op
    token = alice["Authorization"].removeprefix("Bearer ")
    for headers in [{}, alice, {"X-API-Key": token}, {"X-API-Key": ADMIN_TOKEN}]:
        response = admin_client.request(method, _fill(path, prefix="reid_x"), headers=headers)
        assert _error(response, 401)["code"] == "unauthorized", headers
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert admin_client.get("/v1/admin/keys", headers=admin).status_code == 200
    assert _error(admin_client.get("/v1/jobs", headers=admin), 401)["code"] == "unauthorized"


# ----------------------------------------------------------------------------------------------
# owners
# ----------------------------------------------------------------------------------------------

ID_OPERATIONS = [op for op in V1_OPERATIONS if "{job_id}" in op[1] or "{dataset_id}" in op[1]]


def test_the_owner_checks_cover_jobs_and_datasets() -> None:
    paths = {path for _, path in ID_OPERATIONS}
    assert {"/v1/jobs/{job_id}/logs", "/v1/jobs/{job_id}/metrics"} <= paths
    assert "/v1/datasets/{dataset_id}" in paths


@pytest.mark.parametrize("op", ID_OPERATIONS, ids=_op_id)
def test_another_owners_ids_look_like_ids_that_do_not_exist(
    client: TestClient, alice: Headers, bob: Headers, dataset: dict[str, Any], op: tuple[str, str]
) -> None:
    job = client.post("/v1/jobs", json={"dataset_id": dataset["id"]}, headers=alice).json()
    before = client.get(f"/v1/jobs/{job['id']}/events", headers=alice).json()
    method, path = op
    ids = {"job_id": job["id"], "dataset_id": dataset["id"]}

    theirs = client.request(method, _fill(path, **ids), headers=bob)
    missing = client.request(method, _fill(path), headers=bob)

    error = _error(theirs, 404)  # never 403: nothing says the id exists
    assert error["code"].endswith("_not_found")
    nowhere = _error(missing, 404)
    assert error["code"] == nowhere["code"]
    used = job["id"] if "{job_id}" in path else dataset["id"]
    assert error["message"].replace(used, ANY_ID) == nowhere["message"]
    # ... and alice's job and dataset are as they were
    assert client.get(f"/v1/jobs/{job['id']}/events", headers=alice).json() == before
    assert client.get(f"/v1/datasets/{dataset['id']}", headers=alice).status_code == 200


def test_idempotency_keys_are_per_owner(
    client: TestClient,
    alice: Headers,
    bob: Headers,
    dataset: dict[str, Any],
    image_folder: Path,
) -> None:
    theirs = client.post(
        "/v1/datasets", json={"name": "bobs", "path": str(image_folder)}, headers=bob
    ).json()
    first = client.post(
        "/v1/jobs", json={"dataset_id": dataset["id"], "idempotency_key": "k"}, headers=alice
    )
    second = client.post(
        "/v1/jobs", json={"dataset_id": theirs["id"], "idempotency_key": "k"}, headers=bob
    )
    assert (first.status_code, second.status_code) == (201, 201)
    assert second.json()["id"] != first.json()["id"]
    assert second.json()["dataset_id"] == theirs["id"]
    # Bob repeating alice's exact request gets a 404 for her dataset, not her job.
    replay = client.post(
        "/v1/jobs", json={"dataset_id": dataset["id"], "idempotency_key": "k2"}, headers=bob
    )
    assert _error(replay, 404)["code"] == "dataset_not_found"


# ----------------------------------------------------------------------------------------------
# dataset paths the file system refuses
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_path",
    [
        lambda root: f"{root}/crops\x00/cam1",
        lambda root: f"{root}/{'x' * 300}",
        lambda root: str(root / "loop"),
    ],
    ids=["nul-byte", "name-too-long", "symlink-loop"],
)
def test_dataset_paths_the_file_system_refuses_are_400(
    client: TestClient, alice: Headers, dataset_root: Path, make_path: Callable[[Path], str]
) -> None:
    (dataset_root / "loop").symlink_to(dataset_root / "loop")
    path = make_path(dataset_root)
    response = client.post("/v1/datasets", json={"name": "d", "path": path}, headers=alice)
    error = _error(response, 400)
    assert error["code"] == "invalid_dataset_path"
    assert repr(path) in error["message"]
    assert client.get("/v1/datasets", headers=alice).json()["total"] == 0


# ----------------------------------------------------------------------------------------------
# archives
# ----------------------------------------------------------------------------------------------


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def _understating_zip(name: str, data: bytes, declared: int) -> bytes:
    """A zip whose headers say ``name`` holds ``declared`` bytes; it holds ``data``."""
    raw = bytearray(_zip({name: data}))
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = raw.index(signature) + offset  # uncompressed size, local and central headers
        raw[at : at + 4] = struct.pack("<I", declared)
    return bytes(raw)


def _tar_of_folders(folders: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tf:
        for i in range(folders):
            info = tarfile.TarInfo(f"top/d{i}")
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
        info = tarfile.TarInfo("top/a.jpg")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    return buffer.getvalue()


def _upload(client: TestClient, headers: Headers, data: bytes) -> Any:
    return client.post(
        "/v1/datasets",
        data={"name": "up"},
        files={"file": ("a.zip", data, "application/octet-stream")},
        headers=headers,
    )


@pytest.mark.parametrize(
    ("build", "status", "code"),
    [
        (
            lambda s: _zip({"top/readme.txt": b"hello", "top/fake.jpg": b"not an image"}),
            400,
            "invalid_dataset",
        ),
        (lambda s: _zip({"top/" + "n" * 300 + ".jpg": b"x"}), 400, "corrupt_archive"),
        (
            lambda s: _understating_zip("top/a.jpg", bytes(50_000), declared=10),
            400,
            "corrupt_archive",
        ),
        (lambda s: _tar_of_folders(s.limits.max_archive_files), 413, "archive_too_many_files"),
    ],
    ids=["no-image", "name-too-long", "understated-size", "too-many-folders"],
)
def test_bad_archives_are_refused_and_leave_nothing(
    client: TestClient,
    alice: Headers,
    settings: Settings,
    build: Callable[[Settings], bytes],
    status: int,
    code: str,
) -> None:
    response = _upload(client, alice, build(settings))
    assert _error(response, status)["code"] == code
    uploads = settings.upload_path
    assert sorted(p.name for p in uploads.iterdir()) == [".scratch"]
    assert list((uploads / ".scratch").iterdir()) == []
    assert client.get("/v1/datasets", headers=alice).json()["total"] == 0


# ----------------------------------------------------------------------------------------------
# config bounds
# ----------------------------------------------------------------------------------------------


def test_the_image_width_is_bounded(
    client: TestClient, alice: Headers, dataset: dict[str, Any], settings: Settings
) -> None:
    limit = settings.job_bounds.max_image_width
    response = client.post(
        "/v1/jobs",
        json={"dataset_id": dataset["id"], "config": {"data.width": limit + 16}},
        headers=alice,
    )
    error = _error(response, 422)
    assert error["details"][0]["field"] == "body.config.data.width"
    expected = f"config.data.width={limit + 16} is above this service's limit of {limit}"
    assert expected in error["message"]


def test_a_config_nested_absurdly_deep_is_422(
    client: TestClient, alice: Headers, dataset: dict[str, Any]
) -> None:
    config: dict[str, Any] = {}
    level = config
    for _ in range(400):
        level["x"] = {}
        level = level["x"]
    response = client.post(
        "/v1/jobs", json={"dataset_id": dataset["id"], "config": config}, headers=alice
    )
    error = _error(response, 422)
    assert error["details"][0]["field"].startswith("body.config")
    assert client.get("/v1/jobs", headers=alice).json()["total"] == 0
