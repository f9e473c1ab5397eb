"""The page in a real browser: headless Chromium (Debian's), driven by Selenium.

Pointer input (a pen, a mouse, a finger) draws on the canvas through
WebDriver actions, which Chrome turns into real PointerEvents; the page
must show both models' answers, read a vertical stroke as 1, clear, and
answer again for a closed loop, an uploaded file and a dropped one, on a
desktop and a phone-sized screen. Nothing is downloaded: the system
chromedriver is always given by path.

Also a script, for the README's screenshot (real-MNIST models read the
digit right; the fixture models are small):

    .venv/bin/python tests/test_browser.py --root DIR [--out docs/images/web_app.png]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # as a script: import this checkout's mnist_dvc, as pytest does
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest
from PIL import Image
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.actions import interaction
from selenium.webdriver.common.actions.action_builder import ActionBuilder
from selenium.webdriver.common.actions.pointer_input import PointerInput
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from helpers import (CHROMEDRIVER, CHROMIUM, canvas_stroke, chromium, missing_browser, scanned_digits,  # noqa: E402
                     start_server)

WAIT = 20  # s for an answer; ~50 ms on an idle machine
SIDE = 280  # the canvas's own pixels

pytestmark = pytest.mark.e2e


@pytest.fixture
def browser(tmp_path):
    reason = missing_browser()
    if reason:
        pytest.skip(reason)
    driver = chromium(tmp_path)
    yield driver
    driver.quit()


# --- driving the page -------------------------------------------------------------------

POINTERS = {"mouse": interaction.POINTER_MOUSE, "pen": interaction.POINTER_PEN, "touch": interaction.POINTER_TOUCH}


def draw(driver, points: list[tuple[float, float]], kind: str = "mouse") -> None:
    """One stroke through ``points`` (canvas pixels, 0-280) with a pointer of ``kind`` (mouse, pen, touch)."""
    canvas = driver.find_element(By.ID, "canvas")
    scale = canvas.size["width"] / SIDE  # CSS px per canvas pixel
    pointer = PointerInput(POINTERS[kind], kind)
    actions = ActionBuilder(driver, mouse=pointer, duration=10)

    def offset(x: float, y: float) -> tuple[int, int]:  # WebDriver offsets are from the element's centre
        return round((x - SIDE / 2) * scale), round((y - SIDE / 2) * scale)

    actions.pointer_action.move_to(canvas, *offset(*points[0]))
    actions.pointer_action.pointer_down()
    for point in points[1:]:
        actions.pointer_action.move_to(canvas, *offset(*point))
    actions.pointer_action.pointer_up()
    actions.perform()


def shown(driver) -> dict | None:
    """Both models' digits once the page shows an answer and waits for no other, else None."""
    return driver.execute_script("""
        if (document.getElementById("results").getAttribute("aria-busy") !== "false") return null;
        const digits = {};
        for (const name of ["manual", "skorch"]) {
            const value = document.getElementById("model-" + name).dataset.digit;
            if (value === undefined) return null;
            digits[name] = Number(value);
        }
        return digits;""")


def wait_for_answer(driver) -> dict:
    return WebDriverWait(driver, WAIT, poll_frequency=0.05).until(shown)


def text(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def vertical_stroke() -> list[tuple[float, float]]:
    return [(140, y) for y in range(50, 231, 12)]


def loop(cx=140, cy=140, rx=62, ry=92, steps=40) -> list[tuple[float, float]]:
    return [(cx + rx * math.sin(2 * math.pi * i / steps), cy - ry * math.cos(2 * math.pi * i / steps))
            for i in range(steps + 2)]


def console_errors(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


# --- the test -----------------------------------------------------------------------------

def test_drawing_reads_digits_in_a_real_browser(browser, reproduced, tmp_path):
    server = start_server(reproduced)
    try:
        browser.get(server.url + "/")
        assert browser.title.startswith("Draw a digit")
        # Test accuracy from /api/health, as the page shows it.
        metrics = json.loads((reproduced / "metrics/evaluate.json").read_text())
        WebDriverWait(browser, WAIT).until(lambda d: "Backend: PyTorch" in text(d, "model-info"))
        for name in ("manual", "skorch"):
            assert f"test accuracy: {metrics[name]['accuracy']:.2%}" in text(browser, f"model-{name}")
        # Started without --collect: no correction buttons, no line about saving.
        assert not browser.find_element(By.ID, "feedback").is_displayed()
        assert not browser.find_element(By.ID, "collect-note").is_displayed()
        browser.execute_script("""
            window.pointerTypes = [];
            document.getElementById("canvas").addEventListener("pointerdown",
                                                               (e) => pointerTypes.push(e.pointerType));""")

        # A "1", with a pen: both models read it.
        draw(browser, vertical_stroke(), kind="pen")
        assert wait_for_answer(browser) == {"manual": 1, "skorch": 1}
        assert text(browser, "verdict") == "Both models read 1."
        # The 28x28 input is drawn: a bright vertical bar in the middle of a black square.
        column = browser.execute_script("""
            const data = document.getElementById("input28").getContext("2d").getImageData(0, 0, 28, 28).data;
            return [data[(14 * 28 + 14) * 4], data[(14 * 28 + 2) * 4]];""")
        assert column[0] > 200 and column[1] == 0

        browser.find_element(By.ID, "clear").click()
        assert shown(browser) is None and text(browser, "verdict") == "Nothing drawn yet."

        # A "0", with a mouse: both models answer (the fixture models are too small to promise a 0).
        draw(browser, loop(), kind="mouse")
        answer = wait_for_answer(browser)
        assert set(answer) == {"manual", "skorch"} and all(0 <= d <= 9 for d in answer.values())
        assert browser.execute_script("return pointerTypes") == ["pen", "mouse"]  # real PointerEvents
        browser.save_screenshot(str(tmp_path / "web_app.png"))

        # Undo takes the only stroke away; an uploaded file is read; so is a dropped one.
        browser.find_element(By.ID, "undo").click()
        assert text(browser, "verdict") == "Nothing drawn yet."
        picture = tmp_path / "digit.png"
        picture.write_bytes(scanned_digits(1)[0])
        browser.find_element(By.ID, "file").send_keys(str(picture))
        assert set(wait_for_answer(browser)) == {"manual", "skorch"}
        assert "digit.png" in text(browser, "status")
        ActionChains(browser).send_keys(Keys.ESCAPE).perform()  # the keyboard's Clear
        assert shown(browser) is None and not browser.find_element(By.ID, "picture").is_displayed()
        browser.execute_script("""
            const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], "stroke.png", {type: "image/png"}));
            document.getElementById("pad").dispatchEvent(
                new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));""",
                               base64.b64encode(canvas_stroke()).decode())
        assert wait_for_answer(browser) == {"manual": 1, "skorch": 1}

        # On a phone-sized screen: nothing wider than the screen; a finger draws; the answer
        # shows right below the pad.
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
        width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width == [390, 390], width
        assert browser.find_element(By.ID, "canvas").size["width"] >= 300
        browser.find_element(By.ID, "clear").click()
        draw(browser, vertical_stroke(), kind="touch")
        assert wait_for_answer(browser) == {"manual": 1, "skorch": 1}
        assert text(browser, "mini-answer") == "manual 1 · skorch 1"
        assert browser.execute_script("return pointerTypes") == ["pen", "mouse", "touch"]

        # A bad picture: the server's sentence, no crash.
        picture.write_bytes(b"not a picture")
        browser.find_element(By.ID, "file").send_keys(str(picture))
        WebDriverWait(browser, WAIT).until(lambda d: "could not use this picture" in text(d, "status"))
        assert "not an image" in text(browser, "status")
        # The bad upload's 422 is the only console message.
        errors = console_errors(browser)
        assert len(errors) == 1 and "422" in errors[0], errors
    finally:
        server.stop()


def test_with_collect_the_page_says_where_corrections_go_and_a_click_saves_one(browser, reproduced, tmp_path):
    from mnist_dvc.data import read_feedback_labels

    folder = tmp_path / "feedback"
    server = start_server(reproduced, "--collect", str(folder))
    try:
        browser.get(server.url + "/")
        WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.ID, "collect-note").is_displayed())
        assert f"Corrections are saved on this server, in {folder}" in text(browser, "collect-note")
        assert browser.find_element(By.ID, "feedback").is_displayed()
        draw(browser, vertical_stroke(), kind="mouse")
        wait_for_answer(browser)
        browser.find_element(By.CSS_SELECTOR, "#feedback-digits button:nth-child(8)").click()  # the 7
        WebDriverWait(browser, WAIT).until(lambda d: "Saved as 7" in text(d, "feedback-status"))
        assert list(read_feedback_labels(folder).values()) == [7]
        assert console_errors(browser) == []
    finally:
        server.stop()


# --- the README's screenshot ------------------------------------------------------------

def three() -> list[tuple[float, float]]:
    top = [(140 + 55 * math.cos(a), 95 + 42 * math.sin(a)) for a in [-2.5 + i * 0.11 for i in range(38)]]
    bottom = [(140 + 60 * math.cos(a), 183 + 50 * math.sin(a)) for a in [-1.55 + i * 0.11 for i in range(38)]]
    return top + bottom


def screenshot(root: Path, out: Path) -> dict:
    """Draw a "3" on the page served over ``root``'s models; save the window as ``out``."""
    with tempfile.TemporaryDirectory() as folder:
        server = start_server(root)
        driver = chromium(Path(folder), width=1100, height=800)
        try:
            driver.get(server.url + "/")
            WebDriverWait(driver, WAIT).until(lambda d: "Backend" in text(d, "model-info"))
            draw(driver, three(), kind="pen")
            answer = wait_for_answer(driver)
            time.sleep(0.5)  # the bars' transition
            driver.execute_script("document.activeElement.blur()")
            # The whole page: a window as tall as the page, plus the browser's own bars.
            height = driver.execute_script("return document.documentElement.scrollHeight + "
                                           "window.outerHeight - window.innerHeight")
            driver.set_window_size(1100, height)
            png = driver.get_screenshot_as_png()
        finally:
            driver.quit()
            server.stop()
    # A palette of 256 colours is plenty for a page: a third of the bytes.
    Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(out, optimize=True)
    return answer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Save a screenshot of the web app with a drawn digit.")
    parser.add_argument("--root", type=Path, required=True, help="a project folder with trained models/")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs/images/web_app.png")
    args = parser.parse_args()
    if not shutil.which(str(CHROMIUM)) or not CHROMEDRIVER.exists():
        sys.exit(f"needs {CHROMIUM} and {CHROMEDRIVER}")
    print(screenshot(args.root, args.out), "->", args.out)
