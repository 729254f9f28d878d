"""Property-based tests of the whole OpenAPI spec (schemathesis): every operation, with valid and
invalid inputs, against the app on a fresh, migrated PostgreSQL database.

Each operation gets ``MAX_EXAMPLES`` generated requests, sent with a valid API key (the admin token
on ``/v1/admin``). Path parameters are generated or, as often, ids that exist (a dataset, jobs
waiting, running and finished, an API key prefix), so requests get past the 404s. Checks: no 5xx,
and status codes, content types, headers and bodies as the spec says.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service import migrate
from service.app import create_app
from service.auth import create_api_key
from service.db import session_scope
from service.job_states import change_state, lock_job
from service.models import JobState
from service.settings import Settings, WorkerSettings
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
        key, token = create_api_key(session, "fuzzer")
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
    ids = {"dataset_id": [dataset_id], "job_id": jobs, "prefix": [key.prefix]}
    yield FuzzStack(app, user, {"Authorization": f"Bearer {ADMIN_TOKEN}"}, ids)
    app.state.engine.dispose()


def _spec_operations() -> list[APIOperation]:
    """The spec's operations, from an app that never opens its (in-memory) database."""
    spec = create_app(Settings(_env_file=None, database_url="sqlite://")).openapi()
    return [result.ok() for result in schemathesis.openapi.from_dict(spec).get_all_operations()]


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
        case.call_and_validate(app=fuzz_stack.app, headers=headers, checks=CHECKS)

    check()
