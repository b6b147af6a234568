"""A real browser on the page: Playwright drives Debian's chromium (headless) against a loopback server,
uploads an MNIST-like digit, sees the predicted class and one heatmap per method, moves the opacity slider,
and saves a screenshot."""

from __future__ import annotations

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from web_helpers import RUN, digit_png, loopback_server, train_tiny_run
from xailab.web import create_app

CHROMIUM = "/usr/bin/chromium"
DEFAULT_METHODS = ["gradcam", "integrated_gradients", "saliency"]  # ticked by the page on load


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    with loopback_server(create_app(train_tiny_run(tmp_path_factory))) as url:
        yield url


@pytest.fixture(scope="module")
def page(base_url):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(base_url + "/")
        yield page
        browser.close()
        assert errors == [], f"JavaScript errors on the page: {errors}"


def test_upload_a_digit_and_see_prediction_and_heatmaps(page, base_url, tmp_path):
    data, _ = digit_png(0)
    digit = tmp_path / "digit.png"
    digit.write_bytes(data)
    expected = httpx.post(f"{base_url}/api/runs/{RUN}/predict", files={"file": ("d.png", data)}).json()[
        "top"
    ][0]

    expect(page.locator("#runs input[type=checkbox]")).to_have_count(1)
    expect(page.locator("#methods input:checked")).to_have_count(len(DEFAULT_METHODS))
    page.set_input_files("#file", str(digit))

    card = page.locator(f'article.result[data-run="{RUN}"]')
    expect(card.locator(".predicted strong")).to_have_text(expected["name"], timeout=60_000)
    expect(card.locator(".predicted")).to_contain_text(f"{100 * expected['probability']:.1f}%")
    expect(card.locator("ol.bars li")).to_have_count(5)  # the page asks for the top 5
    heatmaps = card.locator("img.heatmap")
    expect(heatmaps).to_have_count(len(DEFAULT_METHODS))
    expect(card.locator("figcaption")).to_have_count(len(DEFAULT_METHODS))
    for i, method in enumerate(DEFAULT_METHODS):
        expect(card.locator("figcaption").nth(i)).to_contain_text(method)
    # every heatmap is a decoded image, not a broken link
    assert page.evaluate(
        "[...document.querySelectorAll('img.heatmap')].every(i => i.complete && i.naturalWidth == 28)"
    )

    # drag the slider (a range input cannot be typed into): set the value and fire the input event
    page.eval_on_selector("#opacity", "e => { e.value = '0.8'; e.dispatchEvent(new Event('input')); }")
    expect(heatmaps.first).to_have_css("opacity", "0.8")
    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_pick_a_test_image_and_list_reports(page):
    samples = page.locator("img.sample")
    expect(samples.first).to_be_visible()
    samples.nth(4).click()
    expect(page.locator("#input-preview span")).to_contain_text("test image 4")
    expect(page.locator(f'article.result[data-run="{RUN}"] img.heatmap')).to_have_count(len(DEFAULT_METHODS))
    expect(page.locator("#status")).to_contain_text("done in")
    expect(page.locator("#report-list")).to_contain_text("no report.html")


def test_a_bad_upload_shows_the_servers_message(page, tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    page.set_input_files("#file", str(bad))
    error = page.locator(f'article.result[data-run="{RUN}"] .error')
    expect(error).to_contain_text("400: ")
    expect(error).to_contain_text("not an image")
