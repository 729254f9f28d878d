"""``python -m service``: migrate | create-key | revoke-key | list-keys | serve."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service import migrate
from service.auth import create_api_key, revoke_api_key
from service.db import make_engine, make_session_factory, session_scope
from service.models import ApiKey
from service.settings import Settings

_LOG = logging.getLogger("service")


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
        print(f"revoked {key.prefix}... (owner {key.owner!r})")
    return 0


def _list_keys(settings: Settings, owner: str | None) -> int:
    with session_scope(_sessions(settings)) as session:
        query = select(ApiKey).order_by(ApiKey.id)
        if owner is not None:
            query = query.where(ApiKey.owner == owner)
        for key in session.execute(query).scalars():
            state = f"revoked {key.revoked_at:%Y-%m-%d}" if key.revoked_at else "active"
            print(f"{key.prefix}...  {key.owner:<20} {state:<18} {key.name or ''}")
    return 0


def _serve(settings: Settings, host: str, port: int, run_migrations: bool) -> int:
    import uvicorn

    from service.app import create_app

    if run_migrations:
        migrate.upgrade(settings.database_url)
    app = create_app(settings)
    print(f"re-ID training service on http://{host}:{port} (API docs: http://{host}:{port}/docs)")
    uvicorn.run(app, host=host, port=port, log_level=settings.log_level.lower())
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
        return _serve(settings, args.host, args.port, not args.no_migrate)
    raise AssertionError(args.command)


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


if __name__ == "__main__":
    sys.exit(main())
