"""Fixtures of the service tests: an app on a migrated SQLite file per test, API keys, images.

Tests marked ``integration`` use the PostgreSQL server at ``REID_TEST_DATABASE_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``): each session creates its own databases
there and drops them at the end; the tests skip, saying why, when the server does not answer.
"""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from PIL import Image
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from service.app import create_app
from service.core import migrate
from service.core.api_keys import create_api_key
from service.core.db import session_scope
from service.core.job_states import change_state
from service.core.models import Dataset, DatasetKind, Job, JobState
from service.core.settings import JobBounds, Settings, UploadLimits
from tests.helpers import require_postgres

with warnings.catch_warnings():
    # Starlette asks for its fork "httpx2"; the httpx API the tests use is the same.
    warnings.filterwarnings("ignore", message=".*httpx2.*")
    from fastapi.testclient import TestClient


Headers = dict[str, str]


@pytest.fixture(autouse=True)
def _no_reid_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from each test alone, not from the developer's REID_* variables."""
    for name in list(os.environ):
        if name.startswith("REID_") and name != "REID_TEST_DATABASE_URL":
            monkeypatch.delenv(name)


# ----------------------------------------------------------------------------------------------
# SQLite app
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file at head, migrated once and copied by each test (migrating is slow)."""
    path = tmp_path_factory.mktemp("schema") / "reid.db"
    migrate.upgrade(f"sqlite:///{path}")
    return path


def make_settings(tmp_path: Path, database_url: str, **overrides: Any) -> Settings:
    roots = tmp_path / "roots" / "allowed"
    roots.mkdir(parents=True, exist_ok=True)
    values: dict[str, Any] = {
        "environment": "development",
        "data_dir": tmp_path / "var",
        "database_url": database_url,
        "dataset_roots": [roots],
        "upload_dir": tmp_path / "uploads",
        "jobs_dir": tmp_path / "jobs",
        "limits": UploadLimits(
            max_upload_bytes=2_000_000, max_archive_files=20, max_uncompressed_bytes=1_000_000
        ),
        "job_bounds": JobBounds(max_epochs=100, max_batch_size=128, max_gpus=2, max_retries=3),
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


def copied_settings(tmp_path: Path, migrated_sqlite: Path, **overrides: Any) -> Settings:
    """Settings on a copy of the migrated SQLite file in ``tmp_path``, with ``overrides``."""
    db = tmp_path / "reid.db"
    shutil.copyfile(migrated_sqlite, db)
    return make_settings(tmp_path, f"sqlite:///{db}", **overrides)


@pytest.fixture
def settings(tmp_path: Path, migrated_sqlite: Path) -> Settings:
    return copied_settings(tmp_path, migrated_sqlite)


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return create_app(settings)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def session(app: FastAPI) -> Iterator[Session]:
    """A session on the app's database, for tests of service.core alone."""
    with app.state.session_factory() as db_session:
        yield db_session


def queued_job(session: Session) -> Job:
    """A committed QUEUED job of alice's on a new server-folder dataset."""
    dataset = Dataset(owner="alice", name=f"d{uuid.uuid4().hex[:6]}", kind=DatasetKind.PATH)
    dataset.path, dataset.format = "/data/x", "image_folder"
    session.add(dataset)
    session.flush()
    job = Job(owner="alice", dataset_id=dataset.id, timeout_minutes=60)
    change_state(session, job, JobState.QUEUED, "submitted")
    session.commit()
    return job


@pytest.fixture
def make_key(app: FastAPI) -> Callable[[str], str]:
    def make(owner: str) -> str:
        with session_scope(app.state.session_factory) as session:
            _, token = create_api_key(session, owner)
        return token

    return make


@pytest.fixture
def alice(make_key: Callable[[str], str]) -> Headers:
    return {"Authorization": f"Bearer {make_key('alice')}"}


@pytest.fixture
def bob(make_key: Callable[[str], str]) -> Headers:
    return {"X-API-Key": make_key("bob")}


# ----------------------------------------------------------------------------------------------
# images and datasets
# ----------------------------------------------------------------------------------------------


def write_jpeg(path: Path, seed: int = 0, size: tuple[int, int] = (16, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = ((seed * 53) % 256, (seed * 101) % 256, (seed * 197) % 256)
    Image.new("RGB", size, colour).save(path, format="JPEG")
    return path


def write_image_folder(folder: Path, bad: int = 1) -> Path:
    """Four readable crops from two cameras and ``bad`` unreadable ones."""
    for i in range(4):
        write_jpeg(folder / f"cam{i % 2 + 1}" / f"img_{i}.jpg", seed=i)
    for i in range(bad):
        (folder / f"broken_{i}.jpg").write_bytes(b"not a jpeg at all")
    return folder


def write_market_folder(folder: Path) -> Path:
    """A tiny Market-1501 layout: 2 identities x 2 cameras in every split."""
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        for pid in (1, 2):
            for cam in (1, 2):
                write_jpeg(folder / split / f"{pid:04d}_c{cam}s1_000{pid}{cam}_00.jpg", pid + cam)
    return folder


@pytest.fixture
def dataset_root(settings: Settings) -> Path:
    return settings.dataset_roots[0]


@pytest.fixture
def image_folder(dataset_root: Path) -> Path:
    return write_image_folder(dataset_root / "crops")


@pytest.fixture
def dataset(client: TestClient, alice: Headers, image_folder: Path) -> dict[str, Any]:
    response = client.post(
        "/v1/datasets", json={"name": "crops", "path": str(image_folder)}, headers=alice
    )
    assert response.status_code == 201, response.text
    return response.json()


# ----------------------------------------------------------------------------------------------
# PostgreSQL
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    """The server URL; skips the test when PostgreSQL does not answer."""
    return require_postgres()


@pytest.fixture(scope="session")
def pg_databases(pg_admin_url: str) -> Iterator[Callable[[], str]]:
    """A factory of empty databases on the test server, all dropped when the session ends."""
    admin = create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    created: list[str] = []

    def create() -> str:
        name = f"reid_test_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        created.append(name)
        return make_url(pg_admin_url).set(database=name).render_as_string(hide_password=False)

    yield create
    with admin.connect() as conn:
        for name in created:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
