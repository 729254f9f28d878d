"""A worker installed with only the ``worker`` and ``cpu`` extras runs a job end to end.

The test builds a virtual environment of its own with ``pip install -e '.[worker,cpu]'`` (nothing
of ``service``, ``dev`` or ``onnx``) and starts the Celery worker and the dispatcher from it against
a private PostgreSQL, Redis and the embedded MLflow store; the API runs in this test's process (it
needs the ``service`` extra). A module that the worker imports but its extras do not install
fails here, not on a GPU server.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from service.app import create_app
from tests.reliability.servers import RedisServer
from tests.reliability.stack import (
    FINAL_STATES,
    REPO_ROOT,
    ServiceStack,
    job_body,
    service_stack,
    wait_for_job,
)
from tests.reliability.test_restarts import Api
from tests.service.conftest import TestClient

# Installing torch, faiss, Celery and MLflow into a fresh environment takes minutes.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

EPOCHS = 2
#: What the ``service`` and ``dev`` extras bring and a worker must run without.
NOT_IN_WORKER_EXTRAS = ("httpx", "python_multipart", "pytest", "onnxruntime")


def _run(*argv: str | Path, timeout: float) -> str:
    result = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{argv}: {result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def worker_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The interpreter of a fresh environment holding the package with ``[worker,cpu]`` only."""
    venv = tmp_path_factory.mktemp("worker-extras") / "venv"
    _run(sys.executable, "-m", "venv", venv, timeout=120)
    python = venv / "bin" / "python"
    _run(
        python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
        "-e", f"{REPO_ROOT}[worker,cpu]", timeout=1200,
    )  # fmt: skip
    return python


@pytest.fixture
def stack(tmp_path: Path, own_database: str, own_redis: RedisServer) -> Iterator[ServiceStack]:
    with service_stack(tmp_path, own_database, own_redis.url) as stack:
        yield stack


def test_the_environment_holds_only_the_worker_extras(worker_python: Path) -> None:
    """The check below means something only if the service's own packages are absent."""
    missing = _run(
        worker_python, "-c",
        "import importlib.util, sys; "
        "print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))",
        *NOT_IN_WORKER_EXTRAS, timeout=60,
    )  # fmt: skip
    assert missing.split() == list(NOT_IN_WORKER_EXTRAS)


def test_a_worker_with_only_its_extras_trains_a_job_to_the_end(
    worker_python: Path, stack: ServiceStack
) -> None:
    stack.start_worker(python=worker_python)
    stack.start_dispatcher(python=worker_python)
    with TestClient(create_app(stack.settings)) as client:
        api = Api(client, stack.api_key())
        dataset_id = api.register(stack.synthetic_dataset())
        job_id = api.submit(job_body(dataset_id, epochs=EPOCHS))
        job = wait_for_job(
            api.job, job_id, lambda j: j["state"] in FINAL_STATES, "the end", stack, timeout=300
        )

    assert job["state"] == "SUCCEEDED", job["reason"] + "\n" + stack.logs()
    assert job["epoch"] == EPOCHS
    # The worker's MLflow hook logged the run and registered the model.
    tracking = MlflowClient(stack.settings.mlflow_tracking_uri)
    run = tracking.get_run(job["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert tracking.search_model_versions(f"run_id = '{run.info.run_id}'")
