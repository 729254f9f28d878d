"""The service's processes for the fault tests: settings on a private database and Redis, and the
API (uvicorn), a Celery worker and the dispatcher as child processes that a test may kill.

Children run in their own process group with a log file each; :meth:`ServiceStack.close` stops
whatever is still running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from reid_core.data import generate_synthetic_market
from service.core.api_keys import create_api_key
from service.core.db import make_engine, make_session_factory, session_scope
from service.core.settings import JobBounds, Settings, TrackingSettings
from tests.helpers import TINY_JOB_CONFIG
from tests.reliability.servers import wait_until
from tests.worker.conftest import fast_worker_settings

__all__ = [
    "FINAL_STATES",
    "REPO_ROOT",
    "Child",
    "ServiceStack",
    "job_body",
    "service_stack",
    "wait_for_job",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
FINAL_STATES = {"SUCCEEDED", "FAILED", "CANCELLED"}


@dataclass
class Child:
    """A child process (its own process group) and its log."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self, chars: int = 3000) -> str:
        return f"--- {self.name} ({self.log}):\n" + self.log.read_text(errors="replace")[-chars:]

    def running(self) -> bool:
        return self.process.poll() is None

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        if self.running():
            os.killpg(self.process.pid, sig)
        self.process.wait(timeout=60)

    def stop(self) -> None:
        """SIGTERM to the group (a warm shutdown), SIGKILL if it is still there after 30 s."""
        if not self.running():
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()


@dataclass
class ServiceStack:
    """Settings for a private database and broker, plus the children started from them."""

    settings: Settings
    folder: Path
    children: list[Child] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        folder: Path,
        database_url: str,
        broker_url: str,
        mlflow: TrackingSettings | None = None,
        **worker: Any,
    ) -> ServiceStack:
        settings = Settings(
            _env_file=None,
            data_dir=folder / "var",
            database_url=database_url,
            dataset_roots=[folder / "roots"],
            jobs_dir=folder / "jobs",
            job_bounds=JobBounds(max_epochs=100, max_retries=3),
            worker=fast_worker_settings(
                broker_url=broker_url,
                gpus="",
                poll_interval_s=0.2,
                heartbeat_interval_s=1,
                kill_grace_s=30,
                **worker,
            ),
            mlflow=mlflow or TrackingSettings(),
        )
        return cls(settings, folder)

    def environment(self) -> dict[str, str]:
        """The settings as REID_* variables, for the children."""
        s, w = self.settings, self.settings.worker
        env = {k: v for k, v in os.environ.items() if not k.startswith("REID_")}
        env |= {
            "REID_DATA_DIR": str(s.data_dir),
            "REID_DATABASE_URL": s.database_url,
            "REID_DATASET_ROOTS": json.dumps([str(root) for root in s.dataset_roots]),
            "REID_JOBS_DIR": str(s.jobs_path),
            "REID_JOB_BOUNDS__MAX_EPOCHS": str(s.job_bounds.max_epochs),
            "REID_WORKER__BROKER_URL": w.broker_url,
            "REID_WORKER__GPUS": "",
            "REID_WORKER__POLL_INTERVAL_S": str(w.poll_interval_s),
            "REID_WORKER__HEARTBEAT_INTERVAL_S": str(w.heartbeat_interval_s),
            "REID_WORKER__HEARTBEAT_TIMEOUT_S": str(w.heartbeat_timeout_s),
            "REID_WORKER__KILL_GRACE_S": str(w.kill_grace_s),
            "REID_WORKER__DISPATCH_GRACE_S": str(w.dispatch_grace_s),
            "REID_WORKER__REQUEUE_AFTER_S": str(w.requeue_after_s),
            "REID_MLFLOW__TRACKING_URI": s.mlflow.tracking_uri,
            "REID_MLFLOW__REQUEST_TIMEOUT_S": str(s.mlflow.request_timeout_s),
            "REID_MLFLOW__RETRY_AFTER_S": str(s.mlflow.retry_after_s),
            "REID_MLFLOW__FINAL_SYNC_S": str(s.mlflow.final_sync_s),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        return env

    def spawn(self, name: str, *argv: str, python: Path | None = None) -> Child:
        """``python argv...`` (this interpreter unless another one is named) in the repository."""
        log = self.folder / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                [str(python or sys.executable), *argv],
                cwd=REPO_ROOT,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        child = Child(name, process, log)
        self.children.append(child)
        return child

    def start_worker(self, python: Path | None = None) -> Child:
        """``python -m worker run`` on the ``cpu`` queue; returns once Celery says it is ready."""
        worker = self.spawn(
            "worker", "-m", "worker", "run", "--queues", "cpu", "--gpus", "none",
            "--hostname", "reliability@%h", python=python,
        )  # fmt: skip
        wait_until(
            lambda: b"ready." in worker.log.read_bytes() or not worker.running(),
            "the Celery worker to start",
        )
        assert worker.running(), worker.tail()
        return worker

    def start_dispatcher(self, interval_s: float = 0.5, python: Path | None = None) -> Child:
        return self.spawn(
            "dispatcher", "-m", "worker", "dispatcher", "--interval", str(interval_s), python=python
        )

    def start_api(self, port: int) -> Child:
        """uvicorn on 127.0.0.1:``port``; returns once /healthz answers."""
        api = self.spawn(
            f"api-{len(self.children)}", "-m", "uvicorn", "--factory", "service.app:create_app",
            "--host", "127.0.0.1", "--port", str(port),
        )  # fmt: skip

        def up() -> bool:
            assert api.running(), api.tail()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, "the API to start")
        return api

    def api_key(self, owner: str = "alice") -> dict[str, str]:
        engine = make_engine(self.settings.database_url)
        try:
            with session_scope(make_session_factory(engine)) as session:
                _, token = create_api_key(session, owner)
        finally:
            engine.dispose()
        return {"Authorization": f"Bearer {token}"}

    def synthetic_dataset(self) -> Path:
        """A tiny Market-1501-layout folder under the dataset root."""
        return generate_synthetic_market(
            self.settings.dataset_roots[0] / "synthetic",
            num_identities=8,
            images_per_identity=4,
            height=96,
            width=48,
        )

    def logs(self) -> str:
        return "\n".join(child.tail() for child in self.children)

    def close(self) -> None:
        for child in reversed(self.children):
            child.stop()


@contextmanager
def service_stack(
    folder: Path,
    database_url: str,
    broker_url: str,
    mlflow: TrackingSettings | None = None,
    **worker: Any,
) -> Iterator[ServiceStack]:
    stack = ServiceStack.create(folder, database_url, broker_url, mlflow, **worker)
    try:
        yield stack
    finally:
        stack.close()


def job_body(dataset_id: str, epochs: int, steps: int = 2) -> dict[str, Any]:
    """A CPU job of seconds on the tiny synthetic data set."""
    config = {**TINY_JOB_CONFIG, "schedule.epochs": epochs, "schedule.max_steps_per_epoch": steps}
    return {"dataset_id": dataset_id, "config": config, "gpus": 0}


def wait_for_job(
    get_job: Callable[[str], dict[str, Any]],
    job_id: str,
    done: Callable[[dict[str, Any]], bool],
    what: str,
    stack: ServiceStack,
    timeout: float = 120,
) -> dict[str, Any]:
    """Poll ``get_job(job_id)`` until ``done(job)``; on a timeout, fail with the children's logs."""
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = get_job(job_id)
        if done(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(
                f"job {job_id} never reached {what}: {job['state']} ({job['reason']})\n"
                + stack.logs()
            )
        time.sleep(0.2)
