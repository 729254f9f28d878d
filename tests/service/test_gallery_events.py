"""A gallery's lifecycle as jobs have it: every state change recorded with its reason, read back
through ``GET /v1/galleries/{id}/events`` (another owner's gallery is not found), and GET routes
that only read: a build whose worker died stays as it is until the reaper fails it.

The galleries are rows moved as the workers move them (no model, no build), on SQLite.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.core.db import session_scope
from service.core.gallery_states import (
    change_gallery_state,
    lock_gallery,
)
from service.core.models import Gallery, GalleryEvent, GalleryState, utcnow
from service.core.settings import Settings
from service.core.state_machine import InvalidTransitionError
from tests.helpers import make_gallery
from tests.service.conftest import Headers, TestClient

G = GalleryState


def _new_gallery(app: FastAPI, owner: str = "alice") -> uuid.UUID:
    return make_gallery(app.state.session_factory, owner=owner)


def _move(app: FastAPI, gallery_id: uuid.UUID, state: GalleryState, reason: str) -> None:
    with session_scope(app.state.session_factory) as session:
        gallery = lock_gallery(session, gallery_id)
        assert gallery is not None
        change_gallery_state(session, gallery, state, reason)


def _events(client: TestClient, headers: Headers, gallery_id: uuid.UUID) -> Any:
    return client.get(f"/v1/galleries/{gallery_id}/events", headers=headers)


def test_every_change_is_an_event_with_its_reason(
    app: FastAPI, client: TestClient, alice: Headers
) -> None:
    gallery_id = _new_gallery(app)
    _move(app, gallery_id, G.BUILDING, "building on w1:7")
    _move(app, gallery_id, G.BUILDING, "built again by w2:9: w1:7 stopped heartbeating")
    _move(app, gallery_id, G.FAILED, "the build failed: the model version is gone")
    _move(app, gallery_id, G.QUEUED, "retried by alice")
    _move(app, gallery_id, G.BUILDING, "building on w2:9")
    _move(app, gallery_id, G.READY, "indexed 10 images")
    response = _events(client, alice, gallery_id)
    assert response.status_code == 200, response.text
    events = response.json()
    assert [(e["from_state"], e["to_state"], e["reason"]) for e in events] == [
        (None, "QUEUED", "requested by alice"),
        ("QUEUED", "BUILDING", "building on w1:7"),
        ("BUILDING", "BUILDING", "built again by w2:9: w1:7 stopped heartbeating"),
        ("BUILDING", "FAILED", "the build failed: the model version is gone"),
        ("FAILED", "QUEUED", "retried by alice"),
        ("QUEUED", "BUILDING", "building on w2:9"),
        ("BUILDING", "READY", "indexed 10 images"),
    ]
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    assert all(e["at"] for e in events)
    shown = client.get(f"/v1/galleries/{gallery_id}", headers=alice).json()
    assert shown["reason"] == events[-1]["reason"]


def test_a_refused_change_writes_no_event(app: FastAPI, client: TestClient, alice: Headers) -> None:
    gallery_id = _new_gallery(app)
    with session_scope(app.state.session_factory) as session:
        gallery = lock_gallery(session, gallery_id)
        assert gallery is not None
        with pytest.raises(InvalidTransitionError):
            change_gallery_state(session, gallery, G.READY, "not built")
    assert [e["to_state"] for e in _events(client, alice, gallery_id).json()] == ["QUEUED"]


def test_events_of_another_owner_s_gallery_are_not_found(
    app: FastAPI, client: TestClient, alice: Headers, bob: Headers
) -> None:
    gallery_id = _new_gallery(app, owner="alice")
    refused = _events(client, bob, gallery_id)
    assert refused.status_code == 404
    assert refused.json()["error"]["code"] == "gallery_not_found"
    assert _events(client, alice, uuid.uuid4()).status_code == 404
    assert _events(client, alice, gallery_id).status_code == 200


def test_events_go_with_the_deleted_gallery(
    app: FastAPI, client: TestClient, alice: Headers
) -> None:
    gallery_id = _new_gallery(app)
    assert client.delete(f"/v1/galleries/{gallery_id}", headers=alice).status_code == 204
    assert _events(client, alice, gallery_id).status_code == 404
    with app.state.session_factory() as session:
        left = session.scalar(select(func.count()).where(GalleryEvent.gallery_id == gallery_id))
    assert left == 0


def _snapshot(session: Session, gallery_id: uuid.UUID) -> tuple[Any, ...]:
    gallery = session.get(Gallery, gallery_id)
    assert gallery is not None
    events = session.scalar(select(func.count()).where(GalleryEvent.gallery_id == gallery_id))
    return gallery.state, gallery.reason, gallery.updated_at, gallery.finished_at, events


def test_reading_a_stale_build_writes_nothing(
    app: FastAPI, client: TestClient, alice: Headers, settings: Settings
) -> None:
    gallery_id = _new_gallery(app)
    _move(app, gallery_id, G.BUILDING, "building on w9:42")
    long_ago = utcnow() - timedelta(seconds=settings.worker.heartbeat_timeout_s + 60)
    with session_scope(app.state.session_factory) as session:
        gallery = session.get(Gallery, gallery_id)
        assert gallery is not None
        gallery.worker_id, gallery.heartbeat_at, gallery.updated_at = "w9:42", long_ago, long_ago
    with app.state.session_factory() as session:
        before = _snapshot(session, gallery_id)
    shown = client.get(f"/v1/galleries/{gallery_id}", headers=alice).json()
    listed = client.get("/v1/galleries", headers=alice).json()["items"]
    events = _events(client, alice, gallery_id).json()
    # as stored: the reaper, not a read, decides that the build died
    assert (shown["state"], shown["error"]) == ("BUILDING", None)
    assert [g["state"] for g in listed] == ["BUILDING"]
    assert events[-1]["to_state"] == "BUILDING"
    with app.state.session_factory() as session:
        assert _snapshot(session, gallery_id) == before
