"""Database tables (SQLAlchemy 2, typed). Alembic creates them: see ``migrations/versions``.

A change here needs a new Alembic revision (``alembic revision --autogenerate -m ...``); the app
never calls ``create_all``.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
    literal_column,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite forgets the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware UTC datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


#: JSON columns: JSONB on PostgreSQL, JSON text elsewhere.
JSONType = JSON().with_variant(JSONB(), "postgresql")

# Named constraints: Alembic can drop and alter them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class JobState(enum.StrEnum):
    """QUEUED -> STARTING -> RUNNING -> SUCCEEDED | FAILED | CANCELLED, with CANCELLING and
    RETRYING in between. Transitions: :data:`service.core.job_states.TRANSITIONS`."""

    QUEUED = "QUEUED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    CANCELLING = "CANCELLING"
    RETRYING = "RETRYING"

    @property
    def is_final(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class DatasetKind(enum.StrEnum):
    PATH = "path"  # a folder under one of the configured dataset roots
    UPLOAD = "upload"  # an archive extracted into upload_dir


class DatasetStatus(enum.StrEnum):
    READY = "ready"
    FAILED = "failed"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored as strings with a CHECK constraint (no native PostgreSQL type to migrate).
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


class ApiKey(Base):
    """An API key: only the SHA-256 of the token is stored; the token is shown once."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class _Versioned:
    """A row version: 1 when the row is inserted, one more in every UPDATE of it, in the
    statement that makes the change (the column's ``onupdate``, so an ORM flush and a Core
    ``update()`` both bump it). The API's ETags are made of it: a poll that changed nothing is
    answered from this integer alone (:mod:`service.api.conditional`)."""

    version: Mapped[int] = mapped_column(
        Integer, default=1, server_default="1", onupdate=literal_column("version") + 1
    )


class _Run:
    """What a row a worker runs (a job, a gallery build) keeps of its run: the worker holding it
    and its last heartbeat (:mod:`service.core.heartbeat`), and when it was created, last
    changed, started and finished (the state machines set the last two)."""

    worker_id: Mapped[str | None] = mapped_column(String(256))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Dataset(Base):
    """A registered dataset: a server folder or an extracted upload, scanned once at creation."""

    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("owner", "name", name="uq_datasets_owner_name"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True, default=uuid.uuid4)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(128))
    kind: Mapped[DatasetKind] = mapped_column(_enum(DatasetKind, "dataset_kind"))
    path: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(32))  # reid_core registry name
    status: Mapped[DatasetStatus] = mapped_column(
        _enum(DatasetStatus, "dataset_status"), default=DatasetStatus.READY
    )
    image_count: Mapped[int] = mapped_column(Integer, default=0)
    identity_count: Mapped[int] = mapped_column(Integer, default=0)
    camera_count: Mapped[int] = mapped_column(Integer, default=0)
    splits: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    unreadable_count: Mapped[int] = mapped_column(Integer, default=0)
    unreadable_sample: Mapped[list[str]] = mapped_column(JSONType, default=list)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    jobs: Mapped[list[Job]] = relationship(back_populates="dataset", passive_deletes=True)


class Job(_Versioned, _Run, Base):
    """A training job. Its ``state`` changes only through :func:`service.core.job_states.change_state`."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
        Index("ix_jobs_owner_state", "owner", "state"),
        Index("ix_jobs_state_priority", "state", "priority"),
        # GET /v1/jobs: an owner's newest first (scanned backwards), without sorting them all
        Index("ix_jobs_owner_created_at", "owner", "created_at", "id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True, default=uuid.uuid4)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    dataset_id: Mapped[uuid.UUID | None] = mapped_column(
        Uuid(), ForeignKey("datasets.id", ondelete="SET NULL"), index=True
    )
    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_state"))
    reason: Mapped[str | None] = mapped_column(Text)

    config_overrides: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    resolved_config: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    gpus: Mapped[int] = mapped_column(Integer, default=1)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    queue: Mapped[str] = mapped_column(String(64), default="default")
    #: Automatic reruns after the trainer failed by itself (a crash): allowed, made.
    max_retries: Mapped[int] = mapped_column(Integer, default=0)
    retries: Mapped[int] = mapped_column(Integer, default=0)
    #: Automatic reruns after the trainer or its worker was killed from outside (the OOM
    #: killer's SIGKILL, a lost machine): allowed, made. The owner's retry resets both counts.
    max_restarts: Mapped[int] = mapped_column(Integer, default=0)
    restarts: Mapped[int] = mapped_column(Integer, default=0)
    timeout_minutes: Mapped[int] = mapped_column(Integer)
    idempotency_key: Mapped[str | None] = mapped_column(String(128))
    request_hash: Mapped[str | None] = mapped_column(String(64))

    progress: Mapped[float] = mapped_column(Float, default=0.0)
    epoch: Mapped[int | None] = mapped_column(Integer)
    step: Mapped[int | None] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    model_name: Mapped[str | None] = mapped_column(String(256))
    model_version: Mapped[str | None] = mapped_column(String(32))
    #: Problems that did not stop the job (e.g. MLflow unreachable for a while), oldest first.
    warnings: Mapped[list[str]] = mapped_column(JSONType, default=list)

    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)

    dataset: Mapped[Dataset | None] = relationship(back_populates="jobs")
    events: Mapped[list[JobEvent]] = relationship(
        back_populates="job",
        order_by="JobEvent.id",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )


class _StateChange:
    """What a state change records besides whose it is and its two states: its order, why and
    when (``job_events``, ``gallery_events``)."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    reason: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class JobEvent(_StateChange, Base):
    """One state change of a job, written in the transaction that makes it."""

    __tablename__ = "job_events"

    job_id: Mapped[uuid.UUID] = mapped_column(
        Uuid(), ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    from_state: Mapped[JobState | None] = mapped_column(_enum(JobState, "job_event_from_state"))
    to_state: Mapped[JobState] = mapped_column(_enum(JobState, "job_event_to_state"))

    job: Mapped[Job] = relationship(back_populates="events")


class GalleryState(enum.StrEnum):
    """QUEUED -> BUILDING -> READY | FAILED; changed by
    :func:`service.core.gallery_states.change_gallery_state`."""

    QUEUED = "QUEUED"
    BUILDING = "BUILDING"
    READY = "READY"
    FAILED = "FAILED"

    @property
    def is_final(self) -> bool:
        return self in (GalleryState.READY, GalleryState.FAILED)


class Gallery(_Versioned, _Run, Base):
    """A searchable index of a dataset's gallery images, embedded by one registered model version.

    The index itself lives in ``<data_dir>/galleries/<id>/`` (:mod:`service.core.folders`); the row
    keeps what it was built from, its state and progress. ``dataset_path`` is the dataset's folder
    when the gallery was created: search hits are given relative to it, and the gallery stays
    searchable after its dataset is deleted (``dataset_id`` then becomes NULL).
    """

    __tablename__ = "galleries"
    __table_args__ = (Index("ix_galleries_owner_created_at", "owner", "created_at"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True, default=uuid.uuid4)
    owner: Mapped[str] = mapped_column(String(128))
    name: Mapped[str | None] = mapped_column(String(128))
    dataset_id: Mapped[uuid.UUID | None] = mapped_column(
        Uuid(), ForeignKey("datasets.id", ondelete="SET NULL"), index=True
    )
    dataset_path: Mapped[str] = mapped_column(Text)
    dataset_format: Mapped[str] = mapped_column(String(32))
    model_name: Mapped[str] = mapped_column(String(256))
    model_version: Mapped[str] = mapped_column(String(32))  # a number, never an alias
    gpus: Mapped[int] = mapped_column(Integer, default=0)
    queue: Mapped[str] = mapped_column(String(64), default="default")

    state: Mapped[GalleryState] = mapped_column(_enum(GalleryState, "gallery_state"))
    reason: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    image_count: Mapped[int | None] = mapped_column(Integer)
    images_done: Mapped[int] = mapped_column(Integer, default=0)
    skipped_count: Mapped[int] = mapped_column(Integer, default=0)
    feature_dim: Mapped[int | None] = mapped_column(Integer)

    events: Mapped[list[GalleryEvent]] = relationship(
        back_populates="gallery",
        order_by="GalleryEvent.id",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )


class GalleryEvent(_StateChange, Base):
    """One state change of a gallery, written in the transaction that makes it."""

    __tablename__ = "gallery_events"

    gallery_id: Mapped[uuid.UUID] = mapped_column(
        Uuid(), ForeignKey("galleries.id", ondelete="CASCADE"), index=True
    )
    from_state: Mapped[GalleryState | None] = mapped_column(
        _enum(GalleryState, "gallery_event_from_state")
    )
    to_state: Mapped[GalleryState] = mapped_column(_enum(GalleryState, "gallery_event_to_state"))

    gallery: Mapped[Gallery] = relationship(back_populates="events")


class PairAnswerValue(enum.StrEnum):
    """What a person said of a pair of crops: the same person, different people, or cannot
    tell (left out of the estimates, counted apart)."""

    SAME = "same"
    DIFFERENT = "different"
    UNSURE = "unsure"


class PairCheck(Base):
    """A human check of a READY gallery: queries sampled from its images (``seed``), each with
    its nearest crops from other cameras, as the pairs a person judges
    (:mod:`service.core.pair_checks`). ``pairs`` is that sample, fixed when the check is made (a
    READY gallery never changes); the answers live in ``pair_answers``, keyed by the images, so
    another version's check of the same dataset reuses them."""

    __tablename__ = "pair_checks"
    __table_args__ = (Index("ix_pair_checks_owner_created_at", "owner", "created_at", "id"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True, default=uuid.uuid4)
    owner: Mapped[str] = mapped_column(String(128))
    gallery_id: Mapped[uuid.UUID] = mapped_column(
        Uuid(), ForeignKey("galleries.id", ondelete="CASCADE"), unique=True
    )
    dataset_id: Mapped[uuid.UUID] = mapped_column(
        Uuid(), ForeignKey("datasets.id", ondelete="CASCADE"), index=True
    )
    model_name: Mapped[str] = mapped_column(String(256))
    model_version: Mapped[str] = mapped_column(String(32))
    seed: Mapped[int] = mapped_column(Integer)
    query_count: Mapped[int] = mapped_column(Integer)
    pairs: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class PairAnswer(Base):
    """An owner's answer on a pair of images of a dataset, whichever check (model version)
    showed it. A pair is unordered: ``image_a < image_b``, paths relative to the dataset's
    folder."""

    __tablename__ = "pair_answers"
    __table_args__ = (
        UniqueConstraint(
            "owner", "dataset_id", "image_a", "image_b", name="uq_pair_answers_owner_pair"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(128))
    dataset_id: Mapped[uuid.UUID] = mapped_column(
        Uuid(), ForeignKey("datasets.id", ondelete="CASCADE"), index=True
    )
    image_a: Mapped[str] = mapped_column(Text)
    image_b: Mapped[str] = mapped_column(Text)
    answer: Mapped[PairAnswerValue] = mapped_column(_enum(PairAnswerValue, "pair_answer"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
