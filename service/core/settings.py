"""The service's settings: one pydantic-settings class, read from ``REID_*`` variables and ``.env``.

Nested groups use ``__`` in variable names: ``REID_LIMITS__MAX_UPLOAD_BYTES=1000000``,
``REID_JOB_BOUNDS__MAX_EPOCHS=100``. Lists are JSON: ``REID_DATASET_ROOTS='["/data/reid"]'``.

The embedded default needs no server: a SQLite file and the uploads under ``var/``. Outside
development, placeholder or empty secrets are refused at start-up with the variable to set.
"""

from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

#: Values that mean "nobody chose a secret here".
PLACEHOLDER_SECRETS = frozenset(
    {"", "changethis", "changeme", "change-me", "secret", "password", "postgres", "placeholder"}
)
#: Shortest admin token accepted in production.
MIN_SECRET_LENGTH = 16

_GIB = 1024**3

#: Registered model names: what MLflow and URLs take without escaping.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"


class UploadLimits(BaseModel):
    """Bounds on uploaded dataset archives, checked before anything is extracted."""

    max_upload_bytes: int = Field(4 * _GIB, ge=1, description="Largest request body (archive).")
    max_archive_files: int = Field(
        200_000, ge=1, description="Most members (files and folders) in one archive."
    )
    max_uncompressed_bytes: int = Field(
        8 * _GIB, ge=1, description="Largest total size of an archive's files once extracted."
    )


class JobBounds(BaseModel):
    """What one training job may ask for; larger values are refused with 422."""

    max_epochs: int = Field(200, ge=1)
    max_batch_size: int = Field(256, ge=2, description="data.batch_size (images per GPU)")
    max_image_height: int = Field(512, ge=32, description="data.height")
    max_image_width: int = Field(256, ge=16, description="data.width")
    max_gpus: int = Field(8, ge=0)
    default_gpus: int | None = Field(
        None,
        ge=0,
        description="GPUs of a job or gallery that does not say (gpus omitted); unset: 1, or 0 "
        "where max_gpus is 0. `serve --with-worker` with a CPU worker sets it to 0, so that "
        "what is submitted reaches that worker.",
    )
    max_retries: int = Field(5, ge=0)
    default_restarts: int = Field(
        3,
        ge=0,
        description="max_restarts of a job that does not say: how many times a trainer killed "
        "from outside (the OOM killer's SIGKILL, a worker that died) is resumed from its last "
        "checkpoint before the job fails",
    )
    max_restarts: int = Field(10, ge=0, description="The largest max_restarts a job may ask for.")
    max_timeout_minutes: int = Field(7 * 24 * 60, ge=1)
    default_timeout_minutes: int = Field(24 * 60, ge=1)
    max_priority: int = Field(9, ge=0, description="Priorities run from 0 (lowest) to this.")
    max_threads: int = Field(64, ge=1, description="runtime.num_threads (CPU threads per process)")
    max_data_workers: int = Field(16, ge=0, description="data.num_workers (loader processes)")
    max_memory_bank_gib: float = Field(
        16.0,
        gt=0,
        description="Estimated size of the job's per-image memory banks (training images x "
        "feature sizes x 4 bytes, plus one batch of similarities to them)",
    )

    @model_validator(mode="after")
    def _default_timeout_within_max(self) -> Self:
        if self.default_timeout_minutes > self.max_timeout_minutes:
            raise ValueError(
                f"default_timeout_minutes={self.default_timeout_minutes} is above "
                f"max_timeout_minutes={self.max_timeout_minutes}"
            )
        if self.default_gpus is not None and self.default_gpus > self.max_gpus:
            raise ValueError(f"default_gpus={self.default_gpus} is above max_gpus={self.max_gpus}")
        if self.default_restarts > self.max_restarts:
            raise ValueError(
                f"default_restarts={self.default_restarts} is above "
                f"max_restarts={self.max_restarts}"
            )
        return self

    def gpus_or_default(self, gpus: int | None) -> int:
        """``gpus`` as asked, or the default when it was omitted."""
        if gpus is not None:
            return gpus
        if self.default_gpus is not None:
            return self.default_gpus
        return min(1, self.max_gpus)


class WorkerSettings(BaseModel):
    """The job workers and their dispatcher (``worker/``); ``REID_WORKER__*`` variables."""

    broker_url: str = Field(
        "",
        description="Celery broker, e.g. redis://redis:6379/0; empty: kombu's SQLAlchemy "
        "transport on a SQLite file in data_dir (sqla+sqlite:///<data_dir>/broker.sqlite).",
    )
    gpus: str | None = Field(
        None,
        description="CUDA_VISIBLE_DEVICES given to the trainer (e.g. '0,1'; '' for none); "
        "unset: inherited from the worker.",
    )
    poll_interval_s: float = Field(1.0, gt=0, description="How often a supervisor polls.")
    heartbeat_interval_s: float = Field(10.0, gt=0, description="How often it heartbeats.")
    heartbeat_timeout_s: float = Field(
        120.0, gt=0, description="A running job whose heartbeat is older is reaped."
    )
    kill_grace_s: float = Field(
        60.0, ge=0, description="SIGTERM (checkpoint) to SIGKILL, on cancel or timeout."
    )
    dispatch_grace_s: float = Field(
        10.0, ge=0, description="A job never sent to the broker is sent after this long."
    )
    requeue_after_s: float = Field(
        900.0, gt=0, description="A waiting job sent this long ago is sent again."
    )
    dispatcher_interval_s: float = Field(15.0, gt=0, description="The dispatcher's loop period.")
    visibility_timeout_s: int | None = Field(
        None,
        ge=60,
        description="Broker visibility timeout (unacked messages are redelivered after it); "
        "default: the longest job (job_bounds.max_timeout_minutes) plus an hour.",
    )
    enqueue_on_submit: bool = Field(
        True, description="POST /v1/jobs sends the job to the broker after its commit."
    )


class TrackingSettings(BaseModel):
    """MLflow: one run per job, the final models in its registry (``REID_MLFLOW__*``)."""

    tracking_uri: str = Field(
        "",
        description="MLflow tracking URI, e.g. http://mlflow:5000; empty: a SQLite store in "
        "data_dir (sqlite:///<data_dir>/mlflow.db) with artifacts in data_dir/mlartifacts.",
    )
    artifact_location: str = Field(
        "",
        description="Artifact root of the experiment when the service creates it; empty: "
        "data_dir/mlartifacts for the embedded store, the server's default otherwise.",
    )
    experiment: str = Field("reid-training", min_length=1, description="Experiment of the runs.")
    model_name: str = Field(
        "reid-{owner}",
        description="Registered model a job's final model becomes a version of, unless the "
        "job names another; '{owner}' stands for the job owner's name. A registered model "
        "belongs to the owner whose job created it.",
    )
    ui_url: str | None = Field(
        None, description="Base URL of the MLflow UI, for links from the API and dashboard."
    )
    request_timeout_s: float = Field(
        10.0, gt=0, description="Timeout of one MLflow request from a worker or the API."
    )
    retry_after_s: float = Field(
        30.0,
        ge=0,
        description="After a failed MLflow request a trainer waits this long before trying "
        "again (training never waits for MLflow).",
    )
    final_sync_s: float = Field(
        120.0,
        ge=0,
        description="How long a finished trainer keeps trying to log what is left (metrics, "
        "the model) when MLflow is unreachable.",
    )
    log_checkpoints: bool = Field(True, description="Upload each checkpoint as an artifact.")

    @model_validator(mode="after")
    def _model_name_template(self) -> Self:
        if not re.match(MODEL_NAME_PATTERN, self.model_name.replace("{owner}", "owner")):
            raise ValueError(
                f"mlflow.model_name {self.model_name!r}: letters, digits, '_', '.', '-' and "
                "'{owner}' only, starting with a letter or digit"
            )
        return self

    def model_name_for(self, owner: str) -> str:
        """The default registered model of ``owner``'s jobs."""
        safe = re.sub(r"[^A-Za-z0-9_.-]", "-", owner)
        return self.model_name.replace("{owner}", safe)[:128]


class Settings(BaseSettings):
    """Every setting of the API process (the worker reads the same class)."""

    model_config = SettingsConfigDict(
        env_prefix="REID_",
        env_file=".env",
        env_file_encoding="utf-8",
        env_nested_delimiter="__",
        extra="ignore",
    )

    environment: Literal["development", "production"] = "development"
    data_dir: Path = Field(
        Path("var"), description="Where the embedded defaults live (SQLite file, uploads, jobs)."
    )
    database_url: str = Field(
        "",
        description="SQLAlchemy URL, e.g. postgresql+psycopg://reid:pw@db/reid; "
        "empty: a SQLite file in data_dir.",
    )
    database_pool_size: int = Field(
        10,
        ge=1,
        le=100,
        description="Connections an API process keeps open to a database server (PostgreSQL): "
        "at least the requests it serves at once, or every request past it opens a connection "
        "of its own (a few ms); up to as many again are opened for bursts and closed after.",
    )
    database_ping_idle_s: float = Field(
        5.0,
        ge=0.0,
        le=3600.0,
        description="A pooled database connection idle for longer than this many seconds is "
        "pinged before a request uses it, and replaced if it is dead; 0: pinged before every "
        "use (one more round trip on every request). A connection in steady use is not: when "
        "the database restarts meanwhile, the one request that finds it cut gets a 503 to "
        "retry, and the pool reconnects.",
    )
    migrate_on_startup: bool = Field(
        False, description="Run `alembic upgrade head` when the API starts."
    )
    dataset_roots: list[Path] = Field(
        default_factory=list,
        description="Server-side folders under which datasets may be registered by path.",
    )
    upload_dir: Path | None = Field(
        None, description="Where uploaded archives are extracted; default data_dir/uploads."
    )
    jobs_dir: Path | None = Field(
        None, description="Parent of each job's output folder; default data_dir/jobs."
    )
    weights_path: Path | None = Field(
        None, description="ImageNet backbone weights given to every job (model.weights_path)."
    )
    queues: list[str] = Field(
        default_factory=lambda: ["default"],
        description="Queues a job may be sent to; the first is the default.",
    )
    limits: UploadLimits = UploadLimits()
    job_bounds: JobBounds = JobBounds()
    worker: WorkerSettings = WorkerSettings()
    mlflow: TrackingSettings = TrackingSettings()
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token of the /v1/admin routes (API key management); "
        "unset: those routes are off.",
    )
    api_key_cache_seconds: float = Field(
        10.0,
        ge=0,
        le=3600,
        description="How long the API trusts a key it verified before reading it again: a key "
        "revoked by another process (the CLI, another API worker) is refused within this many "
        "seconds (at once when revoked through this process's admin route); 0: every request.",
    )
    version_cache_seconds: float = Field(
        0.5,
        ge=0,
        le=60,
        description="How long the API trusts a job's or gallery's row version it read before "
        "reading it again, so that a conditional GET that still matches (304) needs no "
        "database read: a change written by another process (the worker's progress, the "
        "dispatcher, another API worker) shows within this many seconds (at once when made "
        "through this process's routes); 0: every conditional GET reads it.",
    )
    poll_threads: int = Field(
        4,
        ge=1,
        le=64,
        description="Threads of an API process that read the database for polls of one job "
        "or gallery (GET /v1/jobs/{id}, /v1/galleries/{id}), started with the process: a "
        "burst of polls waits for them, never for threads to be created nor behind slower "
        "routes.",
    )
    api_workers: int = Field(
        1,
        ge=1,
        le=64,
        description="API processes `python -m service serve` starts (uvicorn's workers), each "
        "with its own database pool, API key cache and row-version cache; about one per CPU "
        "core the API may use.",
    )
    log_level: Annotated[str, Field(pattern=r"^(?i:debug|info|warning|error|critical)$")] = "info"

    @model_validator(mode="after")
    def _defaults_and_secrets(self) -> Self:
        # Absolute: the paths end up in the database and in job configs, read by workers that
        # may run from another folder.
        self.data_dir = self.data_dir.absolute()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'reid.db'}"
        self.upload_dir = (self.upload_dir or self.data_dir / "uploads").absolute()
        self.jobs_dir = (self.jobs_dir or self.data_dir / "jobs").absolute()
        if not self.queues:
            raise ValueError("queues must name at least one queue (REID_QUEUES)")
        try:
            url = make_url(self.database_url)
        except ArgumentError:
            raise ValueError(
                f"database_url {self.database_url!r} is not a SQLAlchemy URL "
                "(e.g. postgresql+psycopg://user:password@host/db or sqlite:///var/reid.db)"
            ) from None
        if url.password is not None:
            self._check_secret("the password in REID_DATABASE_URL", url.password, min_length=1)
        if self.admin_token is not None:
            self._check_secret("REID_ADMIN_TOKEN", self.admin_token.get_secret_value())
        return self

    def _check_secret(self, name: str, value: str, min_length: int = MIN_SECRET_LENGTH) -> None:
        """Refuse an empty, placeholder or short secret outside development (warn inside)."""
        if value.strip().lower() not in PLACEHOLDER_SECRETS and len(value) >= min_length:
            return
        if not value.strip():
            what = "empty"
        elif value.strip().lower() in PLACEHOLDER_SECRETS:
            what = f"the placeholder {value!r}"
        else:
            what = f"shorter than {min_length} characters"
        message = (
            f"{name} is {what}; set it to a random value "
            '(e.g. python -c "import secrets; print(secrets.token_urlsafe(32))")'
        )
        if self.environment == "development":
            warnings.warn(message + " before deploying", stacklevel=3)
            return
        raise ValueError(f"{message}; refused because REID_ENVIRONMENT={self.environment}")

    # Typed views of the fields the validator fills in.
    @property
    def upload_path(self) -> Path:
        assert self.upload_dir is not None
        return self.upload_dir

    @property
    def jobs_path(self) -> Path:
        assert self.jobs_dir is not None
        return self.jobs_dir

    @property
    def mlflow_tracking_uri(self) -> str:
        """``mlflow.tracking_uri``, or a SQLite store in ``data_dir``."""
        return self.mlflow.tracking_uri or f"sqlite:///{self.data_dir / 'mlflow.db'}"

    @property
    def mlflow_artifact_location(self) -> str | None:
        """Where a new experiment keeps its artifacts (None: the tracking server decides)."""
        if self.mlflow.artifact_location:
            return self.mlflow.artifact_location
        if self.mlflow.tracking_uri:
            return None
        return (self.data_dir / "mlartifacts").as_uri()

    @property
    def broker_url(self) -> str:
        """The Celery broker: ``worker.broker_url``, or a SQLite file in ``data_dir``."""
        return self.worker.broker_url or f"sqla+sqlite:///{self.data_dir / 'broker.sqlite'}"

    @property
    def broker_visibility_timeout_s(self) -> int:
        """Longer than the longest job, so a running job's message is never redelivered."""
        if self.worker.visibility_timeout_s is not None:
            return self.worker.visibility_timeout_s
        return self.job_bounds.max_timeout_minutes * 60 + 3600


@functools.cache
def get_settings() -> Settings:
    """The process's settings (read once)."""
    return Settings()
