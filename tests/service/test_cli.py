"""``python -m service``: migrate, create-key (printed once), list-keys, revoke-key, serve."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from uvicorn.importer import import_from_string

import service.__main__ as service_main
from service.__main__ import main
from service.app import create_app
from service.core.settings import get_settings
from tests.service.conftest import TestClient, make_settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def db_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("REID_DATABASE_URL", url)
    monkeypatch.setenv("REID_DATA_DIR", str(tmp_path / "var"))
    return url


def test_migrate_then_keys(db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(Config(str(REPO / "alembic.ini"))).get_current_head()
    assert head is not None
    assert main(["migrate"]) == 0
    assert f"database at revision {head}" in capsys.readouterr().out

    assert main(["create-key", "--owner", "alice", "--name", "laptop"]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert token.startswith("reid_") and "\n" not in token
    assert "shown again" in err and token not in err

    assert main(["list-keys"]) == 0
    listing = capsys.readouterr().out
    assert "alice" in listing and "active" in listing and "laptop" in listing
    assert token not in listing

    # an API that reads the key on every request refuses it at once (with its cache on: within
    # REID_API_KEY_CACHE_SECONDS, tests/service/test_polling.py)
    uncached = make_settings(tmp_path, db_url, api_key_cache_seconds=0)
    with TestClient(create_app(uncached)) as client:
        headers = {"Authorization": f"Bearer {token}"}
        assert client.get("/v1/jobs", headers=headers).status_code == 200
        prefix = listing.split("...")[0].strip()
        assert main(["revoke-key", prefix]) == 0
        assert "refuse it within 10 s" in capsys.readouterr().out
        assert client.get("/v1/jobs", headers=headers).status_code == 401
    assert main(["revoke-key", "reid_nothing"]) == 1
    assert main(["create-key", "--owner", "  "]) == 2
    assert "owner must be" in capsys.readouterr().err


def test_invalid_settings_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REID_ENVIRONMENT", "production")
    monkeypatch.setenv("REID_ADMIN_TOKEN", "changethis")
    assert main(["migrate"]) == 2
    assert "REID_ADMIN_TOKEN" in capsys.readouterr().err


def test_serve_migrates_first_and_prints_the_url(
    db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append({"app": app, **kw}))
    assert main(["serve"]) == 0
    assert "http://127.0.0.1:8000" in capsys.readouterr().out
    (call,) = calls
    assert (call["host"], call["port"]) == ("127.0.0.1", 8000)
    assert (call["workers"], call["factory"]) == (1, False)  # REID_API_WORKERS unset: this app
    with TestClient(call["app"]) as client:
        assert client.get("/readyz").status_code == 200  # migrations were applied


def test_serve_starts_api_workers_processes_from_the_factory(
    db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """REID_API_WORKERS=3: uvicorn gets the app factory to import in each of 3 processes, and
    what `serve --with-worker` decides for the API (jobs without gpus go to the CPU worker)
    reaches the apps those processes build from the environment."""
    monkeypatch.setattr(os, "environ", dict(os.environ))  # serve exports the API's variables
    monkeypatch.setenv("REID_API_WORKERS", "3")
    monkeypatch.delenv("REID_JOB_BOUNDS__DEFAULT_GPUS", raising=False)
    monkeypatch.setattr(service_main, "_start_children", lambda gpus: [])
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append({"app": app, **kw}))
    assert main(["serve", "--with-worker"]) == 0
    assert "3 API processes" in capsys.readouterr().out
    (call,) = calls
    assert (call["app"], call["factory"], call["workers"]) == ("service.app:create_app", True, 3)

    get_settings.cache_clear()  # as in a new process
    try:
        app = import_from_string(call["app"])()  # what each API process runs
    finally:
        get_settings.cache_clear()
    assert app.state.settings.api_workers == 3
    assert app.state.settings.job_bounds.default_gpus == 0
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 200  # migrated before uvicorn started


def test_module_entry_point(db_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0
    for command in ("migrate", "create-key", "serve"):
        assert command in result.stdout
