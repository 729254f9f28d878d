"""The galleries pages, in Chromium, against the real service and its worker: a gallery built from
the page (alice's synthetic dataset with ``reid-alice@best``) is followed to READY, searched with
one of the dataset's query images (hits with their thumbnails, scores and a camera summary), and
a gallery is deleted from the list; the same pages in a phone-sized window. A gallery the worker
failed (its dataset's folder was away while it built) is retried from its page and built to READY,
and from the list, where the list follows it again; what the API refuses reads as its message."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import (
    BUILD_TIMEOUT_MS,
    PARKED_QUEUE,
    OpenPage,
    Service,
    build,
    screenshot,
    wait_for_gallery,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

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

#: Records, from a gallery's page, every state, progress and reason it drew.
_WATCH_GALLERY = """() => {
    window.seenGallery = [];
    const record = () => {
        const state = document.getElementById("gallery-state");
        if (state === null) return;
        window.seenGallery.push({
            state: state.textContent,
            progress: document.querySelector("#gallery-progress progress")?.value ?? null,
            count: document.querySelector("#gallery-progress > .muted")?.textContent ?? null,
            reason: document.getElementById("gallery-reason").textContent,
        });
    };
    new MutationObserver(record).observe(
        document.getElementById("view"), { childList: true, subtree: true });
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


def api_search(
    service: Service, gallery_id: str, image: Path, k: int, camera: int | None = None
) -> dict[str, Any]:
    params = {"k": k} if camera is None else {"k": k, "camera": camera}
    with service.client() as api, image.open("rb") as f:
        response = api.post(
            f"/v1/galleries/{gallery_id}/search",
            params=params,
            files={"image": (image.name, f, "image/jpeg")},
        )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def search_from_the_page(page: Page, image: Path, k: int, camera: str = "") -> str:
    """Searches from the page's form (``camera`` as typed in its field); the request's URL."""
    form = page.locator("#search-form")
    form.get_by_label("Query image").set_input_files(image)
    form.get_by_label("Hits (k)").fill(str(k))
    form.get_by_label("Query camera").fill(camera)
    # the answer, not only the request: until it arrives the page still shows the last hits,
    # whose thumbnails are loaded already
    with page.expect_response(re.compile(r"/search\?"), timeout=60_000) as response:
        form.get_by_role("button", name="Search").click()
    page.wait_for_function(_THUMBNAILS_LOADED, timeout=30_000)
    return response.value.url


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


RegisterCopy = Callable[[str], tuple[dict[str, Any], Path]]


@pytest.fixture
def register_copy(service: Service) -> Iterator[RegisterCopy]:
    """``register_copy(name)``: a dataset of alice's in a copy of the synthetic dataset's
    folder, and that folder; both are removed after the test, so that later tests (the new job
    form's default dataset) see the session's datasets only."""
    made: list[tuple[str, Path]] = []

    def register(name: str) -> tuple[dict[str, Any], Path]:
        folder = service.data_root / name
        shutil.copytree(service.data_root / "synthetic", folder)
        with service.client() as api:
            response = api.post("/v1/datasets", json={"name": name, "path": str(folder)})
        assert response.status_code == 201, response.text
        dataset: dict[str, Any] = response.json()
        made.append((dataset["id"], folder))
        return dataset, folder

    yield register
    with service.client() as api:
        for dataset_id, folder in made:
            # 404 when the test deleted it itself
            assert api.delete(f"/v1/datasets/{dataset_id}").status_code in (204, 404)
            shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def folder_away(folder: Path) -> Iterator[None]:
    """The folder moved away meanwhile: a build of its dataset fails for real (the builder
    cannot read it and records FAILED with its error)."""
    away = folder.with_name(f"{folder.name}.away")
    folder.rename(away)
    try:
        yield
    finally:
        away.rename(folder)


def failed_build(
    service: Service, dataset: dict[str, Any], model: str, name: str
) -> dict[str, Any]:
    """A gallery the worker failed: its build read the dataset's folder while it was away."""
    gallery = wait_for_gallery(service, build(service, dataset, model, name)["id"], "FAILED")
    assert gallery["reason"].startswith("the build failed: "), gallery
    assert gallery["error"] == gallery["reason"], gallery
    return gallery


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
    # the timeline: every state change, as GET /v1/galleries/{id}/events has them
    timeline = page.locator("#gallery-timeline li")
    expect(timeline).to_have_count(3)  # requested, building, READY
    expect(timeline.last).to_contain_text(gallery["reason"])
    image = query_image(service)
    k = min(10, gallery["images_done"])
    search_from_the_page(page, image, k)
    plain = api_search(service, gallery_id, image, k)
    check_results(page, plain)
    expect(page.locator("#query-figure")).to_contain_text(image.name)
    expect(page.locator("#query-camera")).to_have_count(0)

    # the query's camera (its file name says c1), typed as the hits name cameras (c1 is camera
    # id 0): the camera-normalised model embeds the query with that camera's statistics, so the
    # scores change
    assert "_c1s" in image.name, image.name
    url = search_from_the_page(page, image, k, camera="1")
    assert "camera=0" in url, url
    with_camera = api_search(service, gallery_id, image, k, camera=0)
    assert [h["score"] for h in with_camera["hits"]] != [h["score"] for h in plain["hits"]]
    check_results(page, with_camera)
    expect(page.locator("#query-camera")).to_have_text("c1")
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    screenshot(page, "gallery-search")
    form = page.locator("#search-form")
    form.get_by_label("Query camera").fill("0")
    form.get_by_role("button", name="Search").click()
    expect(form.locator(".form-message")).to_have_text(
        "Query camera: the number after c (1 for c1), or empty."
    )
    form.get_by_label("Query camera").fill("")

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


def test_a_failed_gallery_is_retried_from_its_page_and_built(
    open_page: OpenPage,
    service: Service,
    trained_job: dict[str, Any],
    register_copy: RegisterCopy,
) -> None:
    dataset, folder = register_copy("retry-page")
    with folder_away(folder):
        failed = failed_build(service, dataset, trained_job["model_name"], "retry-page")
    gallery_id = failed["id"]

    page = open_page()
    page.goto("/#/galleries")
    row = page.locator(f'#galleries-table tr[data-gallery-id="{gallery_id}"]')
    expect(row.locator(".cell-state")).to_have_text("FAILED")
    expect(row.locator(".cell-reason")).to_have_text(failed["error"])
    expect(row.get_by_role("button", name="retry", exact=True)).to_be_visible()
    expect(row.get_by_role("button", name="delete", exact=True)).to_be_visible()

    # its page: the error, and Retry next to Delete
    row.get_by_role("link", name="retry-page").click()
    expect(page).to_have_url(re.compile(f"#/galleries/{gallery_id}$"))
    expect(page.locator("#gallery-state")).to_have_text("FAILED")
    expect(page.locator("#gallery-reason")).to_have_text(failed["error"])
    expect(page.locator("#gallery-search")).to_be_hidden()
    retry = page.locator("#retry-gallery")
    expect(retry).to_be_visible()
    expect(retry).to_have_text("Retry")
    screenshot(page, "gallery-failed")

    # Retry: QUEUED again from scratch, followed by the page (its poll resumes) until READY
    page.evaluate(_WATCH_GALLERY)
    retry.click()
    expect(page.locator("#gallery-state")).to_have_text("READY", timeout=BUILD_TIMEOUT_MS)
    expect(retry).to_be_hidden()
    expect(page.locator("#gallery-status")).to_be_hidden()
    expect(page.locator("#gallery-search")).to_be_visible()
    seen = page.evaluate("window.seenGallery")
    queued = [r for r in seen if r["state"] == "QUEUED"]
    assert queued, seen
    assert queued[0]["progress"] == 0, queued
    assert queued[0]["count"] == f"0 / {failed['image_count']} images", queued
    assert queued[0]["reason"].startswith("retried by alice"), queued
    with service.client() as api:
        gallery = api.get(f"/v1/galleries/{gallery_id}").json()
    assert (gallery["state"], gallery["progress"], gallery["gpus"]) == ("READY", 1.0, 0)
    assert gallery["images_done"] == gallery["image_count"] > 0
    assert gallery["error"] is None and gallery["queue"] == "default"
    expect(page.locator("#gallery-reason")).to_have_text(gallery["reason"])
    facts = page.locator("#gallery-facts")
    expect(facts).to_contain_text(f"{gallery['images_done']} of {gallery['image_count']}")
    screenshot(page, "gallery-retried")

    # a READY gallery offers no Retry, in the list either
    page.get_by_role("link", name="← Galleries").click()
    expect(row.locator(".cell-state")).to_have_text("READY")
    expect(row.get_by_role("button", name="delete", exact=True)).to_be_visible()
    expect(row.get_by_role("button", name="retry", exact=True)).to_have_count(0)


def test_a_failed_gallery_is_retried_from_the_list_and_refusals_read_as_messages(
    open_page: OpenPage,
    service: Service,
    trained_job: dict[str, Any],
    register_copy: RegisterCopy,
) -> None:
    dataset, folder = register_copy("retry-list")
    page = open_page()
    with folder_away(folder):
        failed = failed_build(service, dataset, trained_job["model_name"], "retry-list")
        gallery_id = failed["id"]
        page.goto("/#/galleries")
        row = page.locator(f'#galleries-table tr[data-gallery-id="{gallery_id}"]')
        expect(row.locator(".cell-state")).to_have_text("FAILED")
        assert page.evaluate("document.documentElement.scrollWidth") <= 1280

        # retried with the folder still away: the list follows it again (its poll resumes)
        # through a second build, which fails as the first did
        page.evaluate(_WATCH_ROWS)
        row.get_by_role("button", name="retry", exact=True).click()
        page.wait_for_function(
            "(id) => window.seenRows.some((r) => r.id === id && r.state !== 'FAILED')",
            arg=gallery_id,
        )
        expect(row.locator(".cell-state")).to_have_text("FAILED", timeout=BUILD_TIMEOUT_MS)
        again = wait_for_gallery(service, gallery_id, "FAILED")
    assert again["reason"].startswith("the build failed: "), again
    assert again["finished_at"] > failed["finished_at"], (failed, again)
    expect(row.locator(".cell-reason")).to_have_text(again["error"])
    seen = [r for r in page.evaluate("window.seenRows") if r["id"] == gallery_id]
    queued = [r for r in seen if r["state"] == "QUEUED"]
    assert queued, seen
    assert all(r["bar"] for r in queued), queued
    assert queued[0]["count"] == f"0 / {failed['image_count']} images", queued
    expect(page.locator("#galleries-status")).to_be_hidden()

    # its dataset deleted: the API's refusal reads as its message, in the list and on its page
    with service.client() as api:
        assert api.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
        refused = api.post(f"/v1/galleries/{gallery_id}/retry")
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "dataset_gone", refused.text
    expected = f"Could not retry retry-list: {refused.json()['error']['message']}"
    retry = row.get_by_role("button", name="retry", exact=True)
    retry.click()
    expect(page.locator("#galleries-status")).to_have_text(expected)
    expect(retry).to_be_enabled()
    expect(row.locator(".cell-state")).to_have_text("FAILED")
    screenshot(page, "galleries-retry-refused")

    page.goto(f"/#/galleries/{gallery_id}")
    expect(page.locator("#gallery-state")).to_have_text("FAILED")
    page.locator("#retry-gallery").click()
    expect(page.locator("#gallery-status")).to_have_text(expected)
    expect(page.locator("#retry-gallery")).to_be_enabled()
    expect(page.locator("#gallery-state")).to_have_text("FAILED")
    with service.client() as api:
        assert api.get(f"/v1/galleries/{gallery_id}").json()["state"] == "FAILED"


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
