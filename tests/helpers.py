"""Shared by the service and worker tests: the real servers they use, a job that trains in
seconds, gallery rows."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from service.core.db import session_scope
from service.core.gallery_states import change_gallery_state
from service.core.models import Gallery, GalleryState

PG_URL = os.environ.get(
    "REID_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)

#: A job of seconds: MobileNetV3-small on 96x48 crops, small heads, one thread.
TINY_JOB_CONFIG = {
    "data.height": 96,
    "data.width": 48,
    "data.batch_size": 8,
    "data.num_workers": 0,
    "model.backbone": "mobilenet_v3_small",
    "model.pretrained": "none",
    "model.pgm_channels": 32,
    "model.pgm_hidden": 16,
    "model.patch_dim": 16,
    "model.ipfl_dim": 8,
    "loss.pedal.neighbours": 3,
    "loss.gsl.warmup_epochs": 1,
    "eval.batch_size": 32,
    "runtime.num_threads": 1,
    "runtime.log_every_n_steps": 1,
}


def require_postgres() -> str:
    """The PostgreSQL server URL (with password); skips the test when it does not answer."""
    url = make_url(PG_URL)
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        pytest.skip(
            f"PostgreSQL at {url.render_as_string(hide_password=True)} does not answer "
            f"({type(exc).__name__}); start it or set REID_TEST_DATABASE_URL"
        )
    finally:
        engine.dispose()
    return url.render_as_string(hide_password=False)


@contextlib.contextmanager
def postgres_database(prefix: str) -> Iterator[str]:
    """A new, empty database on the test server (dropped afterwards); its URL."""
    admin_url = require_postgres()
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def mlflow_server(
    folder: Path, backend_store_uri: str, timeout_s: float = 120, port: int | None = None
) -> Iterator[str]:
    """A real ``mlflow server`` (database backend, proxied artifacts under ``folder``) on
    ``port`` (default: a free one) of the loopback, as in docker-compose.yml but small: one
    worker, no job execution. Its URL."""
    port = port or free_port()
    log = folder / "mlflow_server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", backend_store_uri,
                "--serve-artifacts", "--artifacts-destination", str(folder / "artifacts"),
                "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            ],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.3)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def make_gallery(
    factory: sessionmaker[Session],
    *,
    owner: str = "alice",
    state: GalleryState = GalleryState.QUEUED,
    **fields: object,
) -> uuid.UUID:
    """A gallery row (no model, no build), QUEUED, then moved to ``state`` (READY through
    BUILDING) as the workers move it, with ``fields`` set."""
    gallery = Gallery(
        id=uuid.uuid4(),
        owner=owner,
        dataset_path="/data/market",
        dataset_format="market_folder",
        model_name=f"reid-{owner}",
        model_version="1",
        gpus=0,
        queue="default",
        progress=0.0,
        images_done=0,
        skipped_count=0,
    )
    with session_scope(factory) as session:
        change_gallery_state(session, gallery, GalleryState.QUEUED, f"requested by {owner}")
        if state is GalleryState.READY:  # only a build makes a gallery READY
            change_gallery_state(session, gallery, GalleryState.BUILDING, "test")
        if state is not GalleryState.QUEUED:
            change_gallery_state(session, gallery, state, "test")
        for name, value in fields.items():
            setattr(gallery, name, value)
    return gallery.id
