"""A service job whose disk fills up while it writes a checkpoint: the job FAILS (no retry) with a
reason that says the disk is full, and the checkpoint before stays complete and loadable.

The job is submitted through the API and run by the supervisor with the real trainer. The disk
fills up for real where the test may mount a tmpfs (root): its checkpoints folder is a tmpfs with
room for one and a half checkpoints, so the second one cannot be written. Elsewhere the trainer
runs under :mod:`tests.reliability.full_disk_trainer`, where the second write fails with ENOSPC.
"""

from __future__ import annotations

import errno
import math
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from fastapi import FastAPI

from reid_core.data import generate_synthetic_market
from reid_core.engine.checkpoint import LAST_TAG
from reid_core.model_io import load_model
from service.app import create_app
from service.core import migrate
from service.core.api_keys import create_api_key
from service.core.db import session_scope
from tests.helpers import TINY_JOB_CONFIG
from tests.reliability.stack import REPO_ROOT
from tests.service.conftest import TestClient, make_settings
from tests.worker.conftest import fast_worker_settings
from worker.supervisor import Supervisor, trainer_command

pytestmark = pytest.mark.slow

FULL_DISK_TRAINER = Path(__file__).with_name("full_disk_trainer.py")
NO_SPACE = os.strerror(errno.ENOSPC)


def _train(config: dict[str, Any], folder: Path) -> None:
    """``python -m reid_core.train`` on ``config``, its outputs in ``folder``."""
    config = {**config, "runtime": {**config["runtime"], "output_dir": str(folder)}}
    folder.mkdir(parents=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    subprocess.run(
        [sys.executable, "-m", "reid_core.train", "--config", str(path)],
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        check=True,
        timeout=300,
    )


def _mount(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *argv], capture_output=True, text=True, check=False)


@pytest.fixture
def app_and_key(tmp_path: Path) -> tuple[FastAPI, dict[str, str]]:
    database = tmp_path / "reid.db"
    migrate.upgrade(f"sqlite:///{database}")
    settings = make_settings(
        tmp_path,
        f"sqlite:///{database}",
        worker=fast_worker_settings(enqueue_on_submit=False, gpus=""),
    )
    app = create_app(settings)
    with session_scope(app.state.session_factory) as session:
        _, token = create_api_key(session, "alice")
    return app, {"Authorization": f"Bearer {token}"}


FillDisk = Callable[[dict[str, Any], Path], Callable[[int, Path], list[str]]]


def _tmpfs_disk(mounts: list[Path], tmp_path: Path) -> FillDisk:
    """Checkpoints on a tmpfs with room for 1.5 checkpoints of this config (measured by a
    one-epoch run): the first fits, the second runs out of space."""

    def prepare(config: dict[str, Any], output_dir: Path) -> Callable[[int, Path], list[str]]:
        folder = output_dir / "checkpoints"
        folder.mkdir(parents=True)
        mounted = _mount("-t", "tmpfs", "tmpfs", str(folder))
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (it needs root): {mounted.stderr.strip()}")
        mounts.append(folder)
        one_epoch = {**config, "schedule": {**config["schedule"], "epochs": 1}}
        _train(one_epoch, tmp_path / "calibration")
        size = (tmp_path / "calibration" / "checkpoints" / "epoch_0001.pt").stat().st_size
        room = math.ceil(size * 1.5 / 4096) * 4096
        resized = _mount("-o", f"remount,size={room}", str(folder))
        assert resized.returncode == 0, resized.stderr
        return trainer_command

    return prepare


def _injected_disk(_config: dict[str, Any], _output_dir: Path) -> Callable[[int, Path], list[str]]:
    def command(_gpus: int, config_path: Path) -> list[str]:
        return [sys.executable, str(FULL_DISK_TRAINER), "--config", str(config_path)]

    return command


@pytest.fixture(params=["tmpfs", "injected"])
def fill_disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FillDisk]:
    mounts: list[Path] = []
    yield _tmpfs_disk(mounts, tmp_path) if request.param == "tmpfs" else _injected_disk
    for folder in mounts:
        subprocess.run(["umount", "--lazy", str(folder)], check=False)


def test_full_disk_fails_the_job_and_keeps_the_previous_checkpoint(
    app_and_key: tuple[FastAPI, dict[str, str]], fill_disk: FillDisk
) -> None:
    app, alice = app_and_key
    settings = app.state.settings
    folder = generate_synthetic_market(
        settings.dataset_roots[0] / "synthetic",
        num_identities=8,
        images_per_identity=4,
        height=96,
        width=48,
    )
    with TestClient(app) as client:
        dataset = client.post(
            "/v1/datasets", json={"name": "synthetic", "path": str(folder)}, headers=alice
        ).json()
        config = {**TINY_JOB_CONFIG, "schedule.epochs": 2, "schedule.max_steps_per_epoch": 2}
        response = client.post(
            "/v1/jobs",
            json={"dataset_id": dataset["id"], "config": config, "gpus": 0, "max_retries": 2},
            headers=alice,
        )
        assert response.status_code == 201, response.text
        job = response.json()
        out = Path(job["resolved_config"]["runtime"]["output_dir"])
        command = fill_disk(job["resolved_config"], out)

        supervisor = Supervisor(
            settings,
            app.state.session_factory,
            "test:1",
            command=command,
            send=lambda _job: pytest.fail("a job that ran out of disk space was retried"),
        )
        assert supervisor.run(uuid.UUID(job["id"])) == "FAILED"

        failed = client.get(f"/v1/jobs/{job['id']}", headers=alice).json()
        events = client.get(f"/v1/jobs/{job['id']}/events", headers=alice).json()

    assert failed["state"] == "FAILED"
    assert failed["retries"] == 0
    assert [e["to_state"] for e in events] == ["QUEUED", "STARTING", "RUNNING", "FAILED"]
    reason = failed["reason"]
    assert reason.startswith("a checkpoint could not be written (disk full or read-only?)"), reason
    assert "exit code 4 NO_SPACE" in reason
    assert "epoch_0002.pt" in reason and NO_SPACE in reason  # the trainer's own error line

    checkpoints = out / "checkpoints"
    assert (checkpoints / LAST_TAG).read_text().strip() == "epoch_0001.pt"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch_0001.pt", LAST_TAG]
    assert not (out / "model_final.pt").exists()
    payload = torch.load(checkpoints / "epoch_0001.pt", map_location="cpu", weights_only=False)
    assert payload["trainer"]["global_step"] == 2  # the end of the first epoch
    model, cfg = load_model(checkpoints / "epoch_0001.pt")
    assert cfg.schedule.epochs == 2
    assert sum(p.numel() for p in model.parameters()) > 0
