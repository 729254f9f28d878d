"""The one-command embedded setup, for real: ``python -m service serve --with-worker`` with no
server at all (SQLite database, kombu's SQLAlchemy broker on SQLite), jobs submitted over HTTP
and trained by the worker it started, then a clean shutdown.

The second test walks the README's path for a user without labels, command by command: upload
a folder of crops, train from a preset, follow the label-free signals, check pairs by hand,
pull ``best``."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from reid_core.data import generate_synthetic_market
from tests.helpers import TINY_JOB_CONFIG

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

TINY = {**TINY_JOB_CONFIG, "schedule.epochs": 1, "schedule.max_steps_per_epoch": 2}

#: The preset's cluster settings made for 12 people seen 6 times each.
TINY_CLUSTERS = {
    "cluster.eps": "auto",
    "cluster.min_samples": 2,
    "cluster.k1": 6,
    "cluster.k2": 2,
    "cluster.instances_per_cluster": 2,
    "eval.label_free_k": 5,
}


@dataclass
class Embedded:
    base: str
    key: str
    data_root: Path
    var: Path

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.key}"}
        return httpx.request(method, self.base + path, headers=headers, timeout=30, **kwargs)

    def wait(self, path: str, done: tuple[str, ...], seconds: float) -> dict[str, Any]:
        """GET ``path`` every second until its ``state`` is one of ``done``."""
        deadline = time.monotonic() + seconds
        while True:
            body: dict[str, Any] = self.call("GET", path).json()
            if body["state"] in done:
                return body
            assert time.monotonic() < deadline, f"{path} still {body['state']} after {seconds} s"
            time.sleep(1)


@contextmanager
def embedded_service(tmp_path: Path) -> Iterator[Embedded]:
    """``serve --with-worker`` on a free port over ``tmp_path/var``, with ``tmp_path/datasets``
    as the dataset root and a key for alice; stopped with SIGTERM, leaving no process behind."""
    data_root = tmp_path / "datasets"
    data_root.mkdir()
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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    serve_log = tmp_path / "serve.log"
    with serve_log.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--with-worker", "--port", str(port)],
            env=env,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            service = Embedded(f"http://127.0.0.1:{port}", key, data_root, tmp_path / "var")
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(service.base + "/healthz", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert server.poll() is None, serve_log.read_text()
                assert time.monotonic() < deadline, "the API did not answer within 60 s"
                time.sleep(0.5)
            yield service
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            code = server.wait(timeout=60)
    assert code == 128 + signal.SIGTERM, serve_log.read_text()
    assert _processes_with_env(f"REID_DATA_DIR={tmp_path / 'var'}") == []  # no orphan left


def test_serve_with_worker_trains_a_job_end_to_end(tmp_path: Path) -> None:
    with embedded_service(tmp_path) as service:
        synthetic = generate_synthetic_market(
            service.data_root / "synthetic",
            num_identities=8,
            images_per_identity=4,
            height=96,
            width=48,
        )
        response = service.call(
            "POST", "/v1/datasets", json={"name": "synthetic", "path": str(synthetic)}
        )
        assert response.status_code == 201, response.text
        # gpus omitted: the embedded worker trains on the CPU, so that is the default here
        response = service.call(
            "POST", "/v1/jobs", json={"dataset_id": response.json()["id"], "config": TINY}
        )
        assert response.status_code == 201, response.text
        job = response.json()
        assert (job["gpus"], job["queue"]) == (0, "default"), job

        job = service.wait(f"/v1/jobs/{job['id']}", ("SUCCEEDED", "FAILED", "CANCELLED"), 240)
        assert job["state"] == "SUCCEEDED", job
        assert job["progress"] == pytest.approx(1.0)
        events = service.call("GET", f"/v1/jobs/{job['id']}/events").json()
        assert [e["to_state"] for e in events][-3:] == ["STARTING", "RUNNING", "SUCCEEDED"]
        # the embedded MLflow (SQLite store and artifacts under the data dir) holds the model
        assert (job["model_name"], job["model_version"]) == ("reid-alice", "1"), job["warnings"]
        response = service.call("GET", "/v1/models/reid-alice/versions/best")
        assert response.status_code == 200, response.text
        version = response.json()
        assert version["job_id"] == job["id"] and "mAP" in version["metrics"]
        assert version["best_rule"] == "mAP"
        assert (service.var / "mlflow.db").is_file()
        assert any((service.var / "mlartifacts").rglob("model_final.pt"))


def _unlabeled_crops(root: Path) -> tuple[bytes, dict[str, int]]:
    """A zip of ``crops/cam<N>/<n>.jpg`` (the synthetic people's training images, renamed so
    that nothing names the person) and, for judging pairs, the hidden person of each path in
    the dataset (``cam<N>/<n>.jpg``)."""
    synthetic = generate_synthetic_market(
        root, num_identities=12, images_per_identity=6, num_cameras=2, height=96, width=48
    )
    person: dict[str, int] = {}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for n, image in enumerate(sorted((synthetic / "bounding_box_train").glob("*.jpg"))):
            pid, camera = image.name.split("_")[:2]  # 0003_c2s1_...: person 3, camera 2
            path = f"cam{camera[1]}/{n:04d}.jpg"
            archive.write(image, f"crops/{path}")  # the dataset is the archive's one folder
            person[path] = int(pid)
    return buffer.getvalue(), person


def test_the_readme_path_without_labels(tmp_path: Path) -> None:
    """README, "Without labels, end to end": every step over HTTP against the embedded stack."""
    archive, person = _unlabeled_crops(tmp_path / "people")
    with embedded_service(tmp_path) as service:
        # 1. upload the folder of crops (cameras from the cam<N> sub-folders)
        response = service.call(
            "POST",
            "/v1/datasets",
            data={"name": "cams"},
            files={"file": ("crops.zip", archive, "application/zip")},
        )
        assert response.status_code == 201, response.text
        dataset = response.json()
        assert dataset["format"] == "image_folder", dataset

        # 2. a job from the CPU preset of cluster contrast, overrides on top
        body = {
            "dataset_id": dataset["id"],
            "preset": "cuhk03_cc_cpu",
            "config": {**TINY, **TINY_CLUSTERS},
        }
        preview = service.call("POST", "/v1/jobs/preview", json=body)
        assert preview.status_code == 200, preview.text
        assert preview.json()["config"]["loss"]["objective"] == "cluster_contrast"
        response = service.call("POST", "/v1/jobs", json=body)
        assert response.status_code == 201, response.text
        job = service.wait(
            f"/v1/jobs/{response.json()['id']}", ("SUCCEEDED", "FAILED", "CANCELLED"), 300
        )
        assert job["state"] == "SUCCEEDED", job

        # 3. the signals: before training (epoch 0) and after it, no mAP anywhere
        history = service.call("GET", f"/v1/jobs/{job['id']}/metrics").json()
        assert [record["epoch"] for record in history] == [0, 1]
        for record in history:
            assert 0.0 <= record["label_free/mutual_nn_rate"] <= 1.0, record
            assert "eval/mAP" not in record
        assert "cluster/clusters" in history[-1]
        version = service.call("GET", "/v1/models/reid-alice/versions/best").json()
        assert version["best_rule"] == "label-free mutual_nn_rate", version
        assert version["best_value"] == pytest.approx(history[-1]["label_free/mutual_nn_rate"])

        # 4. judge pairs: a gallery of the crops with best, its check, an answer per pair
        response = service.call(
            "POST",
            "/v1/galleries",
            json={"dataset_id": dataset["id"], "model_name": "reid-alice", "model_version": "best"},
        )
        assert response.status_code == 202, response.text
        gallery = service.wait(f"/v1/galleries/{response.json()['id']}", ("READY", "FAILED"), 180)
        assert gallery["state"] == "READY", gallery
        response = service.call("POST", "/v1/checks", json={"gallery_id": gallery["id"]})
        assert response.status_code == 201, response.text
        check = response.json()
        pairs = service.call("GET", f"/v1/checks/{check['id']}/pairs").json()["items"]
        assert len(pairs) == check["pairs"] > 0
        for pair in pairs:
            same = person[pair["query"]["path"]] == person[pair["candidate"]["path"]]
            response = service.call(
                "PUT",
                f"/v1/checks/{check['id']}/pairs/{pair['index']}/answer",
                json={"answer": "same" if same else "different"},
            )
            assert response.status_code == 200, response.text
        answered = response.json()
        assert answered["mlflow_error"] is None, answered
        at_1 = [
            person[p["query"]["path"]] == person[p["candidate"]["path"]]
            for p in pairs
            if p["at_rank_1"]
        ]
        assert answered["precision_at_1"]["estimate"] == pytest.approx(sum(at_1) / len(at_1))

        # 5. best now says the people's answers chose it; its weights load
        version = service.call("GET", "/v1/models/reid-alice/versions/best").json()
        assert version["best_rule"] == "human precision@1", version
        assert version["best_value"] == pytest.approx(sum(at_1) / len(at_1))
        weights = service.call("GET", "/v1/models/reid-alice/versions/best/weights")
        assert weights.status_code == 200, weights.text
        state = torch.load(io.BytesIO(weights.content), weights_only=True)
        assert state["config"]["loss"]["objective"] == "cluster_contrast"


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
