"""/v1/jobs: submit a training job (or preview it), list, show (with ETag), its events, metrics,
logs (tail or followed as server-sent events), cancel, retry (the rules: :mod:`service.core.jobs`)."""

from __future__ import annotations

import asyncio
import collections
import uuid
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse

from reid_core.config import ExperimentConfig
from reid_core.run_dir import EpochMetrics
from service.api.auth import CurrentOwner
from service.api.conditional import (
    NOT_MODIFIED,
    ConditionalGetDep,
    IfNoneMatch,
    list_etag,
    matches,
    not_modified,
    row_etag,
    tagged,
    tagged_json,
)
from service.api.deps import (
    BodyCacheDep,
    JobSubmissionsDep,
    PageDep,
    ReadSessionDep,
    SessionDep,
    SettingsDep,
)
from service.api.log_stream import follow_log, tail_offset
from service.api.schemas import (
    COMMON_ERRORS,
    JobCreate,
    JobEventOut,
    JobOut,
    JobPreviewOut,
    JobSummary,
    Page,
    error_responses,
)
from service.core import jobs
from service.core.models import Job, JobState
from service.core.registry import mlflow_ui_url
from service.core.row_versions import OwnedRow
from service.core.settings import Settings

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=COMMON_ERRORS)
config_router = APIRouter(prefix="/v1/config", tags=["jobs"], responses=COMMON_ERRORS)


def _job_out(job: Job, settings: Settings, model: type[JobSummary] = JobOut) -> JobSummary:
    out = model.model_validate(job)
    if out.mlflow_run_id:
        out.mlflow_run_url = mlflow_ui_url(settings, f"runs/{out.mlflow_run_id}")
    return out


#: What refuses a job's request, submitted or previewed.
_REQUEST_ERRORS = {
    "e404": "Unknown dataset or preset",
    "e422": "Bad config key or value, or above the service's bounds",
}


@router.post(
    "",
    status_code=201,
    response_model=JobOut,
    summary="Submit a training job (it starts QUEUED)",
    responses={
        200: {"model": JobOut, "description": "Same idempotency_key: the job it created"},
        **error_responses(**_REQUEST_ERRORS, e409="idempotency_key reused for a different request"),
    },
)
async def create_job(
    body: JobCreate, owner: CurrentOwner, submissions: JobSubmissionsDep, settings: SettingsDep
) -> Response:
    # Committed with the submissions that arrive with it, in one transaction.
    submission = jobs.Submission(owner, jobs.JobRequest(**body.model_dump()))
    job, created = await asyncio.wrap_future(submissions.submit(submission))
    if not created:
        return _job_response(job, settings, status_code=200)
    return _job_response(job, settings, status_code=201, headers={"Location": f"/v1/jobs/{job.id}"})


@router.post(
    "/preview",
    summary="Resolve a job's configuration without submitting it",
    responses=error_responses(**_REQUEST_ERRORS, e409="The dataset is not ready"),
)
def preview_job(
    body: JobCreate, owner: CurrentOwner, session: SessionDep, settings: SettingsDep
) -> JobPreviewOut:
    """The same body as ``POST /v1/jobs`` and the same checks; answers the configuration the job
    would run with (defaults, preset, overrides, then the service's keys), its GPUs and queue.
    Nothing is created; ``idempotency_key`` is not looked at."""
    preview = jobs.preview_job(session, settings, owner, jobs.JobRequest(**body.model_dump()))
    return JobPreviewOut.model_validate(preview)


def _job_response(
    job: Job, settings: Settings, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """The job as JSON with its ETag (the row version: :mod:`service.api.conditional`)."""
    etag = row_etag(JobOut, settings, job.version)
    return tagged(_job_out(job, settings), etag, status_code, headers)


class JobView(StrEnum):
    summary = "summary"
    full = "full"


@router.get(
    "",
    summary="Your jobs, newest first (weak ETag; If-None-Match answers 304)",
    response_model=Page[JobSummary] | Page[JobOut],
    responses={304: {"description": "The page did not change since the ETag given"}},
)
def list_jobs(
    owner: CurrentOwner,
    session: ReadSessionDep,
    settings: SettingsDep,
    bodies: BodyCacheDep,
    paging: PageDep,
    state: Annotated[list[JobState] | None, Query(description="Only these states")] = None,
    dataset_id: Annotated[uuid.UUID | None, Query()] = None,
    view: Annotated[
        JobView, Query(description="`summary`: no configuration; `full`: as GET /v1/jobs/{id}")
    ] = JobView.summary,
    if_none_match: IfNoneMatch = None,
) -> Response:
    """The page's ids and versions are read first: its ETag, and the 304, need nothing else.
    Each item is the JSON kept for its job's version (:mod:`service.api.body_cache`), shared
    with ``GET /v1/jobs/{id}`` for ``view=full``; the jobs without one are read by id."""
    full = view is JobView.full
    page = jobs.list_jobs(
        session,
        owner,
        states=state,
        dataset_id=dataset_id,
        limit=paging.limit,
        offset=paging.offset,
        after=paging.after,
    )
    item: type[JobSummary] = JobOut if full else JobSummary
    query = f"{paging.query()}&state={','.join(state or [])}&dataset_id={dataset_id}&view={view}"
    listed = [(row.id, row.version) for row in page.rows]
    etag = list_etag(item, settings, query, listed, page.total)
    if matches(if_none_match, etag):
        return not_modified(etag)
    items = bodies.items(
        item,
        owner,
        listed,
        lambda ids: jobs.jobs_by_id(session, owner, ids, full=full),
        lambda job: _job_out(job, settings, item),
    )
    shown = [(ident, version) for ident, version, _ in items]
    if shown != listed:  # a job changed or was deleted since the page was read
        etag = list_etag(item, settings, query, shown, page.total)
    body = Page[item].json_of([json for *_, json in items], page, paging.limit, paging.offset)  # type: ignore[valid-type]
    return tagged_json(body, etag)


# `:uuid`: only a UUID routes here, so /v1/jobs/preview is never a job id (GET on it is a
# 405 naming POST, not a 422 for job_id) and a malformed id is no route (404).
@router.get(
    "/{job_id:uuid}",
    summary="One job: state, progress, epoch, metrics (ETag; If-None-Match answers 304)",
    response_model=JobOut,
    responses={**NOT_MODIFIED, **error_responses(e404="Unknown job")},
)
async def get_job(
    job_id: uuid.UUID, owner: CurrentOwner, conditional: ConditionalGetDep
) -> Response:
    """With ``If-None-Match``, the job's version is looked at first: a job that did not change
    is a 304 from the API process's row-version cache (no database read) or after reading that
    one integer. Async so that the cached 304 never waits for the thread pool; the database is
    read there."""
    return await conditional.answer(
        OwnedRow(Job, job_id, owner), JobOut, lambda job: _job_out(job, conditional.settings)
    )


@router.get(
    "/{job_id:uuid}/events",
    summary="The job's state changes, oldest first",
    responses=error_responses(e404="Unknown job"),
)
def list_job_events(
    job_id: uuid.UUID, owner: CurrentOwner, session: ReadSessionDep
) -> list[JobEventOut]:
    events = jobs.job_events(session, owner, job_id)
    return [JobEventOut.model_validate(e) for e in events]


@router.get(
    "/{job_id:uuid}/metrics",
    summary="Per-epoch history: mean loss per term, learning rates, images/s, evaluation "
    "(epoch 0: before training)",
    responses=error_responses(e404="Unknown job"),
)
def job_metrics(
    job_id: uuid.UUID, owner: CurrentOwner, session: ReadSessionDep, settings: SettingsDep
) -> list[EpochMetrics]:
    """One record per finished epoch, oldest first (``loss/<term>``, ``lr/group<i>``,
    ``images_per_second``; ``eval/mAP`` ... and the label-free signals ``label_free/<name>``
    when the epoch was evaluated); before them, when the job evaluates before training
    (``eval.at_start``), a record of epoch 0 holding that evaluation's ``eval/<metric>`` and
    ``label_free/<name>`` alone. Empty before the first record."""
    return jobs.job_metrics(settings, jobs.owned_job(session, owner, job_id))


@router.get(
    "/{job_id:uuid}/logs",
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
    job = jobs.owned_job(session, owner, job_id)
    path = jobs.log_path(settings, job)
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
            return jobs.final_state(session, job_id)

    return StreamingResponse(
        follow_log(path, start, final_state),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post(
    "/{job_id:uuid}/cancel",
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
    job = jobs.cancel_job(session, owner, job_id)
    return _job_response(
        job, settings, status_code=202 if job.state is JobState.CANCELLING else 200
    )


@router.post(
    "/{job_id:uuid}/retry",
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
    job = jobs.retry_job(session, settings, owner, job_id)
    return _job_response(job, settings, status_code=202)


@config_router.get("/defaults", summary="The default training configuration")
def config_defaults(_owner: CurrentOwner) -> ExperimentConfig:
    """reid_core's defaults (the paper's settings); a job's ``config`` overrides any of them,
    except the dataset, its folder and the output folder, which the service sets."""
    return ExperimentConfig()
