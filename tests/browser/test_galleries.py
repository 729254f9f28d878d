"""The galleries pages, in Chromium, against the real service and its worker: a gallery built from
the page (alice's synthetic dataset with ``reid-alice@best``) is followed to READY, searched with
one of the dataset's query images (hits with their thumbnails, scores and a camera summary), and
a gallery is deleted from the list; the same pages in a phone-sized window."""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import PARKED_QUEUE, OpenPage, Service, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.slow]

#: A gallery build on this CPU: the builder starts (torch), loads the model, embeds the images.
BUILD_TIMEOUT_MS = 180_000

#: Records, from the page, every state (and the progress it showed) the galleries table drew.
_WATCH_ROWS = """() => {
    window.seenRows = [];
    const record = () => {
        for (const row of document.querySelectorAll("#galleries-table tbody tr")) {
            window.seenRows.push({
                id: row.dataset.galleryId,
                state: row.dataset.state,
                bar: row.querySelector(".cell-progress progress") !== null,
                count: row.querySelector(".progress-count")?.textContent ?? null,
            });
        }
    };
    new MutationObserver(record).observe(
        document.getElementById("galleries-list"), { childList: true, subtree: true });
    record();
}"""

_THUMBNAILS_LOADED = """() => {
    const images = [...document.querySelectorAll("#hits img.thumb")];
    return images.length > 0 && images.every((i) => i.complete && i.naturalWidth > 0);
}"""


#: Whether each object URL still loads as an image (a revoked one does not; the page's CSP lets
#: images load from blob: URLs, not fetch()).
_LOAD_URLS = """(urls) => Promise.all(urls.map((url) => new Promise((resolve) => {
    const image = new Image();
    image.onload = () => resolve("alive");
    image.onerror = () => resolve("revoked");
    image.src = url;
})))"""


def camera_label(camera_id: int | None) -> str:
    return "unknown" if camera_id is None else f"c{camera_id + 1}"


def query_image(service: Service) -> Path:
    return sorted((service.data_root / "synthetic" / "query").glob("*.jpg"))[0]


def api_search(service: Service, gallery_id: str, image: Path, k: int) -> dict[str, Any]:
    with service.client() as api, image.open("rb") as f:
        response = api.post(
            f"/v1/galleries/{gallery_id}/search",
            params={"k": k},
            files={"image": (image.name, f, "image/jpeg")},
        )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def search_from_the_page(page: Page, image: Path, k: int) -> None:
    form = page.locator("#search-form")
    form.get_by_label("Query image").set_input_files(image)
    form.get_by_label("Hits (k)").fill(str(k))
    form.get_by_role("button", name="Search").click()
    page.wait_for_function(_THUMBNAILS_LOADED, timeout=30_000)


def check_results(page: Page, expected: dict[str, Any]) -> None:
    """The page shows the hits the API answers: ranks, scores, cameras, people, paths, thumbnails
    of the gallery's images (their real size), and the hits per camera."""
    hits = expected["hits"]
    cards = page.locator("#hits figure.hit")
    expect(cards).to_have_count(len(hits))
    for card, hit in zip(cards.all(), hits, strict=True):
        expect(card.locator(".hit-rank")).to_have_text(f"#{hit['rank']}")
        expect(card.locator(".hit-score")).to_have_text(f"{hit['score']:.3f}")
        expect(card.locator(".hit-camera")).to_have_text(camera_label(hit["camera_id"]))
        expect(card.locator(".hit-person")).to_have_text(f"person {hit['person_id']}")
        expect(card.locator(".hit-path")).to_have_text(hit["path"])
        assert card.get_attribute("data-position") == str(hit["position"])
    sizes = page.locator("#hits img.thumb").evaluate_all(
        "images => images.map((i) => [i.naturalWidth, i.naturalHeight])"
    )
    assert sizes == [[48, 96]] * len(hits)  # the synthetic dataset's crops
    assert page.locator("#query-image").evaluate("i => i.complete && i.naturalWidth") == 48

    per_camera = Counter(camera_label(h["camera_id"]) for h in hits)
    summary = page.locator("#camera-summary")
    expect(summary.locator("tbody tr")).to_have_count(len(per_camera))
    shown = {
        row.get_attribute("data-camera"): int(row.locator("td").nth(1).inner_text())
        for row in summary.locator("tbody tr").all()
    }
    assert shown == dict(per_camera)
    expect(summary).to_contain_text(f"Best match: {camera_label(hits[0]['camera_id'])} (#1")


def test_a_gallery_is_built_searched_and_deleted_from_the_pages(
    open_page: OpenPage, service: Service, trained_job: dict[str, Any]
) -> None:
    model = trained_job["model_name"]
    assert model == "reid-alice", trained_job
    with service.client() as api:
        parked = api.post(
            "/v1/galleries",
            json={
                "dataset_id": service.dataset["id"],
                "model_name": model,
                "model_version": "best",
                "name": "parked",
                "gpus": 0,
                "queue": PARKED_QUEUE,  # no worker: it stays QUEUED until deleted
            },
        )
    assert parked.status_code == 202, parked.text
    parked_id = parked.json()["id"]

    page = open_page()
    page.goto("/#/galleries")
    expect(page.get_by_role("link", name="Galleries", exact=True)).to_have_class("active")
    parked_row = page.locator(f'#galleries-table tr[data-gallery-id="{parked_id}"]')
    expect(parked_row.locator(".cell-state")).to_have_text("QUEUED")
    expect(parked_row.locator(".cell-progress progress")).to_be_visible()
    expect(parked_row.locator(".progress-count")).to_have_text(
        f"0 / {parked.json()['image_count']} images"
    )

    form = page.locator("#new-gallery-form")
    expect(form.get_by_label("Dataset")).to_contain_text("synthetic (")
    form.get_by_label("Dataset").select_option(service.dataset["id"])
    form.get_by_label("Model").select_option(model)
    expect(form.get_by_label("Version or alias")).to_have_value("best")

    # an unknown version reads as the API's message
    form.get_by_label("Version or alias").fill("99")
    form.get_by_role("button", name="Build gallery").click()
    expect(form.locator(".form-message")).to_have_text(f"model version {model}/99 not found")

    form.get_by_label("Version or alias").fill("best")
    form.get_by_label("Name").fill("cams")
    form.get_by_label("Build on").select_option(label="CPU")  # the service's worker has no GPU
    page.evaluate(_WATCH_ROWS)
    form.get_by_role("button", name="Build gallery").click()
    expect(form.locator(".form-message")).to_contain_text("Building gallery cams with reid-alice")
    row = page.locator("#galleries-table tbody tr", has_text="cams")
    gallery_id = row.get_attribute("data-gallery-id")
    assert gallery_id is not None

    expect(row.locator(".cell-state")).to_have_text("READY", timeout=BUILD_TIMEOUT_MS)
    with service.client() as api:
        gallery = api.get(f"/v1/galleries/{gallery_id}").json()
    assert (gallery["state"], gallery["progress"], gallery["gpus"]) == ("READY", 1.0, 0)
    assert gallery["images_done"] == gallery["image_count"] > 0
    assert gallery["name"] == "cams" and gallery["model_name"] == model
    # the table showed it building, with its progress, before it was READY
    seen = [r for r in page.evaluate("window.seenRows") if r["id"] == gallery_id]
    building = [r for r in seen if r["state"] in ("QUEUED", "BUILDING")]
    assert building, seen
    assert all(r["bar"] and re.fullmatch(r"\d+ / \d+ images", r["count"]) for r in building)
    expect(row.locator(".cell-progress")).to_have_text(f"{gallery['images_done']} images")
    expect(row.locator(".cell-model")).to_have_text(f"{model} v{gallery['model_version']}")
    expect(row.locator(".cell-dataset")).to_have_text("synthetic")
    expect(row.locator(".cell-indexed")).to_have_text(str(gallery["images_done"]))
    expect(row.locator(".cell-skipped")).to_have_text("0")
    expect(row.locator(".cell-reason")).to_have_text(gallery["reason"])
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    screenshot(page, "galleries")

    # its page: the facts, the search form, and hits for a query image of the dataset
    row.get_by_role("link", name="cams").click()
    expect(page).to_have_url(re.compile(f"#/galleries/{gallery_id}$"))
    expect(page.locator("#gallery-state")).to_have_text("READY")
    facts = page.locator("#gallery-facts")
    expect(facts).to_contain_text(f"{model} version {gallery['model_version']}")
    expect(facts).to_contain_text(f"{gallery['images_done']} of {gallery['image_count']}")
    expect(facts).to_contain_text("synthetic")
    image = query_image(service)
    k = min(10, gallery["images_done"])
    search_from_the_page(page, image, k)
    check_results(page, api_search(service, gallery_id, image, k))
    expect(page.locator("#query-figure")).to_contain_text(image.name)
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    screenshot(page, "gallery-search")

    # leaving the page revokes its object URLs (the query image and the thumbnails)
    urls = page.locator("#search-results img").evaluate_all("images => images.map((i) => i.src)")
    assert len(urls) == k + 1 and all(u.startswith("blob:") for u in urls)
    assert page.evaluate(_LOAD_URLS, urls) == ["alive"] * len(urls)
    page.get_by_role("link", name="← Galleries").click()
    expect(parked_row).to_be_visible()
    assert page.evaluate(_LOAD_URLS, urls) == ["revoked"] * len(urls)

    # deleting from the list
    page.once("dialog", lambda dialog: dialog.accept())
    parked_row.get_by_role("button", name="delete").click()
    expect(parked_row).to_have_count(0)
    expect(row).to_be_visible()
    with service.client() as api:
        assert api.get(f"/v1/galleries/{parked_id}").status_code == 404
        assert api.get(f"/v1/galleries/{gallery_id}").status_code == 200


def test_galleries_in_a_phone_sized_window(
    open_page: OpenPage, service: Service, trained_job: dict[str, Any]
) -> None:
    with service.client() as api:
        ready = [g for g in api.get("/v1/galleries").json()["items"] if g["state"] == "READY"]
    if not ready:  # this test alone: build one
        with service.client() as api:
            response = api.post(
                "/v1/galleries",
                json={
                    "dataset_id": service.dataset["id"],
                    "model_name": trained_job["model_name"],
                    "model_version": "best",
                    "gpus": 0,
                },
            )
        assert response.status_code == 202, response.text
        ready = [response.json()]
    gallery_id = ready[0]["id"]

    page = open_page(width=390, height=844)
    page.goto("/#/galleries")
    row = page.locator(f'#galleries-table tr[data-gallery-id="{gallery_id}"]')
    expect(row.locator(".cell-state")).to_have_text("READY", timeout=BUILD_TIMEOUT_MS)
    expect(row.locator(".cell-dataset")).to_be_hidden()  # optional columns give way
    for cell in (".cell-gallery", ".cell-state", ".cell-model", ".cell-actions"):
        box = row.locator(cell).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, (cell, box)
    for section in ("Jobs", "Datasets", "Models", "Galleries"):
        expect(page.get_by_role("link", name=section, exact=True)).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    screenshot(page, "narrow-galleries")

    page.goto(f"/#/galleries/{gallery_id}")
    expect(page.locator("#gallery-state")).to_have_text("READY")
    image = query_image(service)
    search_from_the_page(page, image, 6)
    check_results(page, api_search(service, gallery_id, image, 6))
    columns = page.locator("#hits figure.hit").evaluate_all(
        "cards => new Set(cards.map((c) => c.getBoundingClientRect().left)).size"
    )
    assert columns == 2
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    screenshot(page, "narrow-gallery-search")


def test_errors_read_as_messages(open_page: OpenPage, service: Service) -> None:
    page = open_page()
    # What the API answers while MLflow is down.
    page.route(
        "**/v1/models",
        lambda route: route.fulfill(
            status=503,
            content_type="application/json",
            body=json.dumps(
                {
                    "error": {
                        "code": "model_registry_unavailable",
                        "message": "the model registry (MLflow at http://mlflow:5000) does "
                        "not answer",
                    }
                }
            ),
        ),
    )
    page.goto("/#/galleries")
    form = page.locator("#new-gallery-form")
    expect(form.locator(".form-message")).to_have_text(
        "Could not load the models: The model registry (MLflow) is not answering: the model "
        "registry (MLflow at http://mlflow:5000) does not answer"
    )
    expect(form.get_by_label("Model")).to_contain_text("the models did not load")
    form.get_by_role("button", name="Build gallery").click()
    expect(form.locator(".form-message")).to_have_text(
        "Choose a model (a job that succeeds registers one)."
    )

    unknown = str(uuid.uuid4())
    page.goto(f"/#/galleries/{unknown}")
    expect(page.locator(".error-box")).to_have_text(
        f"Could not load gallery {unknown}: gallery {unknown} not found"
    )
    expect(page.get_by_role("link", name="← Galleries")).to_be_visible()
