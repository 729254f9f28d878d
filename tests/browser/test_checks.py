"""The pair check page, in Chromium, against the real service: opened from a READY gallery's page
(alice's synthetic dataset indexed with the trained ``reid-alice``), it shows a query crop and a
candidate crop side by side; pairs are answered by keyboard (s, d, u; z undoes, n skips) and by
the buttons, the progress follows, and after ``min_answers`` answers the page shows the estimates
with their intervals as the API computes them. Another owner's check is not found."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import OpenPage, Service, build, screenshot, wait_for_gallery

pytestmark = [pytest.mark.browser, pytest.mark.slow]

_IMAGES_LOADED = """() => {
    const images = [...document.querySelectorAll("#check-pair img.thumb")];
    return images.length === 2 && images.every((i) => i.complete && i.naturalWidth > 0);
}"""


def _shown(page: Page) -> int:
    """The index of the pair on the page, once its two crops are loaded."""
    page.wait_for_function(_IMAGES_LOADED)
    index = page.locator("#check-pair .pair").get_attribute("data-index")
    assert index is not None
    return int(index)


def _percent(fraction: float) -> str:
    """As the page writes it (format.js ``percent``): JavaScript's ``Math.round`` takes halves
    up (5/8 is 63%), where Python's ``round`` takes them to the even neighbour (62%)."""
    return f"{math.floor(fraction * 100 + 0.5)}%"


def test_pairs_are_judged_by_keyboard_and_buttons_until_the_estimate_shows(
    open_page: OpenPage, service: Service, trained_job: dict[str, Any]
) -> None:
    gallery = build(service, service.dataset, trained_job["model_name"], "human-check")
    gallery = wait_for_gallery(service, gallery["id"], "READY")

    page = open_page()
    page.goto(f"/#/galleries/{gallery['id']}")
    page.get_by_role("button", name="Check pairs").click()
    expect(page).to_have_url(re.compile(r"#/checks/[0-9a-f-]{36}$"))
    check_id = page.url.rsplit("/", 1)[1]
    with service.client() as api:
        check = api.get(f"/v1/checks/{check_id}").json()
        pairs = api.get(f"/v1/checks/{check_id}/pairs").json()["items"]
    assert check["gallery_id"] == gallery["id"] and check["pairs"] == len(pairs) >= 12
    minimum = check["min_answers"]
    expect(page.locator("h1")).to_have_text(f"Pair check reid-alice v{gallery['model_version']}")
    expect(page.locator("#check-progress")).to_have_text(f"0 of {len(pairs)} pairs answered")
    expect(page.locator("#estimate-pending")).to_have_text(
        f"The estimate shows after {minimum} answers (0 so far)."
    )

    # the first pair: the query and its candidate side by side, the gallery's own crops
    assert _shown(page) == 0
    first = pairs[0]
    expect(page.locator("#pair-query")).to_have_attribute(
        "data-position", str(first["query"]["position"])
    )
    expect(page.locator("#pair-candidate")).to_have_attribute(
        "data-position", str(first["candidate"]["position"])
    )
    expect(page.locator("#pair-query figcaption")).to_contain_text(first["query"]["path"])
    sizes = page.locator("#check-pair img.thumb").evaluate_all(
        "images => images.map((i) => [i.naturalWidth, i.naturalHeight])"
    )
    assert sizes == [[48, 96], [48, 96]]  # the synthetic dataset's crops
    expect(page.locator("#undo-answer")).to_be_disabled()
    screenshot(page, "check-pair")

    given: dict[int, str] = {}  # pair index -> the answer given on the page

    def by_key(key: str, answer: str) -> None:
        index = _shown(page)
        page.keyboard.press(key)
        expect(page.locator("#check-pair .pair")).not_to_have_attribute("data-index", str(index))
        given[index] = answer

    def by_click(name: str, answer: str) -> None:
        index = _shown(page)
        page.get_by_role("button", name=name).click()
        expect(page.locator("#check-pair .pair")).not_to_have_attribute("data-index", str(index))
        given[index] = answer

    by_key("s", "same")
    by_key("d", "different")
    by_click("Unsure", "unsure")
    answered = len(given)

    # z takes the last answer back and shows its pair again
    last = list(given)[-1]
    page.keyboard.press("z")
    expect(page.locator("#check-pair .pair")).to_have_attribute("data-index", str(last))
    del given[last]
    with service.client() as api:
        assert api.get(f"/v1/checks/{check_id}/pairs").json()["items"][last]["answer"] is None
    # n skips it: the next unanswered pair, the skipped one comes back after the others
    page.keyboard.press("n")
    expect(page.locator("#check-pair .pair")).not_to_have_attribute("data-index", str(last))

    keys = [("s", "same"), ("d", "different"), ("u", "unsure")]
    buttons = [("Same", "same"), ("Different", "different")]
    while True:
        with service.client() as api:
            answered = api.get(f"/v1/checks/{check_id}").json()["answered"]
        if answered >= minimum:
            break
        expect(page.locator("#estimate-pending")).to_have_text(
            f"The estimate shows after {minimum} answers ({answered} so far)."
        )
        expect(page.locator("#check-progress")).to_have_text(
            f"{answered} of {len(pairs)} pairs answered"
        )
        turn = len(given)
        if turn % 3 == 2:
            by_click(*buttons[turn % 2])
        else:
            by_key(*keys[turn % 3])

    # what the API holds is what was pressed and clicked (a pair showing the same two crops as
    # an answered one is answered with it)
    with service.client() as api:
        check = api.get(f"/v1/checks/{check_id}").json()
        stored = api.get(f"/v1/checks/{check_id}/pairs").json()["items"]
    for index, answer in given.items():
        assert stored[index]["answer"] == answer, index
    assert check["answered"] == sum(p["answer"] is not None for p in stored)
    expect(page.locator("#check-progress")).to_have_text(
        f"{check['answered']} of {len(pairs)} pairs answered"
    )

    # the estimate, as the API computes it
    expect(page.locator("#estimate-pending")).to_have_count(0)
    for row, key in (("#precision-at-1", "precision_at_1"), ("#precision-at-5", "precision_at_5")):
        precision = check[key]
        cells = page.locator(f"{row} td")
        if precision["estimate"] is None:
            expect(cells.first).to_have_text("—")
        else:
            expect(cells.first).to_have_text(
                f"{_percent(precision['estimate'])} (95% interval "
                f"{_percent(precision['low'])}–{_percent(precision['high'])})"
            )
        expect(cells.nth(1)).to_have_text(str(precision["answers"]))
        expect(cells.nth(2)).to_have_text(
            f"{precision['same']} same, {precision['different']} different, "
            f"{precision['unsure']} unsure"
        )
    assert check["precision_at_1"]["answers"] + check["precision_at_1"]["unsure"] >= 1
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    screenshot(page, "check-estimate")

    # bob does not see alice's check
    other = open_page("bob")
    other.goto(f"/#/checks/{check_id}")
    expect(other.locator(".error-box")).to_have_text(
        f"Could not load check {check_id}: check {check_id} not found"
    )
