"""The page of `xpcnn serve` in a real browser (Debian's headless Chromium driven by Selenium,
both installed by .ci/run): Fashion-MNIST test images drawn onto the canvas with pointer events
(mouse and pen) give the label `xpcnn predict` gives for the same drawing saved as a file; a
dropped file gives predict's answer for that file; a bad file shows an error and the page goes
on working; on a phone-sized window nothing overflows sideways.

``XPCNN_SCREENSHOT=docs/img/serve.png`` also saves the screenshot the docs show."""

import base64
import json
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from xpcnn.cli import main

from helpers import REPO, start_server, stop_server, unavailable
from trained import fashion_test_set, trained_checkpoint

#: Fashion-MNIST test images to draw: a trouser, a shirt, an ankle boot (their bright pixels become strokes).
DRAWN = (2, 4, 0)


def _chrome():
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
    except ImportError:
        unavailable("Selenium is not installed (pip install selenium)")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if browser is None or driver_path is None:
        unavailable("Chromium or its driver is missing (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,1000", "--force-device-scale-factor=1", "--no-proxy-server"):
        options.add_argument(argument)
    try:
        return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    except WebDriverException as exc:
        unavailable(f"Chromium did not start: {exc.msg}")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        unavailable(f"the serve extra is not installed ({exc.name}: pip install 'xpcnn[serve]')")
    checkpoint = trained_checkpoint(tmp_path_factory)
    folder = tmp_path_factory.mktemp("serve-browser")
    process, url, _ = start_server(checkpoint, folder)
    driver = None
    try:
        driver = _chrome()
        driver.get(url + "/")
        _wait(driver, "return document.body.dataset.state === 'idle'")
        yield driver, checkpoint, folder
    finally:
        if driver is not None:
            driver.quit()
        stop_server(process)


def _wait(driver, condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if driver.execute_script(condition):
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {condition}")


def _answered(driver, answers_before):
    """Wait for the answer to the latest drawing or file (no drawing left unsent, no request in flight)."""
    _wait(driver, f"return Number(document.body.dataset.answers) > {answers_before} && "
                  f"document.body.dataset.pending === '0' && document.body.dataset.state === 'idle'")


def _answers(driver):
    return int(driver.execute_script("return document.body.dataset.answers"))


def _strokes(image, threshold=0.35):
    """A 28x28 image's bright pixels (the ink) as horizontal strokes ``(x0, y0, x1, y1)`` on the
    280x280 pad, one per run of a row."""
    strokes = []
    for row in range(image.shape[0]):
        ink = np.concatenate([[False], image[row] > threshold, [False]])
        edges = np.flatnonzero(np.diff(ink.astype(np.int8)))
        for start, stop in zip(edges[::2], edges[1::2]):
            y = row * 10 + 5
            strokes.append((int(start) * 10 + 5, y, int(stop - 1) * 10 + 5, y))
    return strokes


def _draw(driver, strokes, kind):
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput

    pad = driver.find_element("id", "pad")
    width = pad.size["width"]
    assert width == 280, f"the pad is {width} CSS pixels wide; the strokes assume 280"
    pointer = PointerInput(kind, kind)
    actions = ActionBuilder(driver, mouse=pointer, duration=0)
    for x0, y0, x1, y1 in strokes:                # offsets from the pad's centre
        actions.pointer_action.move_to(pad, x0 - 140, y0 - 140)
        actions.pointer_action.pointer_down()
        for x in range(x0, x1 + 1, 20):
            actions.pointer_action.move_to(pad, x - 140, y0 - 140)
        actions.pointer_action.move_to(pad, x1 - 140, y1 - 140)
        actions.pointer_action.pointer_up()
    actions.perform()


def _predict(checkpoint, folder, name, capsys):
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        capsys.readouterr()
        assert main(["predict", str(checkpoint), name, "--json", "--top", "5", "--quiet"]) == 0
    finally:
        os.chdir(cwd)
    return json.loads(capsys.readouterr().out)


def _shown(driver):
    label = driver.find_element("id", "top-label")
    bars = [item.text.split("\n") for item in driver.find_elements("css selector", "#bars li")]
    return label.text, int(label.get_attribute("data-class")), bars


def _error(driver):
    box = driver.find_element("id", "error")
    return box.text if box.is_displayed() else None


def test_drawings_get_the_label_xpcnn_predict_gives_the_same_drawing(page, capsys):
    from selenium.webdriver.common.actions import interaction

    driver, checkpoint, folder = page
    x, t = fashion_test_set()
    assert "SimpleConvNet on fashion-mnist" in driver.find_element("id", "model-info").text
    labels = set()
    for number, kind in zip(DRAWN, (interaction.POINTER_MOUSE, interaction.POINTER_PEN, interaction.POINTER_MOUSE)):
        driver.find_element("id", "clear").click()
        before = _answers(driver)
        _draw(driver, _strokes(x[number, 0]), kind)
        _answered(driver, before)
        url = driver.execute_script("return document.getElementById('pad').toDataURL('image/png')")
        name = f"drawn-{number}.png"
        (folder / name).write_bytes(base64.b64decode(url.split(",", 1)[1]))
        drawn = np.asarray(Image.open(folder / name).convert("L"))
        assert (drawn < 128).mean() > 0.05, f"the strokes of image {number} did not reach the canvas"
        expected = _predict(checkpoint, folder, name, capsys)
        label, number_shown, bars = _shown(driver)
        assert (label, number_shown) == (expected["top"][0]["label"], expected["top"][0]["class"]), number
        assert [(name, float(p)) for name, p in bars] == [(g["label"], round(g["prob"], 3)) for g in expected["top"]]
        assert _error(driver) is None
        assert driver.find_element("id", "maps-sheet").get_attribute("data-count") == "30"
        assert driver.find_element("id", "prepared").get_attribute("src").startswith("data:image/png;base64,")
        labels.add(label)
    shot = os.environ.get("XPCNN_SCREENSHOT")
    driver.save_screenshot(str(folder / "serve.png"))
    if shot:
        driver.save_screenshot(str(REPO / shot))


def _drop(driver, data, name):
    """Drop a file on the pad as a person dragging it from a file manager would (a drop event
    carrying the file)."""
    driver.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], arguments[1], { type: "image/png" }));
        const zone = document.getElementById("drop-zone");
        zone.dispatchEvent(new DragEvent("dragover", { dataTransfer: transfer, bubbles: true, cancelable: true }));
        zone.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
    """, base64.b64encode(data).decode("ascii"), name)


def test_dropped_and_picked_files_and_a_bad_file(page, capsys):
    driver, checkpoint, folder = page
    x, _ = fashion_test_set()
    picture = Image.fromarray(255 - np.round(x[7, 0] * 255).astype(np.uint8)).resize((196, 196))
    picture.save(folder / "dropped.png")
    expected = _predict(checkpoint, folder, "dropped.png", capsys)

    before = _answers(driver)
    _drop(driver, (folder / "dropped.png").read_bytes(), "dropped.png")
    _answered(driver, before)
    label, number, _ = _shown(driver)
    assert (label, number) == (expected["top"][0]["label"], expected["top"][0]["class"])
    assert "file dropped.png (light background: inverted)" in driver.find_element("id", "source").text

    (folder / "bad.png").write_bytes(b"this is not a picture")
    before = _answers(driver)
    driver.find_element("id", "file").send_keys(str(folder / "bad.png"))        # the file picker
    _answered(driver, before)
    assert "bad.png: not a picture Pillow can read" in (_error(driver) or "")
    assert driver.find_element("id", "top-label").text == label                  # the last answer stays

    before = _answers(driver)                                                     # and the page goes on
    driver.find_element("id", "file").send_keys(str(folder / "dropped.png"))
    _answered(driver, before)
    assert _error(driver) is None and _shown(driver)[:2] == (label, number)


#: Wraps the page's fetch: the next `count` POSTs to /api/predict get the 503 a busy server
#: gives (JSON, Retry-After: 1, or window.retryAfter); the rest go to the server. Counts the
#: POSTs in window.predictCalls.
BUSY_FETCH = """
    const realFetch = window.fetch;
    window.busyLeft = arguments[0];
    window.retryAfter = "1";
    window.predictCalls = 0;
    window.fetch = (url, init) => {
      if (String(url).startsWith("/api/predict")) {
        window.predictCalls += 1;
        if (window.busyLeft > 0) {
          window.busyLeft -= 1;
          return Promise.resolve(new Response(
            JSON.stringify({ error: "the server is busy (128 requests queued, its limit); retry in 1 s" }),
            { status: 503, headers: { "Content-Type": "application/json", "Retry-After": window.retryAfter } }));
        }
      }
      return realFetch(url, init);
    };
"""


def test_a_busy_server_is_retried_and_the_page_says_so(page, capsys):
    driver, checkpoint, folder = page
    x, _ = fashion_test_set()
    Image.fromarray(255 - np.round(x[11, 0] * 255).astype(np.uint8)).resize((140, 140)).save(folder / "busy.png")
    expected = _predict(checkpoint, folder, "busy.png", capsys)
    driver.execute_script(BUSY_FETCH, 2)
    try:
        before = _answers(driver)
        _drop(driver, (folder / "busy.png").read_bytes(), "busy.png")
        _wait(driver, "const box = document.getElementById('busy'); "
                      "return !box.hidden && box.textContent.startsWith('busy, retrying in 1 s (try 2 of 10)')")
        _answered(driver, before)
        assert driver.execute_script("return window.predictCalls") == 3          # two busy answers, then served
        assert not driver.find_element("id", "busy").is_displayed() and _error(driver) is None
        assert _shown(driver)[:2] == (expected["top"][0]["label"], expected["top"][0]["class"])

        driver.execute_script("window.busyLeft = 100; window.predictCalls = 0; window.retryAfter = '0';")
        before = _answers(driver)                                                 # busy for good: it gives up
        _drop(driver, (folder / "busy.png").read_bytes(), "busy.png")
        _wait(driver, f"return Number(document.body.dataset.answers) > {before}", timeout=60)
        assert driver.execute_script("return window.predictCalls") == 10
        assert _error(driver) == ("the server is busy (128 requests queued, its limit); retry in 1 s "
                                  "(gave up after 10 tries)")
    finally:
        driver.refresh()                                  # the page's own fetch again
        _wait(driver, "return document.body.dataset.state === 'idle'")


def test_readable_on_a_phone(page):
    driver, _, folder = page
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",              # a phone: 390 x 844, touch
                           {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    try:
        driver.refresh()
        _wait(driver, "return document.body.dataset.state === 'idle'")
        assert driver.execute_script("return window.innerWidth") == 390
        overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page is {overflow} px wider than a phone's screen"
        pad = driver.find_element("id", "pad")
        assert pad.size["width"] <= 390 * 0.8 and pad.size["width"] == pad.size["height"]
        assert driver.execute_script("return getComputedStyle(document.getElementById('pad')).touchAction") == "none"
        driver.save_screenshot(str(folder / "phone.png"))
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        driver.refresh()
