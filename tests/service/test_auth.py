"""API keys on every /v1 route; another owner's ids look like ids that do not exist."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.app import create_app
from service.core.api_keys import hash_key, revoke_api_key
from service.core.db import session_scope
from service.core.models import ApiKey
from service.core.settings import Settings
from tests.service.conftest import Headers, make_settings


def _assert_401(response: Any, fragment: str) -> None:
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["code"] == "unauthorized"
    assert fragment in error["message"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/datasets"),
        ("POST", "/v1/datasets"),
        ("GET", "/v1/jobs"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs/00000000-0000-0000-0000-000000000000"),
        ("POST", "/v1/jobs/00000000-0000-0000-0000-000000000000/cancel"),
        ("GET", "/v1/config/defaults"),
    ],
)
def test_every_v1_route_needs_a_key(client: TestClient, method: str, path: str) -> None:
    _assert_401(client.request(method, path), "missing API key")


def test_probes_need_no_key(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_both_headers_work(client: TestClient, alice: Headers, bob: Headers) -> None:
    assert "Authorization" in alice and "X-API-Key" in bob
    assert client.get("/v1/datasets", headers=alice).status_code == 200
    assert client.get("/v1/datasets", headers=bob).status_code == 200


def test_wrong_key(client: TestClient, alice: Headers) -> None:
    _assert_401(client.get("/v1/jobs", headers={"X-API-Key": "reid_wrong"}), "invalid API key")
    token = alice["Authorization"].removeprefix("Bearer ")
    tampered = {"Authorization": f"Bearer {token[:-1]}{'A' if token[-1] != 'A' else 'B'}"}
    _assert_401(client.get("/v1/jobs", headers=tampered), "invalid API key")


def test_both_headers_must_name_the_same_key(
    client: TestClient, alice: Headers, bob: Headers
) -> None:
    token = alice["Authorization"].removeprefix("Bearer ")
    same = {**alice, "X-API-Key": token}
    assert client.get("/v1/jobs", headers=same).status_code == 200
    disagreeing = [
        {"Authorization": "Bearer reid_wrong", "X-API-Key": token},  # valid key, bad bearer
        {**alice, "X-API-Key": "reid_wrong"},  # valid bearer, bad key
        {**alice, **bob},  # two valid keys of two owners
        {**alice, "X-API-Key": ""},  # an empty key is not the bearer's
    ]
    for headers in disagreeing:
        _assert_401(
            client.get("/v1/jobs", headers=headers),
            "Authorization and X-API-Key name different keys; send one",
        )


@pytest.mark.parametrize(
    "authorization",
    ["Basic YWxpY2U6c2VjcmV0", "Bearer", "Bearer ", "reid_sometoken", "Token abc", ""],
    ids=["basic", "bearer-alone", "bearer-blank", "no-scheme", "other-scheme", "empty"],
)
def test_a_malformed_authorization_header_is_refused(
    client: TestClient, bob: Headers, authorization: str
) -> None:
    """HTTPBearer reads a header that is not ``Bearer <key>`` as no header: beside a valid
    X-API-Key, or alone, it is refused saying so (not accepted, not "missing")."""
    assert client.get("/v1/jobs", headers=bob).status_code == 200
    for headers in ({**bob, "Authorization": authorization}, {"Authorization": authorization}):
        _assert_401(
            client.get("/v1/jobs", headers=headers), "the Authorization header is malformed"
        )


def test_revoked_key(app: FastAPI, client: TestClient, alice: Headers) -> None:
    token = alice["Authorization"].removeprefix("Bearer ")
    with session_scope(app.state.session_factory) as session:
        key = session.execute(select(ApiKey).where(ApiKey.key_hash == hash_key(token))).scalar_one()
        revoke_api_key(session, key.prefix)
    _assert_401(client.get("/v1/jobs", headers=alice), "was revoked")


def test_the_token_is_never_stored(app: FastAPI, alice: Headers) -> None:
    token = alice["Authorization"].removeprefix("Bearer ")
    with session_scope(app.state.session_factory) as session:
        key = session.execute(select(ApiKey)).scalars().one()
        assert key.key_hash == hash_key(token)
        assert token not in (key.key_hash, key.prefix)
        assert token.startswith(key.prefix)


def test_foreign_ids_are_404(
    client: TestClient, alice: Headers, bob: Headers, dataset: dict[str, Any]
) -> None:
    job = client.post("/v1/jobs", json={"dataset_id": dataset["id"]}, headers=alice).json()
    for method, path in [
        ("GET", f"/v1/datasets/{dataset['id']}"),
        ("DELETE", f"/v1/datasets/{dataset['id']}"),
        ("GET", f"/v1/jobs/{job['id']}"),
        ("GET", f"/v1/jobs/{job['id']}/events"),
        ("POST", f"/v1/jobs/{job['id']}/cancel"),
    ]:
        response = client.request(method, path, headers=bob)
        assert response.status_code == 404, (method, path)
        assert response.json()["error"]["code"].endswith("_not_found")
    stolen = client.post("/v1/jobs", json={"dataset_id": dataset["id"]}, headers=bob)
    assert stolen.status_code == 404
    assert client.get("/v1/jobs", headers=bob).json()["total"] == 0
    assert client.get("/v1/datasets", headers=bob).json()["total"] == 0
    # ... and alice's job is untouched
    assert client.get(f"/v1/jobs/{job['id']}", headers=alice).json()["state"] == "QUEUED"


def test_admin_routes_are_off_without_a_token(client: TestClient) -> None:
    response = client.post("/v1/admin/keys", json={"owner": "carol"})
    assert response.status_code == 404
    assert "REID_ADMIN_TOKEN" in response.json()["error"]["message"]


def test_admin_routes_manage_keys(tmp_path: Path, settings: Settings) -> None:
    token = "an-admin-token-long-enough-1234"
    admin_settings = make_settings(tmp_path, settings.database_url, admin_token=token)
    with TestClient(create_app(admin_settings)) as client:
        admin = {"Authorization": f"Bearer {token}"}
        assert client.post("/v1/admin/keys", json={"owner": "carol"}).status_code == 401
        assert (
            client.post(
                "/v1/admin/keys", json={"owner": "carol"}, headers={"X-API-Key": token}
            ).status_code
            == 401
        )
        created = client.post("/v1/admin/keys", json={"owner": "carol"}, headers=admin)
        assert created.status_code == 201
        key = created.json()["key"]
        carol = {"Authorization": f"Bearer {key}"}
        assert client.get("/v1/jobs", headers=carol).status_code == 200
        listed = client.get("/v1/admin/keys", params={"owner": "carol"}, headers=admin).json()
        assert [k["prefix"] for k in listed] == [created.json()["prefix"]]
        assert "key" not in listed[0]
        revoked = client.post(f"/v1/admin/keys/{listed[0]['prefix']}/revoke", headers=admin)
        assert revoked.json()["revoked_at"] is not None
        assert client.get("/v1/jobs", headers=carol).status_code == 401
