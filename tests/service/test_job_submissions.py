"""Job submissions committed in groups (service.core.jobs.submit_jobs), on SQLite (the embedded
default) and on a real PostgreSQL: one transaction for a group, each submission answered as it
would be alone."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import event, func, select

from service.app import create_app
from service.core import jobs as jobs_module
from service.core import migrate
from service.core.api_keys import create_api_key
from service.core.db import session_scope
from service.core.errors import ConflictError, InvalidInputError, NotFoundError, ServiceError
from service.core.folders import job_dir
from service.core.jobs import JobRequest, ResolvedConfigs, Submission, SubmitOutcome, submit_jobs
from service.core.models import Dataset, Job, JobEvent
from tests.service.conftest import TestClient, copied_settings, make_settings, write_image_folder


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def any_app(
    request: pytest.FixtureRequest, tmp_path: Path, migrated_sqlite: Path
) -> Iterator[FastAPI]:
    if request.param == "sqlite":
        settings = copied_settings(tmp_path, migrated_sqlite)
    else:
        pg_databases: Callable[[], str] = request.getfixturevalue("pg_databases")
        url = pg_databases()
        migrate.upgrade(url)
        settings = make_settings(tmp_path, url)
    app = create_app(settings)
    yield app
    app.state.engine.dispose()


def _dataset(app: FastAPI, client: TestClient, owner: str, name: str) -> tuple[uuid.UUID, dict]:
    with session_scope(app.state.session_factory) as session:
        _, token = create_api_key(session, owner)
    headers = {"Authorization": f"Bearer {token}"}
    folder = write_image_folder(app.state.settings.dataset_roots[0] / name)
    response = client.post(
        "/v1/datasets", json={"name": name, "path": str(folder)}, headers=headers
    )
    assert response.status_code == 201, response.text
    return uuid.UUID(response.json()["id"]), headers


def _submit(
    app: FastAPI, submissions: list[Submission], inserts: list[tuple[str, int]] | None = None
) -> tuple[list[SubmitOutcome], int]:
    """The outcomes of one group, and how many transactions it committed; ``inserts`` gets
    each INSERT statement sent (its table, and the rows of values it was run for: one
    statement of one row of values run for many, not a statement with a VALUES list)."""
    commits: list[object] = []

    def count(connection: object) -> None:
        commits.append(connection)

    def statement(*args: Any) -> None:  # conn, cursor, statement, parameters, context, many
        statement, parameters, many = args[2], args[3], args[5]
        if inserts is not None and statement.startswith("INSERT INTO"):
            assert statement.count("VALUES (") == 1 and "), (" not in statement
            inserts.append((statement.split()[2], len(parameters) if many else 1))

    engine = app.state.engine
    event.listen(engine, "commit", count)
    event.listen(engine, "before_cursor_execute", statement)
    try:
        with app.state.session_factory() as session:
            outcomes = submit_jobs(session, app.state.settings, submissions)
    finally:
        event.remove(engine, "commit", count)
        event.remove(engine, "before_cursor_execute", statement)
    return outcomes, len(commits)


def _said(outcome: SubmitOutcome) -> Any:
    """``("created" | "earlier", job id)`` or ``(error class, code)``."""
    if isinstance(outcome, ServiceError):
        return type(outcome), outcome.code
    job, created = outcome
    return "created" if created else "earlier", job.id


def test_a_group_is_one_transaction_and_each_submission_gets_its_own_answer(
    any_app: FastAPI,
) -> None:
    with TestClient(any_app) as client:
        mine, _ = _dataset(any_app, client, "alice", "crops")
        _dataset(any_app, client, "bob", "other")

        def ask(owner: str, **fields: Any) -> Submission:
            return Submission(owner, JobRequest(**{"dataset_id": mine, **fields}))

        inserts: list[tuple[str, int]] = []
        outcomes, commits = _submit(
            any_app,
            [
                ask("alice", idempotency_key="a"),
                ask("alice", dataset_id=uuid.uuid4()),
                ask("bob"),  # alice's dataset is not bob's
                ask("alice", config={"schedule.epochs": 0}),
                ask("alice", config={"name": "second"}),
            ],
            inserts,
        )
        said = [_said(o) for o in outcomes]
        assert commits == 1
        # the two jobs: one statement run for both rows, then their two events the same way
        assert inserts == [("jobs", 2), ("job_events", 2)]
        assert [s[0] for s in said] == [
            "created",
            NotFoundError,
            NotFoundError,
            InvalidInputError,
            "created",
        ]
        assert said[1][1] == said[2][1] == "dataset_not_found"
        first, second = outcomes[0], outcomes[4]
        assert not isinstance(first, ServiceError) and not isinstance(second, ServiceError)
        assert second[0].resolved_config["name"] == "second"
        with any_app.state.session_factory() as session:
            events = session.execute(
                select(JobEvent.job_id, JobEvent.from_state, JobEvent.to_state)
            ).all()
            assert sorted(events) == sorted(
                [(first[0].id, None, "QUEUED"), (second[0].id, None, "QUEUED")]
            )

        # The key again (same request: its job; another request: 409), and one key twice in a
        # group: the group's jobs are made again one transaction each, the key's job once.
        outcomes, commits = _submit(
            any_app,
            [
                ask("alice", idempotency_key="a"),
                ask("alice", idempotency_key="a", priority=1),
                ask("alice", idempotency_key="b"),
                ask("alice", idempotency_key="b"),
                ask("alice"),
                # refused; looking up its key must not write the jobs above before the commit
                ask("alice", idempotency_key="c", config={"schedule.epochs": 0}),
            ],
        )
        said = [_said(o) for o in outcomes]
        assert said[5] == (InvalidInputError, "validation_error")
        assert said[0] == ("earlier", first[0].id)
        assert said[1] == (ConflictError, "idempotency_key_reused")
        assert said[2][0] == "created" and said[3] == ("earlier", said[2][1])
        assert said[4][0] == "created"
        assert commits == 3  # made again alone: b, the unkeyed job, the refused one (empty)
        with any_app.state.session_factory() as session:
            jobs = session.execute(select(func.count()).select_from(Job)).scalar_one()
            assert jobs == 4  # first, second, b, the last one


def test_concurrent_posts_are_each_answered_with_their_own_job(any_app: FastAPI) -> None:
    with TestClient(any_app) as client:
        dataset, headers = _dataset(any_app, client, "carol", "burst")

        def post(i: int) -> Any:
            body = {"dataset_id": str(dataset), "idempotency_key": f"k{i % 12}"}
            return client.post("/v1/jobs", json=body, headers=headers)

        with ThreadPoolExecutor(max_workers=8) as pool:
            responses = list(pool.map(post, range(24)))  # every key twice
        assert sorted({r.status_code for r in responses}) == [200, 201]
        by_key: dict[str, set[str]] = {}
        for i, response in enumerate(responses):
            by_key.setdefault(f"k{i % 12}", set()).add(response.json()["id"])
        assert all(len(ids) == 1 for ids in by_key.values())  # one job per key, either answer
        assert [r.status_code for r in responses].count(201) == 12
        listed = client.get("/v1/jobs", headers=headers).json()
        assert listed["total"] == 12


def test_a_request_like_an_earlier_one_takes_its_resolved_configuration(
    app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ResolvedConfigs: each job's configuration is what it would be resolved alone (its own
    output folder); a request like an earlier one is not validated again, a changed one is, and
    a refused one is refused every time."""
    resolving: list[dict[str, Any]] = []
    real = jobs_module.resolve_job_config

    def counted(overrides: Any, **kwargs: Any) -> Any:
        resolving.append(dict(overrides))
        return real(overrides, **kwargs)

    monkeypatch.setattr(jobs_module, "resolve_job_config", counted)
    with TestClient(app) as client:
        mine, _ = _dataset(app, client, "alice", "sweep")
    configs = ResolvedConfigs(app.state.settings, size=2)

    def submit(group: list[dict[str, Any]]) -> list[SubmitOutcome]:
        with app.state.session_factory() as session:
            return submit_jobs(
                session,
                app.state.settings,
                [Submission("alice", JobRequest(mine, config=c)) for c in group],
                configs,
            )

    sweep = {"schedule": {"epochs": 3}}
    outcomes = submit([sweep, sweep, {"schedule": {"epochs": 0}}, sweep])
    assert [type(o) for o in outcomes[:2]] == [tuple, tuple]
    assert isinstance(outcomes[2], InvalidInputError)
    assert "schedule.epochs" in outcomes[2].message
    made = [o[0] for o in outcomes if not isinstance(o, ServiceError)]
    assert len(made) == 3 and len(resolving) == 2  # the sweep once, the refused one once
    folders = {job.resolved_config["runtime"]["output_dir"] for job in made}
    assert folders == {str(job_dir(app.state.settings, job.id).path) for job in made}
    with app.state.session_factory() as session:
        stored = [session.get(Job, job.id) for job in made]
        for job in stored:
            assert job is not None
            alone = jobs_module._config(
                app.state.settings,
                JobRequest(mine, config=sweep),
                session.get(Dataset, mine),  # type: ignore[arg-type]
                jobs_module._check_resources(JobRequest(mine), app.state.settings),
                job.id,
            ).model_dump(mode="json")
            assert job.resolved_config == alone  # as committed, field for field
    assert len(resolving) == 5  # the three checks above resolved anew

    # refused again; the cache holds two: a third request pushes out the oldest
    again = submit([{"schedule": {"epochs": 0}}, {"schedule": {"epochs": 4}}, sweep])
    assert isinstance(again[0], InvalidInputError)
    assert len(resolving) == 7  # the refused one and epochs=4; the sweep was still kept
    # kept, oldest first: epochs=4, the sweep (used last). epochs=5 pushes out epochs=4, which
    # then pushes out the sweep: all three resolved anew
    submit([{"schedule": {"epochs": 5}}, {"schedule": {"epochs": 4}}, sweep])
    assert len(resolving) == 10

    # one key set twice, nested and dotted: the later wins, so the order makes the request
    twice = submit(
        [
            {"schedule": {"epochs": 6}, "schedule.epochs": 7},
            {"schedule.epochs": 7, "schedule": {"epochs": 6}},
        ]
    )
    assert [o[0].resolved_config["schedule"]["epochs"] for o in twice] == [7, 6]  # type: ignore[index]
