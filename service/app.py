"""The FastAPI application: ``create_app(settings)`` wires settings, database, routers, errors."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

import service
from service.api import (
    admin,
    checks,
    dashboard,
    datasets,
    galleries,
    health,
    jobs,
    models,
    presets,
)
from service.api.body_cache import BodyCache
from service.api.conditional import SharedReads, poll_threads, start_threads
from service.api.errors import install_error_handlers
from service.core import migrate
from service.core.api_keys import KeyCache
from service.core.db import make_engine, make_read_session_factory, make_session_factory
from service.core.jobs import job_submissions
from service.core.row_versions import RowVersionCache
from service.core.settings import Settings, get_settings

_LOG = logging.getLogger("service")

_DESCRIPTION = """\
Unsupervised person re-ID training as a service. Register a dataset (a server folder or an
uploaded archive), submit training jobs with configuration overrides, and follow their state.

Every `/v1` route needs an API key: `Authorization: Bearer <key>` or `X-API-Key: <key>`, one
of them or both naming the same key (`python -m service create-key --owner <name>` prints one).
Errors are JSON: `{"error": {"code": ..., "message": ...}}`.
"""


def _use_poll_threads(app: FastAPI, count: int) -> None:
    """Give ``app`` new poll threads, and polls of one row whose kept version expired one read
    of it on them (:class:`service.api.conditional.SharedReads`)."""
    app.state.poll_threads = poll_threads(count)
    app.state.version_reads = SharedReads(app.state.poll_threads)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API for ``settings`` (default: from the environment). The schema must be migrated
    (``python -m service migrate``) unless ``settings.migrate_on_startup`` is set."""
    settings = settings if settings is not None else get_settings()
    engine = make_engine(
        settings.database_url,
        pool_size=settings.database_pool_size,
        ping_idle_s=settings.database_ping_idle_s,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if settings.migrate_on_startup:
            _LOG.info("applying database migrations (REID_MIGRATE_ON_STARTUP)")
            await run_in_threadpool(migrate.upgrade, settings.database_url)
        # The threads polls are read on: started with the app, stopped with it (a new set each
        # time it starts: an app may be started again after a stop, as tests do).
        _use_poll_threads(app, settings.poll_threads)
        start_threads(app.state.poll_threads, settings.poll_threads)
        app.state.job_submissions = job_submissions(app.state.session_factory, settings)
        app.state.job_submissions.start()
        yield
        # The submissions already taken are committed and answered before the engine goes.
        await run_in_threadpool(app.state.job_submissions.close)
        app.state.poll_threads.shutdown(wait=False)
        engine.dispose()

    app = FastAPI(
        title="re-ID training service",
        version=service.__version__,
        description=_DESCRIPTION,
        lifespan=lifespan,
        debug=False,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    # Reads that need no transaction (polls): no BEGIN or ROLLBACK round trips.
    app.state.read_session_factory = make_read_session_factory(engine)
    app.state.key_cache = KeyCache(settings.api_key_cache_seconds)
    # What a 304 is answered from: dropped when this app's sessions change the row.
    app.state.row_versions = RowVersionCache(settings.version_cache_seconds)
    app.state.row_versions.watch(app.state.session_factory)
    # Polls of one row whose kept version expired wait for one read of it.
    _use_poll_threads(app, settings.poll_threads)  # started on their first use without lifespan
    # POST /v1/jobs: the submissions that arrive together are committed in one transaction.
    app.state.job_submissions = job_submissions(app.state.session_factory, settings)
    # The JSON served for a row version, answered again while that version is the one kept.
    app.state.bodies = BodyCache()
    app.state.schema_head = migrate.head_revision()
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(datasets.router)
    app.include_router(jobs.router)
    app.include_router(jobs.config_router)
    app.include_router(presets.router)
    app.include_router(models.router)
    app.include_router(galleries.router)
    app.include_router(checks.router)
    app.include_router(admin.router)
    app.include_router(dashboard.router)
    return app
