"""A real headless Chromium works the call list and opens the reports page; screenshots are kept.

The browser is Debian's `chromium`, driven by Playwright with `executable_path`. Screenshots go to
`test-artifacts/screenshots/` at the repository root.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from harness import MONDAY, REPO, Harness, make_settings, serve, start_harness
from test_pages import _enroll, _seed

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = REPO / "test-artifacts" / "screenshots"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (scripts/test installs it)")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Harness]]:
    harness = start_harness(make_settings(tmp_path))
    with serve(harness) as url:
        yield url, harness
    harness.stop()


@pytest.fixture
def page() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser.new_page(viewport={"width": 1200, "height": 1600})
        finally:
            browser.close()


def _shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_a_manager_works_the_call_list_in_a_real_browser(served: tuple[str, Harness], page: Any) -> None:
    url, h = served
    enrollment = _enroll(h)
    wednesday = MONDAY + timedelta(days=2)
    _seed(h, enrollment, 11, wednesday + timedelta(hours=3), priority=10.0)
    _seed(h, enrollment, 12, wednesday + timedelta(hours=1), priority=5000.0)
    _seed(h, enrollment, 13, wednesday - timedelta(days=1), priority=1.0)  # overdue since Tuesday

    page.goto(f"{url}/managers/ivan/calls?date=2026-11-25&tz=Europe/Moscow")
    _shot(page, "call-list")

    cards = page.locator("section.task")
    assert cards.count() == 3
    reasons = [cards.nth(i).locator("p", has_text="Why this call").inner_text() for i in range(3)]
    # Overdue first, then by priority, highest first.
    assert reasons == ["Why this call: reason 13", "Why this call: reason 12", "Why this call: reason 11"]
    assert "overdue" in (cards.nth(0).get_attribute("class") or "")

    first = cards.nth(0)
    first.locator("select[name=outcome]").select_option("no_answer")
    first.locator("textarea, input[name=note]").first.fill("rang twice")
    first.locator("button", has_text="Log call").click()
    page.wait_for_load_state()
    _shot(page, "call-list-after-logging")

    cards = page.locator("section.task")
    assert cards.count() == 2
    assert "reason 13" not in page.inner_text("body")


def test_the_reports_page_shows_its_charts_in_a_real_browser(served: tuple[str, Harness], page: Any) -> None:
    url, h = served
    _enroll(h)
    h.run_days(3)

    page.goto(f"{url}/reports/page")
    _shot(page, "reports")

    charts = page.locator("svg")
    assert charts.count() >= 3
    assert all(charts.nth(i).bounding_box() is not None for i in range(charts.count()))
    assert "open-deal" in page.inner_text("body")
