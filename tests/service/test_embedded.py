"""The one-command embedded setup, for real: ``python -m service serve --with-worker`` with no
server at all (SQLite database, kombu's SQLAlchemy broker on SQLite), a job submitted over HTTP
and trained by the worker it started, then a clean shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from reid_core.data import generate_synthetic_market
from tests.helpers import TINY_JOB_CONFIG

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

TINY = {**TINY_JOB_CONFIG, "schedule.epochs": 1, "schedule.max_steps_per_epoch": 2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _call(method: str, url: str, key: str | None = None, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def test_serve_with_worker_trains_a_job_end_to_end(tmp_path: Path) -> None:
    data_root = tmp_path / "datasets"
    generate_synthetic_market(
        data_root / "synthetic", num_identities=8, images_per_identity=4, height=96, width=48
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("REID_")},
        "REID_DATA_DIR": str(tmp_path / "var"),
        "REID_DATASET_ROOTS": json.dumps([str(data_root)]),
        "PYTHONUNBUFFERED": "1",
    }
    subprocess.run([sys.executable, "-m", "service", "migrate"], env=env, cwd=REPO_ROOT, check=True)
    key = subprocess.run(
        [sys.executable, "-m", "service", "create-key", "--owner", "alice"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--with-worker", "--port", str(port)],
        env=env,
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if _call("GET", f"{base}/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "the API did not answer within 60 s"
            time.sleep(0.5)

        status, dataset = _call(
            "POST",
            f"{base}/v1/datasets",
            key,
            {"name": "synthetic", "path": str(data_root / "synthetic")},
        )
        assert status == 201, dataset
        # gpus omitted: the embedded worker trains on the CPU, so that is the default here
        status, job = _call(
            "POST", f"{base}/v1/jobs", key, {"dataset_id": dataset["id"], "config": TINY}
        )
        assert status == 201, job
        assert (job["gpus"], job["queue"]) == (0, "default"), job

        deadline = time.monotonic() + 240
        while job["state"] not in ("SUCCEEDED", "FAILED", "CANCELLED"):
            assert time.monotonic() < deadline, f"job still {job['state']} after 240 s"
            time.sleep(1)
            job = _call("GET", f"{base}/v1/jobs/{job['id']}", key)[1]
        assert job["state"] == "SUCCEEDED", job
        assert job["progress"] == pytest.approx(1.0)
        _, events = _call("GET", f"{base}/v1/jobs/{job['id']}/events", key)
        states = [e["to_state"] for e in (events["items"] if isinstance(events, dict) else events)]
        assert states[-3:] == ["STARTING", "RUNNING", "SUCCEEDED"]
        # the embedded MLflow (SQLite store and artifacts under the data dir) holds the model
        assert (job["model_name"], job["model_version"]) == ("reid-alice", "1"), job["warnings"]
        status, version = _call("GET", f"{base}/v1/models/reid-alice/versions/best", key)
        assert status == 200, version
        assert version["job_id"] == job["id"] and "mAP" in version["metrics"]
        assert (tmp_path / "var" / "mlflow.db").is_file()
        assert any((tmp_path / "var" / "mlartifacts").rglob("model_final.pt"))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        code = server.wait(timeout=60)
        log.close()
    assert code == 128 + signal.SIGTERM, (tmp_path / "serve.log").read_text()
    assert _processes_with_env(f"REID_DATA_DIR={tmp_path / 'var'}") == []  # no orphan left


def _processes_with_env(entry: str) -> list[int]:
    """Pids of live processes whose environment holds ``entry`` (Linux /proc)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if entry.encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found
