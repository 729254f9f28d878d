"""Jobs: config overrides validated by reid_core's models and the service's bounds, idempotency,
ETags, listing, cancellation and the event history."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.app import create_app
from service.core.api_keys import create_api_key
from service.core.db import session_scope
from service.core.job_states import change_state, lock_job
from service.core.models import JobState
from service.core.settings import JobBounds, Settings
from tests.service.conftest import Headers, write_image_folder


def _submit(client: TestClient, headers: Headers, dataset_id: str, **body: Any) -> Any:
    return client.post("/v1/jobs", json={"dataset_id": dataset_id, **body}, headers=headers)


def _error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


def _move(app: FastAPI, job_id: str, *states: JobState) -> None:
    """What a worker does: lock the row, change the state, commit."""
    with session_scope(app.state.session_factory) as session:
        job = lock_job(session, uuid.UUID(job_id))
        assert job is not None
        for state in states:
            change_state(session, job, state, f"worker: {state}")


def test_create_resolves_the_whole_config(
    client: TestClient, alice: Headers, dataset: dict[str, Any], settings: Settings
) -> None:
    response = _submit(
        client,
        alice,
        dataset["id"],
        config={"schedule.epochs": 3, "loss": {"gsl": {"threshold": 0.55}}, "data.height": 128},
        priority=5,
        max_retries=2,
        idempotency_key="k1",
    )
    assert response.status_code == 201, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert response.headers["etag"].startswith('"')
    assert job["state"] == "QUEUED"
    assert job["reason"] == "submitted by alice"
    assert (job["gpus"], job["priority"], job["max_retries"], job["retries"]) == (1, 5, 2, 0)
    # restarts after a kill from outside: the service's default, none made yet
    assert (job["max_restarts"], job["restarts"]) == (settings.job_bounds.default_restarts, 0)
    assert job["queue"] == "default"
    assert job["timeout_minutes"] == settings.job_bounds.default_timeout_minutes
    assert job["config_overrides"]["schedule.epochs"] == 3
    cfg = job["resolved_config"]
    assert cfg["schedule"]["epochs"] == 3
    assert cfg["loss"]["gsl"]["threshold"] == 0.55
    assert cfg["data"]["height"] == 128
    assert cfg["data"]["dataset"] == "image_folder"
    assert cfg["data"]["root"] == dataset["path"]
    assert cfg["runtime"]["output_dir"] == str(settings.jobs_path.absolute() / job["id"])
    assert cfg["runtime"]["device"] == "cuda"
    assert cfg["loss"]["pedal"]["scale"] == 15.0  # untouched defaults are filled in


def test_default_gpus_from_the_service_settings(settings: Settings) -> None:
    bounds = settings.job_bounds.model_copy(update={"default_gpus": 0})
    app = create_app(settings.model_copy(update={"job_bounds": bounds}))
    with TestClient(app) as client:
        with session_scope(app.state.session_factory) as session:
            headers = {"X-API-Key": create_api_key(session, "alice")[1]}
        folder = write_image_folder(settings.dataset_roots[0] / "cpu-crops")
        created = client.post(
            "/v1/datasets", json={"name": "cpu", "path": str(folder)}, headers=headers
        )
        assert created.status_code == 201, created.text
        job = _submit(client, headers, created.json()["id"]).json()
        assert job["gpus"] == 0
        assert job["resolved_config"]["runtime"]["device"] == "cpu"
        # asked for explicitly, GPUs are still allowed
        assert _submit(client, headers, created.json()["id"], gpus=1).json()["gpus"] == 1


def test_default_gpus_above_max_gpus_is_refused() -> None:
    with pytest.raises(ValidationError, match="default_gpus=3 is above max_gpus=2"):
        JobBounds(max_gpus=2, default_gpus=3)
    assert JobBounds(max_gpus=0).gpus_or_default(None) == 0
    assert JobBounds(max_gpus=4).gpus_or_default(None) == 1
    assert JobBounds(max_gpus=4, default_gpus=2).gpus_or_default(None) == 2


def test_cpu_job(client: TestClient, alice: Headers, dataset: dict[str, Any]) -> None:
    job = _submit(client, alice, dataset["id"], gpus=0).json()
    assert job["resolved_config"]["runtime"]["device"] == "cpu"
    error = _error(
        _submit(client, alice, dataset["id"], gpus=0, config={"runtime.device": "cuda"}), 422
    )
    assert "gpus" in error["message"]


@pytest.mark.parametrize(
    ("config", "key", "fragment"),
    [
        ({"loss.gls.threshold": 0.5}, "config.loss.gls.threshold", "unknown key 'gls'"),
        ({"loss": {"gls": {"threshold": 0.5}}}, "config.loss.gls.threshold", "unknown key 'gls'"),
        ({"nope": 1}, "config.nope", "unknown key 'nope'"),
        ({"schedule.epochs": "many"}, "config.schedule.epochs", "schedule.epochs"),
        ({"loss.gsl.threshold": 7}, "config.loss.gsl.threshold", "loss.gsl.threshold"),
        ({"data.root": "/etc"}, "config.data.root", "set by the service"),
        ({"data": {"dataset": "synthetic"}}, "config.data.dataset", "set by the service"),
        ({"runtime.output_dir": "/tmp/x"}, "config.runtime.output_dir", "set by the service"),
        ({"model.weights_path": "/x.pth"}, "config.model.weights_path", "set by the service"),
        ({"checkpoint.resume": "/etc/x.pt"}, "config.checkpoint.resume", "auto, none"),
        ({"schedule.epochs": 101}, "config.schedule.epochs", "limit of 100"),
        ({"data.batch_size": 512}, "config.data.batch_size", "limit of 128"),
        ({"data.height": 1024}, "config.data.height", "limit of 512"),
        ({"runtime.num_threads": 65}, "config.runtime.num_threads", "limit of 64"),
        ({"data.num_workers": 17}, "config.data.num_workers", "limit of 16"),
    ],
)
def test_bad_config_is_422_naming_the_key(
    client: TestClient,
    alice: Headers,
    dataset: dict[str, Any],
    config: dict[str, Any],
    key: str,
    fragment: str,
) -> None:
    error = _error(_submit(client, alice, dataset["id"], config=config), 422)
    assert error["code"] == "validation_error"
    assert fragment in error["message"]
    assert error["details"][0]["field"] == f"body.{key}"
    assert client.get("/v1/jobs", headers=alice).json()["total"] == 0


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        ({"gpus": 3}, "body.gpus", "limit of 2"),
        ({"priority": 10}, "body.priority", "highest priority 9"),
        ({"max_retries": 4}, "body.max_retries", "limit of 3"),
        ({"max_restarts": 11}, "body.max_restarts", "limit of 10"),
        ({"max_restarts": -1}, "body.max_restarts", "greater than or equal to 0"),
        ({"timeout_minutes": 10**6}, "body.timeout_minutes", "limit of"),
        ({"queue": "gpu-big"}, "body.queue", "unknown queue"),
        ({"gpus": -1}, "body.gpus", "greater than or equal to 0"),
        ({"gpus": True}, "body.gpus", "valid integer"),
        ({"gpus": "1"}, "body.gpus", "valid integer"),
        ({"gpus": 2.5}, "body.gpus", "valid integer"),
        ({"max_retries": 1.5}, "body.max_retries", "valid integer"),
        # integral floats are integers (JSON Schema's), and the service's bounds still hold
        ({"gpus": 39916801.0}, "body.gpus", "gpus=39916801 is above this service's limit of 2"),
        ({"gpus": 1e300}, "body.gpus", "above this service's limit of 2"),
        ({"priority": 10.0}, "body.priority", "priority=10 is above the highest priority 9"),
        ({"timeout_minutes": 2208617943225783.0}, "body.timeout_minutes", "limit of"),
        ({"surprise": True}, "body.surprise", "Extra inputs"),
    ],
)
def test_resources_are_bounded(
    client: TestClient,
    alice: Headers,
    dataset: dict[str, Any],
    body: dict[str, Any],
    field: str,
    fragment: str,
) -> None:
    error = _error(_submit(client, alice, dataset["id"], **body), 422)
    assert error["details"][0]["field"] == field
    assert fragment in error["message"]


def test_integral_floats_are_integers(
    client: TestClient, alice: Headers, dataset: dict[str, Any]
) -> None:
    """OpenAPI's integer is JSON Schema's: 2.0 is one (a client's JSON library may write it so).
    The job is the one the same request with ints makes: the same idempotency key finds it."""
    ints = {"gpus": 1, "priority": 5, "max_retries": 2, "max_restarts": 3, "timeout_minutes": 60}
    floats = {name: float(value) for name, value in ints.items()}
    created = _submit(client, alice, dataset["id"], idempotency_key="floats", **floats)
    assert created.status_code == 201, created.text
    job = created.json()
    assert {name: job[name] for name in ints} == ints
    assert all(type(job[name]) is int for name in ints)
    again = _submit(client, alice, dataset["id"], idempotency_key="floats", **ints)
    assert (again.status_code, again.json()["id"]) == (200, job["id"])


def test_unknown_dataset(client: TestClient, alice: Headers) -> None:
    error = _error(_submit(client, alice, str(uuid.uuid4())), 404)
    assert error["code"] == "dataset_not_found"
    invalid = _error(_submit(client, alice, "not-a-uuid"), 422)
    assert invalid["details"][0] == {
        "field": "body.dataset_id",
        "message": invalid["details"][0]["message"],
        "value": "not-a-uuid",
    }


def test_idempotency_key(client: TestClient, alice: Headers, dataset: dict[str, Any]) -> None:
    first = _submit(client, alice, dataset["id"], idempotency_key="run-1")
    again = _submit(client, alice, dataset["id"], idempotency_key="run-1")
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    assert client.get("/v1/jobs", headers=alice).json()["total"] == 1
    changed = _submit(client, alice, dataset["id"], idempotency_key="run-1", priority=3)
    assert _error(changed, 409)["code"] == "idempotency_key_reused"
    other = _submit(client, alice, dataset["id"], idempotency_key="run-2")
    assert other.status_code == 201
    assert other.json()["id"] != first.json()["id"]


def test_a_repeated_request_gets_its_job_after_its_dataset_is_gone(
    app: FastAPI, client: TestClient, alice: Headers, dataset: dict[str, Any]
) -> None:
    """The key is looked up only when a submission cannot go on (a new job is one transaction):
    here the dataset, which a new request would need, was deleted after the first one."""
    first = _submit(client, alice, dataset["id"], idempotency_key="run-1").json()
    _move(app, first["id"], JobState.STARTING, JobState.RUNNING, JobState.SUCCEEDED)
    assert client.delete(f"/v1/datasets/{dataset['id']}", headers=alice).status_code == 204
    again = _submit(client, alice, dataset["id"], idempotency_key="run-1")
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first["id"]
    assert _error(_submit(client, alice, dataset["id"]), 404)["code"] == "dataset_not_found"


def test_etag_and_not_modified(
    app: FastAPI, client: TestClient, alice: Headers, dataset: dict[str, Any]
) -> None:
    job = _submit(client, alice, dataset["id"]).json()
    url = f"/v1/jobs/{job['id']}"
    first = client.get(url, headers=alice)
    etag = first.headers["etag"]
    assert not etag.startswith("W/")
    assert first.json() == job
    unchanged = client.get(url, headers={**alice, "If-None-Match": etag})
    assert unchanged.status_code == 304
    assert unchanged.content == b""
    assert unchanged.headers["etag"] == etag
    assert (
        client.get(url, headers={**alice, "If-None-Match": f'"other", W/{etag}'}).status_code == 304
    )
    _move(app, job["id"], JobState.STARTING, JobState.RUNNING)
    changed = client.get(url, headers={**alice, "If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.json()["state"] == "RUNNING"
    assert changed.headers["etag"] != etag


def test_list_filter_and_pagination(
    client: TestClient, alice: Headers, bob: Headers, dataset: dict[str, Any]
) -> None:
    ids = [_submit(client, alice, dataset["id"]).json()["id"] for _ in range(4)]
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=alice)
    everything = client.get("/v1/jobs", headers=alice).json()
    assert everything["total"] == 4
    assert [j["id"] for j in everything["items"]] == ids[::-1]  # newest first
    queued = client.get("/v1/jobs", params={"state": "QUEUED"}, headers=alice).json()
    assert queued["total"] == 3
    assert {j["state"] for j in queued["items"]} == {"QUEUED"}
    both = client.get(
        "/v1/jobs", params=[("state", "QUEUED"), ("state", "CANCELLED")], headers=alice
    )
    assert both.json()["total"] == 4
    page = client.get("/v1/jobs", params={"limit": 2, "offset": 1}, headers=alice).json()
    assert (page["total"], page["limit"], page["offset"]) == (4, 2, 1)
    assert [j["id"] for j in page["items"]] == ids[::-1][1:3]
    by_dataset = client.get("/v1/jobs", params={"dataset_id": dataset["id"]}, headers=alice)
    assert by_dataset.json()["total"] == 4
    bad_state = client.get("/v1/jobs", params={"state": "DONE"}, headers=alice)
    assert _error(bad_state, 422)["details"][0]["field"] == "query.state.0"
    assert _error(client.get("/v1/jobs", params={"limit": 0}, headers=alice), 422)
    assert client.get("/v1/jobs", headers=bob).json()["total"] == 0


def test_cancel_a_queued_job(client: TestClient, alice: Headers, dataset: dict[str, Any]) -> None:
    job = _submit(client, alice, dataset["id"]).json()
    response = client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
    assert response.status_code == 200
    assert response.json()["state"] == "CANCELLED"
    assert response.json()["finished_at"] is not None
    again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
    assert _error(again, 409)["code"] == "job_finished"
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=alice).json()
    assert [(e["from_state"], e["to_state"]) for e in events] == [
        (None, "QUEUED"),
        ("QUEUED", "CANCELLED"),
    ]
    assert events[1]["reason"] == "cancelled by alice before it ran"


@pytest.mark.parametrize("running", [JobState.STARTING, JobState.RUNNING])
def test_cancel_a_running_job(
    app: FastAPI,
    client: TestClient,
    alice: Headers,
    dataset: dict[str, Any],
    running: JobState,
) -> None:
    job = _submit(client, alice, dataset["id"]).json()
    states = [JobState.STARTING] + ([JobState.RUNNING] if running is JobState.RUNNING else [])
    _move(app, job["id"], *states)
    response = client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
    assert response.status_code == 202
    body = response.json()
    assert (body["state"], body["cancel_requested"]) == ("CANCELLING", True)
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice).status_code == 202
    _move(app, job["id"], JobState.CANCELLED)  # the worker saw the flag, the trainer stopped
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=alice).json()
    assert [e["to_state"] for e in events] == ["QUEUED", *states, "CANCELLING", "CANCELLED"]
    assert _error(client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice), 409)


def test_config_models_are_in_the_openapi_schema(client: TestClient, alice: Headers) -> None:
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    for name in ("ExperimentConfig", "LossConfig", "GSLConfig", "DataConfig", "JobCreate"):
        assert name in components
    resolved = components["JobOut"]["properties"]["resolved_config"]
    assert {"$ref": "#/components/schemas/ExperimentConfig"} in resolved["anyOf"]
    assert "ErrorResponse" in components
    defaults = client.get("/v1/config/defaults", headers=alice).json()
    assert defaults["loss"]["gsl"]["threshold"] == 0.6


def test_progress_and_metrics_schemas_are_in_the_openapi_schema(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    metrics = components["JobOut"]["properties"]["metrics"]
    assert metrics.get("$ref", "").endswith("/JobMetrics"), metrics
    job_metrics = components["JobMetrics"]["properties"]
    assert {"status", "losses", "eval", "clustering", "eta_seconds"} <= set(job_metrics)
    # a number, or null where the trainer's was NaN or infinite (a diverged loss)
    number_or_null = {"anyOf": [{"type": "number"}, {"type": "null"}]}
    assert job_metrics["losses"]["additionalProperties"] == number_or_null
    route = schema["paths"]["/v1/jobs/{job_id}/metrics"]["get"]
    history = route["responses"]["200"]["content"]["application/json"]["schema"]
    assert history["type"] == "array"
    assert history["items"]["$ref"].endswith("/EpochMetrics"), history
    epoch = components["EpochMetrics"]
    assert {"epoch", "global_step", "images_per_second", "epoch_seconds"} <= set(
        epoch["properties"]
    )
    assert epoch["additionalProperties"] == {"type": "number"}  # loss/..., eval/..., ...
    assert "loss/<term>" in epoch["description"]
    # epoch 0: the evaluation before training
    assert epoch["properties"]["epoch"]["minimum"] == 0
    assert "evaluation before training" in epoch["properties"]["epoch"]["description"]


def test_metrics_and_logs_read_the_job_folder(
    client: TestClient,
    alice: Headers,
    bob: Headers,
    dataset: dict[str, Any],
    settings: Settings,
) -> None:
    job = _submit(client, alice, dataset["id"]).json()
    url = f"/v1/jobs/{job['id']}"
    assert client.get(f"{url}/metrics", headers=alice).json() == []  # before the first epoch
    assert client.get(f"{url}/logs", headers=alice).text == ""
    folder = settings.jobs_path / job["id"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text(
        '{"epoch": 0, "global_step": 0, "eval/mAP": 4.0}\n'  # the evaluation before training
        '{"epoch": 1, "loss/total": 3.5}\n{"epoch": 2, "loss/total": 2.5, "eval/mAP": 10.0}\n{"epo'
    )
    (folder / "process.log").write_text("".join(f"line {i}\n" for i in range(500)))
    history = client.get(f"{url}/metrics", headers=alice).json()
    assert [h["epoch"] for h in history] == [0, 1, 2]  # the half-written line is skipped
    assert history[0] == {
        "epoch": 0,
        "global_step": 0,
        "images_per_second": None,
        "epoch_seconds": None,
        "eval/mAP": 4.0,
    }
    assert history[2]["eval/mAP"] == 10.0
    logs = client.get(f"{url}/logs?tail=3", headers=alice)
    assert logs.headers["content-type"].startswith("text/plain")
    assert logs.text == "line 497\nline 498\nline 499\n"
    assert client.get(f"{url}/logs?tail=0", headers=alice).status_code == 422
    assert client.get(f"{url}/metrics", headers=bob).status_code == 404
    assert client.get(f"{url}/logs", headers=bob).status_code == 404


def _sse_events(text: str) -> list[dict[str, str]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":"):
                continue
            key, _, value = line.partition(": ")
            fields[key] = value
        if fields:
            events.append(fields)
    return events


def test_logs_follow_as_server_sent_events(
    app: FastAPI, client: TestClient, alice: Headers, dataset: dict[str, Any], settings: Settings
) -> None:
    job = _submit(client, alice, dataset["id"]).json()
    folder = settings.jobs_path / job["id"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "process.log").write_text("epoch 1\nepoch 2\rbar 50%\rbar 100%\nepoch 3\n")
    _move(app, job["id"], JobState.STARTING, JobState.RUNNING, JobState.SUCCEEDED)
    url = f"/v1/jobs/{job['id']}/logs?follow=true&tail=2"
    response = client.get(url, headers=alice)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(response.text)
    # the last two lines (a line redrawn with \r shows its last state), then the end
    assert [e.get("data") for e in events] == ["bar 100%", "epoch 3", "SUCCEEDED"]
    assert events[-1]["event"] == "end"
    # Last-Event-ID (a byte offset) resumes after the line it names
    resumed = client.get(url, headers={**alice, "Last-Event-ID": events[0]["id"]})
    assert [e.get("data") for e in _sse_events(resumed.text)] == ["epoch 3", "SUCCEEDED"]


def test_retry_a_failed_or_cancelled_job(
    app: FastAPI, client: TestClient, alice: Headers, bob: Headers, dataset: dict[str, Any]
) -> None:
    job = _submit(client, alice, dataset["id"]).json()
    url = f"/v1/jobs/{job['id']}/retry"
    error = _error(client.post(url, headers=alice), 409)  # QUEUED: nothing to retry
    assert "only FAILED or CANCELLED jobs can be retried" in error["message"]
    _move(app, job["id"], JobState.STARTING, JobState.RUNNING, JobState.FAILED)
    assert client.post(url, headers=bob).status_code == 404  # not bob's
    response = client.post(url, headers=alice)
    assert response.status_code == 202, response.text
    body = response.json()
    # the owner's retry is not an automatic one: both budgets are whole again
    assert (body["state"], body["retries"], body["restarts"]) == ("RETRYING", 0, 0)
    assert body["finished_at"] is None
    assert body["reason"] == (
        "retry requested by alice (was FAILED): resumes from its last checkpoint; restarts and "
        "retries count from 0 again (3 and 0 allowed)"
    )
    # cancelled while waiting, then retried again
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice).status_code == 200
    assert client.post(url, headers=alice).status_code == 202
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=alice).json()
    assert [e["to_state"] for e in events][-4:] == ["FAILED", "RETRYING", "CANCELLED", "RETRYING"]
    # a job that succeeded is not run again
    _move(app, job["id"], JobState.STARTING, JobState.RUNNING, JobState.SUCCEEDED)
    assert "submit a new job" in _error(client.post(url, headers=alice), 409)["message"]


def test_retry_refused_when_the_dataset_is_gone(
    app: FastAPI, client: TestClient, alice: Headers, dataset: dict[str, Any]
) -> None:
    job = _submit(client, alice, dataset["id"]).json()
    _move(app, job["id"], JobState.CANCELLED)
    assert client.delete(f"/v1/datasets/{dataset['id']}", headers=alice).status_code == 204
    error = _error(client.post(f"/v1/jobs/{job['id']}/retry", headers=alice), 409)
    assert error["code"] == "dataset_gone"


def test_model_name_defaults_per_owner_and_is_validated(
    client: TestClient, alice: Headers, dataset: dict[str, Any]
) -> None:
    assert _submit(client, alice, dataset["id"]).json()["model_name"] == "reid-alice"
    named = _submit(client, alice, dataset["id"], model_name="street-cams").json()
    assert named["model_name"] == "street-cams"
    error = _error(_submit(client, alice, dataset["id"], model_name="../evil"), 422)
    assert error["details"][0]["field"] == "body.model_name"


def test_the_memory_banks_are_bounded(tmp_path: Path, migrated_sqlite: Path) -> None:
    import shutil

    from reid_core.config import ExperimentConfig
    from service.app import create_app
    from service.core.api_keys import create_api_key
    from service.core.job_config import memory_bank_bytes
    from service.core.settings import JobBounds
    from tests.service.conftest import make_settings, write_image_folder

    cfg = ExperimentConfig()  # ResNet-50: 2048 channels; the paper's patch sizes
    m, b = cfg.model, cfg.data.batch_size
    per_image = 2048 + 2 * b + m.num_patches * (m.patch_dim + 2 * b + m.ipfl_dim)
    assert memory_bank_bytes(cfg, 1000) == 4 * 1000 * per_image

    db = tmp_path / "reid.db"
    shutil.copyfile(migrated_sqlite, db)
    settings = make_settings(
        tmp_path,
        f"sqlite:///{db}",
        job_bounds=JobBounds(max_memory_bank_gib=1.5e-5),  # ~16 KB
    )
    app = create_app(settings)
    with session_scope(app.state.session_factory) as session:
        _, token = create_api_key(session, "alice")
    headers = {"X-API-Key": token}
    folder = write_image_folder(settings.dataset_roots[0] / "crops")  # 4 readable images
    with TestClient(app) as client:
        dataset = client.post(
            "/v1/datasets", json={"name": "crops", "path": str(folder)}, headers=headers
        ).json()
        error = _error(_submit(client, headers, dataset["id"], gpus=0), 422)
        assert error["details"][0]["field"] == "body.config.model"
        assert "memory banks of 4 training images" in error["message"]
        # smaller features fit
        small = {"model.backbone": "mobilenet_v3_small", "loss.pedal.enabled": False}
        small |= {"loss.ipfl.enabled": False}
        assert _submit(client, headers, dataset["id"], gpus=0, config=small).status_code == 201
