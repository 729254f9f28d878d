"""The Celery broker as the service uses it: the task names, the queues, and publishing.

Messages carry only an id; the database says what to run and in which state it is. The API and the
dispatcher publish here; the workers (:mod:`worker.celery_app`) consume with the same app
configuration. Celery is imported on first use, so the API runs without the ``worker`` extra (a
job then stays QUEUED, a gallery fails with the reason).

* **Queues by resource**: ``cpu``, ``gpu1``, ``gpu2``, ... (:func:`resource_queue`); a job sent to
  a queue other than the service's default one (``REID_QUEUES``) goes to ``<queue>.gpuN``.
* **Priorities**: jobs have 0 (lowest) to ``max_priority``; a gallery build goes first.
* **Publish after commit**: the row is committed first, then its id is sent; a refused send
  leaves the row for the dispatcher (jobs) or the owner's retry (galleries). The API stamps a
  job as sent (``heartbeat_at``) in the transaction that commits it (:func:`stamp_send`), so a
  submission costs one transaction; a refused send takes the stamp back
  (:func:`send_committed`) and the dispatcher sends the job ``dispatch_grace_s`` later. An API
  process that dies between its commit and its send leaves a stamped job: the dispatcher sends
  it ``requeue_after_s`` after the stamp.
* **Late acks.** ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged
  when its task returns, so a worker that dies mid-job leaves it to be redelivered.
  ``worker_prefetch_multiplier=1``: a busy worker does not hold other jobs' messages.
* **Visibility timeout** (Redis): longer than the longest job
  (:attr:`service.core.settings.Settings.broker_visibility_timeout_s`), so the message of a job
  still running is never handed to a second worker.
"""

from __future__ import annotations

import logging
import threading
import uuid
import warnings
from collections.abc import Sequence
from contextlib import ExitStack, nullcontext
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from service.core.job_states import WAITING_STATES
from service.core.models import Gallery, Job, utcnow
from service.core.settings import Settings

if TYPE_CHECKING:
    from celery import Celery
    from kombu import Producer

log = logging.getLogger("service.broker")

#: The job supervisor's task (:func:`worker.supervisor.run_job`); its one argument: the job id.
RUN_JOB_TASK = "worker.run_job"
#: The gallery builder's task (:func:`worker.gallery_task.build_gallery_task`): a gallery id.
BUILD_GALLERY_TASK = "worker.build_gallery"


def resource_queue(gpus: int, queue: str | None = None, default_queue: str | None = None) -> str:
    """The broker queue of a job: ``cpu`` or ``gpu<N>``, prefixed ``<queue>.`` unless ``queue``
    is the service's default queue (or None)."""
    resource = "cpu" if gpus <= 0 else f"gpu{gpus}"
    if queue is None or queue == default_queue:
        return resource
    return f"{queue}.{resource}"


def celery_priority(priority: int, max_priority: int) -> int:
    """Jobs have 0 (lowest) .. max_priority; Celery on Redis consumes 0 first."""
    return max(0, min(9, max_priority - priority))


def _transport_options(broker_url: str, visibility_timeout: int) -> dict[str, Any]:
    # A publisher facing a dead broker gives up fast (the job stays QUEUED in the database).
    options: dict[str, Any] = {"max_retries": 1, "interval_start": 0, "interval_step": 0.5}
    if broker_url.startswith(("redis://", "rediss://", "redis+socket://", "sentinel://")):
        options |= {
            "visibility_timeout": visibility_timeout,
            # One list per priority, consumed highest first (see celery_priority).
            "queue_order_strategy": "priority",
            "priority_steps": list(range(10)),
            "sep": ":",
            "socket_connect_timeout": 5,
            "socket_timeout": 30,
        }
    return options


def create_celery_app(settings: Settings) -> Celery:
    """A Celery app for ``settings``' broker, configured for long supervised jobs."""
    from celery import Celery

    visibility = settings.broker_visibility_timeout_s
    longest = settings.job_bounds.max_timeout_minutes * 60
    if visibility <= longest:
        warnings.warn(
            f"REID_WORKER__VISIBILITY_TIMEOUT_S={visibility} is not longer than the longest job "
            f"({longest} s): a running job's message may be redelivered to another worker "
            "(which then leaves the job alone while its heartbeat is fresh)",
            stacklevel=2,
        )
    if settings.broker_url.startswith("sqla+"):
        # kombu's SQLAlchemy transport maps with ``noload``, deprecated by SQLAlchemy 2.1.
        warnings.filterwarnings("ignore", message=r".*``noload`` loader strategy is deprecated")
    if settings.broker_url.startswith("sqla+sqlite:///"):
        # The embedded broker's folder (kombu does not create it).
        Path(settings.broker_url.removeprefix("sqla+sqlite:///")).parent.mkdir(
            parents=True, exist_ok=True
        )
    app = Celery("reid_worker", broker=settings.broker_url)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_pool="solo",
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=resource_queue(0),
        task_create_missing_queues=True,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        broker_transport_options=_transport_options(settings.broker_url, visibility),
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_enable_remote_control=False,
        enable_utc=True,
    )
    return app


_APPS: dict[str, Celery] = {}
_APPS_LOCK = threading.Lock()


def celery_app_for(settings: Settings) -> Celery:
    """One app per broker URL (the API may run with settings other than the process's)."""
    with _APPS_LOCK:
        app = _APPS.get(settings.broker_url)
        if app is None:
            app = _APPS[settings.broker_url] = create_celery_app(settings)
        return app


def _publish(
    settings: Settings,
    task: str,
    ident: uuid.UUID,
    queue: str,
    priority: int,
    producer: Producer | None = None,
) -> None:
    celery_app_for(settings).send_task(
        task, args=[str(ident)], queue=queue, priority=priority, retry=False, producer=producer
    )


def send_job(settings: Settings, job: Job, producer: Producer | None = None) -> bool:
    """Publish ``job``'s id to its queue (with ``producer``, one of the broker's pool that the
    caller holds); False (and a warning) when the broker refuses."""
    queue = resource_queue(job.gpus, job.queue, settings.queues[0])
    priority = celery_priority(job.priority, settings.job_bounds.max_priority)
    try:
        _publish(settings, RUN_JOB_TASK, job.id, queue, priority, producer)
    except Exception as exc:  # any broker error (or no Celery here): the database keeps the job
        log.warning(
            "job %s: the broker did not take it (%s: %s); it stays %s and the dispatcher "
            "sends it later",
            job.id,
            type(exc).__name__,
            exc,
            job.state,
        )
        return False
    log.info("job %s sent to queue %s", job.id, queue)
    return True


def mark_dispatched(session: Session, job_id: uuid.UUID, now: datetime | None = None) -> int | None:
    """Record a send in ``heartbeat_at`` if the job still waits (no worker took it meanwhile);
    the job's new row version when it did, else None."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_(WAITING_STATES))
        .values(heartbeat_at=now or utcnow(), updated_at=Job.updated_at)
        .returning(Job.version)
        .execution_options(synchronize_session=False)
    )
    version: int | None = result.scalar_one_or_none()
    return version


def stamp_send(job: Job, now: datetime | None = None) -> None:
    """Record in ``job``, before the commit that makes it waiting, that it is sent right after
    that commit (``heartbeat_at``, as :func:`mark_dispatched` records a send); then call
    :func:`send_committed`."""
    job.heartbeat_at = now or utcnow()


def send_committed(settings: Settings, session: Session, job: Job) -> bool:
    """:func:`send_committed_jobs` of one job: whether the broker took it."""
    return not send_committed_jobs(settings, session, [job])


def send_committed_jobs(settings: Settings, session: Session, jobs: Sequence[Job]) -> list[Job]:
    """Publish ``jobs``, committed with :func:`stamp_send`'s stamp; the jobs the broker did not
    take. Never raises for a broker or database problem.

    The sends share one producer of the broker's pool and, where the transport can (Redis),
    one batch: their messages go in one pipeline, one round trip. When the batch fails, the
    delivery of its messages is uncertain and all its jobs count as not taken: a job sent twice
    is run once (a worker claims only a waiting job), a job not sent would wait for the
    dispatcher's ``requeue_after_s``. A job not taken gets its stamp back (unless a worker or
    the dispatcher changed it meanwhile), so that the dispatcher sends it after
    ``dispatch_grace_s``; the job then shows the row as committed."""
    if not jobs:
        return []
    with ExitStack() as stack:
        try:
            producer = stack.enter_context(celery_app_for(settings).producer_or_acquire())
        except Exception:  # no producer (no Celery, a broker that refuses): each send says why
            producer = None
        batch = producer.batch() if producer is not None else nullcontext()
        try:
            with batch:
                refused = [job for job in jobs if not send_job(settings, job, producer)]
        except Exception as exc:
            log.warning(
                "a batch of %d jobs did not reach the broker whole (%s: %s); they stay "
                "waiting and the dispatcher sends them",
                len(jobs),
                type(exc).__name__,
                exc,
            )
            refused = list(jobs)
    for job in refused:
        _take_stamp_back(session, job)
    return refused


def _take_stamp_back(session: Session, job: Job) -> None:
    """Clear ``job``'s send stamp in the database (and in ``job``) unless its row changed."""
    try:
        version = session.execute(
            update(Job)
            .where(
                Job.id == job.id,
                Job.state.in_(WAITING_STATES),
                Job.heartbeat_at == job.heartbeat_at,
            )
            .values(heartbeat_at=None, updated_at=Job.updated_at)
            .returning(Job.version)
            .execution_options(synchronize_session=False)
        ).scalar_one_or_none()
        session.commit()
        if version is not None:
            set_committed_value(job, "heartbeat_at", None)
            set_committed_value(job, "version", version)
    except Exception:
        session.rollback()
        log.warning(
            "job %s was not sent, and taking back its send stamp failed: the dispatcher sends "
            "it after requeue_after_s",
            job.id,
            exc_info=True,
        )


def send_gallery(settings: Settings, gallery: Gallery) -> str | None:
    """Publish ``gallery``'s id to its queue, ahead of training jobs; None when the broker took
    it, else the error."""
    queue = resource_queue(gallery.gpus, gallery.queue, settings.queues[0])
    max_priority = settings.job_bounds.max_priority
    try:
        _publish(
            settings,
            BUILD_GALLERY_TASK,
            gallery.id,
            queue,
            celery_priority(max_priority, max_priority),
        )
    except Exception as exc:  # any broker error: the caller records it on the gallery
        log.warning(
            "gallery %s: the broker did not take it: %s: %s", gallery.id, type(exc).__name__, exc
        )
        return f"{type(exc).__name__}: {exc}"
    log.info("gallery %s sent to queue %s", gallery.id, queue)
    return None
