"""The restart policy with the real trainer: ``python -m worker.train_job`` on a tiny synthetic
dataset, supervised by :class:`worker.supervisor.Supervisor` on SQLite. Jobs are submitted,
cancelled, retried and read through the API; there is no broker: a rerun is run by calling the
supervisor again, as the message it sends would. MLflow is left out (no tracking spec).

* SIGKILL mid-run (what the OOM killer sends), with the service's default policy: restarted,
  resumed from its checkpoint, SUCCEEDED, the restart counted everywhere.
* A cancel: CANCELLED, no restart.
* SIGKILLed again with no restart left: FAILED, saying so; the owner's retry shows both budgets
  whole again, and the job resumes and finishes.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from reid_core.data import generate_synthetic_market
from service.app import create_app
from service.core.api_keys import create_api_key
from service.core.db import session_scope
from service.core.folders import JobDir
from service.core.models import Job
from service.core.settings import JobBounds, Settings
from tests.helpers import TINY_JOB_CONFIG
from tests.reliability.test_restarts import Api
from tests.service.conftest import TestClient
from tests.worker.conftest import fast_worker_settings
from worker.supervisor import Supervisor, trainer_command

pytestmark = pytest.mark.slow

#: Four epochs of two steps: a kill after the first checkpoint lands mid-run.
RUN = {**TINY_JOB_CONFIG, "schedule.epochs": 4, "schedule.max_steps_per_epoch": 2}


@dataclass
class Service:
    settings: Settings
    api: Api
    dataset_id: str
    supervisor: Supervisor
    sent: list[uuid.UUID]

    def submit(self, **fields: Any) -> str:
        return self.api.submit({"dataset_id": self.dataset_id, "config": RUN, "gpus": 0, **fields})

    def run(self, job_id: str) -> str:
        """One attempt, as a worker runs it when the job's message arrives."""
        return self.supervisor.run(uuid.UUID(job_id))

    def folder(self, job_id: str) -> Path:
        return self.settings.jobs_path / job_id


@pytest.fixture
def service(tmp_path: Path, migrated_sqlite: Path) -> Iterator[Service]:
    db = tmp_path / "reid.db"
    shutil.copyfile(migrated_sqlite, db)
    roots = tmp_path / "roots"
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path / "var",
        database_url=f"sqlite:///{db}",
        dataset_roots=[roots],
        jobs_dir=tmp_path / "jobs",
        job_bounds=JobBounds(max_retries=3),  # default_restarts: the service's default (3)
        worker=fast_worker_settings(gpus="", enqueue_on_submit=False, poll_interval_s=0.1),
    )
    data = generate_synthetic_market(
        roots / "synthetic", num_identities=8, images_per_identity=4, height=96, width=48
    )
    app = create_app(settings)
    factory: sessionmaker[Session] = app.state.session_factory
    with session_scope(factory) as session:
        _, token = create_api_key(session, "alice")
    no_tracking = tmp_path / "no-tracking.json"  # never written: the trainer logs to no MLflow
    sent: list[uuid.UUID] = []

    def command(gpus: int, config: Path) -> list[str]:
        return [*trainer_command(gpus, config), "--tracking", str(no_tracking)]

    def send(job: Job) -> bool:
        sent.append(job.id)
        return True

    supervisor = Supervisor(settings, factory, "test:1", command=command, send=send)
    with TestClient(app) as client:
        api = Api(client, {"Authorization": f"Bearer {token}"})
        yield Service(settings, api, api.register(data), supervisor, sent)


def _in_background(action: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    return thread


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.02)


def _sigkill_when(folder: Path, ready: Callable[[], bool], not_pid: int | None = None) -> int:
    """SIGKILL the trainer of ``folder`` (not ``not_pid``, an earlier one) once ``ready``."""
    pid_file = JobDir(folder).trainer_pid

    def trainer_pid() -> int | None:
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):
            return None
        return None if pid == not_pid else pid

    _wait_for(lambda: trainer_pid() is not None and ready(), "the trainer's checkpoint")
    pid = trainer_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    return pid


def _checkpointed(folder: Path) -> Callable[[], bool]:
    return lambda: (folder / "checkpoints" / "last_checkpoint").exists()


def _resumed(folder: Path) -> Callable[[], bool]:
    def resumed() -> bool:
        log = folder / "train.log"
        return log.exists() and "resumed from" in log.read_text(errors="replace")

    return resumed


def test_a_trainer_killed_mid_run_is_restarted_and_resumes(service: Service) -> None:
    job_id = service.submit()  # max_restarts omitted: the service's default
    assert (service.api.job(job_id)["max_restarts"], service.api.job(job_id)["restarts"]) == (3, 0)
    folder = service.folder(job_id)
    killer = _in_background(lambda: _sigkill_when(folder, _checkpointed(folder)))
    assert service.run(job_id) == "RETRYING"
    killer.join()
    job = service.api.job(job_id)
    assert (job["restarts"], job["retries"]) == (1, 0)
    assert job["reason"] == (
        "the trainer was killed by SIGKILL (the kernel's OOM killer sends it when memory runs "
        "out); restart 1 of 3, resuming from the last checkpoint"
    )
    assert service.sent == [uuid.UUID(job_id)]  # sent again to the workers

    assert service.run(job_id) == "SUCCEEDED"
    job = service.api.job(job_id)
    assert (job["state"], job["restarts"], job["max_restarts"], job["retries"]) == (
        "SUCCEEDED",
        1,
        3,
        0,
    )
    assert job["progress"] == 1.0 and job["epoch"] == 4
    events = service.api.events(job_id)
    assert [e["to_state"] for e in events] == [
        "QUEUED", "STARTING", "RUNNING", "RETRYING", "STARTING", "RUNNING", "SUCCEEDED",
    ]  # fmt: skip
    assert events[4]["reason"] == "picked up by test:1 (attempt 2)"
    assert _resumed(folder)()
    assert (folder / "model_final.pt").is_file()
    assert "attempt 2 on test:1" in JobDir(folder).process_log.read_text()


def test_a_cancel_is_not_restarted(service: Service) -> None:
    job_id = service.submit(config={**RUN, "schedule.epochs": 60})

    def cancel() -> None:
        _wait_for(lambda: (service.api.job(job_id)["step"] or 0) >= 1, "the first step")
        response = service.api.client.post(f"/v1/jobs/{job_id}/cancel", headers=service.api.headers)
        assert response.status_code == 202, response.text

    canceller = _in_background(cancel)
    assert service.run(job_id) == "CANCELLED"
    canceller.join()
    job = service.api.job(job_id)
    assert job["reason"] == "cancelled: the trainer saved a checkpoint and stopped"
    assert (job["restarts"], job["retries"]) == (0, 0)
    assert service.api.states(job_id)[-2:] == ["CANCELLING", "CANCELLED"]
    assert service.sent == []


def test_restarts_run_out_then_the_owner_s_retry_counts_afresh(service: Service) -> None:
    job_id = service.submit(max_restarts=1)
    folder = service.folder(job_id)
    pids: list[int] = []
    killer = _in_background(lambda: pids.append(_sigkill_when(folder, _checkpointed(folder))))
    assert service.run(job_id) == "RETRYING"
    killer.join()
    # the rerun is killed too, once it resumed: no restart left
    killer = _in_background(lambda: _sigkill_when(folder, _resumed(folder), not_pid=pids[0]))
    assert service.run(job_id) == "FAILED"
    killer.join()
    job = service.api.job(job_id)
    assert (job["restarts"], job["max_restarts"], job["retries"]) == (1, 1, 0)
    assert job["reason"] == (
        "the trainer was killed by SIGKILL (the kernel's OOM killer sends it when memory runs "
        "out); no restarts left (1 of 1 used)"
    )

    response = service.api.client.post(f"/v1/jobs/{job_id}/retry", headers=service.api.headers)
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["state"], job["restarts"], job["max_restarts"]) == ("RETRYING", 0, 1)
    assert (job["retries"], job["max_retries"]) == (0, 0)
    assert service.run(job_id) == "SUCCEEDED"
    job = service.api.job(job_id)
    assert (job["restarts"], job["retries"]) == (0, 0)
    states = service.api.states(job_id)
    assert states == [
        "QUEUED", "STARTING", "RUNNING", "RETRYING", "STARTING", "RUNNING", "FAILED",
        "RETRYING", "STARTING", "RUNNING", "SUCCEEDED",
    ]  # fmt: skip
    assert "attempt 3 on test:1" in JobDir(folder).process_log.read_text()
