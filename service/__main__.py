"""``python -m service``: migrate | create-key | revoke-key | list-keys | serve."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from service.core import migrate
from service.core.api_keys import create_api_key, list_api_keys, revoke_api_key
from service.core.db import make_engine, make_session_factory, session_scope
from service.core.settings import Settings

_LOG = logging.getLogger("service")

#: The app as uvicorn imports it in each API process when there are several (REID_API_WORKERS).
APP_FACTORY = "service.app:create_app"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="The re-ID training service. Settings come from REID_* variables and .env.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("migrate", help="apply database migrations (run before starting the API)")
    m.add_argument("--revision", default="head", help="target revision (default: head)")

    k = sub.add_parser("create-key", help="create an API key and print it (shown once)")
    k.add_argument("--owner", required=True, help="who the key acts for")
    k.add_argument("--name", default=None, help="a label (the client, the person)")

    r = sub.add_parser("revoke-key", help="revoke an API key by its prefix")
    r.add_argument("prefix", help="the key's first characters, as list-keys shows them")

    ls = sub.add_parser("list-keys", help="list API keys (prefixes, owners, revocations)")
    ls.add_argument("--owner", default=None)

    s = sub.add_parser("serve", help="apply migrations, then serve the API with uvicorn")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--no-migrate", action="store_true", help="do not apply migrations first")
    s.add_argument(
        "--with-worker",
        action="store_true",
        help="also run a training worker and the dispatcher as child processes (the embedded "
        "one-command setup; production runs them as their own services)",
    )
    s.add_argument(
        "--worker-gpus",
        default="none",
        help="with --with-worker: CUDA_VISIBLE_DEVICES of the worker (0 | 0,1 | none)",
    )
    return parser


def _sessions(settings: Settings) -> sessionmaker[Session]:
    return make_session_factory(make_engine(settings.database_url))


def _create_key(settings: Settings, owner: str, name: str | None) -> int:
    with session_scope(_sessions(settings)) as session:
        key, token = create_api_key(session, owner, name)
        prefix = key.prefix
    print(token)
    print(
        f"API key {prefix}... for owner {owner!r}: copy it now, it is not stored and cannot be "
        "shown again. Send it as `Authorization: Bearer <key>`.",
        file=sys.stderr,
    )
    return 0


def _revoke_key(settings: Settings, prefix: str) -> int:
    with session_scope(_sessions(settings)) as session:
        key = revoke_api_key(session, prefix)
        if key is None:
            print(f"error: no API key with prefix {prefix!r}", file=sys.stderr)
            return 1
        print(
            f"revoked {key.prefix}... (owner {key.owner!r}); running API processes refuse it "
            f"within {settings.api_key_cache_seconds:g} s (REID_API_KEY_CACHE_SECONDS)"
        )
    return 0


def _list_keys(settings: Settings, owner: str | None) -> int:
    with session_scope(_sessions(settings)) as session:
        for key in list_api_keys(session, owner):
            state = f"revoked {key.revoked_at:%Y-%m-%d}" if key.revoked_at else "active"
            print(f"{key.prefix}...  {key.owner:<20} {state:<18} {key.name or ''}")
    return 0


def _start_children(gpus: str) -> list[subprocess.Popen[bytes]]:
    """A solo-pool worker and the dispatcher, each in its own process group."""
    commands = [
        [sys.executable, "-m", "worker", "run", "--gpus", gpus],
        [sys.executable, "-m", "worker", "dispatcher"],
    ]
    return [subprocess.Popen(cmd, start_new_session=True) for cmd in commands]


def _stop_children(children: list[subprocess.Popen[bytes]], grace_s: float = 30.0) -> None:
    """SIGTERM (the worker lets a running trainer checkpoint), then SIGKILL after ``grace_s``."""
    for child in children:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def _prepare_mlflow(settings: Settings) -> str:
    """Create the jobs' MLflow experiment (and, embedded, its SQLite store) before any worker
    uses it; returns a line for the start-up banner. MLflow being down does not stop the API."""
    from service.core.registry import ensure_experiment

    uri = settings.mlflow_tracking_uri
    try:
        ensure_experiment(settings)
    except Exception as exc:
        _LOG.warning("MLflow at %s: %s (jobs still run; they log when it is back)", uri, exc)
        return f"MLflow at {uri}: NOT REACHABLE ({type(exc).__name__})"
    if settings.mlflow.tracking_uri:
        return f"MLflow: {uri}"
    return f"MLflow: {uri} (UI: mlflow ui --backend-store-uri {uri})"


def _serve(
    settings: Settings,
    host: str,
    port: int,
    run_migrations: bool,
    with_worker: bool = False,
    worker_gpus: str = "none",
) -> int:
    import uvicorn

    from service.app import create_app

    if run_migrations:
        migrate.upgrade(settings.database_url)
    mlflow_note = _prepare_mlflow(settings)
    # What this command decides for the API, as variables: with REID_API_WORKERS > 1 each API
    # process builds its own app (engine, pool, key cache) from the environment.
    app_env: dict[str, str] = {}
    if with_worker and worker_gpus == "none" and settings.job_bounds.default_gpus is None:
        # the only worker trains on the CPU: what omits gpus must go to its queue
        app_env["REID_JOB_BOUNDS__DEFAULT_GPUS"] = "0"
        bounds = settings.job_bounds.model_copy(update={"default_gpus": 0})
        settings = settings.model_copy(update={"job_bounds": bounds})
    processes = settings.api_workers
    app: Callable[..., Any] | str = create_app(settings) if processes == 1 else APP_FACTORY
    children = _start_children(worker_gpus) if with_worker else []
    if processes > 1:
        os.environ.update(app_env)  # after the children start: the API's, not the worker's
    extra = " with a worker and the dispatcher" if children else ""
    plural = f", {processes} API processes" if processes > 1 else ""
    print(
        f"re-ID training service on http://{host}:{port}{extra}{plural} "
        f"(API docs: http://{host}:{port}/docs)\n{mlflow_note}",
        flush=True,
    )

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    # uvicorn handles SIGTERM/SIGINT itself, then re-raises the signal to the handler that was
    # installed before it: this one, so that the children are stopped below, never orphaned.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit)
    try:
        uvicorn.run(
            app,
            factory=processes > 1,
            workers=processes,
            host=host,
            port=port,
            log_level=settings.log_level.lower(),
        )
    finally:
        _stop_children(children)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"error: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "migrate":
        migrate.upgrade(settings.database_url, args.revision)
        engine = make_engine(settings.database_url)
        try:
            revision = migrate.current_revision(engine)
        finally:
            engine.dispose()
        print(f"database at revision {revision} ({_safe_url(settings.database_url)})")
        return 0
    if args.command == "create-key":
        try:
            return _create_key(settings, args.owner, args.name)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.command == "revoke-key":
        return _revoke_key(settings, args.prefix)
    if args.command == "list-keys":
        return _list_keys(settings, args.owner)
    if args.command == "serve":
        return _serve(
            settings,
            args.host,
            args.port,
            not args.no_migrate,
            with_worker=args.with_worker,
            worker_gpus=args.worker_gpus,
        )
    raise AssertionError(args.command)


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


if __name__ == "__main__":
    sys.exit(main())
