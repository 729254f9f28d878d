"""/v1/jobs: submit a training job, list, show (with ETag), its events, metrics, logs (tail or
followed as server-sent events), cancel, retry."""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import uuid
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from reid_core.config import ExperimentConfig
from service.auth import CurrentOwner
from service.deps import SessionDep, SettingsDep
from service.errors import APIError, not_found
from service.job_config import JobConfigError, resolve_job_config
from service.job_states import FINAL_STATES, change_state, lock_job
from service.log_stream import follow_log, tail_offset
from service.models import Dataset, DatasetStatus, Job, JobEvent, JobState
from service.schemas import (
    COMMON_ERRORS,
    JobCreate,
    JobEventOut,
    JobOut,
    Page,
    error_responses,
)
from service.settings import Settings

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=COMMON_ERRORS)
config_router = APIRouter(prefix="/v1/config", tags=["jobs"], responses=COMMON_ERRORS)

_LOG = logging.getLogger("service.jobs")


def _invalid(field: str, message: str, value: Any = None) -> APIError:
    detail: dict[str, Any] = {"field": field, "message": message}
    if value is not None:
        detail["value"] = value
    return APIError(422, "validation_error", message, details=[detail])


def _request_hash(body: JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _job_out(job: Job, settings: Settings) -> JobOut:
    out = JobOut.model_validate(job)
    if out.mlflow_run_id and settings.mlflow.ui_url:
        out.mlflow_run_url = f"{settings.mlflow.ui_url.rstrip('/')}/#/runs/{out.mlflow_run_id}"
    return out


def _existing_for_key(session: Session, owner: str, key: str, request_hash: str) -> Job | None:
    job = session.execute(
        select(Job).where(Job.owner == owner, Job.idempotency_key == key)
    ).scalar_one_or_none()
    if job is not None and job.request_hash != request_hash:
        raise APIError(
            409,
            "idempotency_key_reused",
            f"idempotency_key {key!r} was used for a different request (job {job.id}); "
            "use a new key for a new job",
        )
    return job


def _check_resources(body: JobCreate, settings: Settings) -> tuple[int, str, int]:
    """(gpus, queue, timeout_minutes) after the defaults; 422 above the service's bounds."""
    bounds = settings.job_bounds
    gpus = bounds.gpus_or_default(body.gpus)
    if gpus > bounds.max_gpus:
        raise _invalid(
            "body.gpus", f"gpus={gpus} is above this service's limit of {bounds.max_gpus}", gpus
        )
    if body.priority > bounds.max_priority:
        raise _invalid(
            "body.priority",
            f"priority={body.priority} is above the highest priority {bounds.max_priority}",
            body.priority,
        )
    if body.max_retries > bounds.max_retries:
        raise _invalid(
            "body.max_retries",
            f"max_retries={body.max_retries} is above this service's limit of {bounds.max_retries}",
            body.max_retries,
        )
    timeout = body.timeout_minutes or bounds.default_timeout_minutes
    if timeout > bounds.max_timeout_minutes:
        raise _invalid(
            "body.timeout_minutes",
            f"timeout_minutes={timeout} is above this service's limit of "
            f"{bounds.max_timeout_minutes}",
            timeout,
        )
    queue = body.queue or settings.queues[0]
    if queue not in settings.queues:
        raise _invalid(
            "body.queue",
            f"unknown queue {queue!r}; this service has: {', '.join(settings.queues)}",
            queue,
        )
    return gpus, queue, timeout


@router.post(
    "",
    status_code=201,
    response_model=JobOut,
    summary="Submit a training job (it starts QUEUED)",
    responses={
        200: {"model": JobOut, "description": "Same idempotency_key: the job it created"},
        **error_responses(
            e404="Unknown dataset",
            e409="idempotency_key reused for a different request",
            e422="Bad config key or value, or above the service's bounds",
        ),
    },
)
def create_job(
    body: JobCreate, owner: CurrentOwner, session: SessionDep, settings: SettingsDep
) -> Response:
    request_hash = _request_hash(body)
    if body.idempotency_key is not None:
        existing = _existing_for_key(session, owner, body.idempotency_key, request_hash)
        if existing is not None:
            return _job_response(existing, settings, status_code=200)
    # FOR SHARE: a concurrent DELETE of the dataset waits for this job to be committed.
    dataset = session.execute(
        select(Dataset)
        .where(Dataset.id == body.dataset_id, Dataset.owner == owner)
        .with_for_update(read=True)
    ).scalar_one_or_none()
    if dataset is None:
        raise not_found("dataset", body.dataset_id)
    if dataset.status is not DatasetStatus.READY:
        raise APIError(409, "dataset_not_ready", f"dataset {dataset.id} is {dataset.status}")
    gpus, queue, timeout = _check_resources(body, settings)
    job_id = uuid.uuid4()
    try:
        cfg = resolve_job_config(
            body.config,
            dataset_format=dataset.format,
            dataset_root=Path(dataset.path),
            output_dir=settings.jobs_path.absolute() / str(job_id),
            gpus=gpus,
            bounds=settings.job_bounds,
            weights_path=settings.weights_path,
            num_train_images=_train_images(dataset),
        )
    except JobConfigError as exc:
        details = [{**d, "field": f"body.{d['field']}"} for d in exc.details]
        raise APIError(422, "validation_error", exc.message, details=details) from None
    job = Job(
        id=job_id,
        owner=owner,
        dataset_id=dataset.id,
        config_overrides=body.config,
        resolved_config=cfg.model_dump(mode="json"),
        gpus=gpus,
        priority=body.priority,
        queue=queue,
        max_retries=body.max_retries,
        retries=0,
        timeout_minutes=timeout,
        idempotency_key=body.idempotency_key,
        request_hash=request_hash,
        progress=0.0,
        metrics={},
        warnings=[],
        model_name=body.model_name or settings.mlflow.model_name_for(owner),
        cancel_requested=False,
    )
    try:
        change_state(session, job, JobState.QUEUED, f"submitted by {owner}")  # flushes
        session.commit()
    except IntegrityError:
        # Two requests with the same idempotency key raced; the other one won.
        session.rollback()
        if body.idempotency_key is None:
            raise
        existing = _existing_for_key(session, owner, body.idempotency_key, request_hash)
        if existing is None:
            raise
        return _job_response(existing, settings, status_code=200)
    if settings.worker.enqueue_on_submit:
        _send_to_workers(settings, session, job)
    return _job_response(job, settings, status_code=201, headers={"Location": f"/v1/jobs/{job.id}"})


def _train_images(dataset: Dataset) -> int:
    """Training images of a dataset: its train split when it has one, else all its images."""
    train = (dataset.splits or {}).get("train", {}).get("images")
    return int(train) if train else int(dataset.image_count or 0)


def _send_to_workers(settings: Settings, session: Session, job: Job) -> None:
    """Publish the committed job to the broker. Never fails the request: a job the broker did
    not take stays QUEUED and the dispatcher (``python -m worker dispatcher``) sends it later."""
    try:
        from worker.dispatcher import send_and_mark
    except ImportError as exc:  # the `worker` extra is not installed here
        _LOG.warning("job %s stays QUEUED: cannot load the worker package (%s)", job.id, exc)
        return
    send_and_mark(settings, session, job)


def _job_body(job: Job, settings: Settings) -> tuple[bytes, str]:
    """The job as JSON, and its ETag: a hash of the canonical form (sorted keys), so the same
    job has the same ETag whatever order the database returns its JSON columns in."""
    data = _job_out(job, settings).model_dump(mode="json")
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    canonical = json.dumps(data, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return body, '"' + hashlib.sha256(canonical).hexdigest()[:32] + '"'


def _job_response(
    job: Job, settings: Settings, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    body, etag = _job_body(job, settings)
    return Response(
        content=body,
        status_code=status_code,
        media_type="application/json",
        headers={"ETag": etag, **(headers or {})},
    )


def _owned_job(session: Session, owner: str, job_id: uuid.UUID) -> Job:
    job = session.execute(
        select(Job).where(Job.id == job_id, Job.owner == owner)
    ).scalar_one_or_none()
    if job is None:
        raise not_found("job", job_id)
    return job


def _etag_matches(header: str, etag: str) -> bool:
    # If-None-Match uses the weak comparison (RFC 9110 13.1.2): W/ prefixes are ignored.
    candidates = [c.strip() for c in header.split(",")]
    return any(c == "*" or c.removeprefix("W/") == etag for c in candidates)


@router.get("", summary="Your jobs, newest first")
def list_jobs(
    owner: CurrentOwner,
    session: SessionDep,
    settings: SettingsDep,
    state: Annotated[list[JobState] | None, Query(description="Only these states")] = None,
    dataset_id: Annotated[uuid.UUID | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Page[JobOut]:
    conditions = [Job.owner == owner]
    if state:
        conditions.append(Job.state.in_(state))
    if dataset_id is not None:
        conditions.append(Job.dataset_id == dataset_id)
    total = session.execute(select(func.count()).select_from(Job).where(*conditions)).scalar_one()
    rows = session.execute(
        select(Job)
        .where(*conditions)
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(limit)
        .offset(offset)
    ).scalars()
    return Page[JobOut](
        items=[_job_out(j, settings) for j in rows], total=total, limit=limit, offset=offset
    )


@router.get(
    "/{job_id}",
    summary="One job: state, progress, epoch, metrics (ETag; If-None-Match answers 304)",
    response_model=JobOut,
    responses={
        304: {"description": "Not modified since the ETag given"},
        **error_responses(e404="Unknown job"),
    },
)
def get_job(
    job_id: uuid.UUID,
    owner: CurrentOwner,
    session: SessionDep,
    settings: SettingsDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    body, etag = _job_body(_owned_job(session, owner, job_id), settings)
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if if_none_match is not None and _etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    return Response(content=body, media_type="application/json", headers=headers)


@router.get(
    "/{job_id}/events",
    summary="The job's state changes, oldest first",
    responses=error_responses(e404="Unknown job"),
)
def list_job_events(
    job_id: uuid.UUID, owner: CurrentOwner, session: SessionDep
) -> list[JobEventOut]:
    job = _owned_job(session, owner, job_id)
    events = session.execute(
        select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id)
    ).scalars()
    return [JobEventOut.model_validate(e) for e in events]


def _output_file(settings: Settings, job: Job, name: str) -> Path:
    return settings.jobs_path / str(job.id) / name


@router.get(
    "/{job_id}/metrics",
    summary="Per-epoch history: mean loss per term, learning rates, images/s, evaluation",
    responses=error_responses(e404="Unknown job"),
)
def job_metrics(
    job_id: uuid.UUID, owner: CurrentOwner, session: SessionDep, settings: SettingsDep
) -> list[dict[str, Any]]:
    """One record per finished epoch, oldest first (``loss/<term>``, ``lr/group<i>``,
    ``images_per_second``, ``eval/mAP`` ... when the epoch was evaluated); empty before the first
    epoch ends."""
    job = _owned_job(session, owner, job_id)
    path = _output_file(settings, job, "metrics.jsonl")
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written right now
    return records


@router.get(
    "/{job_id}/logs",
    summary="The job's log (trainer output and supervisor notes): the last lines, or followed",
    # No default media type: the 200 is text (below), the errors JSON as everywhere else.
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {}, "text/event-stream": {}},
            "description": "The last `tail` lines; with `follow=true`, server-sent events: one "
            "`data:` event per line (its `id` is a byte offset: `Last-Event-ID` resumes there), "
            "and an `end` event with the final state once the job finished.",
        },
        **error_responses(e404="Unknown job"),
    },
)
def job_logs(
    request: Request,
    job_id: uuid.UUID,
    owner: CurrentOwner,
    session: SessionDep,
    settings: SettingsDep,
    tail: Annotated[int, Query(ge=1, le=10_000, description="How many lines")] = 200,
    follow: Annotated[
        bool, Query(description="Stream new lines as server-sent events until the job ends")
    ] = False,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Response:
    job = _owned_job(session, owner, job_id)
    path = _output_file(settings, job, "process.log")
    if follow:
        return _follow_logs(request, job.id, path, tail, last_event_id)
    if not path.is_file():
        return PlainTextResponse("")
    with path.open("rb") as f:
        lines = collections.deque(f, maxlen=tail)
    return PlainTextResponse(b"".join(lines).decode("utf-8", errors="replace"))


def _follow_logs(
    request: Request, job_id: uuid.UUID, path: Path, tail: int, last_event_id: str | None
) -> StreamingResponse:
    start = tail_offset(path, tail)
    resume = (last_event_id or "").strip()
    if resume.isascii() and resume.isdigit():
        # Never past the end: an offset from another file (or made up) resumes at its end.
        start = min(int(resume), path.stat().st_size if path.is_file() else 0)
    factory = request.app.state.session_factory

    def final_state() -> str | None:
        with factory() as session:
            state = session.execute(select(Job.state).where(Job.id == job_id)).scalar_one()
        return str(state) if state in FINAL_STATES else None

    return StreamingResponse(
        follow_log(path, start, final_state),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post(
    "/{job_id}/cancel",
    summary="Cancel a job: at once if it has not started, else via CANCELLING",
    response_model=JobOut,
    responses={
        200: {"description": "Cancelled (it had not started)"},
        202: {"model": JobOut, "description": "CANCELLING: the worker stops the trainer"},
        **error_responses(e404="Unknown job", e409="The job already finished"),
    },
)
def cancel_job(
    job_id: uuid.UUID, owner: CurrentOwner, session: SessionDep, settings: SettingsDep
) -> Response:
    job = lock_job(session, job_id, owner=owner)
    if job is None:
        raise not_found("job", job_id)
    if job.state in FINAL_STATES:
        raise APIError(
            409, "job_finished", f"job {job_id} is already {job.state}; nothing to cancel"
        )
    if job.state in (JobState.QUEUED, JobState.RETRYING):
        change_state(session, job, JobState.CANCELLED, f"cancelled by {owner} before it ran")
    elif job.state in (JobState.STARTING, JobState.RUNNING):
        change_state(session, job, JobState.CANCELLING, f"cancel requested by {owner}")
    session.commit()
    return _job_response(
        job, settings, status_code=202 if job.state is JobState.CANCELLING else 200
    )


@router.post(
    "/{job_id}/retry",
    summary="Run a FAILED or CANCELLED job again; it resumes from its last checkpoint",
    response_model=JobOut,
    status_code=202,
    responses=error_responses(
        e404="Unknown job",
        e409="The job is not FAILED or CANCELLED, or its dataset is gone",
    ),
)
def retry_job(
    job_id: uuid.UUID, owner: CurrentOwner, session: SessionDep, settings: SettingsDep
) -> Response:
    """The job goes to RETRYING with the same id, output folder and MLflow run; the trainer
    continues from the newest checkpoint in that folder (from scratch when there is none)."""
    job = lock_job(session, job_id, owner=owner)
    if job is None:
        raise not_found("job", job_id)
    if job.state not in (JobState.FAILED, JobState.CANCELLED):
        hint = "cancel it first" if job.state not in FINAL_STATES else "submit a new job"
        raise APIError(
            409,
            "job_not_retryable",
            f"job {job_id} is {job.state}; only FAILED or CANCELLED jobs can be retried ({hint})",
        )
    dataset = None
    if job.dataset_id is not None:
        dataset = session.execute(
            select(Dataset).where(Dataset.id == job.dataset_id).with_for_update(read=True)
        ).scalar_one_or_none()
    if dataset is None or dataset.status is not DatasetStatus.READY:
        raise APIError(
            409,
            "dataset_gone",
            f"job {job_id} cannot be retried: its dataset {job.dataset_id} was deleted or is "
            "not ready",
        )
    change_state(
        session,
        job,
        JobState.RETRYING,
        f"retry requested by {owner} (was {job.state}): resumes from its last checkpoint",
    )
    session.commit()
    if settings.worker.enqueue_on_submit:
        _send_to_workers(settings, session, job)
    return _job_response(job, settings, status_code=202)


@config_router.get("/defaults", summary="The default training configuration")
def config_defaults(_owner: CurrentOwner) -> ExperimentConfig:
    """reid_core's defaults (the paper's settings); a job's ``config`` overrides any of them,
    except the dataset, its folder and the output folder, which the service sets."""
    return ExperimentConfig()
