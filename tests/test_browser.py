"""The drawing page in headless Chromium: draw with mouse and pen, see the top 5 appear, clear, load a test image.

Needs the playwright package and Debian's chromium (/usr/bin/chromium); skipped without them. The
screenshot is left in test-artifacts/. KMNIST_BROWSER_CHECKPOINT names a real checkpoint to show
instead of the tiny synthetic one (how the screenshot in docs/ was made).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import REAL_DATA, serve_in_process, write_dataset

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)", allow_module_level=True)

# A hand-drawn つ, in board pixels (the board is 280 x 280): one stroke, left to right, curling down and back.
TSU = [(45, 125), (80, 104), (125, 94), (170, 96), (208, 112), (228, 140), (222, 172), (198, 198), (160, 214),
       (122, 218)]


@pytest.fixture(scope="module")
def server_url(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    checkpoint = os.environ.get("KMNIST_BROWSER_CHECKPOINT")
    if checkpoint:
        arguments = [checkpoint, "--data-dir", str(REAL_DATA)]
    else:
        data_dir = write_dataset(tmp_path_factory.mktemp("data"))
        arguments = [str(tiny_checkpoint), "--data-dir", str(data_dir), "--skip-md5"]
    with serve_in_process(arguments, tmp_path_factory.mktemp("serve") / "stderr.txt") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server_url: str):
    page = browser.new_page(viewport={"width": 900, "height": 760})
    page.set_default_timeout(15_000)
    # expect() waits 5 s by default; on a loaded 2-core machine a stroke's chain of predictions can take
    # longer to settle (seen in CI: the last answer still in flight after 5 s), so it waits as long as page calls.
    sync_api.expect.set_options(timeout=15_000)
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("request", lambda request: None if request.url.startswith(server_url)
            else problems.append(f"request elsewhere: {request.url}"))
    page.goto(server_url + "/")
    sync_api.expect(page.locator("#classes li")).to_have_count(10)
    yield page
    page.close()
    assert problems == []  # no script errors, nothing fetched from anywhere but this server


def board_position(page, x: float, y: float) -> tuple[float, float]:
    box = page.locator("#board").bounding_box()
    return box["x"] + x * box["width"] / 280, box["y"] + y * box["height"] / 280


def model_input_ink(page) -> int:
    return page.evaluate("""() => {
        const data = document.getElementById('input').getContext('2d').getImageData(0, 0, 28, 28).data;
        let ink = 0; for (let i = 0; i < data.length; i += 4) ink += data[i]; return ink; }""")


def test_draw_with_the_mouse_and_see_the_top_five(page) -> None:
    page.mouse.move(*board_position(page, *TSU[0]))
    page.mouse.down()
    for point in TSU[1:]:
        page.mouse.move(*board_position(page, *point), steps=4)
    page.mouse.up()
    rows = page.locator("#predictions li")
    sync_api.expect(rows).to_have_count(5)
    classes = page.locator("#classes .char").all_inner_texts()
    percents = [float(text.rstrip("%")) for text in page.locator("#predictions .percent").all_inner_texts()]
    assert all(character in classes for character in page.locator("#predictions .char").all_inner_texts())
    assert percents == sorted(percents, reverse=True) and 0 < sum(percents) <= 100.5
    sync_api.expect(page.locator("#status")).to_contain_text("Best guess")
    sync_api.expect(page.locator("#predictions")).to_have_attribute("aria-busy", "false")  # the last stroke's answer
    assert model_input_ink(page) > 0  # the 28x28 the model saw is shown
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "drawing-page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000

    page.get_by_role("button", name="Clear").click()
    sync_api.expect(rows).to_have_count(0)
    assert model_input_ink(page) == 0


def test_draw_with_a_pen(page) -> None:
    """Pointer events carry pens and fingers as well as mice; a pen stroke with pressure draws and predicts."""
    board = page.locator("#board")
    points = [board_position(page, x, y) for x, y in TSU[::2]]
    board.dispatch_event("pointerdown", {"pointerId": 7, "pointerType": "pen", "pressure": 0.8,
                                         "clientX": points[0][0], "clientY": points[0][1], "isPrimary": True})
    for x, y in points[1:]:
        board.dispatch_event("pointermove", {"pointerId": 7, "pointerType": "pen", "pressure": 0.8,
                                             "clientX": x, "clientY": y, "isPrimary": True})
    board.dispatch_event("pointerup", {"pointerId": 7, "pointerType": "pen", "clientX": points[-1][0],
                                       "clientY": points[-1][1], "isPrimary": True})
    sync_api.expect(page.locator("#predictions li")).to_have_count(5)


def test_a_server_that_never_answers_is_given_up_on(page) -> None:
    """The page's clock runs fast here; a prediction with no answer in 20 s ends in a message, not a wait forever."""
    page.clock.install()
    page.reload()
    sync_api.expect(page.locator("#classes li")).to_have_count(10)
    page.route("**/predict*", lambda route: None)  # the request is held, never answered
    with page.expect_request("**/predict*"):  # sent, so its 20 s have started
        page.mouse.click(*board_position(page, 140, 140))
    sync_api.expect(page.locator("#predictions")).to_have_attribute("aria-busy", "true")
    page.clock.run_for(19_000)
    sync_api.expect(page.locator("#status")).not_to_contain_text("no answer")
    page.clock.run_for(2_000)
    sync_api.expect(page.locator("#status")).to_have_text("no answer from the server in 20 s")
    sync_api.expect(page.locator("#status")).to_have_class("error")


def test_random_test_image(page) -> None:
    button = page.get_by_role("button", name="Random test image")
    sync_api.expect(button).to_be_enabled()
    button.click()
    sync_api.expect(page.locator("#status")).to_contain_text("true class")
    sync_api.expect(page.locator("#predictions li")).to_have_count(5)


def test_openapi_docs_page_renders_offline(page, server_url: str) -> None:
    page.goto(server_url + "/docs")
    sync_api.expect(page.locator(".opblock-summary-path", has_text="/predict")).to_be_visible()
