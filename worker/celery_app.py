"""The workers' Celery application: ``celery -A worker.celery_app worker --pool solo -Q cpu``.

The app itself (broker, queues, late acks, visibility timeout) is the service's
(:mod:`service.core.broker`), so what the API publishes and what a worker consumes cannot drift
apart; this module adds the task modules a worker imports.

A worker runs the solo pool, one task at a time: a supervisor spends the whole job watching its
child process (``python -m worker.train_job``, or a gallery build) and must never run torch work
in a prefork parent (worker/README.md). Late acks and the visibility timeout:
:mod:`service.core.broker`.
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
