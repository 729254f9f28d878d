"""What dashboards poll, made cheap and kept correct: ETags from row versions (every visible
change of a job gives a new one, and a 304 reads one integer or, from the row-version cache,
nothing), API keys from the in-process cache (revocation within its TTL), list summaries, keyset
pagination and the bounded count."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio.to_thread
import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel, SecretStr
from sqlalchemy import create_engine, event, select, update

from service.api.body_cache import BodyCache
from service.api.conditional import SharedReads
from service.api.schemas import JobOut, JobSummary, Page
from service.app import create_app
from service.core import jobs, owned
from service.core.api_keys import KeyCache, create_api_key, revoke_api_key
from service.core.broker import mark_dispatched
from service.core.db import session_scope
from service.core.job_states import change_state, lock_job
from service.core.models import ApiKey, Gallery, GalleryState, Job, JobState
from service.core.row_versions import OwnedRow, RowVersionCache
from service.core.settings import Settings
from service.core.ttl_cache import TtlCache
from tests.service.conftest import Headers

ADMIN_TOKEN = "polling-admin-token-0123456789"

T = TypeVar("T")


def _submit(client: TestClient, headers: Headers, dataset_id: str) -> dict[str, Any]:
    response = client.post("/v1/jobs", json={"dataset_id": dataset_id}, headers=headers)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def _set(app: FastAPI, job_id: str, **values: Any) -> None:
    """What the supervisor does on a tick: lock the row, set attributes, commit."""
    with session_scope(app.state.session_factory) as session:
        job = lock_job(session, uuid.UUID(job_id))
        assert job is not None
        for name, value in values.items():
            setattr(job, name, value)


def _add_gallery(
    app: FastAPI,
    owner: str = "alice",
    state: GalleryState = GalleryState.BUILDING,
    dataset_id: uuid.UUID | None = None,
) -> uuid.UUID:
    """A gallery row as a worker would leave it (no build runs)."""
    with session_scope(app.state.session_factory) as session:
        gallery = Gallery(
            owner=owner,
            dataset_id=dataset_id,
            dataset_path="/nowhere",
            dataset_format="image_folder",
            model_name="m",
            model_version="1",
            state=state,
        )
        session.add(gallery)
        session.flush()
        return gallery.id


@contextmanager
def _statements(app: FastAPI) -> Iterator[list[str]]:
    """The SQL statements the app sends while the block runs."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    event.listen(app.state.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(app.state.engine, "before_cursor_execute", record)


def _run_async(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """``main()`` run to its end on an event loop of its own, in a thread of its own: in a full
    run the browser tests' session-wide Playwright keeps an event loop running in this one,
    where ``asyncio.run`` refuses to start."""
    with ThreadPoolExecutor(max_workers=1) as runner:
        return runner.submit(asyncio.run, main()).result()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _row_versions_on(app: FastAPI, ttl_s: float) -> FakeClock:
    """Give ``app`` a row-version cache of ``ttl_s`` seconds on a clock the test moves,
    watching the app's sessions as :func:`service.app.create_app` does."""
    clock = FakeClock()
    versions = RowVersionCache(ttl_s, clock=clock)
    versions.watch(app.state.session_factory)
    app.state.row_versions = versions
    return clock


# ----------------------------------------------------------------------------------------------
# a job's ETag
# ----------------------------------------------------------------------------------------------

#: Every column of a job that a worker or the service changes after submission, and a new value.
CHANGES: list[tuple[str, Any]] = [
    ("reason", "trainer started on w1"),
    ("progress", 0.25),
    ("epoch", 3),
    ("step", 120),
    ("metrics", {"eval": {"mAP": 12.5}, "epochs": 10}),
    ("warnings", ["MLflow unreachable for 30 s"]),
    ("heartbeat_at", datetime(2026, 12, 4, 12, 0, tzinfo=UTC)),
    ("worker_id", "worker-7"),
    ("mlflow_run_id", "0123456789abcdef"),
    ("model_name", "alice-street-cams"),
    ("model_version", "4"),
    ("cancel_requested", True),
    ("retries", 1),
    ("restarts", 1),
    ("started_at", datetime(2026, 12, 4, 12, 0, tzinfo=UTC)),
    ("finished_at", datetime(2026, 12, 4, 13, 0, tzinfo=UTC)),
]


@pytest.mark.parametrize(("field", "value"), CHANGES, ids=[c[0] for c in CHANGES])
def test_every_visible_change_gives_a_new_etag(
    app: FastAPI,
    client: TestClient,
    alice: Headers,
    dataset: dict[str, Any],
    field: str,
    value: Any,
) -> None:
    job = _submit(client, alice, dataset["id"])
    url = f"/v1/jobs/{job['id']}"
    etag = client.get(url, headers=alice).headers["etag"]
    assert client.get(url, headers={**alice, "If-None-Match": etag}).status_code == 304
    _set(app, job["id"], **{field: value})
    changed = client.get(url, headers={**alice, "If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.headers["etag"] != etag
    shown = changed.json()[field]
    if isinstance(value, datetime):
        assert datetime.fromisoformat(shown) == value
    elif field == "metrics":
        assert (shown["eval"], shown["epochs"]) == (value["eval"], value["epochs"])
    else:
        assert shown == value


def test_state_changes_and_core_updates_give_new_etags(
    app: FastAPI, client: TestClient, alice: Headers, dataset: dict[str, Any]
) -> None:
    job = _submit(client, alice, dataset["id"])
    url = f"/v1/jobs/{job['id']}"
    seen = {client.get(url, headers=alice).headers["etag"]}
    # a state change (the worker's path) ...
    with session_scope(app.state.session_factory) as session:
        row = lock_job(session, uuid.UUID(job["id"]))
        assert row is not None
        change_state(session, row, JobState.STARTING, "claimed")
    seen.add(client.get(url, headers=alice).headers["etag"])
    # ... and a Core UPDATE that the ORM does not see (the dispatcher's send record)
    with session_scope(app.state.session_factory) as session:
        session.execute(
            update(Job).where(Job.id == uuid.UUID(job["id"])).values(state=JobState.QUEUED)
        )
    with session_scope(app.state.session_factory) as session:
        assert mark_dispatched(session, uuid.UUID(job["id"])) is not None
    seen.add(client.get(url, headers=alice).headers["etag"])
    assert len(seen) == 3


def test_an_unchanged_row_keeps_its_etag(
    app: FastAPI, client: TestClient, alice: Headers, dataset: dict[str, Any]
) -> None:
    """Setting a value the row already has is no change: no new version, no new ETag; the
    POST's ETag is GET's."""
    created = client.post("/v1/jobs", json={"dataset_id": dataset["id"]}, headers=alice)
    url = f"/v1/jobs/{created.json()['id']}"
    assert client.get(url, headers=alice).headers["etag"] == created.headers["etag"]
    _set(app, created.json()["id"], progress=0.0, epoch=None)
    assert client.get(url, headers=alice).headers["etag"] == created.headers["etag"]


def test_a_304_reads_one_integer_and_no_key(
    app: FastAPI, client: TestClient, alice: Headers, dataset: dict[str, Any]
) -> None:
    """Once the version the cache kept has expired (a poll every 2 s outlives 0.5 s), a 304
    reads the row's owner and version alone."""
    clock = _row_versions_on(app, ttl_s=1.0)
    job = _submit(client, alice, dataset["id"])
    url = f"/v1/jobs/{job['id']}"
    etag = client.get(url, headers=alice).headers["etag"]  # the key is verified (and kept)
    clock.now += 1.0
    with _statements(app) as seen:
        assert client.get(url, headers={**alice, "If-None-Match": etag}).status_code == 304
    assert len(seen) == 1, seen
    assert "api_keys" not in seen[0] and "resolved_config" not in seen[0]
    assert "jobs.version" in seen[0]


def test_the_etag_follows_the_representation(
    settings: Settings, client: TestClient, alice: Headers, dataset: dict[str, Any]
) -> None:
    """The same row served with another MLflow UI address (which enters the body's
    ``mlflow_run_url``) is another representation: its ETag differs."""
    url = f"/v1/jobs/{_submit(client, alice, dataset['id'])['id']}"
    mlflow = settings.mlflow.model_copy(update={"ui_url": "http://mlflow.example:5000"})
    other = create_app(settings.model_copy(update={"mlflow": mlflow}))
    with TestClient(other) as second:
        assert (
            second.get(url, headers=alice).headers["etag"]
            != client.get(url, headers=alice).headers["etag"]
        )


def test_gallery_etag_and_304(app: FastAPI, client: TestClient, alice: Headers) -> None:
    gallery_id = _add_gallery(app)
    url = f"/v1/galleries/{gallery_id}"
    first = client.get(url, headers=alice)
    assert first.status_code == 200, first.text
    etag = first.headers["etag"]
    assert client.get(url, headers={**alice, "If-None-Match": etag}).status_code == 304
    with session_scope(app.state.session_factory) as session:
        session.execute(update(Gallery).where(Gallery.id == gallery_id).values(images_done=5))
    changed = client.get(url, headers={**alice, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.json()["images_done"] == 5
    assert changed.headers["etag"] != etag
    assert client.get(url, headers={"X-API-Key": "reid_nobody"}).status_code == 401


# ----------------------------------------------------------------------------------------------
# lists
# ----------------------------------------------------------------------------------------------


def test_list_items_are_summaries_unless_full(
    client: TestClient, alice: Headers, dataset: dict[str, Any]
) -> None:
    job = _submit(client, alice, dataset["id"])
    summary = client.get("/v1/jobs", headers=alice).json()["items"][0]
    assert summary["id"] == job["id"] and summary["state"] == "QUEUED"
    assert "resolved_config" not in summary and "config_overrides" not in summary
    full = client.get("/v1/jobs", params={"view": "full"}, headers=alice).json()["items"][0]
    assert full == client.get(f"/v1/jobs/{job['id']}", headers=alice).json()
    bad = client.get("/v1/jobs", params={"view": "everything"}, headers=alice)
    assert bad.status_code == 422 and bad.json()["error"]["details"][0]["field"] == "query.view"


def test_keyset_pages_walk_the_same_list_as_offsets(
    client: TestClient, alice: Headers, dataset: dict[str, Any]
) -> None:
    ids = [_submit(client, alice, dataset["id"])["id"] for _ in range(5)]
    newest_first = ids[::-1]
    walked: list[str] = []
    after: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"after": after} if after else {})}
        page = client.get("/v1/jobs", params=params, headers=alice).json()
        assert page["total"] == 5 and page["total_exact"] is True
        walked += [j["id"] for j in page["items"]]
        after = page["next_after"]
        if after is None:
            break
    assert walked == newest_first
    # a job submitted while walking does not shift the next page (it would with offsets)
    first = client.get("/v1/jobs", params={"limit": 2}, headers=alice).json()
    _submit(client, alice, dataset["id"])
    second = client.get(
        "/v1/jobs", params={"limit": 2, "after": first["next_after"]}, headers=alice
    ).json()
    assert [j["id"] for j in second["items"]] == newest_first[2:4]
    # the cursor and an offset together: skip that many after the cursor
    skipped = client.get(
        "/v1/jobs", params={"limit": 2, "after": first["next_after"], "offset": 1}, headers=alice
    ).json()
    assert [j["id"] for j in skipped["items"]] == newest_first[3:5]


@pytest.mark.parametrize("cursor", ["nonsense", "bm90IGEgY3Vyc29y", "MjAyNi0xMi0wNHxub3QtYS11dWlk"])
def test_a_bad_cursor_is_a_422_naming_it(client: TestClient, alice: Headers, cursor: str) -> None:
    for path in ("/v1/jobs", "/v1/datasets", "/v1/galleries"):
        response = client.get(path, params={"after": cursor}, headers=alice)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert cursor in error["message"] and error["details"][0]["field"] == "query.after"


def test_the_count_stops_at_its_limit(
    client: TestClient, alice: Headers, dataset: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for _ in range(4):
        _submit(client, alice, dataset["id"])
    monkeypatch.setattr(owned, "COUNT_LIMIT", 3)
    page = client.get("/v1/jobs", params={"limit": 2}, headers=alice).json()
    assert (page["total"], page["total_exact"], len(page["items"])) == (3, False, 2)
    monkeypatch.setattr(owned, "COUNT_LIMIT", 4)
    page = client.get("/v1/jobs", params={"limit": 2}, headers=alice).json()
    assert (page["total"], page["total_exact"]) == (4, True)


def test_list_etag_changes_with_any_job_on_the_page(
    app: FastAPI, client: TestClient, alice: Headers, dataset: dict[str, Any]
) -> None:
    old = _submit(client, alice, dataset["id"])
    first = client.get("/v1/jobs", headers=alice)
    etag = first.headers["etag"]
    assert etag.startswith('W/"')
    assert client.get("/v1/jobs", headers={**alice, "If-None-Match": etag}).status_code == 304
    # another view or filter of the same rows is another page
    full = client.get("/v1/jobs", params={"view": "full"}, headers=alice).headers["etag"]
    assert full != etag
    _set(app, old["id"], progress=0.5)
    moved = client.get("/v1/jobs", headers={**alice, "If-None-Match": etag})
    assert moved.status_code == 200 and moved.headers["etag"] != etag
    etag = moved.headers["etag"]
    _submit(client, alice, dataset["id"])
    grown = client.get("/v1/jobs", headers={**alice, "If-None-Match": etag})
    assert grown.status_code == 200 and grown.json()["total"] == 2


# ----------------------------------------------------------------------------------------------
# API keys from the cache
# ----------------------------------------------------------------------------------------------


def _revoke_elsewhere(app: FastAPI, owner: str) -> None:
    """What ``python -m service revoke-key`` or another API process does: the database only."""
    with session_scope(app.state.session_factory) as session:
        key = session.execute(select(ApiKey).where(ApiKey.owner == owner)).scalar_one()
        revoke_api_key(session, key.prefix)


def test_a_key_revoked_elsewhere_is_refused_within_the_ttl(
    app: FastAPI, client: TestClient, alice: Headers
) -> None:
    clock = FakeClock()
    app.state.key_cache = KeyCache(ttl_s=10, clock=clock)
    assert client.get("/v1/jobs", headers=alice).status_code == 200
    _revoke_elsewhere(app, "alice")
    clock.now += 9.5  # still trusted: the cache's promise is "within the TTL"
    assert client.get("/v1/jobs", headers=alice).status_code == 200
    clock.now += 1.0
    refused = client.get("/v1/jobs", headers=alice)
    assert refused.status_code == 401 and "was revoked" in refused.json()["error"]["message"]


def test_ttl_zero_checks_every_request(app: FastAPI, client: TestClient, alice: Headers) -> None:
    app.state.key_cache = KeyCache(ttl_s=0)
    assert client.get("/v1/jobs", headers=alice).status_code == 200
    _revoke_elsewhere(app, "alice")
    assert client.get("/v1/jobs", headers=alice).status_code == 401


def test_a_key_revoked_through_this_process_is_refused_at_once(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"admin_token": SecretStr(ADMIN_TOKEN)}))
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with TestClient(app) as client:
        created = client.post("/v1/admin/keys", json={"owner": "carol"}, headers=admin).json()
        carol = {"X-API-Key": created["key"]}
        assert client.get("/v1/jobs", headers=carol).status_code == 200  # now cached
        revoked = client.post(f"/v1/admin/keys/{created['prefix']}/revoke", headers=admin)
        assert revoked.status_code == 200, revoked.text
        assert client.get("/v1/jobs", headers=carol).status_code == 401


def test_the_cache_does_not_keep_unknown_tokens_and_stays_bounded(app: FastAPI) -> None:
    cache = KeyCache(ttl_s=60, max_entries=2)
    tokens = []
    for owner in ("a", "b", "c"):
        with session_scope(app.state.session_factory) as session:
            tokens.append(create_api_key(session, owner)[1])
    factory = app.state.session_factory
    assert cache.lookup("reid_" + uuid.uuid4().hex, factory) is None
    known = [cache.lookup(t, factory) for t in tokens]
    assert [k.owner for k in known if k is not None] == ["a", "b", "c"]
    assert len(cache._entries) == 2  # the oldest ("a") went first


# ----------------------------------------------------------------------------------------------
# row versions from the cache
# ----------------------------------------------------------------------------------------------


def _kept(client: TestClient, app: FastAPI, url: str, headers: Headers) -> str:
    """Read the row in full (which keeps its version), then check that a poll with its ETag is
    a 304 without a single SQL statement; returns the ETag."""
    etag: str = client.get(url, headers=headers).headers["etag"]
    with _statements(app) as seen:
        assert client.get(url, headers={**headers, "If-None-Match": etag}).status_code == 304
    assert seen == []
    return etag


def _shows_a_change(client: TestClient, url: str, headers: Headers, etag: str) -> dict[str, Any]:
    changed = client.get(url, headers={**headers, "If-None-Match": etag})
    assert changed.status_code == 200, changed.text
    assert changed.headers["etag"] != etag
    body: dict[str, Any] = changed.json()
    return body


def test_a_cached_304_makes_no_sql(
    app: FastAPI, client: TestClient, alice: Headers, dataset: dict[str, Any]
) -> None:
    """The default cache (create_app's, 0.5 s): a poll right after the full answer, for a job
    and for a gallery."""
    job = _submit(client, alice, dataset["id"])
    _kept(client, app, f"/v1/jobs/{job['id']}", alice)
    _kept(client, app, f"/v1/galleries/{_add_gallery(app)}", alice)


def test_a_change_by_another_process_shows_once_the_entry_expires(
    app: FastAPI, settings: Settings, client: TestClient, alice: Headers, dataset: dict[str, Any]
) -> None:
    clock = _row_versions_on(app, ttl_s=1.0)
    job = _submit(client, alice, dataset["id"])
    url = f"/v1/jobs/{job['id']}"
    etag = _kept(client, app, url, alice)
    # the worker's supervisor: another process, its own engine, a Core UPDATE (version + 1)
    worker = create_engine(settings.database_url)
    try:
        with worker.begin() as connection:
            connection.execute(
                update(Job).where(Job.id == uuid.UUID(job["id"])).values(progress=0.5)
            )
    finally:
        worker.dispose()
    clock.now += 0.5
    with _statements(app) as seen:  # still trusted: the staleness the cache documents
        assert client.get(url, headers={**alice, "If-None-Match": etag}).status_code == 304
    assert seen == []
    clock.now += 0.5  # a full TTL after the read that kept the version
    assert _shows_a_change(client, url, alice, etag)["progress"] == 0.5
    _kept(client, app, url, alice)  # the full answer kept the new version


def test_this_process_changes_to_a_job_show_at_once(
    app: FastAPI, client: TestClient, alice: Headers, dataset: dict[str, Any]
) -> None:
    """Every write the API makes to a job drops its entry when it commits, however long the
    entry would still be trusted (60 s here, the clock never moves)."""
    _row_versions_on(app, ttl_s=60)
    job = _submit(client, alice, dataset["id"])
    job_id = uuid.UUID(job["id"])
    url = f"/v1/jobs/{job_id}"

    etag = _kept(client, app, url, alice)
    with session_scope(app.state.session_factory) as session:  # a send recorded (a Core UPDATE)
        assert mark_dispatched(session, job_id) is not None
    _shows_a_change(client, url, alice, etag)

    etag = _kept(client, app, url, alice)
    assert client.post(f"{url}/cancel", headers=alice).status_code == 200
    assert _shows_a_change(client, url, alice, etag)["state"] == "CANCELLED"

    etag = _kept(client, app, url, alice)
    assert client.post(f"{url}/retry", headers=alice).status_code == 202
    assert _shows_a_change(client, url, alice, etag)["state"] == "RETRYING"

    etag = _kept(client, app, url, alice)
    _set(app, job["id"], progress=0.75)  # an ORM change through the app's sessions
    assert _shows_a_change(client, url, alice, etag)["progress"] == 0.75


def test_this_process_changes_to_a_gallery_show_at_once(
    app: FastAPI, client: TestClient, alice: Headers, dataset: dict[str, Any]
) -> None:
    _row_versions_on(app, ttl_s=60)
    gallery_id = _add_gallery(app, state=GalleryState.FAILED, dataset_id=uuid.UUID(dataset["id"]))
    url = f"/v1/galleries/{gallery_id}"

    etag = _kept(client, app, url, alice)
    assert client.post(f"{url}/retry", headers=alice).status_code == 202
    _shows_a_change(client, url, alice, etag)

    etag = _kept(client, app, url, alice)
    assert client.delete(url, headers=alice).status_code == 204
    gone = client.get(url, headers={**alice, "If-None-Match": etag})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "gallery_not_found"


def test_a_statement_drops_the_rows_its_where_names_or_every_row_of_its_table(
    app: FastAPI, client: TestClient, alice: Headers, dataset: dict[str, Any]
) -> None:
    _row_versions_on(app, ttl_s=60)
    first, second = (f"/v1/jobs/{_submit(client, alice, dataset['id'])['id']}" for _ in range(2))
    gallery = f"/v1/galleries/{_add_gallery(app)}"
    etags = {url: _kept(client, app, url, alice) for url in (first, second, gallery)}

    first_id = uuid.UUID(first.rsplit("/", 1)[1])
    with session_scope(app.state.session_factory) as session:
        session.execute(update(Job).where(Job.id.in_([first_id])).values(priority=1))
    _shows_a_change(client, first, alice, etags[first])
    etags[first] = _kept(client, app, first, alice)
    _kept(client, app, second, alice)  # another id: still kept

    with session_scope(app.state.session_factory) as session:  # no id named: any job may change
        session.execute(update(Job).values(priority=2))
    for url in (first, second):
        _shows_a_change(client, url, alice, etags[url])
    _kept(client, app, gallery, alice)  # another table


def test_another_owner_gets_the_404_of_an_unknown_id(
    app: FastAPI, client: TestClient, alice: Headers, bob: Headers, dataset: dict[str, Any]
) -> None:
    """The owner is checked against the cached one: bob learns nothing from alice's kept
    version, not even with ``If-None-Match: *`` (which matches any version)."""
    job_id = _submit(client, alice, dataset["id"])["id"]
    url = f"/v1/jobs/{job_id}"
    etag = _kept(client, app, url, alice)
    answers = {}
    for condition in (etag, "*"):
        with _statements(app) as seen:  # bob's key is read, alice's job is not
            answers[condition] = client.get(url, headers={**bob, "If-None-Match": condition})
        assert answers[condition].status_code == 404
        assert not [statement for statement in seen if "jobs" in statement], seen
    app.state.row_versions = RowVersionCache(ttl_s=0)  # from the database, as before the cache
    uncached = client.get(url, headers={**bob, "If-None-Match": etag})
    assert answers[etag].json() == answers["*"].json() == uncached.json()
    unknown_id = uuid.uuid4()
    unknown = client.get(f"/v1/jobs/{unknown_id}", headers={**bob, "If-None-Match": "*"})
    assert uncached.status_code == unknown.status_code == 404
    assert uncached.json()["error"]["code"] == unknown.json()["error"]["code"]
    assert uncached.json()["error"]["message"].replace(job_id, "<id>") == unknown.json()["error"][
        "message"
    ].replace(str(unknown_id), "<id>")


def test_ttl_zero_reads_the_version_on_every_poll(
    settings: Settings, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REID_VERSION_CACHE_SECONDS", "0")
    uncached = Settings(_env_file=None, **settings.model_dump(exclude={"version_cache_seconds"}))
    assert uncached.version_cache_seconds == 0
    app = create_app(uncached)
    with TestClient(app) as client:
        with session_scope(app.state.session_factory) as session:
            alice = {"X-API-Key": create_api_key(session, "alice")[1]}
        url = f"/v1/galleries/{_add_gallery(app)}"
        etag = client.get(url, headers=alice).headers["etag"]
        for _ in range(2):
            with _statements(app) as seen:
                assert client.get(url, headers={**alice, "If-None-Match": etag}).status_code == 304
            assert len(seen) == 1 and "galleries.version" in seen[0], seen
        assert len(app.state.row_versions) == 0


def test_the_row_version_cache_stays_bounded(app: FastAPI) -> None:
    versions = RowVersionCache(ttl_s=60, max_entries=2, clock=FakeClock())
    rows = [OwnedRow(Gallery, _add_gallery(app), "alice") for _ in range(3)]
    with app.state.session_factory() as session:
        assert [versions.read_entry(session, row) for row in rows] == [("alice", 1)] * 3
    assert len(versions) == 2
    assert [versions.peek(row) for row in rows] == [None, 1, 1]  # the first kept went first


def test_requests_of_one_key_share_the_read_under_way() -> None:
    """One read per key while it runs: its result (or its error) for every request that came
    meanwhile; a waiter that goes away cancels its wait, not the read; the next request after
    it reads again."""
    calls: list[str] = []
    release = threading.Event()

    def slow(value: str) -> Callable[[], str]:
        def read() -> str:
            calls.append(value)
            release.wait(10)
            if value == "boom":
                raise RuntimeError("the database went away")
            return value

        return read

    async def scenario() -> None:
        reads: SharedReads[str] = SharedReads(threads)
        shared = [asyncio.create_task(reads.read("a", slow(f"a{i}"))) for i in range(5)]
        other = asyncio.create_task(reads.read("b", slow("b")))
        failing = [asyncio.create_task(reads.read("c", slow("boom"))) for _ in range(2)]
        await asyncio.sleep(0.1)
        shared[0].cancel()  # a client that went away
        await asyncio.sleep(0.1)
        assert sorted(calls) == ["a0", "b", "boom"] and len(reads) == 3
        release.set()
        assert await asyncio.gather(*shared[1:]) == ["a0"] * 4
        assert await other == "b"
        for task in failing:
            with pytest.raises(RuntimeError, match="database went away"):
                await task
        assert shared[0].cancelled() and len(reads) == 0
        assert await reads.read("a", slow("again")) == "again"

    with ThreadPoolExecutor(max_workers=4) as threads:
        _run_async(scenario)
    assert calls.count("again") == 1


def test_polls_of_one_row_whose_version_expired_read_it_once(
    app: FastAPI, alice: Headers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight dashboards ask at once for a row whose kept version expired: one read of its
    version, and each gets its own answer (a 304 for the current ETag, a 404 for another
    owner)."""
    clock = _row_versions_on(app, ttl_s=0.5)
    gallery = _add_gallery(app)
    url = f"/v1/galleries/{gallery}"
    with session_scope(app.state.session_factory) as session:
        bob = {"X-API-Key": create_api_key(session, "bob")[1]}
    reading = threading.Event()
    read_entry = RowVersionCache.read_entry

    def slow_read(self: RowVersionCache, session: Any, row: OwnedRow[Any]) -> Any:
        reading.wait(5)  # until every request waits for this read
        return read_entry(self, session, row)

    async def polls() -> list[tuple[int, str | None]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            etag = (await client.get(url, headers=alice)).headers["etag"]
            clock.now += 1  # the kept version expired
            monkeypatch.setattr(RowVersionCache, "read_entry", slow_read)
            asks = [{**alice, "If-None-Match": etag}] * 7 + [{**bob, "If-None-Match": etag}]
            with _statements(app) as seen:
                tasks = [asyncio.create_task(client.get(url, headers=h)) for h in asks]
                while len(app.state.version_reads) == 0:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.2)
                reading.set()
                answers = await asyncio.gather(*tasks)
            assert len([s for s in seen if "galleries.version" in s]) == 1, seen
            return [(a.status_code, a.headers.get("etag")) for a in answers]

    with TestClient(app):  # the app's lifespan
        answers = _run_async(polls)
    assert answers[:7] == [(304, answers[0][1])] * 7 and answers[7][0] == 404


def test_polls_are_read_on_threads_of_their_own_started_with_the_app(
    app: FastAPI, alice: Headers
) -> None:
    """REID_POLL_THREADS threads start with the app; a poll that must read the database is
    answered while every thread of the sync routes' pool is taken (an upload being unpacked),
    where a sync route waits."""
    clock = _row_versions_on(app, ttl_s=0.5)
    url = f"/v1/galleries/{_add_gallery(app)}"

    def polls() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("poll")}

    async def while_the_pool_is_taken() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            etag = (await client.get(url, headers=alice)).headers["etag"]  # the key is kept
            limiter = anyio.to_thread.current_default_thread_limiter()
            limiter.total_tokens = 1
            await limiter.acquire()  # every thread of the sync routes is busy
            try:
                clock.now += 1  # the version must be read
                poll = await asyncio.wait_for(
                    client.get(url, headers={**alice, "If-None-Match": etag}), timeout=10
                )
                assert poll.status_code == 304
                listing = asyncio.create_task(client.get("/v1/galleries", headers=alice))
                await asyncio.sleep(0.3)
                assert not listing.done()  # a sync route waits for the pool
            finally:
                limiter.release()
            assert (await listing).status_code == 200

    before = polls()  # other apps' (a process has one app; a test session, many)
    with TestClient(app):
        assert len(polls() - before) == app.state.settings.poll_threads
        _run_async(while_the_pool_is_taken)


def test_an_app_started_again_after_a_stop_reads_polls_on_new_threads(
    app: FastAPI, alice: Headers
) -> None:
    clock = _row_versions_on(app, ttl_s=0.5)
    url = f"/v1/galleries/{_add_gallery(app)}"
    for _ in range(2):
        with TestClient(app) as client:
            etag = client.get(url, headers=alice).headers["etag"]
            clock.now += 1  # the version must be read, on the poll threads
            assert client.get(url, headers={**alice, "If-None-Match": etag}).status_code == 304


def test_a_read_under_way_during_a_local_change_is_not_kept() -> None:
    """It may have read the row before the change committed: keeping it would hide the change
    for a whole TTL."""
    cache: TtlCache[str, int] = TtlCache(ttl_s=60, max_entries=10, clock=FakeClock())
    read = cache.begin_read()
    cache.discard(["row"])
    cache.put("row", 1, read)
    assert cache.get("row") is None
    cache.put("row", 2, cache.begin_read())
    assert cache.get("row") == 2


# ----------------------------------------------------------------------------------------------
# the JSON served for a row version, from the body cache
# ----------------------------------------------------------------------------------------------


def test_a_full_answer_at_a_kept_version_makes_no_sql(
    app: FastAPI, client: TestClient, alice: Headers, dataset: dict[str, Any]
) -> None:
    """The second 200 is the first's JSON, sent again without a statement; a cache that keeps
    nothing (TTL 0) gives the same bytes read from the database."""
    _row_versions_on(app, ttl_s=60)
    url = f"/v1/jobs/{_submit(client, alice, dataset['id'])['id']}"
    first = client.get(url, headers=alice)
    with _statements(app) as seen:
        second = client.get(url, headers=alice)
    assert seen == []
    assert second.status_code == 200 and second.content == first.content
    assert second.headers["etag"] == first.headers["etag"]
    app.state.row_versions, app.state.bodies = RowVersionCache(ttl_s=0), BodyCache()
    assert client.get(url, headers=alice).content == first.content


def test_a_full_answer_shows_a_change_elsewhere_once_the_version_expires(
    app: FastAPI, settings: Settings, client: TestClient, alice: Headers, dataset: dict[str, Any]
) -> None:
    """The body follows the version cache's rule: the kept JSON while the version is trusted,
    the new row's the first request after the TTL."""
    clock = _row_versions_on(app, ttl_s=1.0)
    job = _submit(client, alice, dataset["id"])
    url = f"/v1/jobs/{job['id']}"
    assert client.get(url, headers=alice).json()["progress"] == 0.0
    worker = create_engine(settings.database_url)
    try:
        with worker.begin() as connection:
            connection.execute(
                update(Job).where(Job.id == uuid.UUID(job["id"])).values(progress=0.5)
            )
    finally:
        worker.dispose()
    clock.now += 0.5
    assert client.get(url, headers=alice).json()["progress"] == 0.0  # the documented staleness
    clock.now += 0.5
    changed = client.get(url, headers=alice)
    assert changed.json()["progress"] == 0.5
    assert client.get(url, headers=alice).content == changed.content


def test_a_full_answer_shows_a_change_through_this_process_at_once(
    app: FastAPI, client: TestClient, alice: Headers, dataset: dict[str, Any]
) -> None:
    _row_versions_on(app, ttl_s=60)
    job = _submit(client, alice, dataset["id"])
    url = f"/v1/jobs/{job['id']}"
    before = client.get(url, headers=alice)
    assert before.json()["state"] == "QUEUED"
    assert client.post(f"{url}/cancel", headers=alice).status_code == 200
    after = client.get(url, headers=alice)
    assert after.json()["state"] == "CANCELLED" and after.headers["etag"] != before.headers["etag"]
    _set(app, job["id"], warnings=["MLflow unreachable for 30 s"])
    assert client.get(url, headers=alice).json()["warnings"] == ["MLflow unreachable for 30 s"]


def test_another_owner_never_gets_a_kept_body(
    app: FastAPI, client: TestClient, alice: Headers, bob: Headers, dataset: dict[str, Any]
) -> None:
    _row_versions_on(app, ttl_s=60)
    job_id = _submit(client, alice, dataset["id"])["id"]
    gallery_id = _add_gallery(app)
    for url in (f"/v1/jobs/{job_id}", f"/v1/galleries/{gallery_id}"):
        assert client.get(url, headers=alice).status_code == 200  # version and body kept
        refused = client.get(url, headers=bob)
        assert refused.status_code == 404 and list(refused.json()) == ["error"]
    # nor through the cache itself: a body is served for its owner and exact version only
    bodies = BodyCache()
    ident = uuid.UUID(job_id)
    bodies.put(JobOut, ident, "alice", 3, b"{}")
    assert bodies.get(JobOut, ident, "alice", 3) == b"{}"
    assert bodies.get(JobOut, ident, "bob", 3) is None
    assert bodies.get(JobOut, ident, "alice", 4) is None
    assert bodies.get(JobSummary, ident, "alice", 3) is None


def test_the_body_cache_keeps_the_newest_version_and_stays_bounded() -> None:
    bodies = BodyCache(max_entries=2)
    first, second, third = (uuid.uuid4() for _ in range(3))
    bodies.put(JobOut, first, "alice", 2, b"v2")
    bodies.put(JobOut, first, "alice", 1, b"v1")  # a read that raced a change: not put back
    assert bodies.get(JobOut, first, "alice", 2) == b"v2"
    bodies.put(JobOut, second, "alice", 1, b"b")
    assert bodies.get(JobOut, first, "alice", 2) == b"v2"  # used: now the most recent
    bodies.put(JobOut, third, "alice", 1, b"c")
    assert len(bodies) == 2
    assert bodies.get(JobOut, second, "alice", 1) is None  # the least recently used went


def _list_statements(app: FastAPI, client: TestClient, headers: Headers, **params: Any) -> Any:
    with _statements(app) as seen:
        response = client.get("/v1/jobs", params=params, headers=headers)
    return response, seen


def test_a_list_page_reads_the_versions_and_only_the_jobs_it_has_no_json_for(
    app: FastAPI, client: TestClient, alice: Headers, dataset: dict[str, Any]
) -> None:
    """The count and the page's ids and versions are read on every request (no TTL: a change
    anywhere shows at once); a 304 needs nothing more, nor does a page whose jobs were all
    served at their versions before; a job that changed is read alone."""
    ids = [_submit(client, alice, dataset["id"])["id"] for _ in range(3)]
    first, seen = _list_statements(app, client, alice)
    assert first.status_code == 200 and [j["id"] for j in first.json()["items"]] == ids[::-1]
    assert len(seen) == 3  # count, page, the jobs by id
    again, seen = _list_statements(app, client, alice)
    assert len(seen) == 2 and not any("jobs.metrics" in s for s in seen), seen
    assert again.content == first.content and again.headers["etag"] == first.headers["etag"]
    with _statements(app) as seen:
        kept = {**alice, "If-None-Match": first.headers["etag"]}
        assert client.get("/v1/jobs", headers=kept).status_code == 304
    assert len(seen) == 2
    # another process changes one job: the next page shows it, reading that job alone
    with session_scope(app.state.session_factory) as session:
        session.connection().execute(
            update(Job).where(Job.id == uuid.UUID(ids[1])).values(progress=0.5)
        )
    changed, seen = _list_statements(app, client, alice)
    assert [j["progress"] for j in changed.json()["items"]] == [0.0, 0.5, 0.0]
    assert changed.headers["etag"] != first.headers["etag"]
    assert len(seen) == 3, seen


def test_a_list_page_is_the_json_of_its_model(
    app: FastAPI, client: TestClient, alice: Headers, dataset: dict[str, Any]
) -> None:
    """The page assembled from kept items is byte for byte what pydantic writes for it, in
    either view, with a cursor."""
    for _ in range(3):
        _submit(client, alice, dataset["id"])
    for view, item in (("summary", JobSummary), ("full", JobOut)):
        for _ in range(2):  # read, then from the kept items
            answer = client.get("/v1/jobs", params={"limit": 2, "view": view}, headers=alice)
            page = answer.json()
            assert page["next_after"] is not None
            expected = Page[item].model_validate(page).model_dump_json()  # type: ignore[valid-type]
            assert answer.content == expected.encode()


def test_another_owner_never_gets_kept_list_items(
    app: FastAPI, client: TestClient, alice: Headers, bob: Headers, dataset: dict[str, Any]
) -> None:
    job_id = _submit(client, alice, dataset["id"])["id"]
    for view in ("summary", "full"):
        assert client.get("/v1/jobs", params={"view": view}, headers=alice).json()["total"] == 1
        theirs = client.get("/v1/jobs", params={"view": view}, headers=bob)
        assert theirs.status_code == 200 and theirs.json()["items"] == []
        assert job_id not in theirs.text
    # the jobs read by id are the owner's only, whatever ids are asked for
    with session_scope(app.state.session_factory) as session:
        assert jobs.jobs_by_id(session, "bob", [uuid.UUID(job_id)]) == []


def test_a_job_deleted_or_changed_between_the_page_and_its_rows_is_shown_as_read() -> None:
    bodies = BodyCache()
    gone, changed, same = (uuid.uuid4() for _ in range(3))
    bodies.put(JobSummary, same, "alice", 1, b'"same"')

    class Row:
        def __init__(self, ident: uuid.UUID, version: int) -> None:
            self.id, self.version = ident, version

    class Shown(BaseModel):
        version: int

    asked: list[list[uuid.UUID]] = []

    def read(ids: list[uuid.UUID]) -> list[Any]:
        asked.append(ids)
        return [Row(changed, 3)]  # `gone` was deleted, `changed` moved from version 2 to 3

    items = bodies.items(
        JobSummary,
        "alice",
        [(gone, 1), (changed, 2), (same, 1)],
        read,
        lambda row: Shown(version=row.version),
    )
    assert asked == [[gone, changed]]
    assert [(ident, version) for ident, version, _ in items] == [(changed, 3), (same, 1)]
    assert items[1][2] == b'"same"'
    assert bodies.get(JobSummary, changed, "alice", 3) == items[0][2] == b'{"version":3}'
