"""The jobs table and the job page, in Chromium, against the real service and its worker: a job
submitted from the page trains to SUCCEEDED while the table follows it, its page draws the charts;
a running job is cancelled and retried from its page; keys and bad input read as messages."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from playwright.sync_api import Page, Route, expect

from tests.browser.conftest import (
    LONG_JOB,
    PARKED_QUEUE,
    SHORT_JOB,
    OpenPage,
    Service,
    screenshot,
)
from tests.helpers import TINY_JOB_CONFIG

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TRAINING_TIMEOUT_MS = 180_000


def chart_points(page: Page, canvas_id: str) -> dict[str, list[list[float]]]:
    """{series label: [[epoch, value], ...]} of the Chart.js chart drawn on ``canvas_id``."""
    page.wait_for_function(
        "id => window.Chart.getChart(document.getElementById(id))?.data.datasets.length > 0",
        arg=canvas_id,
    )
    points: dict[str, list[list[float]]] = page.evaluate(
        """id => Object.fromEntries(
            window.Chart.getChart(document.getElementById(id)).data.datasets.map(
                d => [d.label, d.data.map(p => [p.x, p.y])]))""",
        canvas_id,
    )
    return points


def chart_x_labels(page: Page, canvas_id: str) -> list[str]:
    """The x axis's tick labels of the Chart.js chart drawn on ``canvas_id``."""
    labels: list[str] = page.evaluate(
        "id => window.Chart.getChart(document.getElementById(id)).scales.x.ticks.map(t => t.label)",
        canvas_id,
    )
    return labels


def chart_tooltip_title(page: Page, canvas_id: str, index: int) -> list[str]:
    """The tooltip's title over point ``index`` of the chart's first series."""
    title: list[str] = page.evaluate(
        """([id, index]) => {
            const chart = window.Chart.getChart(document.getElementById(id));
            chart.tooltip.setActiveElements([{ datasetIndex: 0, index }], { x: 0, y: 0 });
            chart.update();
            const title = chart.tooltip.title;
            chart.tooltip.setActiveElements([], { x: 0, y: 0 });
            chart.update();
            return title;
        }""",
        [canvas_id, index],
    )
    return title


def sign_in(page: Page, key: str) -> None:
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()
    dialog.get_by_label("Key", exact=True).fill(key)
    dialog.get_by_role("button", name="Use this key").click()


def test_a_wrong_key_is_refused_with_the_api_message(open_page: OpenPage) -> None:
    page = open_page(owner=None)
    page.goto("/")
    sign_in(page, "reid_not-a-key")
    expect(page.locator("#key-error")).to_have_text("This key was not accepted: invalid API key")
    expect(page.locator("#key-dialog")).to_be_visible()
    expect(page.locator("#view")).to_contain_text("Enter an API key")
    assert page.evaluate("sessionStorage.getItem('reid.apiKey')") is None


def test_a_job_submitted_from_the_page_is_followed_to_the_end(
    open_page: OpenPage, service: Service
) -> None:
    page = open_page(owner=None)
    polls: list[dict[str, Any]] = []  # GET /v1/jobs/{id} as the page sent them
    page.on(
        "request",
        lambda r: (
            polls.append({"url": r.url, "headers": r.headers})
            if r.method == "GET" and re.search(r"/v1/jobs/[0-9a-f-]{36}$", r.url)
            else None
        ),
    )
    page.goto("/")
    sign_in(page, service.keys["alice"])
    expect(page.locator("#key-dialog")).to_be_hidden()
    expect(page.locator("#key-label")).to_have_text(f"key {service.keys['alice'][:13]}…")
    page.evaluate("window.sameDocument = true")  # gone if anything reloads the page

    page.locator("#new-job > summary").click()
    form = page.locator("#new-job-form")
    form.get_by_label("Dataset").select_option(label="synthetic (64 images)")
    form.get_by_label("Overrides").fill(json.dumps(SHORT_JOB))
    form.get_by_label("GPUs").fill("0")
    form.get_by_label("Max retries").fill("1")
    form.get_by_role("button", name="Submit job").click()
    expect(form.locator(".form-message")).to_contain_text("Submitted job")

    row = page.locator("#jobs-table tbody tr").first
    job_id = row.get_attribute("data-job-id")
    assert job_id is not None
    submitted = service.job(job_id)
    assert submitted["config_overrides"] == SHORT_JOB
    assert (submitted["gpus"], submitted["max_retries"]) == (0, 1)
    assert submitted["dataset_id"] == service.dataset["id"]

    expect(row.locator(".cell-state")).to_have_text("SUCCEEDED", timeout=TRAINING_TIMEOUT_MS)
    job = service.job(job_id)
    expect(row.locator(".progress-text")).to_have_text("100%")
    expect(row.locator(".cell-epoch")).to_have_text("2 / 2")
    expect(row.locator(".cell-loss")).to_have_text(f"{job['metrics']['losses']['total']:.3f}")
    expect(row.locator(".cell-map")).to_have_text(f"{job['metrics']['eval']['mAP']:.1f}")
    expect(row.locator(".cell-r1")).to_have_text(f"{job['metrics']['eval']['r1']:.1f}")
    expect(row.locator(".cell-dataset")).to_have_text("synthetic")
    assert page.evaluate("window.sameDocument") is True
    # The table asked for this job alone, every time but the first with its ETag.
    mine = [p for p in polls if p["url"].endswith(job_id)]
    assert len(mine) >= 2
    assert all("if-none-match" in p["headers"] for p in mine[1:])
    assert all(p["headers"].get("x-api-key") == service.keys["alice"] for p in polls)
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    screenshot(page, "jobs-table")

    row.locator(".cell-job a").click()
    expect(page).to_have_url(re.compile(f"#/jobs/{job_id}$"))
    expect(page.locator("#job-state")).to_have_text("SUCCEEDED")
    with service.client() as api:
        history = api.get(f"/v1/jobs/{job_id}/metrics").json()
        events = api.get(f"/v1/jobs/{job_id}/events").json()

    # epoch 0 is the evaluation before training (eval.at_start): evaluation figures and the
    # label-free signals alone, no losses
    assert [r["epoch"] for r in history] == [0, 1, 2]
    measured = {k for k, v in history[0].items() if v is not None} - {"epoch", "global_step"}
    assert any(k.startswith("eval/") for k in measured), history[0]
    assert all(k.startswith(("eval/", "label_free/")) for k in measured), history[0]
    trained = history[1:]

    losses = chart_points(page, "loss-chart")
    terms = {k.removeprefix("loss/") for k in trained[0] if k.startswith("loss/")}
    assert set(losses) == terms
    assert losses["total"] == [[r["epoch"], r["loss/total"]] for r in trained]
    assert "before training" not in chart_x_labels(page, "loss-chart")
    evaluation = chart_points(page, "eval-chart")
    assert set(evaluation) == {"mAP", "R1", "R5", "mINP"}
    # the first point: the model before training, so the gain shows
    assert evaluation["mAP"] == [[r["epoch"], r["eval/mAP"]] for r in history]
    assert evaluation["R1"][0] == [0, history[0]["eval/r1"]]
    assert chart_x_labels(page, "eval-chart")[0] == "before training"
    assert chart_tooltip_title(page, "eval-chart", 0) == ["epoch 0 (before training)"]
    assert chart_tooltip_title(page, "eval-chart", 1) == ["epoch 1"]
    expect(page.locator("#loss-chart")).to_be_visible()
    expect(page.locator("#eval-chart")).to_be_visible()
    # the label-free signals of the same evaluations, in a chart of their own
    signals = chart_points(page, "label-free-chart")
    assert signals["mutual_nn_rate"] == [
        [r["epoch"], r["label_free/mutual_nn_rate"]] for r in history
    ]
    expect(page.locator("#label-free-chart")).to_be_visible()

    timeline = page.locator("#job-timeline li")
    expect(timeline).to_have_count(len(events))
    assert [e["to_state"] for e in events] == ["QUEUED", "STARTING", "RUNNING", "SUCCEEDED"]
    for item, event in zip(timeline.all(), events, strict=True):
        expect(item).to_contain_text(event["to_state"])
        expect(item).to_contain_text(event["reason"])
    expect(page.locator("#job-log")).to_contain_text("final model saved")
    assert json.loads(page.locator("#job-overrides").inner_text()) == SHORT_JOB
    expect(page.locator("#job-resolved-config")).to_contain_text('"mobilenet_v3_small"')
    expect(page.locator("#job-facts")).to_contain_text("synthetic")

    job = service.job(job_id)
    expect(page.locator("#mlflow-run")).to_have_text(job["mlflow_run_id"])
    expect(page.locator("#mlflow-run")).to_have_attribute("href", job["mlflow_run_url"])
    expect(page.locator("#job-model")).to_have_text(f"{job['model_name']} v{job['model_version']}")
    expect(page.locator("#cancel-job")).to_be_hidden()
    expect(page.locator("#retry-job")).to_be_hidden()  # only FAILED or CANCELLED jobs
    screenshot(page, "job-page")


#: Many short epochs, each evaluated (the label-free signals, without labels), the model before
#: training too: a point per epoch while it runs, for as long as the test watches.
UNLABELLED_JOB = {
    **TINY_JOB_CONFIG,
    "schedule.epochs": 150,
    "schedule.max_steps_per_epoch": 2,
    "eval.every_n_epochs": 1,
    "eval.at_start": True,
}
LABEL_FREE = ("mutual_nn_rate", "similarity_margin", "neighbour_stability")


def test_a_running_job_on_unlabelled_data_charts_its_label_free_signals_beside_the_losses(
    open_page: OpenPage, service: Service
) -> None:
    with service.client() as api:  # the synthetic training images alone: no labels, no split
        folder = service.data_root / "synthetic" / "bounding_box_train"
        response = api.post("/v1/datasets", json={"name": "unlabelled", "path": str(folder)})
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert (dataset["format"], dataset["identity_count"]) == ("image_folder", 0)
    job = service.submit(UNLABELLED_JOB, dataset_id=dataset["id"])
    try:
        page = open_page()
        page.goto(f"/#/jobs/{job['id']}")
        expect(page.locator("#job-state")).to_have_text("RUNNING", timeout=TRAINING_TIMEOUT_MS)
        # the model before training and two trained epochs, drawn while the job runs
        page.wait_for_function(
            """id => (window.Chart.getChart(document.getElementById(id))
                ?.data.datasets.find(d => d.label === "neighbour_stability")?.data.length ?? 0) >= 2""",
            arg="label-free-chart",
            timeout=TRAINING_TIMEOUT_MS,
        )
        drawn = chart_points(page, "label-free-chart")
        expect(page.locator("#job-state")).to_have_text("RUNNING")
        with service.client() as api:
            history = api.get(f"/v1/jobs/{job['id']}/metrics").json()

        assert not [k for r in history for k, v in r.items() if k.startswith("eval/") and v]
        assert set(drawn) == set(LABEL_FREE)
        for name in LABEL_FREE:
            key = f"label_free/{name}"
            measured = [[r["epoch"], r[key]] for r in history if r.get(key) is not None]
            assert drawn[name] == measured[: len(drawn[name])], name  # the history grew since
        assert drawn["mutual_nn_rate"][0][0] == 0  # before training, so the change shows
        assert drawn["neighbour_stability"][0][0] == 1  # nothing to compare with before
        assert chart_x_labels(page, "label-free-chart")[0] == "before training"
        # no evaluation chart waiting for labels: the signals stand beside the losses
        expect(page.locator("#eval-card")).to_be_hidden()
        expect(page.locator("#label-free-card")).to_be_visible()
        expect(page.locator("#label-free-chart")).to_be_visible()
        loss = page.locator("section.card", has=page.locator("#loss-chart")).bounding_box()
        signals = page.locator("#label-free-card").bounding_box()
        assert loss is not None and signals is not None
        assert signals["y"] == loss["y"] and signals["x"] > loss["x"] + loss["width"]
        screenshot(page, "job-page-unlabelled")
    finally:
        service.cancel(job["id"])


def test_a_running_job_is_cancelled_and_retried_from_its_page(
    open_page: OpenPage, service: Service
) -> None:
    job = service.submit(LONG_JOB)
    try:
        page = open_page()
        page.goto(f"/#/jobs/{job['id']}")
        expect(page.locator("#job-state")).to_have_text("RUNNING", timeout=TRAINING_TIMEOUT_MS)
        expect(page.locator("#job-reason")).to_contain_text("trainer started")
        # While it runs, the log follows the server's event stream.
        expect(page.locator("#log-mode")).to_have_text("(live)")
        expect(page.locator("#job-log")).to_contain_text("epoch 1 step", timeout=60_000)

        page.once("dialog", lambda dialog: dialog.accept())
        page.locator("#cancel-job").click()
        expect(page.locator("#job-state")).to_have_text("CANCELLED", timeout=60_000)
        states = page.locator("#job-timeline li").evaluate_all(
            "lis => lis.map(l => l.dataset.state)"
        )
        assert states[-2:] == ["CANCELLING", "CANCELLED"]
        expect(page.locator("#job-timeline")).to_contain_text("cancel requested by alice")
        expect(page.locator("#cancel-job")).to_be_hidden()

        page.locator("#retry-job").click()
        expect(page.locator("#job-state")).not_to_have_text("CANCELLED")
        expect(page.locator("#retry-job")).to_be_hidden()
        expect(page.locator("#cancel-job")).to_be_visible()
        assert service.job(job["id"])["state"] not in ("CANCELLED", "FAILED", "SUCCEEDED")
    finally:
        service.cancel(job["id"])


def test_an_unchanged_job_costs_a_304_and_a_change_shows_without_reload(
    open_page: OpenPage, service: Service
) -> None:
    job = service.submit(SHORT_JOB, queue=PARKED_QUEUE)  # no worker: it stays QUEUED
    try:
        page = open_page()
        page.goto("/")
        row = page.locator(f'#jobs-table tr[data-job-id="{job["id"]}"]')
        expect(row.locator(".cell-state")).to_have_text("QUEUED")
        expect(row.locator(".cell-time")).to_have_text("waiting")
        page.evaluate("window.sameDocument = true")
        with page.expect_response(
            lambda r: r.url.endswith(f"/v1/jobs/{job['id']}") and r.status == 304
        ):
            pass
        service.cancel(job["id"])
        expect(row.locator(".cell-state")).to_have_text("CANCELLED")
        assert page.evaluate("window.sameDocument") is True
    finally:
        service.cancel(job["id"])


def test_a_key_sees_only_its_owners_jobs(open_page: OpenPage, service: Service) -> None:
    job = service.submit(SHORT_JOB, queue=PARKED_QUEUE)
    try:
        page = open_page(owner="bob")
        page.goto("/")
        expect(page.locator("#jobs-count")).to_have_text("0 of 0")
        expect(page.get_by_text("No jobs yet")).to_be_visible()
        page.goto(f"/#/jobs/{job['id']}")
        expect(page.locator(".error-box")).to_have_text(f"job {job['id']} not found")
    finally:
        service.cancel(job["id"])


def test_the_new_job_form_and_the_table_explain_what_went_wrong(
    open_page: OpenPage, service: Service
) -> None:
    page = open_page()
    page.goto("/")
    page.locator("#new-job > summary").click()
    form = page.locator("#new-job-form")
    form.get_by_label("Dataset").select_option(service.dataset["id"])  # others may exist
    expect(form.get_by_label("Dataset")).to_have_value(service.dataset["id"])
    overrides = form.get_by_label("Overrides")
    message = form.locator(".form-message")
    submit = form.get_by_role("button", name="Submit job")

    overrides.fill('{"schedule.epochs": 3,}')
    submit.click()
    expect(message).to_contain_text("Overrides are not valid JSON")
    overrides.fill('["schedule.epochs", 3]')
    submit.click()
    expect(message).to_have_text('Overrides must be a JSON object, e.g. {"schedule.epochs": 30}')
    overrides.fill('{"schedule.epochs": 100000}')
    submit.click()
    expect(message).to_have_text(
        "config.schedule.epochs: Input should be less than or equal to 1000 (got 100000)"
    )
    overrides.fill('{"optim.nonsense": 1}')
    submit.click()
    expect(message).to_contain_text("unknown key 'nonsense'")

    # The API out of reach: the table says so and keeps its rows.
    page.route("**/v1/jobs?limit=*", lambda route: route.abort())
    page.locator("#jobs-table").wait_for()
    page.evaluate("window.dispatchEvent(new HashChangeEvent('hashchange'))")
    expect(page.locator("#jobs-status")).to_contain_text(
        "Could not refresh the jobs: cannot reach the API"
    )


def test_a_job_starts_from_a_preset_after_a_preview(open_page: OpenPage, service: Service) -> None:
    page = open_page()
    page.goto("/")
    page.locator("#new-job > summary").click()
    form = page.locator("#new-job-form")
    form.get_by_label("Dataset").select_option(service.dataset["id"])  # others may exist
    expect(form.get_by_label("Dataset")).to_have_value(service.dataset["id"])
    with service.client() as api:
        smoke = api.get("/v1/presets/smoke").json()
        jobs_before = api.get("/v1/jobs").json()["total"]
    preset = form.locator("select[name=preset]")
    expect(preset.locator("option", has_text="smoke")).to_have_count(1)
    preset.select_option("smoke")
    expect(page.locator("#preset-about")).to_contain_text(smoke["purpose"])
    expect(page.locator("#preset-about")).to_contain_text(smoke["measured"])
    overrides = {"schedule.epochs": 1, "schedule.max_steps_per_epoch": 1}
    form.get_by_label("Overrides").fill(json.dumps(overrides))
    form.get_by_label("GPUs").fill("0")
    form.get_by_role("button", name="Preview configuration").click()

    shown = page.locator("#job-preview-config")
    expect(shown).to_be_visible()
    expect(page.locator("#job-preview")).to_contain_text("gpus: 0, queue: default")
    preview = json.loads(shown.inner_text())
    assert preview["name"] == "smoke"  # the preset's
    assert (preview["model"]["patch_dim"], preview["model"]["pgm_channels"]) == (64, 64)
    assert preview["schedule"]["epochs"] == 1  # the overrides' over the preset's 2
    # the preset's data.dataset and data.root gave way to the dataset's
    assert preview["data"]["root"] == service.dataset["path"]
    assert preview["data"]["dataset"] != "synthetic"
    with service.client() as api:
        assert api.get("/v1/jobs").json()["total"] == jobs_before  # a preview creates nothing
    screenshot(page, "new-job-preset-preview")

    form.get_by_label("Max retries").fill("1")
    expect(page.locator("#job-preview")).to_be_hidden()  # no longer what would be submitted
    form.get_by_role("button", name="Submit job").click()
    expect(form.locator(".form-message")).to_contain_text("Submitted job")
    job_id = page.locator("#jobs-table tbody tr").first.get_attribute("data-job-id")
    assert job_id is not None
    job = service.job(job_id)
    service.cancel(job_id)
    assert job["config_overrides"] == overrides
    resolved = job["resolved_config"]
    resolved["runtime"].pop("output_dir")
    preview["runtime"].pop("output_dir")
    assert resolved == preview


def test_ticked_jobs_are_compared_side_by_side(
    open_page: OpenPage, service: Service, trained_job: dict[str, Any]
) -> None:
    other = service.submit({**SHORT_JOB, "loss.gsl.threshold": 0.61}, queue=PARKED_QUEUE)
    try:
        page = open_page()
        page.goto("/")
        compare = page.locator("#compare-link")
        page.get_by_label(f"compare job {trained_job['id'][:8]}").check()
        expect(compare).to_be_hidden()  # one job is not a comparison
        page.get_by_label(f"compare job {other['id'][:8]}").check()
        expect(compare).to_have_text("Compare 2 jobs")
        compare.click()
        expect(page).to_have_url(re.compile(f"#/compare/{trained_job['id']},{other['id']}$"))

        with service.client() as api:
            history = api.get(f"/v1/jobs/{trained_job['id']}/metrics").json()
        best_map = max(r["eval/mAP"] for r in history if r["epoch"] >= 1)  # a trained model
        trained_row = page.locator(f'#compare-table tr[data-job-id="{trained_job["id"]}"]')
        expect(trained_row.locator(".cell-best-map")).to_have_text(f"{best_map:.1f}")
        expect(page.locator("#compare-table tbody tr")).to_have_count(2)
        assert history[0]["epoch"] == 0  # before training: on the chart, not the best
        assert chart_points(page, "compare-map-chart") == {
            trained_job["id"][:8]: [[r["epoch"], r["eval/mAP"]] for r in history],
            other["id"][:8]: [],  # still QUEUED: no epoch yet
        }

        threshold = trained_job["resolved_config"]["loss"]["gsl"]["threshold"]
        diff = page.locator("#config-diff tbody tr")
        assert diff.evaluate_all("rows => rows.map(r => r.dataset.key)") == ["loss.gsl.threshold"]
        key, trained_value, other_value = diff.locator("td").all_inner_texts()
        assert (key, float(trained_value), float(other_value)) == (
            "loss.gsl.threshold",
            threshold,
            0.61,
        )
        screenshot(page, "compare")
    finally:
        service.cancel(other["id"])


def test_the_log_is_polled_when_the_server_does_not_stream_it(
    open_page: OpenPage, service: Service
) -> None:
    job = service.submit(SHORT_JOB, queue=PARKED_QUEUE)  # stays QUEUED: its log is followed
    try:
        page = open_page()
        asked: list[str] = []

        def plain_text_log(route: Route) -> None:
            asked.append(route.request.url)
            body = "the tail\n" if "follow=true" in route.request.url else "polled again\n"
            route.fulfill(status=200, content_type="text/plain; charset=utf-8", body=body)

        # An API whose logs route ignores follow=true and answers the tail as plain text.
        page.route(re.compile(r"/v1/jobs/[0-9a-f-]+/logs\?"), plain_text_log)
        page.goto(f"/#/jobs/{job['id']}")
        expect(page.locator("#log-mode")).to_have_text("(refreshed every few seconds)")
        expect(page.locator("#job-log")).to_have_text("polled again\n", timeout=10_000)
        assert "follow=true" in asked[0]
        assert all("follow" not in url for url in asked[1:])
    finally:
        service.cancel(job["id"])
