"""Settings: embedded defaults, environment variables, and refusal of weak secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.core.settings import Settings

STRONG = "x7Gq2-very-random-token-value-42"


def test_embedded_defaults_live_under_the_data_dir(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path / "var")
    assert settings.environment == "development"
    assert settings.data_dir == tmp_path / "var"
    assert settings.database_url == f"sqlite:///{(tmp_path / 'var' / 'reid.db').absolute()}"
    assert settings.upload_path == tmp_path / "var" / "uploads"
    assert settings.jobs_path == tmp_path / "var" / "jobs"
    assert settings.admin_token is None
    assert settings.queues == ["default"]


def test_relative_folders_are_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings(_env_file=None)
    assert settings.upload_path == tmp_path / "var" / "uploads"
    assert settings.database_url == f"sqlite:///{tmp_path / 'var' / 'reid.db'}"


def test_environment_variables_and_nested_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REID_DATASET_ROOTS", '["/data/a", "/data/b"]')
    monkeypatch.setenv("REID_LIMITS__MAX_ARCHIVE_FILES", "7")
    monkeypatch.setenv("REID_JOB_BOUNDS__MAX_EPOCHS", "12")
    settings = Settings(_env_file=None)
    assert settings.dataset_roots == [Path("/data/a"), Path("/data/b")]
    assert settings.limits.max_archive_files == 7
    assert settings.job_bounds.max_epochs == 12


@pytest.mark.parametrize("token", ["changethis", "", "   ", "short"])
def test_production_refuses_placeholder_admin_token(token: str) -> None:
    with pytest.raises(ValidationError, match="REID_ADMIN_TOKEN") as info:
        Settings(_env_file=None, environment="production", admin_token=token)
    assert "REID_ENVIRONMENT=production" in str(info.value)


@pytest.mark.parametrize("password", ["changethis", "postgres", "password"])
def test_production_refuses_placeholder_database_password(password: str) -> None:
    url = f"postgresql+psycopg://reid:{password}@db:5432/reid"
    with pytest.raises(ValidationError, match="password in REID_DATABASE_URL"):
        Settings(_env_file=None, environment="production", database_url=url)


def test_production_accepts_real_secrets() -> None:
    settings = Settings(
        _env_file=None,
        environment="production",
        admin_token=STRONG,
        database_url=f"postgresql+psycopg://reid:{STRONG}@db:5432/reid",
    )
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == STRONG
    assert STRONG not in repr(settings.admin_token)


def test_production_without_admin_routes_needs_no_token() -> None:
    assert Settings(_env_file=None, environment="production").admin_token is None


def test_development_only_warns_about_placeholders() -> None:
    with pytest.warns(UserWarning, match="REID_ADMIN_TOKEN is the placeholder"):
        settings = Settings(_env_file=None, admin_token="changethis")
    assert settings.environment == "development"


def test_dotenv_file_is_read_and_checked(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("REID_ENVIRONMENT=production\nREID_ADMIN_TOKEN=changethis\n")
    with pytest.raises(ValidationError, match="placeholder 'changethis'"):
        Settings(_env_file=env)


def test_bad_database_url_is_named() -> None:
    with pytest.raises(ValidationError, match="not a SQLAlchemy URL"):
        Settings(_env_file=None, database_url="not a url")
