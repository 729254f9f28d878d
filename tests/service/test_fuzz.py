"""Property-based tests of the whole OpenAPI spec (schemathesis) with the checks of the
schemathesis CLI's ``--checks all``: every operation, with valid and invalid inputs, against the
app on a fresh, migrated PostgreSQL database.

Three runs: two of the CLI's phases, and one for the credentials.

- fuzzing: each operation gets ``MAX_EXAMPLES`` generated requests. Path parameters are generated
  or, as often, ids that exist (a dataset, jobs waiting, running and finished, another API key's
  prefix), so requests get past the 404s;
- coverage: schemathesis's deterministic requests (each boundary value, each missing required part,
  each method a path does not take: a 405 with every method of the path in ``Allow``);
- a second credential: generated ``Authorization`` values beside the valid ``X-API-Key``; a request
  whose two credentials disagree must be refused (``ignored_auth``).

The credentials go with every request the way the CLI's ``-H`` sends them, the checks' own probes
included: the user's key as ``X-API-Key``, the admin token on ``/v1/admin``. Checks: no 5xx; status
codes, content types, headers and bodies as the spec says; invalid data refused; a request the spec
allows never failing the API's own request validation (:func:`schema_valid_requests_pass_validation`);
405s with ``Allow``; authentication enforced. A failure prints the Hypothesis seed that reproduces
it (``--hypothesis-seed``).
"""

from __future__ import annotations

import inspect
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import CHECKS as REGISTERED_CHECKS
from schemathesis.checks import CheckContext, not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.core.result import Err
from schemathesis.core.transport import Response as CheckedResponse
from schemathesis.schemas import APIOperation, BaseSchema
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    ignored_auth,
    missing_required_header,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from starlette.responses import Response

from service.api.deps import MAX_OFFSET
from service.app import create_app
from service.core import migrate
from service.core.api_keys import create_api_key
from service.core.db import session_scope
from service.core.job_states import change_state, lock_job
from service.core.models import JobState
from service.core.settings import Settings, WorkerSettings
from tests.service.conftest import TestClient, make_settings, write_image_folder

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Generated requests per operation; the fuzzing run takes about a minute.
MAX_EXAMPLES = 100
#: Requests per operation with a generated second credential (each is refused at once).
SECOND_CREDENTIAL_EXAMPLES = 20

ADMIN_TOKEN = "fuzz-admin-token-0123456789abcdef"

#: The header the fixture's app adds to the answers of its request validation (FastAPI's, and the
#: routes' own of the bodies they parse): :func:`schema_valid_requests_pass_validation` reads it.
REFUSED_BY_VALIDATION = "x-fuzz-refused-by-request-validation"


def schema_valid_requests_pass_validation(
    ctx: CheckContext, response: CheckedResponse, case: Case
) -> bool | None:
    """``positive_data_acceptance``, exact for this API: a request the spec allows never fails
    the API's request validation. The spec is made from the same pydantic models, so such a
    failure means they disagree (``gpus: 2.0`` under StrictInt). The service may still refuse a
    valid request for what a spec cannot say: its bounds (settings), a cursor it never gave out,
    a folder outside its roots, a config key reid_core does not know. Those are 4xx of its own,
    which the built-in check, going by status codes, cannot tell from the first kind."""
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return None
    if response.headers.get(REFUSED_BY_VALIDATION):
        raise AssertionError(
            f"a request the spec allows failed the API's request validation: "
            f"{response.status_code} {response.text}"
        )
    return None


#: What each request is checked for: every check of the CLI's ``--checks all`` but those in
#: :data:`NOT_RUN`.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    schema_valid_requests_pass_validation,
    missing_required_header,
    unsupported_method,
    allow_header_conformance,
]

#: How invalid data may be refused: schemathesis's list (its 5xx left to not_a_server_error), and
#: 413: more images than an embed's ``maxItems`` are refused as the upload limits are, as the body
#: streams in, as too large.
REFUSALS = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]

#: The checks of ``--checks all`` not in :data:`CHECKS`, and why.
NOT_RUN = {
    "positive_data_acceptance": "schema_valid_requests_pass_validation is its exact form",
    "ignored_auth": "test_a_second_credential_is_never_ignored runs it: it probes each 2xx "
    "three more times",
    "use_after_free": "stateful phase (links between operations): not run here",
    "ensure_resource_availability": "stateful phase: not run here",
    "object_level_authorization": "stateful phase with two identities: not run here",
}


@dataclass
class FuzzStack:
    app: FastAPI
    user: dict[str, str]
    admin: dict[str, str]
    ids: dict[str, list[str]]  # path parameter -> values that exist
    finished_job: str
    schema: BaseSchema  # the live app's spec, sending the credentials (:func:`_live_schema`)

    def credentials(self, operation: APIOperation) -> dict[str, str]:
        return self.admin if operation.path.startswith("/v1/admin") else self.user


def _mark_request_validation(app: FastAPI) -> None:
    """Add :data:`REFUSED_BY_VALIDATION` to the answers of the app's request validation (before
    its first request: the middleware stack keeps the handlers it was built with)."""
    handler = app.exception_handlers[RequestValidationError]

    async def marked(request: Request, exc: Exception) -> Response:
        answer = handler(request, exc)
        response = await answer if inspect.isawaitable(answer) else answer
        response.headers[REFUSED_BY_VALIDATION] = "1"
        return response

    app.add_exception_handler(RequestValidationError, marked)


def _live_schema(
    app: FastAPI, user: dict[str, str], admin: dict[str, str], **config: Any
) -> BaseSchema:
    """The app's spec as schemathesis reads it, with ``config`` (phases, generation); the
    credentials go with every request, the checks' probes too, as the CLI's ``-H`` sends them."""
    return schemathesis.openapi.from_asgi(
        "/openapi.json",
        app,
        config=SchemathesisConfig.from_dict(
            {
                "headers": user,
                "operations": [{"include-path-regex": "^/v1/admin", "headers": admin}],
                "checks": {"negative_data_rejection": {"expected-statuses": REFUSALS}},
                **config,
            }
        ),
    )


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
    _mark_request_validation(app)
    folder = write_image_folder(app.state.settings.dataset_roots[0] / "crops")
    with session_scope(app.state.session_factory) as session:
        _, token = create_api_key(session, "fuzzer")
        revocable, _ = create_api_key(session, "someone")  # the fuzzer's own key must stay valid
    user = {"X-API-Key": token}  # so the generated credential is an Authorization header
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
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    # generated credentials would be refused beside the valid one: only their own run has them
    schema = _live_schema(app, user, admin, generation={"with-security-parameters": False})
    yield FuzzStack(app, user, admin, ids, finished_job=jobs[2], schema=schema)
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


def _live(
    stack: FuzzStack, operation: APIOperation, schema: BaseSchema | None = None
) -> APIOperation:
    """``operation`` of the live app's spec (``schema``, by default the stack's)."""
    live = (schema or stack.schema).find_operation_by_label(operation.label)
    assert live is not None, f"{operation.label} is not in the live app's spec"
    return live


def _existing(operation: APIOperation, ids: dict[str, list[str]]) -> list[dict[str, str]]:
    """Path parameters naming things that exist, one set per id (none when the path has none)."""
    names = re.findall(r"{(\w+)}", operation.path)
    return [{name: value} for name in names for value in ids.get(name, [])]


def _cases(operation: APIOperation, ids: dict[str, list[str]]) -> st.SearchStrategy[Case]:
    """Valid and invalid requests, half of them on ids that exist (when the path has one)."""
    existing = _existing(operation, ids)
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


def test_every_check_of_checks_all_is_run_or_said_why_not() -> None:
    """A schemathesis upgrade with a new check fails here until it is run or said why not."""
    run = {check.__name__ for check in CHECKS} - {schema_valid_requests_pass_validation.__name__}
    assert sorted(run | set(NOT_RUN)) == sorted(REGISTERED_CHECKS.get_all_names())


@pytest.mark.parametrize("operation", _spec_operations(), ids=lambda op: op.label)
def test_every_operation_conforms_to_the_spec(
    operation: APIOperation, fuzz_stack: FuzzStack
) -> None:
    live = _live(fuzz_stack, operation)
    headers = fuzz_stack.credentials(live)

    @given(case=_cases(live, fuzz_stack.ids))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def check(case: Case) -> None:
        _follow_only_finished_jobs(case, fuzz_stack)
        case.call_and_validate(headers=headers, checks=CHECKS)

    check()
    with TestClient(fuzz_stack.app) as client:  # nothing above may have locked the fuzzer out
        assert client.get("/v1/jobs", headers=fuzz_stack.user).status_code == 200


def _coverage_cases(operation: APIOperation, ids: dict[str, list[str]]) -> list[Case]:
    """schemathesis's coverage phase for ``operation``, positive and negative, its path on ids
    that exist (the last of each: the finished job). The CLI runs this phase; its pytest plugin's
    lazy schemas do not work under pytest 9, so the generator is called as the CLI's engine
    calls it."""
    from schemathesis.generation.drivers import CoverageGenerator
    from schemathesis.generation.feedback import FeedbackSources
    from schemathesis.generation.overrides import Override

    names = re.findall(r"{(\w+)}", operation.path)
    pinned = {name: ids[name][-1] for name in names if name in ids}
    generation = operation.schema.config.generation_for(operation=operation, phase="coverage")
    return list(
        CoverageGenerator(
            operation=operation,
            generation_modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
            generation_config=generation,
            auth_storage=None,
            override=Override(path_parameters=pinned),
            feedback=FeedbackSources(),
        )
    )


@pytest.mark.parametrize("operation", _spec_operations(), ids=lambda op: op.label)
def test_every_coverage_request_conforms_to_the_spec(
    operation: APIOperation, fuzz_stack: FuzzStack
) -> None:
    """Boundary values, each required part left out, each method the path does not take (405
    and its Allow): one request each."""
    live = _live(fuzz_stack, operation)
    headers = fuzz_stack.credentials(live)
    cases = _coverage_cases(live, fuzz_stack.ids)
    assert cases, f"no coverage request for {live.label}"
    failures = []
    for case in cases:
        _follow_only_finished_jobs(case, fuzz_stack)
        try:
            case.call_and_validate(headers=headers, checks=CHECKS)
        except AssertionError as failure:  # schemathesis's FailureGroup, one per request
            failures.append(failure)
    assert not failures, "\n\n".join(str(f) for f in failures)


USER_OPERATIONS = [op for op in _spec_operations() if not op.path.startswith("/v1/admin")]


@pytest.fixture(scope="module")
def with_generated_credentials(fuzz_stack: FuzzStack) -> BaseSchema:
    """The live spec, generating the security parameters the fuzzing run leaves out."""
    return _live_schema(fuzz_stack.app, fuzz_stack.user, fuzz_stack.admin)


@pytest.mark.parametrize("operation", USER_OPERATIONS, ids=lambda op: op.label)
def test_a_second_credential_is_never_ignored(
    operation: APIOperation, fuzz_stack: FuzzStack, with_generated_credentials: BaseSchema
) -> None:
    """Beside the valid X-API-Key, schemathesis generates an Authorization header (a Bearer of
    another key, another scheme, garbage): a request that gets through (2xx) with it is the API
    ignoring a credential, and ``ignored_auth`` fails. Requests go to ids that exist, so they
    can get through."""
    live = _live(fuzz_stack, operation, with_generated_credentials)
    existing = _existing(live, fuzz_stack.ids)
    strategy = (
        st.one_of([live.as_strategy(path_parameters=p) for p in existing])
        if existing
        else live.as_strategy()
    )

    @given(case=strategy)
    @settings(
        max_examples=SECOND_CREDENTIAL_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def check(case: Case) -> None:
        _follow_only_finished_jobs(case, fuzz_stack)
        case.call_and_validate(headers=fuzz_stack.user, checks=[ignored_auth, not_a_server_error])

    check()


# ----------------------------------------------------------------------------------------------
# what the fuzzer found, kept as plain examples
# ----------------------------------------------------------------------------------------------


def _dataset_id(stack: FuzzStack) -> str:
    return stack.ids["dataset_id"][0]


@pytest.mark.parametrize(
    ("method", "path", "request_"),
    [
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
    ids=["nul-in-key", "nul-in-config"],
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


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/datasets", "/v1/galleries"])
def test_offsets_stop_at_the_largest_bigint(fuzz_stack: FuzzStack, path: str) -> None:
    """The spec says the largest offset (the databases' OFFSET is a 64-bit integer): one past it
    is refused by validation, naming the bound, not by the database (PostgreSQL: a DataError,
    SQLite: an OverflowError, a 500)."""
    with TestClient(fuzz_stack.app) as client:
        spec = client.get("/openapi.json").json()
        offset = next(p for p in spec["paths"][path]["get"]["parameters"] if p["name"] == "offset")
        assert offset["schema"]["maximum"] == MAX_OFFSET == 2**63 - 1
        last = client.get(path, params={"offset": MAX_OFFSET}, headers=fuzz_stack.user)
        past = client.get(path, params={"offset": MAX_OFFSET + 1}, headers=fuzz_stack.user)
    assert (last.status_code, last.json()["items"]) == (200, [])
    assert past.status_code == 422, past.text
    error = past.json()["error"]
    assert error["details"][0]["field"] == "query.offset"
    assert f"less than or equal to {MAX_OFFSET}" in error["message"]


def test_the_spec_refuses_an_embed_without_images(fuzz_stack: FuzzStack) -> None:
    """`files: []` was valid by the spec; multipart sends no part for it, which the route refuses
    (422): the spec now says at least one."""
    with TestClient(fuzz_stack.app) as client:
        spec = client.get("/openapi.json").json()
        response = client.post(  # a multipart body of no part
            "/v1/models/reid-fuzzer/versions/1/embed",
            content=b"--b--\r\n",
            headers={**fuzz_stack.user, "Content-Type": "multipart/form-data; boundary=b"},
        )
    body = spec["paths"]["/v1/models/{name}/versions/{version}/embed"]["post"]["requestBody"]
    files = body["content"]["multipart/form-data"]["schema"]["properties"]["files"]
    assert files["minItems"] == 1
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"] == [
        {"field": "body.files", "message": "no image: send at least one file part named `files`"}
    ]


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
