"""The workers' Celery application: ``celery -A worker.celery_app worker --pool solo -Q cpu``.

The app itself (broker, queues, late acks, visibility timeout) is the service's
(:mod:`service.core.broker`), so what the API publishes and what a worker consumes cannot drift
apart; this module adds the task modules a worker imports.

* **Solo pool, one task at a time.** A supervisor spends the whole job polling its trainer, a child
  process (``python -m reid_core.train``, torchrun for several GPUs) in its own process group. The
  task imports no torch at all, and a worker must never run torch work in a prefork parent (CUDA
  and forked children do not mix): ``python -m worker run`` always starts ``--pool solo``.
* **Late acks** and the **visibility timeout**: see :mod:`service.core.broker`. A worker that dies
  mid-job leaves its message to be redelivered, and the reaper in :mod:`worker.dispatcher` does
  not wait for that: it retries jobs whose heartbeat stopped. If a running job's message were
  handed to a second worker, its supervisor would see a fresh heartbeat and leave the job alone.
"""

from __future__ import annotations

from celery import Celery

from service.core.broker import celery_app_for
from service.core.settings import Settings, get_settings

#: The modules that define the tasks a worker runs.
TASK_MODULES = ["worker.supervisor", "worker.gallery_task"]


def worker_app(settings: Settings) -> Celery:
    """The broker's app for ``settings``, with the task modules a worker imports."""
    app = celery_app_for(settings)
    app.conf.include = TASK_MODULES
    return app


def __getattr__(name: str) -> Celery:
    # ``app``: the process's app, from the environment's settings (``celery -A
    # worker.celery_app``); built on first use, so importing this module reads no settings.
    if name == "app":
        return worker_app(get_settings())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
