"""Property-based tests of the whole OpenAPI spec (schemathesis): every operation, with valid and
invalid inputs, against the app on a fresh, migrated PostgreSQL database.

Each operation gets ``MAX_EXAMPLES`` generated requests, sent with a valid API key (the admin token
on ``/v1/admin``). Path parameters are generated or, as often, ids that exist (a dataset, jobs
waiting, running and finished, another API key's prefix), so requests get past the 404s. Checks:
no 5xx, and status codes, content types, headers and bodies as the spec says. A failure prints the
Hypothesis seed that reproduces it (``--hypothesis-seed``).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from service.core import migrate
from service.core.api_keys import create_api_key
from service.core.db import session_scope
from service.core.job_states import change_state, lock_job
from service.core.models import JobState
from service.core.settings import Settings, WorkerSettings
from tests.service.conftest import TestClient, make_settings, write_image_folder

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Generated requests per operation; the whole module takes about a minute.
MAX_EXAMPLES = 100

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]

ADMIN_TOKEN = "fuzz-admin-token-0123456789abcdef"


@dataclass
class FuzzStack:
    app: FastAPI
    user: dict[str, str]
    admin: dict[str, str]
    ids: dict[str, list[str]]  # path parameter -> values that exist
    finished_job: str


def _move(app: FastAPI, job_id: str, *states: JobState) -> None:
    with session_scope(app.state.session_factory) as session:
        job = lock_job(session, uuid.UUID(job_id))
        assert job is not None
        for state in states:
            change_state(session, job, state, f"fuzz setup: {state}")


@pytest.fixture(scope="module")
def fuzz_stack(
    pg_databases: Callable[[], str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FuzzStack]:
    url = pg_databases()
    migrate.upgrade(url)
    app = create_app(
        make_settings(
            tmp_path_factory.mktemp("fuzz"),
            url,
            admin_token=ADMIN_TOKEN,
            worker=WorkerSettings(enqueue_on_submit=False),
        )
    )
    folder = write_image_folder(app.state.settings.dataset_roots[0] / "crops")
    with session_scope(app.state.session_factory) as session:
        _, token = create_api_key(session, "fuzzer")
        revocable, _ = create_api_key(session, "someone")  # the fuzzer's own key must stay valid
    user = {"Authorization": f"Bearer {token}"}
    with TestClient(app) as client:
        response = client.post(
            "/v1/datasets", json={"name": "crops", "path": str(folder)}, headers=user
        )
        assert response.status_code == 201, response.text
        dataset_id = response.json()["id"]
        jobs = [
            client.post("/v1/jobs", json={"dataset_id": dataset_id}, headers=user).json()["id"]
            for _ in range(3)
        ]
    _move(app, jobs[1], JobState.STARTING, JobState.RUNNING)
    _move(app, jobs[2], JobState.STARTING, JobState.RUNNING, JobState.SUCCEEDED)
    for job_id in jobs:  # something for /logs and /metrics to read
        out = app.state.settings.jobs_path / job_id
        out.mkdir(parents=True)
        (out / "process.log").write_text("".join(f"line {i}\n" for i in range(50)))
        (out / "metrics.jsonl").write_text('{"epoch": 1, "loss/total": 1.5}\n')
    ids = {"dataset_id": [dataset_id], "job_id": jobs, "prefix": [revocable.prefix]}
    yield FuzzStack(
        app, user, {"Authorization": f"Bearer {ADMIN_TOKEN}"}, ids, finished_job=jobs[2]
    )
    app.state.engine.dispose()


def _spec_operations() -> list[APIOperation]:
    """The spec's operations, from an app that never opens its (in-memory) database."""
    spec = create_app(Settings(_env_file=None, database_url="sqlite://")).openapi()
    operations = []
    for result in schemathesis.openapi.from_dict(spec).get_all_operations():
        if isinstance(result, Err):
            raise result.err()  # the spec itself is broken
        operations.append(result.ok())
    return operations


def _cases(operation: APIOperation, ids: dict[str, list[str]]) -> st.SearchStrategy[Case]:
    """Valid and invalid requests, half of them on ids that exist (when the path has one)."""
    names = re.findall(r"{(\w+)}", operation.path)
    existing = [{name: value} for name in names for value in ids.get(name, [])]
    strategies = []
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        generated = operation.as_strategy(mode)
        if existing:
            on_existing = st.one_of(
                [operation.as_strategy(mode, path_parameters=p) for p in existing]
            )
            strategies.append(st.one_of(generated, on_existing))
        else:
            strategies.append(generated)
    return st.one_of(strategies)


def _follow_only_finished_jobs(case: Case, stack: FuzzStack) -> None:
    """A followed log streams until its job ends: follow the finished job, not one that never
    will (the waiting and the running job of the fixture)."""
    follow = str((case.query or {}).get("follow", "")).lower()
    job_id = (case.path_parameters or {}).get("job_id")
    if follow in ("true", "1", "yes", "on", "t", "y") and job_id in stack.ids["job_id"]:
        case.path_parameters["job_id"] = stack.finished_job


@pytest.mark.parametrize("operation", _spec_operations(), ids=lambda op: op.label)
def test_every_operation_conforms_to_the_spec(
    operation: APIOperation, fuzz_stack: FuzzStack
) -> None:
    headers = fuzz_stack.admin if operation.path.startswith("/v1/admin") else fuzz_stack.user

    @given(case=_cases(operation, fuzz_stack.ids))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def check(case: Case) -> None:
        _follow_only_finished_jobs(case, fuzz_stack)
        case.call_and_validate(app=fuzz_stack.app, headers=headers, checks=CHECKS)

    check()
    with TestClient(fuzz_stack.app) as client:  # nothing above may have locked the fuzzer out
        assert client.get("/v1/jobs", headers=fuzz_stack.user).status_code == 200


# ----------------------------------------------------------------------------------------------
# what the fuzzer found, kept as plain examples
# ----------------------------------------------------------------------------------------------


def _dataset_id(stack: FuzzStack) -> str:
    return stack.ids["dataset_id"][0]


@pytest.mark.parametrize(
    ("method", "path", "request_"),
    [
        ("GET", "/v1/jobs", lambda s: {"params": {"offset": 2**63}}),
        ("GET", "/v1/datasets", lambda s: {"params": {"limit": 1, "offset": 2**63}}),
        (
            "POST",
            "/v1/jobs",
            lambda s: {"json": {"dataset_id": _dataset_id(s), "idempotency_key": "a\x00b"}},
        ),
        (
            "POST",
            "/v1/jobs",
            lambda s: {"json": {"dataset_id": _dataset_id(s), "config": {"name": "a\x00b"}}},
        ),
    ],
    ids=["offset-past-bigint", "dataset-offset-past-bigint", "nul-in-key", "nul-in-config"],
)
def test_values_postgresql_refuses_are_422_not_500(
    fuzz_stack: FuzzStack, method: str, path: str, request_: Callable[[FuzzStack], dict[str, Any]]
) -> None:
    with TestClient(fuzz_stack.app) as client:
        response = client.request(method, path, headers=fuzz_stack.user, **request_(fuzz_stack))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert "cannot be stored or compared by the database" in error["message"]


def test_a_body_that_is_not_utf8_is_422_not_400(fuzz_stack: FuzzStack) -> None:
    with TestClient(fuzz_stack.app) as client:
        response = client.post(
            "/v1/admin/keys",
            content=b'{"owner": "\xff\xfe"}',
            headers={**fuzz_stack.admin, "Content-Type": "application/json"},
        )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["details"] == [
        {
            "field": "body",
            "message": "the request body cannot be parsed: it is not UTF-8 "
            "(invalid start byte at byte 11)",
        }
    ]


def test_a_blank_key_owner_is_422_not_500(fuzz_stack: FuzzStack) -> None:
    with TestClient(fuzz_stack.app) as client:
        response = client.post(
            "/v1/admin/keys", json={"owner": " \u0085\t"}, headers=fuzz_stack.admin
        )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["field"] == "body.owner"
