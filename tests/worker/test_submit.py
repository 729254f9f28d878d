"""POST /v1/jobs publishes the job after its commit; with the broker down the job stays QUEUED
and the dispatcher sends it later (SQLite, kombu's SQLAlchemy transport, no servers)."""

from __future__ import annotations

import uuid
import warnings
from datetime import timedelta
from pathlib import Path

from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from service.app import create_app
from service.core.api_keys import create_api_key
from service.core.db import session_scope
from service.core.models import Job, JobState
from service.core.settings import Settings
from tests.worker.conftest import load_job
from worker.dispatcher import Dispatcher

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2.*")
    from fastapi.testclient import TestClient


def _submit(settings: Settings, tmp_path: Path) -> dict[str, object]:
    root = settings.dataset_roots[0]
    for i in range(4):
        (root / "crops" / f"cam{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 32), (i * 40, 0, 0)).save(root / "crops" / f"cam{i % 2}" / f"{i}.jpg")
    app = create_app(settings)
    with session_scope(app.state.session_factory) as session:
        _, token = create_api_key(session, "alice")
    headers = {"X-API-Key": token}
    with TestClient(app) as client:
        dataset = client.post(
            "/v1/datasets", json={"name": "crops", "path": str(root / "crops")}, headers=headers
        )
        assert dataset.status_code == 201, dataset.text
        response = client.post(
            "/v1/jobs", json={"dataset_id": dataset.json()["id"], "gpus": 0}, headers=headers
        )
        assert response.status_code == 201, response.text
        job: dict[str, object] = response.json()
        return job


def test_submit_sends_to_the_broker(settings: Settings, tmp_path: Path) -> None:
    settings.dataset_roots = [tmp_path / "roots"]
    job = _submit(settings, tmp_path)  # embedded broker: sqla+sqlite in data_dir
    assert job["state"] == "QUEUED"
    assert job["heartbeat_at"] is not None  # sent
    assert (settings.data_dir / "broker.sqlite").is_file()


def test_broker_down_at_submit_then_the_dispatcher_sends_it(
    settings: Settings, factory: sessionmaker[Session], tmp_path: Path
) -> None:
    settings.dataset_roots = [tmp_path / "roots"]
    settings.worker.broker_url = "redis://127.0.0.1:1/0"  # nothing listens there
    job = _submit(settings, tmp_path)
    assert job["state"] == "QUEUED"
    assert job["heartbeat_at"] is None  # not sent, not lost
    job_id = uuid.UUID(str(job["id"]))

    sent: list[uuid.UUID] = []

    def send(j: Job) -> bool:
        sent.append(j.id)
        return True

    later = load_job(factory, job_id).updated_at + timedelta(seconds=60)
    dispatcher = Dispatcher(settings, factory, clock=lambda: later, send=send)
    assert dispatcher.run_once().requeued == [job_id]
    assert sent == [job_id]
    stored = load_job(factory, job_id)
    assert stored.state is JobState.QUEUED
    assert stored.heartbeat_at == later
