"""Training jobs: submit (idempotent), preview, list, show, follow, cancel, retry.

A job is committed QUEUED, then its id is sent to the workers (:mod:`service.core.broker`); a job
the broker did not take stays QUEUED and the dispatcher (``python -m worker dispatcher``) sends it
later. Every state change goes through :func:`service.core.job_states.change_state`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, load_only, sessionmaker

from reid_core.config import ExperimentConfig
from reid_core.run_dir import EpochMetrics
from service.core.broker import send_committed, send_committed_jobs, stamp_send
from service.core.datasets import check_ready, train_images
from service.core.errors import ConflictError, InvalidInputError, ServiceError, not_found
from service.core.folders import job_dir
from service.core.group_commit import GroupCommitter
from service.core.job_config import JobConfigError, resolve_job_config
from service.core.job_states import FINAL_STATES, JOBS, change_state
from service.core.model_cache import LoadingLRU
from service.core.models import Dataset, DatasetStatus, Job, JobEvent, JobState
from service.core.owned import Cursor, OwnedPage, RowVersion, owned, owned_page_versions
from service.core.presets import preset_settings
from service.core.settings import Settings


@dataclass(frozen=True)
class JobRequest:
    """What a client asks for (the API's ``JobCreate``, field for field)."""

    dataset_id: uuid.UUID
    config: dict[str, Any] = field(default_factory=dict)
    gpus: int | None = None
    priority: int = 0
    queue: str | None = None
    max_retries: int = 0
    timeout_minutes: int | None = None
    idempotency_key: str | None = None
    model_name: str | None = None
    max_restarts: int | None = None
    preset: str | None = None

    def digest(self) -> str:
        """SHA-256 of the request's canonical JSON: the same key with another request is refused."""
        # fields' values as they are (asdict would deep-copy the config first): the same JSON
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["dataset_id"] = str(self.dataset_id)
        # as before these fields existed: a request repeated across the upgrade is the same one
        for name in ("max_restarts", "preset"):
            if data[name] is None:
                del data[name]
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def check_queue(settings: Settings, queue: str | None) -> str:
    """``queue``, or the service's first queue; refused when the service has no such queue."""
    queue = queue or settings.queues[0]
    if queue not in settings.queues:
        raise InvalidInputError(
            f"unknown queue {queue!r}; this service has: {', '.join(settings.queues)}",
            "queue",
            queue,
        )
    return queue


@dataclass(frozen=True)
class _Resources:
    """What a job gets once the service's defaults filled what the request left out."""

    gpus: int
    queue: str
    timeout_minutes: int
    max_restarts: int


def check_limit(name: str, value: int, limit: int) -> None:
    """Refused when ``value`` of the request field ``name`` is above this service's ``limit``."""
    if value > limit:
        raise InvalidInputError(
            f"{name}={value} is above this service's limit of {limit}", name, value
        )


def _check_resources(request: JobRequest, settings: Settings) -> _Resources:
    """The request's resources after the defaults; refused above the service's bounds."""
    bounds = settings.job_bounds
    gpus = bounds.gpus_or_default(request.gpus)
    check_limit("gpus", gpus, bounds.max_gpus)
    if request.priority > bounds.max_priority:
        raise InvalidInputError(
            f"priority={request.priority} is above the highest priority {bounds.max_priority}",
            "priority",
            request.priority,
        )
    check_limit("max_retries", request.max_retries, bounds.max_retries)
    max_restarts = bounds.default_restarts if request.max_restarts is None else request.max_restarts
    check_limit("max_restarts", max_restarts, bounds.max_restarts)
    timeout = request.timeout_minutes or bounds.default_timeout_minutes
    check_limit("timeout_minutes", timeout, bounds.max_timeout_minutes)
    return _Resources(gpus, check_queue(settings, request.queue), timeout, max_restarts)


@dataclass(frozen=True)
class JobPreview:
    """What a job of a request would run with: its configuration and resources."""

    config: ExperimentConfig
    gpus: int
    queue: str


@dataclass(frozen=True)
class Submission:
    """One owner's request for a job, as :func:`submit_jobs` takes it."""

    owner: str
    request: JobRequest


def _shared_datasets(session: Session, ids: Collection[uuid.UUID]) -> dict[uuid.UUID, Dataset]:
    """The datasets of ``ids`` that exist, locked FOR SHARE: a concurrent DELETE of one waits
    for the jobs of this transaction to be committed."""
    rows = session.execute(
        select(Dataset).where(Dataset.id.in_(ids)).with_for_update(read=True)
    ).scalars()
    return {dataset.id: dataset for dataset in rows}


def _checked(
    settings: Settings, owner: str, request: JobRequest, dataset: Dataset | None
) -> tuple[Dataset, _Resources]:
    """``request``'s dataset (locked by :func:`_shared_datasets`; None: it does not exist) and
    resources, every check of a submission but its configuration's done."""
    if dataset is None or dataset.owner != owner:
        raise not_found("dataset", request.dataset_id)
    check_ready(dataset)
    return dataset, _check_resources(request, settings)


def _config(
    settings: Settings,
    request: JobRequest,
    dataset: Dataset,
    resources: _Resources,
    job_id: uuid.UUID,
) -> ExperimentConfig:
    """The configuration of job ``job_id`` of ``request`` (:func:`_checked`)."""
    preset = None if request.preset is None else preset_settings(request.preset)
    try:
        return resolve_job_config(
            request.config,
            preset=preset,
            dataset_format=dataset.format,
            dataset_root=Path(dataset.path),
            output_dir=job_dir(settings, job_id).path,
            gpus=resources.gpus,
            bounds=settings.job_bounds,
            weights_path=settings.weights_path,
            num_train_images=train_images(dataset),
        )
    except JobConfigError as exc:
        raise InvalidInputError(exc.message, details=exc.details) from None


class ResolvedConfigs:
    """The resolved configurations (as JSON) of the last ``size`` different requests of one
    service, so that a request like an earlier one (the jobs of a sweep, a script's repeated
    submission) is not validated again. The key is all that a configuration depends on but the
    job's own folder (``runtime.output_dir``), which each job's copy gets; the service's
    settings are the same for every key (one cache per :func:`job_submissions`). A refused
    configuration is not kept: it is refused again, with its error."""

    def __init__(self, settings: Settings, size: int = 256) -> None:
        self.settings = settings
        self._kept: LoadingLRU[tuple[Any, ...], dict[str, Any]] = LoadingLRU(size)

    def resolved(
        self, request: JobRequest, dataset: Dataset, resources: _Resources, job_id: uuid.UUID
    ) -> dict[str, Any]:
        """Job ``job_id``'s resolved configuration, as :func:`_config` dumps it."""
        key = (
            # in the request's order: a key set twice (nested and dotted) takes its last value
            json.dumps(request.config, separators=(",", ":")),
            request.preset,
            dataset.id,
            dataset.format,
            dataset.path,
            train_images(dataset),
            resources.gpus,
        )

        def resolve() -> dict[str, Any]:
            config = _config(self.settings, request, dataset, resources, job_id)
            return config.model_dump(mode="json")

        kept = self._kept.get_or_load(key, resolve)
        output_dir = str(job_dir(self.settings, job_id).path)
        # the job's own copy of what it changes; the rest is shared and never written to
        return kept | {"runtime": kept["runtime"] | {"output_dir": output_dir}}


def preview_job(
    session: Session, settings: Settings, owner: str, request: JobRequest
) -> JobPreview:
    """What :func:`submit_jobs` would create for ``request``, refused as it would be; nothing is
    created. ``runtime.output_dir`` names a new id: a job gets its own."""
    dataset = _shared_datasets(session, [request.dataset_id]).get(request.dataset_id)
    dataset, resources = _checked(settings, owner, request, dataset)
    cfg = _config(settings, request, dataset, resources, uuid.uuid4())
    return JobPreview(cfg, resources.gpus, resources.queue)


def _new_job(
    settings: Settings,
    submission: Submission,
    dataset: Dataset | None,
    configs: ResolvedConfigs | None = None,
) -> Job:
    """The job of ``submission`` before it is QUEUED (its configuration from ``configs`` where
    given); refused (:class:`ServiceError`) as the submission would be."""
    owner, request = submission.owner, submission.request
    job_id = uuid.uuid4()
    dataset, resources = _checked(settings, owner, request, dataset)
    if configs is None:
        resolved = _config(settings, request, dataset, resources, job_id).model_dump(mode="json")
    else:
        resolved = configs.resolved(request, dataset, resources, job_id)
    return Job(
        id=job_id,
        owner=owner,
        dataset_id=dataset.id,
        config_overrides=request.config,
        resolved_config=resolved,
        gpus=resources.gpus,
        priority=request.priority,
        queue=resources.queue,
        max_retries=request.max_retries,
        retries=0,
        max_restarts=resources.max_restarts,
        restarts=0,
        timeout_minutes=resources.timeout_minutes,
        idempotency_key=request.idempotency_key,
        request_hash=request.digest(),
        progress=0.0,
        metrics={},
        warnings=[],
        model_name=request.model_name or settings.mlflow.model_name_for(owner),
        cancel_requested=False,
    )


#: What :func:`submit_jobs` answers for one submission: ``(job, created)`` or why it was refused.
SubmitOutcome = tuple[Job, bool] | ServiceError


def submit_jobs(
    session: Session,
    settings: Settings,
    submissions: Sequence[Submission],
    configs: ResolvedConfigs | None = None,
) -> list[SubmitOutcome]:
    """Each submission's outcome, in order: ``(job, created)`` for a new QUEUED job, committed
    stamped as sent (:func:`stamp_send`) for the caller to send (:func:`publish_new`), or
    (created False) the job an earlier request with the same idempotency key created; else the
    :class:`ServiceError` that refused it.

    The new jobs of all the submissions are committed in one transaction (the group commit of
    ``POST /v1/jobs``: :func:`job_submissions`). A key is not looked up first: its unique index
    refuses a repeated one, and then each submission is made again in a transaction of its
    own, so that one repeated key costs the others nothing but the retry. ``configs``: where
    the configurations are resolved (:class:`ResolvedConfigs`), else each anew."""
    outcomes: list[SubmitOutcome] = []
    events: list[JobEvent] = []
    datasets = _shared_datasets(session, {s.request.dataset_id for s in submissions})
    sending = settings.worker.enqueue_on_submit
    for submission in submissions:
        try:
            dataset = datasets.get(submission.request.dataset_id)
            job = _new_job(settings, submission, dataset, configs)
        except ServiceError as exc:
            # A repeated request gets its job even where it would not be accepted any more.
            # (The lookup must not flush the jobs so far: their keys are checked by the commit.)
            with session.no_autoflush:
                earlier = _earlier(session, submission)
            outcomes.append(exc if earlier is None else earlier)
            continue
        if sending:
            stamp_send(job)
        reason = f"submitted by {job.owner}"
        events.append(change_state(session, job, JobState.QUEUED, reason, defer=True))
        outcomes.append((job, True))
    try:
        # one statement run for all the jobs, then one for their events
        session.flush()
        JOBS.write_events(session, events)
        session.commit()
    except IntegrityError:
        # A key used before, by an earlier or concurrent request or by another of this group.
        session.rollback()
        if len(submissions) > 1:
            return [
                submit_jobs(session, settings, [submission], configs)[0]
                for submission in submissions
            ]
        earlier = _earlier(session, submissions[0])
        if earlier is None:
            raise
        outcomes = [earlier]
    # The jobs answered keep what was committed: a later rollback in this session (a refused
    # send's, the next submission's) must not expire them.
    session.expunge_all()
    return outcomes


def publish_new(
    session: Session, settings: Settings, outcomes: Sequence[tuple[Job, bool] | BaseException]
) -> None:
    """Send the jobs :func:`submit_jobs` created (``outcomes``' created ones) to the workers,
    in one batch (:func:`~service.core.broker.send_committed_jobs`: a job the broker did not
    take gets its stamp back in ``session``). Nothing when the service does not send on submit
    (``REID_WORKER__ENQUEUE_ON_SUBMIT``)."""
    created = [o[0] for o in outcomes if not isinstance(o, BaseException) and o[1]]
    if settings.worker.enqueue_on_submit:
        send_committed_jobs(settings, session, created)


def _earlier(session: Session, submission: Submission) -> SubmitOutcome | None:
    """The job an earlier request with ``submission``'s idempotency key created (created False),
    a ConflictError where that key was used for a different request, None where it was not
    used (or the submission has no key)."""
    key = submission.request.idempotency_key
    if key is None:
        return None
    job = session.execute(
        select(Job).where(Job.owner == submission.owner, Job.idempotency_key == key)
    ).scalar_one_or_none()
    if job is None:
        return None
    if job.request_hash != submission.request.digest():
        return ConflictError(
            "idempotency_key_reused",
            f"idempotency_key {key!r} was used for a different request (job {job.id}); "
            "use a new key for a new job",
        )
    return job, False


def job_submissions(
    session_factory: sessionmaker[Session], settings: Settings, *, max_group: int = 32
) -> GroupCommitter[Submission, tuple[Job, bool]]:
    """The submissions of an API process, committed in groups by one thread (each group in a
    session of ``session_factory``: :func:`submit_jobs`) and sent to the workers by a second
    one (:func:`publish_new`), so that a group commits while the one before it is being sent.
    A request is answered once its job was sent."""

    configs = ResolvedConfigs(settings)

    def submit_group(group: Sequence[Submission]) -> list[SubmitOutcome]:
        with session_factory() as session:
            return submit_jobs(session, settings, group, configs)

    def publish_group(outcomes: Sequence[tuple[Job, bool] | BaseException]) -> None:
        with session_factory() as session:
            publish_new(session, settings, outcomes)

    return GroupCommitter(
        submit_group, then=publish_group, max_group=max_group, name="job-submissions"
    )


#: What a list item shows of a job (``GET /v1/jobs``): everything but its configuration, which
#: is what makes a job row large (a resolved config is ~3 KB of JSON).
SUMMARY_COLUMNS = tuple(
    column.key
    for column in Job.__table__.columns
    if column.key not in ("config_overrides", "resolved_config", "request_hash")
)


def list_jobs(
    session: Session,
    owner: str,
    *,
    states: list[JobState] | None,
    dataset_id: uuid.UUID | None,
    limit: int,
    offset: int = 0,
    after: Cursor | None = None,
) -> OwnedPage[RowVersion]:
    """``owner``'s jobs (in ``states``, of ``dataset_id``), newest first, with their count: the
    id, version and creation of each (:func:`jobs_by_id` reads the rows)."""
    filters: dict[str, Any] = {}
    if states:
        filters["state"] = list(states)
    if dataset_id is not None:
        filters["dataset_id"] = dataset_id
    return owned_page_versions(
        session, Job, owner, filters=filters, limit=limit, offset=offset, after=after
    )


def jobs_by_id(
    session: Session, owner: str, ids: Collection[uuid.UUID], *, full: bool = False
) -> list[Job]:
    """``owner``'s jobs of ``ids`` (those that exist), in no order. Unless ``full``, without
    their configuration (:data:`SUMMARY_COLUMNS`)."""
    if not ids:
        return []
    query = select(Job).where(Job.owner == owner, Job.id.in_(ids))
    if not full:
        query = query.options(load_only(*(getattr(Job, c) for c in SUMMARY_COLUMNS)))
    return list(session.execute(query).scalars())


def owned_job(session: Session, owner: str, job_id: uuid.UUID) -> Job:
    return owned(session, Job, owner, job_id, "job")


def job_events(session: Session, owner: str, job_id: uuid.UUID) -> list[JobEvent]:
    """The job's state changes, oldest first."""
    return list(owned_job(session, owner, job_id).events)


def job_metrics(settings: Settings, job: Job) -> list[EpochMetrics]:
    """The job's ``metrics.jsonl``, oldest first: the evaluation before training (epoch 0) when
    ``eval.at_start`` ran, then one record per finished epoch; empty before the first."""
    return job_dir(settings, job.id).read_metrics()


def log_path(settings: Settings, job: Job) -> Path:
    """The job's log: the trainer's output and the supervisor's notes."""
    return job_dir(settings, job.id).process_log


def final_state(session: Session, job_id: uuid.UUID) -> str | None:
    """The job's state when it is final, else None."""
    state = session.execute(select(Job.state).where(Job.id == job_id)).scalar_one()
    return str(state) if state in FINAL_STATES else None


def cancel_job(session: Session, owner: str, job_id: uuid.UUID) -> Job:
    """CANCELLED at once when it has not started, else CANCELLING (the worker stops the
    trainer); refused for a finished job."""
    job = JOBS.lock_owned(session, job_id, owner)
    if job.state in FINAL_STATES:
        raise ConflictError(
            "job_finished", f"job {job_id} is already {job.state}; nothing to cancel"
        )
    if job.state in (JobState.QUEUED, JobState.RETRYING):
        change_state(session, job, JobState.CANCELLED, f"cancelled by {owner} before it ran")
    elif job.state in (JobState.STARTING, JobState.RUNNING):
        change_state(session, job, JobState.CANCELLING, f"cancel requested by {owner}")
    session.commit()
    return job


def retry_job(session: Session, settings: Settings, owner: str, job_id: uuid.UUID) -> Job:
    """A FAILED or CANCELLED job to RETRYING with the same id, output folder and MLflow run; the
    trainer continues from the newest checkpoint in that folder (from scratch when none). The
    owner's retry is not an automatic one: the job gets its restarts and retries afresh."""
    job = JOBS.lock_owned(session, job_id, owner)
    if job.state not in (JobState.FAILED, JobState.CANCELLED):
        hint = "cancel it first" if job.state not in FINAL_STATES else "submit a new job"
        raise ConflictError(
            "job_not_retryable",
            f"job {job_id} is {job.state}; only FAILED or CANCELLED jobs can be retried ({hint})",
        )
    dataset = None
    if job.dataset_id is not None:
        dataset = session.execute(
            select(Dataset).where(Dataset.id == job.dataset_id).with_for_update(read=True)
        ).scalar_one_or_none()
    if dataset is None or dataset.status is not DatasetStatus.READY:
        raise ConflictError(
            "dataset_gone",
            f"job {job_id} cannot be retried: its dataset {job.dataset_id} was deleted or is "
            "not ready",
        )
    change_state(
        session,
        job,
        JobState.RETRYING,
        f"retry requested by {owner} (was {job.state}): resumes from its last checkpoint; "
        f"restarts and retries count from 0 again ({job.max_restarts} and {job.max_retries} "
        "allowed)",
    )
    sending = settings.worker.enqueue_on_submit
    if sending:
        stamp_send(job)
    session.commit()
    if sending:
        send_committed(settings, session, job)
    return job
