"""Fixtures of the browser tests: the real service and Debian's Chromium driven by Playwright.

The service is ``python -m service serve --with-worker`` (API, a training worker and the
dispatcher; SQLite database, broker and MLflow store, nothing else) on a free port, shared by the
session. Its worker trains real jobs on a tiny synthetic dataset on the CPU; a second queue
(``parked``) has no worker, so a job sent there stays QUEUED for as long as a test needs.

The browser is ``/usr/bin/chromium`` (``apt-get install chromium``; ``.ci/run`` installs it),
never one downloaded by ``playwright install``; the tests skip, saying why, without it. The
``playwright`` package comes with the ``dev`` extra. Screenshots go to ``test-output/screenshots/``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from reid_core.data import generate_synthetic_market
from tests.helpers import TINY_JOB_CONFIG

REPO_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO_ROOT / "test-output" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: The parked queue: accepted by the API, consumed by no worker.
PARKED_QUEUE = "parked"
#: Two evaluated epochs of two steps: a job of seconds with a point per epoch on every chart,
#: and on the evaluation chart one at epoch 0, the evaluation before training.
SHORT_JOB = {
    **TINY_JOB_CONFIG,
    "schedule.epochs": 2,
    "schedule.max_steps_per_epoch": 2,
    "eval.every_n_epochs": 1,
    "eval.at_start": True,
    "model.camera_norm": True,  # the gallery search's camera field changes its hits
}
#: Minutes of training on this CPU: running for as long as a test needs before it cancels.
LONG_JOB = {**TINY_JOB_CONFIG, "schedule.epochs": 150, "eval.every_n_epochs": 150}
FINAL_STATES = {"SUCCEEDED", "FAILED", "CANCELLED"}


@dataclass
class Service:
    base_url: str
    keys: dict[str, str]  # owner -> API key
    data_root: Path
    dataset: dict[str, Any]  # alice's synthetic Market-1501 dataset
    log: Path

    def client(self, owner: str = "alice") -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url, headers={"X-API-Key": self.keys[owner]}, timeout=30
        )

    def submit(self, config: dict[str, Any], owner: str = "alice", **fields: Any) -> dict[str, Any]:
        body = {"dataset_id": self.dataset["id"], "config": config, "gpus": 0, **fields}
        with self.client(owner) as api:
            response = api.post("/v1/jobs", json=body)
        assert response.status_code == 201, response.text
        job: dict[str, Any] = response.json()
        return job

    def job(self, job_id: str, owner: str = "alice") -> dict[str, Any]:
        with self.client(owner) as api:
            response = api.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        job: dict[str, Any] = response.json()
        return job

    def wait_for(
        self, job_id: str, states: set[str], timeout_s: float = 120, owner: str = "alice"
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.job(job_id, owner)
            if job["state"] in states:
                return job
            assert job["state"] not in FINAL_STATES, f"job ended {job['state']}: {job['reason']}"
            assert time.monotonic() < deadline, f"job still {job['state']} after {timeout_s} s"
            time.sleep(0.5)

    def cancel(self, job_id: str, owner: str = "alice") -> None:
        """Cancel unless finished, and wait until it is: the next test gets an idle worker."""
        with self.client(owner) as api:
            api.post(f"/v1/jobs/{job_id}/cancel")
        self.wait_for(job_id, FINAL_STATES, timeout_s=60, owner=owner)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(env: dict[str, str], cwd: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "service", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    home = tmp_path_factory.mktemp("service")
    data_root = home / "datasets"
    generate_synthetic_market(
        data_root / "synthetic", num_identities=8, images_per_identity=4, height=96, width=48
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("REID_")},
        "REID_DATA_DIR": str(home / "var"),
        "REID_DATASET_ROOTS": json.dumps([str(data_root)]),
        "REID_QUEUES": json.dumps(["default", PARKED_QUEUE]),
        "REID_WORKER__POLL_INTERVAL_S": "0.3",
        "REID_WORKER__KILL_GRACE_S": "20",
        "REID_MLFLOW__UI_URL": "http://mlflow.example:5000",
        "REID_LOG_LEVEL": "warning",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    # Run from the temporary folder: no developer's .env is read, nothing is written here.
    _cli(env, home, "migrate")
    keys = {owner: _cli(env, home, "create-key", "--owner", owner) for owner in ("alice", "bob")}
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = home / "serve.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--with-worker", "--port", str(port)],
            env=env,
            cwd=home,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_until_up(base_url, server, log_path)
        with httpx.Client(
            base_url=base_url, headers={"X-API-Key": keys["alice"]}, timeout=30
        ) as api:
            response = api.post(
                "/v1/datasets", json={"name": "synthetic", "path": str(data_root / "synthetic")}
            )
        assert response.status_code == 201, response.text
        yield Service(base_url, keys, data_root, response.json(), log_path)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _wait_until_up(base_url: str, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert server.poll() is None, f"the service exited:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no answer in 90 s:\n{log.read_text()[-4000:]}"
        time.sleep(0.3)


@pytest.fixture(scope="session")
def trained_job(service: Service) -> dict[str, Any]:
    """A short job of alice's, trained to SUCCEEDED (metrics, events, log, registered model)."""
    job = service.submit(SHORT_JOB)
    return service.wait_for(job["id"], {"SUCCEEDED"}, timeout_s=180)


#: A gallery build on this CPU: the builder starts (torch), loads the model, embeds the images.
BUILD_TIMEOUT_MS = 180_000


def build(service: Service, dataset: dict[str, Any], model: str, name: str) -> dict[str, Any]:
    """A gallery of ``dataset`` on the CPU and the default queue: the service's worker builds it."""
    with service.client() as api:
        response = api.post(
            "/v1/galleries",
            json={
                "dataset_id": dataset["id"],
                "model_name": model,
                "model_version": "best",
                "name": name,
                "gpus": 0,
            },
        )
    assert response.status_code == 202, response.text
    gallery: dict[str, Any] = response.json()
    assert gallery["queue"] == "default", gallery
    return gallery


def wait_for_gallery(service: Service, gallery_id: str, state: str) -> dict[str, Any]:
    """The gallery once READY or FAILED, which must be ``state``."""
    deadline = time.monotonic() + BUILD_TIMEOUT_MS / 1000
    while True:
        with service.client() as api:
            response = api.get(f"/v1/galleries/{gallery_id}")
        assert response.status_code == 200, response.text
        gallery: dict[str, Any] = response.json()
        if gallery["state"] in ("READY", "FAILED"):
            assert gallery["state"] == state, gallery
            return gallery
        assert time.monotonic() < deadline, f"gallery still {gallery['state']}"
        time.sleep(0.5)


# ----------------------------------------------------------------------------------------------
# browser
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


OpenPage = Callable[..., Page]


@pytest.fixture
def open_page(browser: Browser, service: Service) -> Iterator[OpenPage]:
    """``open_page(owner="alice", width=1280, height=800)``: a fresh browser tab on the
    dashboard; signed in as ``owner`` (its key already in sessionStorage) unless owner is None.
    At the end, the test fails if a page had an error no view handled (uncaught, or shown in the
    page's banner) or a Content-Security-Policy refusal."""
    pages: list[Page] = []
    problems: list[str] = []

    def open_(owner: str | None = "alice", width: int = 1280, height: int = 800) -> Page:
        context = browser.new_context(
            base_url=service.base_url, viewport={"width": width, "height": height}
        )
        if owner is not None:
            key = json.dumps(service.keys[owner])
            context.add_init_script(f"sessionStorage.setItem('reid.apiKey', {key})")
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
        page.on(
            "console",
            lambda message: (
                problems.append(f"console: {message.text}")
                if "Content Security Policy" in message.text
                else None
            ),
        )
        pages.append(page)
        return page

    yield open_
    for page in pages:
        if page.locator("#banner").is_visible():
            problems.append(f"banner: {page.locator('#banner-text').inner_text()}")
        page.context.close()
    assert problems == []


def screenshot(page: Page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
