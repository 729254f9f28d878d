"""The Celery application: ``celery -A worker.celery_app worker --pool solo -Q cpu``.

Messages carry only a job id; the database says what to run and in which state the job is.

* **Solo pool, one task at a time.** A supervisor spends the whole job polling its trainer, a child
  process (``python -m reid_core.train``, torchrun for several GPUs) in its own process group. The
  task imports no torch at all, and a worker must never run torch work in a prefork parent (CUDA
  and forked children do not mix): ``python -m worker run`` always starts ``--pool solo``.
* **Late acks.** ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged
  when the supervisor returns, so a worker that dies mid-job leaves it to be redelivered (and the
  reaper in :mod:`worker.dispatcher` does not wait for that: it retries jobs whose heartbeat
  stopped). ``worker_prefetch_multiplier=1``: a busy worker does not hold other jobs' messages.
* **Visibility timeout** (Redis): longer than the longest job
  (:attr:`service.settings.Settings.broker_visibility_timeout_s`), so the message of a job still
  running is never handed to a second worker; if it were, the supervisor would see a fresh
  heartbeat from another worker and leave the job alone.
* **Queues by resource**: ``cpu``, ``gpu1``, ``gpu2``, ... (:func:`resource_queue`); a job sent to
  a queue other than the service's default one (``REID_QUEUES``) goes to ``<queue>.gpuN``.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

from celery import Celery

from service.settings import Settings, get_settings

__all__ = [
    "RUN_JOB_TASK",
    "celery_app_for",
    "celery_priority",
    "create_celery_app",
    "resource_queue",
]  # and ``app``, built on first use (see ``__getattr__``)

#: Name of the supervisor task (:func:`worker.supervisor.run_job`).
RUN_JOB_TASK = "worker.run_job"


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
    app = Celery(
        "reid_worker",
        broker=settings.broker_url,
        include=["worker.supervisor", "worker.gallery_task"],
    )
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


def __getattr__(name: str) -> Celery:
    # ``app``: the process's app, from the environment's settings (``celery -A
    # worker.celery_app``); built on first use, so importing this module reads no settings.
    if name == "app":
        return celery_app_for(get_settings())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
