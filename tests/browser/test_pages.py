"""The datasets and models pages, a phone-sized window, and the page's event-stream reader, in
Chromium against the real service."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
from playwright.sync_api import expect

from tests.browser.conftest import OpenPage, Service, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def crops_archive(path: Path, count: int = 4) -> Path:
    """A .zip of ``count`` plain crops in one folder (an unlabeled image folder)."""
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(count):
            image = path.parent / f"crop_{i}.jpg"
            Image.new("RGB", (32, 64), (40 * i, 80, 160)).save(image, format="JPEG")
            archive.write(image, f"crops/cam{i % 2 + 1}_{i}.jpg")
    return path


def test_datasets_are_registered_by_path_and_by_upload(
    open_page: OpenPage, service: Service, tmp_path: Path
) -> None:
    page = open_page()
    page.goto("/#/datasets")
    expect(
        page.locator('#datasets-table tr[data-dataset-id="' + service.dataset["id"] + '"]')
    ).to_contain_text("synthetic")

    by_path = page.locator("#dataset-path-form")
    by_path.get_by_label("Name").fill("outside")
    by_path.get_by_label("Path on the server").fill("/etc")
    by_path.get_by_role("button", name="Register folder").click()
    expect(by_path.locator(".form-message")).to_have_text(
        f"dataset path '/etc' is not under an allowed dataset root; allowed: {service.data_root}"
    )

    by_path.get_by_label("Name").fill("by-path")
    by_path.get_by_label("Path on the server").fill(str(service.data_root / "synthetic"))
    by_path.get_by_role("button", name="Register folder").click()
    scan = page.locator("#dataset-scan")
    expect(scan.locator("h2")).to_have_text("Scan of by-path")
    expect(scan.locator("dl")).to_contain_text("market_folder")
    with service.client() as api:
        registered = next(
            d for d in api.get("/v1/datasets").json()["items"] if d["name"] == "by-path"
        )
    expect(scan.locator("tbody tr")).to_have_count(3)
    for row in scan.locator("tbody tr").all():
        split, *counts = row.locator("td").all_inner_texts()
        numbers = registered["splits"][split]
        assert counts == [str(numbers[k]) for k in ("images", "identities", "cameras")]
    expect(page.locator("#datasets-table")).to_contain_text("by-path")

    upload = page.locator("#dataset-upload-form")
    upload.get_by_label("Name").fill("uploaded")
    upload.get_by_label("Archive").set_input_files(crops_archive(tmp_path / "crops.zip"))
    upload.get_by_role("button", name="Upload").click()
    expect(scan.locator("h2")).to_have_text("Scan of uploaded")
    expect(scan.locator("dl")).to_contain_text("image_folder")
    expect(scan.locator("dl")).to_contain_text("extracted")
    with service.client() as api:
        uploaded = next(
            d for d in api.get("/v1/datasets").json()["items"] if d["name"] == "uploaded"
        )
    assert (uploaded["format"], uploaded["image_count"]) == ("image_folder", 4)
    screenshot(page, "datasets")


def test_models_page_lists_versions_moves_an_alias_and_downloads_weights(
    open_page: OpenPage, service: Service, trained_job: dict[str, Any], tmp_path: Path
) -> None:
    name, version = trained_job["model_name"], trained_job["model_version"]
    assert name and version, trained_job
    with service.client() as api:  # other tests' jobs may have registered newer versions
        listed = api.get(f"/v1/models/{name}/versions").json()["items"]
    latest = max(int(v["version"]) for v in listed)
    assert int(version) <= latest
    page = open_page()
    page.goto("/#/models")
    model = page.locator(f'#models-table tr[data-model="{name}"]')
    expect(model).to_contain_text(f"v{latest}")
    model.get_by_role("link", name=name).click()
    expect(page).to_have_url(f"{service.base_url}/#/models/{name}")

    # which version holds best and by which rule: alice's jobs all evaluate on labels, so mAP
    with service.client() as api:
        versions = api.get(f"/v1/models/{name}/versions").json()["items"]
    holder = next(v for v in versions if "best" in v["aliases"])
    assert holder["best_rule"] == "mAP"
    assert holder["best_value"] == max(v["metrics"]["mAP"] for v in versions)
    expect(page.locator("#best-choice")).to_have_text(
        f"best → v{holder['version']}, by mAP: {holder['best_value']:.1f} %."
    )
    rule = page.locator("#best-rule details")
    rule.locator("summary").click()
    expect(rule.locator("li")).to_have_count(4)
    expect(rule.locator("li").nth(0)).to_contain_text("mAP")
    expect(rule.locator("li").nth(1)).to_contain_text("human check's precision@1")
    expect(rule.locator("li").nth(2)).to_contain_text("label-free signal")

    row = page.locator(f'#versions-table tr[data-version="{version}"]')
    expect(row).to_contain_text(trained_job["id"][:8])
    expect(row).to_contain_text(f"{trained_job['metrics']['eval']['mAP']:.1f}")
    row.get_by_role("link", name=trained_job["id"][:8]).click()
    expect(page.locator("#job-state")).to_have_text("SUCCEEDED")
    page.go_back()

    alias_form = page.locator("#alias-form")
    alias_form.get_by_label("Alias").fill("champion")
    alias_form.get_by_label("Version").select_option(version)
    alias_form.get_by_role("button", name="Set alias").click()
    expect(row.locator(".chip", has_text="champion")).to_be_visible()
    expect(model.locator(".chip", has_text=f"champion → v{version}")).to_be_visible()
    with service.client() as api:
        versions = api.get(f"/v1/models/{name}/versions").json()["items"]
    assert "champion" in next(v for v in versions if v["version"] == version)["aliases"]

    alias_form.get_by_label("Alias").fill("9lives")
    alias_form.get_by_role("button", name="Set alias").click()
    expect(alias_form.locator(".form-message")).to_contain_text("alias: a letter, then")
    screenshot(page, "models")

    try:
        with page.expect_download() as download:
            row.get_by_role("button", name="download").click()
    except PlaywrightTimeoutError:
        pytest.fail(f"no download; the page says {row.locator('[role=alert]').inner_text()!r}")
    assert download.value.suggested_filename == f"{name}-v{version}.pt"
    saved = tmp_path / "weights.pt"
    download.value.save_as(saved)
    with service.client() as api:
        expected = api.get(f"/v1/models/{name}/versions/{version}/weights")
    assert expected.status_code == 200
    assert saved.read_bytes() == expected.content


def test_models_page_without_a_registry_says_so(open_page: OpenPage) -> None:
    page = open_page()
    # What an API without the /v1/models routes answers.
    page.route(
        "**/v1/models",
        lambda route: route.fulfill(
            status=404,
            content_type="application/json",
            body=json.dumps(
                {"error": {"code": "not_found", "message": "no route: GET /v1/models"}}
            ),
        ),
    )
    page.goto("/#/models")
    expect(page.locator("#registry-unavailable")).to_contain_text("Model registry not available")


def test_a_phone_sized_window_shows_the_jobs_and_a_job(
    open_page: OpenPage, service: Service, trained_job: dict[str, Any]
) -> None:
    page = open_page(width=390, height=844)
    page.goto("/")
    row = page.locator(f'#jobs-table tr[data-job-id="{trained_job["id"]}"]')
    expect(row.locator(".cell-state")).to_be_visible()
    expect(row.locator(".cell-map")).to_be_visible()
    expect(row.locator(".cell-dataset")).to_be_hidden()  # optional columns give way
    for cell in (".cell-state", ".cell-map", ".cell-time"):  # on screen, no sideways scrolling
        box = row.locator(cell).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, (cell, box)
    for section in ("Jobs", "Datasets", "Models"):
        expect(page.get_by_role("link", name=section, exact=True)).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    screenshot(page, "narrow-jobs")

    page.goto(f"/#/jobs/{trained_job['id']}")
    page.wait_for_function(
        "() => window.Chart.getChart(document.getElementById('eval-chart'))?.data.datasets.length"
    )
    box = page.locator("#loss-chart").bounding_box()
    assert box is not None and 0 < box["width"] <= 390
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    screenshot(page, "narrow-job")


def test_the_event_stream_reader_takes_the_stream_in_any_chunks(open_page: OpenPage) -> None:
    page = open_page()
    page.goto("/")
    stream = (
        "id: 10\ndata: first line\n\n: keep-alive\n\n"
        "data: a\r\ndata: b\r\n\r\nevent: end\ndata: SUCCEEDED\n\ndata: no blank line"
    )
    expected = [
        {"type": "message", "data": "first line", "id": "10"},
        {"type": "message", "data": "a\nb", "id": "10"},
        {"type": "end", "data": "SUCCEEDED", "id": "10"},
    ]
    splits = [[stream], list(stream), *([stream[:i], stream[i:]] for i in range(len(stream)))]
    results = page.evaluate(
        """async (splits) => {
            const { EventStreamParser } = await import("./static/js/api.js");
            return splits.map((chunks) => {
                const events = [];
                const parser = new EventStreamParser((event) => events.push(event));
                chunks.forEach((chunk) => parser.push(chunk));
                parser.finish();
                return events;
            });
        }""",
        splits,
    )
    for chunks, events in zip(splits, results, strict=True):
        assert events == expected, chunks
