"""The explorers in a real browser: notebooks/widgets_smoke.ipynb run in JupyterLab in headless Chromium (hover,
click, pin, compare, the dark theme, timings), its default `nbconvert --to html --execute` export opened offline,
and a `save_html` page.

Needs the Debian packages `chromium` and `chromium-driver` (skipped without them) and the `selenium` and
`jupyterlab` packages. Nothing is downloaded: Selenium gets the driver's path, so its driver manager stays
idle, and Chromium runs with its background networking off. Screenshots go to the test's tmp_path, and also
to $LLAMA_LENS_SCREENSHOTS when that is set; the timings measured in the page (performance.now) are printed and
written next to them as widget_timings.json (measured, not asserted: speed is reported, never a test failure).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "widgets_smoke.ipynb"
REPO_ROOT = NOTEBOOK.parent.parent
TOKEN = "llama-lens-browser-test"
METRICS = ("prob", "logit", "target_prob", "target_rank", "token_prob", "token_rank", "entropy", "kl")
COLORMAPS = ("viridis", "magma", "cividis", "greys", "blues")
# Prompts that end or change an inline <script> were it not escaped (the character model takes ASCII only).
INJECTIONS = [
    "<!--<script",
    "</script><script>window.injected = 1</script>",
    "<!-- x",
    "-->",
    "<img src=x onerror='window.injected = 1'>",
    "a & b &amp; ]]>",
    "'\"`${window.injected = 1}`",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason="needs /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium chromium-driver)",
    ),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _notebook_widget_count() -> int:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    return sum("Explorer(" in "".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")


@pytest.fixture
def jupyter_lab(tmp_path):
    """A JupyterLab server on a free port serving a copy of the smoke notebook; yields its base URL."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / "smoke.ipynb")
    # Answer JupyterLab's "get notified about Jupyter news?" question with no, so no toast covers the page.
    notification = tmp_path / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True)
    notification.write_text(json.dumps({"fetchNews": "false"}))
    port = _free_port()
    env = os.environ | {
        # Keep the server's config, runtime files and workspaces out of the user's home.
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "MPLBACKEND": "Agg",
    }
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        f"--port={port}",
        "--ip=127.0.0.1",
        f"--IdentityProvider.token={TOKEN}",
        f"--ServerApp.root_dir={root}",
        "--allow-root",
        "--LabApp.expose_app_in_browser=True",  # lets the test run JupyterLab commands (run all cells)
        # Nothing that reaches out: no news, no update check, no PyPI extension manager.
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
    ]
    log = open(tmp_path / "jupyter.log", "wb")  # noqa: SIM115 (the server writes to it until the fixture ends)
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                pytest.fail(f"jupyter lab exited:\n{(tmp_path / 'jupyter.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab did not start:\n{(tmp_path / 'jupyter.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        server.send_signal(signal.SIGTERM)  # the server shuts its kernels down on SIGTERM
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture
def chromium(tmp_path, monkeypatch):
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never fetch a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--window-size=1400,2000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        # Offline: any host name fails to resolve (the local JupyterLab is reached by IP), so a page that
        # would fetch a script from a CDN gets nothing, as on a machine without a network.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(what: str, condition, timeout: float, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _screenshot_dir(tmp_path: Path) -> list[Path]:
    extra = os.environ.get("LLAMA_LENS_SCREENSHOTS")
    return [tmp_path] + ([Path(extra)] if extra else [])


def _shoot(driver, element, name: str, tmp_path: Path) -> Path:
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", element)
    time.sleep(0.3)
    shots = [folder / name for folder in _screenshot_dir(tmp_path)]
    for shot in shots:
        shot.parent.mkdir(parents=True, exist_ok=True)
        element.screenshot(str(shot))
    return shots[0]


def _ink(png: Path) -> tuple[float, int]:
    """Share of pixels that differ from the most common colour (the background), and the number of colours."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    background = colours[counts.argmax()]
    inked = float((np.abs(pixels.astype(int) - background).sum(axis=1) > 60).mean())
    return inked, len(colours)


def _hover(driver, element, x: float, y: float) -> None:
    """Moves the mouse to (x, y) pixels from the element's top-left corner (Selenium offsets are from its centre)."""
    from selenium.webdriver.common.action_chains import ActionChains

    width, height = driver.execute_script(
        "const r = arguments[0].getBoundingClientRect(); return [r.width, r.height]", element
    )
    ActionChains(driver).move_to_element_with_offset(element, int(x - width / 2), int(y - height / 2)).perform()


def _click_at(driver, element, x: float, y: float) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    _hover(driver, element, x, y)
    ActionChains(driver).click().perform()


def _websocket_frames(driver) -> list[int]:
    """Sizes in bytes of the WebSocket frames the page received since the last call (Chromium's log)."""
    sizes = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.webSocketFrameReceived":
            sizes.append(len(message["params"]["response"]["payloadData"]))
    return sizes


def _timings(driver) -> dict[str, list[float]]:
    return driver.execute_script("return window.llamaLensTimings || {}")


def _summary(values: list[float]) -> str:
    return f"n={len(values)} max={max(values):.1f} ms median={sorted(values)[len(values) // 2]:.1f} ms"


def _open_notebook(driver, url: str) -> None:
    driver.get(f"{url}/lab/tree/smoke.ipynb?token={TOKEN}")
    _wait(
        "the notebook's kernel",
        lambda: driver.execute_script(
            "const app = window.jupyterapp; const widget = app && app.shell.currentWidget;"
            "return !!(widget && widget.sessionContext && widget.sessionContext.session"
            " && widget.sessionContext.session.kernel && widget.content && widget.content.widgets.length);"
        ),
        timeout=90,
    )


def _fail_on_errors(driver) -> None:
    from selenium.webdriver.common.by import By

    stderr = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
    tracebacks = [e.text for e in driver.find_elements(By.CSS_SELECTOR, stderr) if "Error" in e.text]
    if tracebacks:
        pytest.fail("a cell raised:\n" + "\n".join(tracebacks)[-3000:])


def test_explorers_in_jupyterlab(jupyter_lab, chromium, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = chromium
    _open_notebook(driver, jupyter_lab)
    _websocket_frames(driver)  # drop the frames of JupyterLab's own start-up
    driver.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")
    expected = _notebook_widget_count()

    def ready():
        _fail_on_errors(driver)
        roots = driver.find_elements(By.CSS_SELECTOR, ".ll-root[data-ready='1']")
        drawn = driver.find_elements(By.CSS_SELECTOR, ".ll-root canvas.ll-cells, .ll-root canvas.ll-att-canvas")
        busy = driver.find_elements(By.CSS_SELECTOR, ".ll-root.ll-busy")
        return roots if len(roots) >= expected and len(drawn) >= expected + 1 and not busy else None

    roots = _wait(f"{expected} rendered explorers", ready, timeout=240)
    lens, attention, wide, compare = roots
    assert "ll-lens" in lens.get_attribute("class") and "ll-attention" in attention.get_attribute("class")
    assert "ll-attention" in wide.get_attribute("class")

    # Every explorer's static picture is in the page (it arrived as its own output) and hidden by the live view.
    statics = _wait(
        "the static pictures",
        lambda: (
            (found := driver.find_elements(By.CSS_SELECTOR, ".llama-lens-static")) and len(found) >= expected and found
        ),
        timeout=120,
    )
    assert all(not s.is_displayed() for s in statics), "a live explorer left its static picture visible"
    frames = _websocket_frames(driver)

    # ---------------------------------------------------------------- the lens: hover, click, pin
    canvas = lens.find_element(By.CSS_SELECTOR, "canvas.ll-cells")
    cell_width = float(canvas.get_attribute("style").split("width:")[1].split("px")[0]) / 300
    canvas = lens.find_element(By.CSS_SELECTOR, ".ll-scroll")  # the visible part of the wide canvas
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    tooltip = lens.find_element(By.CSS_SELECTOR, ".ll-tooltip")
    for column in range(1, 8):  # several hovers, so the timings are more than one sample
        _hover(driver, canvas, (column + 0.5) * cell_width, 18 * 1.5)  # the top row: the last read-out
    text = _wait("the tooltip", lambda: tooltip.is_displayed() and tooltip.text, timeout=5)
    assert "29_post" in text and "position 7" in text and "top-1 probability" in text, text
    assert len(tooltip.find_elements(By.CSS_SELECTOR, "tr")) == 10  # the top-10

    # Far along the prompt: its top-k was not in the frame, and comes through the widget's channel when in sight.
    driver.execute_script("arguments[0].scrollLeft = 250 * arguments[1]", canvas, cell_width)
    _hover(driver, canvas, 5.5 * cell_width, 18 * 1.5)
    _hover(driver, canvas, 6.5 * cell_width, 18 * 1.5)
    _wait("the top-k of position 256", lambda: "position 256" in tooltip.text and "loading" not in tooltip.text, 10)
    assert len(tooltip.find_elements(By.CSS_SELECTOR, "tr")) == 10
    driver.execute_script("arguments[0].scrollLeft = 0", canvas)

    _click_at(driver, canvas, 3.5 * cell_width, 18 * 1.5)
    popup = lens.find_element(By.CSS_SELECTOR, ".ll-popup")
    _wait("the clicked cell's top-k list", lambda: len(popup.find_elements(By.CSS_SELECTOR, ".ll-topk li")) == 10, 5)
    assert "29_post · position 3" in popup.text

    pin = popup.find_element(By.CSS_SELECTOR, ".ll-pin")
    token = pin.text
    pin.click()

    def exact_line():
        lines = lens.find_elements(By.CSS_SELECTOR, ".ll-chart path.ll-pin-line")
        exact = [p for p in lines if not p.get_attribute("stroke-dasharray")]
        return exact[0] if exact else None

    line = _wait("the pinned token's line from the kernel", exact_line, timeout=30)
    assert line.get_attribute("data-label") == f"{token} @3"
    assert line.get_attribute("d").count("L") == 30  # 31 read-outs, no gaps
    shot = _shoot(driver, lens, "widgets_lens.png", tmp_path)
    inked, colours = _ink(shot)
    assert inked > 0.1 and colours > 50, f"{shot.name}: {inked:.0%} inked, {colours} colours"

    # ---------------------------------------------------------------- attention: hover, thumbnails, text
    heatmap = attention.find_element(By.CSS_SELECTOR, "canvas.ll-att-canvas")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", heatmap)
    labels = float(heatmap.get_attribute("data-labels"))
    size = (float(heatmap.get_attribute("style").split("width:")[1].split("px")[0]) - labels) / 25
    _hover(driver, heatmap, labels + 2.5 * size, labels + 6.5 * size)
    tip = attention.find_element(By.CSS_SELECTOR, ".ll-tooltip")
    text = _wait("the attention tooltip", lambda: tip.is_displayed() and tip.text, timeout=5)
    assert text.startswith("query 6") and "key 2" in text and "weight" in text, text
    attention.find_element(By.CSS_SELECTOR, ".ll-thumb[data-layer='1'][data-head='2']").click()
    title = attention.find_element(By.CSS_SELECTOR, ".ll-panel .ll-title")
    # Drawn from its thumbnail at once, then from the pattern the kernel sends (through the message channel).
    _wait("the opened head", lambda: title.text.startswith("layer 1, head 2") and "thumbnail" not in title.text, 10)
    span = attention.find_element(By.CSS_SELECTOR, ".ll-text span[data-pos='20']")
    _hover(driver, span, 3, 3)
    coloured = "return [...arguments[0].querySelectorAll('.ll-text span')].filter((s) => s.style.background).length"
    _wait("the text coloured by query 20", lambda: driver.execute_script(coloured, attention) > 3, timeout=5)
    _shoot(driver, attention, "widgets_attention.png", tmp_path)

    # ---------------------------------------------------------------- attention at 300 positions, 30 layers
    assert len(wide.find_elements(By.CSS_SELECTOR, ".ll-thumb")) == 30 * 4
    box = wide.find_element(By.CSS_SELECTOR, ".ll-text")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", box)
    spans = "return arguments[0].querySelectorAll('span[data-pos]')"
    width = "return [arguments[0].scrollWidth, arguments[0].clientWidth]"
    scroll_width, client_width = driver.execute_script(width, box)
    assert scroll_width <= client_width + 1, f"the text overflows: {scroll_width} px in {client_width}"
    assert 0 < len(driver.execute_script(spans, box)) < 300  # only the lines in sight (of 23)
    driver.execute_script("arguments[0].scrollTop = arguments[0].scrollHeight", box)
    _wait("the last lines", lambda: box.find_elements(By.CSS_SELECTOR, "span[data-pos='299']"), timeout=5)
    for position in (299, 295, 290):
        _hover(driver, box.find_element(By.CSS_SELECTOR, f"span[data-pos='{position}']"), 2, 2)
    marked = "return !!arguments[0].querySelector(\".ll-text span.ll-query[data-pos='290']\")"
    _wait("the text coloured by the hovered query 290", lambda: driver.execute_script(marked, wide), timeout=5)
    wide_title = wide.find_element(By.CSS_SELECTOR, ".ll-panel .ll-title")
    for layer, head in ((29, 3), (15, 2), (0, 1), (22, 0)):
        thumb = wide.find_element(By.CSS_SELECTOR, f".ll-thumb[data-layer='{layer}'][data-head='{head}']")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", thumb)
        thumb.click()
        opened = f"layer {layer}, head {head}"
        _wait("the opened head", lambda: wide_title.text.startswith(opened) and "thumbnail" not in wide_title.text, 10)
    _shoot(driver, wide, "widgets_attention_wide.png", tmp_path)

    # ---------------------------------------------------------------- comparison: one scale, a difference
    compare.find_element(By.CSS_SELECTOR, "input.ll-diff").click()
    legend = compare.find_element(By.CSS_SELECTOR, ".ll-legend-text")
    _wait("the difference legend", lambda: "panel 2 higher" in legend.text, timeout=10)
    assert len(compare.find_elements(By.CSS_SELECTOR, "canvas.ll-cells")) == 2
    _shoot(driver, compare, "widgets_compare.png", tmp_path)

    # ---------------------------------------------------------------- every metric and the CSV, with a target
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", lens)
    for metric in METRICS:
        _drive_metric(driver, lens, metric)
    # Keyboard: from the clicked cell (top row, position 3) Left moves the selection, Enter pins its top token.
    canvas = lens.find_element(By.CSS_SELECTOR, "canvas.ll-cells")
    canvas.send_keys(Keys.ARROW_LEFT)
    canvas.send_keys(Keys.ENTER)
    _wait("the pin made by Enter", lambda: " @2" in lens.find_element(By.CSS_SELECTOR, ".ll-chart").text, timeout=10)
    _fail_on_console_errors(driver)

    # ---------------------------------------------------------------- the timings, measured in the page
    timings = _timings(driver)
    report = {
        "lens": "30 layers (31 read-outs) x 300 positions, top-10",
        "hover_ms": timings["hover"],
        "click_ms": timings["click"],
        "pin_ms": timings["pin"],
        "open_head_ms": timings["open"],  # from the click to the full pattern drawn (kernel round trip included)
        "hover_frame_ms": timings.get("hover_frame", []),
        "attention": "30 layers x 4 heads x 300 positions (the open head timed on it and on the 25-token one)",
        "first_render_ms": timings["render"],
        "largest_websocket_frame_bytes": max(frames),
    }
    print("\nexplorer timings in Chromium:")
    for kind in ("hover", "hover_frame", "click", "pin", "open", "render", "draw"):
        if timings.get(kind):
            print(f"  {kind:11s} {_summary(timings[kind])}")
    print(f"  largest WebSocket frame: {max(frames):,} bytes")
    for folder in _screenshot_dir(tmp_path):
        (folder / "widget_timings.json").write_text(json.dumps(report, indent=1) + "\n")

    # ---------------------------------------------------------------- the dark theme
    driver.execute_script("window.jupyterapp.commands.execute('apputils:change-theme', {theme: 'JupyterLab Dark'})")

    def dark():
        colour = driver.execute_script("return getComputedStyle(arguments[0]).backgroundColor", lens)
        values = [int(v) for v in colour.replace("rgba(", "").replace("rgb(", "").rstrip(")").split(",")[:3]]
        return sum(values) < 200

    _wait("the dark theme on the lens", dark, timeout=20)
    time.sleep(1.0)  # the view redraws its canvases when JupyterLab marks the new theme on <body>
    shot = _shoot(driver, lens, "widgets_lens_dark.png", tmp_path)
    labels = lens.find_element(By.CSS_SELECTOR, "canvas.ll-rowlabels")
    label_png = tmp_path / "dark_labels.png"
    labels.screenshot(str(label_png))
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(label_png).convert("L"))
    assert (pixels > 160).mean() > 0.005, "the read-out labels are not drawn in the dark theme's light text"


def test_default_nbconvert_html_shows_every_widget_offline(chromium, tmp_path):
    """`jupyter nbconvert --to html --execute` with its defaults (widget state stored) shows a picture per widget
    with no network: the live view needs scripts from a CDN there, the static picture does not."""
    from selenium.webdriver.common.by import By

    env = os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "MPLBACKEND": "Agg",
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
    }
    command = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "html", "--execute", str(NOTEBOOK)]
    subprocess.run(command + ["--output-dir", str(tmp_path)], env=env, check=True, capture_output=True, timeout=600)
    page = tmp_path / "widgets_smoke.html"
    html = page.read_text()
    expected = _notebook_widget_count()
    assert html.count('class="llama-lens-static') == expected
    assert "application/vnd.jupyter.widget-state+json" in html  # the default: the live views' state is stored

    driver = chromium
    driver.get(page.as_uri())
    time.sleep(2)  # the widget manager's CDN script fails to load; nothing may hide the pictures
    images = driver.find_elements(By.CSS_SELECTOR, ".llama-lens-static img")
    assert len(images) == expected
    for index, image in enumerate(images):
        width, height = driver.execute_script(
            "const r = arguments[0].getBoundingClientRect(); return [arguments[0].naturalWidth, r.height]", image
        )
        assert image.is_displayed() and width > 200 and height > 50, f"picture {index}: {width} px wide, {height} high"
    _shoot(driver, images[0], "widgets_nbconvert_static.png", tmp_path)


def _drive_metric(driver, root, metric: str) -> None:
    """Chooses a colouring in the page, hovers a cell and clicks CSV: the heatmap stays, nothing throws."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(root.find_element(By.CSS_SELECTOR, "select.ll-metric")).select_by_value(metric)
    legend = root.find_element(By.CSS_SELECTOR, ".ll-legend-text")
    # Rank colourings wait for the kernel's ranks (a live page) or read the saved ones.
    # A live page asks the kernel for a metric's matrix it has not got ("loading…").
    _wait(f"the {metric} colouring", lambda: "ranking" not in legend.text and "loading" not in legend.text, 60)
    assert len(root.find_elements(By.CSS_SELECTOR, "canvas.ll-cells")) >= 1
    _hover(driver, root.find_element(By.CSS_SELECTOR, ".ll-scroll"), 10, 18 * 1.5)
    root.find_element(By.XPATH, ".//button[text()='CSV']").click()
    _fail_on_console_errors(driver)


def _fail_on_console_errors(driver) -> None:
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "favicon" not in e["message"]]
    assert not errors, errors


def test_saved_pages_in_every_mode_with_injected_prompts(chromium, tmp_path):
    from selenium.webdriver.common.by import By
    from support.models import char_model

    import llama_lens as ll

    model = char_model()
    driver = chromium
    for index, text in enumerate(INJECTIONS):
        for target in ("", "o"):  # the CSV with and without a target
            explorer = ll.widgets.LogitLensExplorer(model, "hi " + text, target=target)
            explorer.token = "h"
            page = explorer.save_html(tmp_path / f"lens{index}{target}.html")
            driver.get(page.as_uri())
            ready = ".ll-root[data-ready='1']"
            root = _wait("the saved page", lambda: driver.find_elements(By.CSS_SELECTOR, ready), timeout=10)
            assert driver.find_element(By.CSS_SELECTOR, "input.ll-prompt").get_attribute("value") == "hi " + text
            for metric in METRICS:
                _drive_metric(driver, root[0], metric)
                assert "not saved" not in root[0].find_element(By.CSS_SELECTOR, ".ll-legend-text").text
            assert driver.execute_script("return window.injected") is None


def test_saved_page_works_offline(chromium, tmp_path):
    from selenium.webdriver.common.by import By
    from support.models import char_model

    import llama_lens as ll

    explorer = ll.widgets.LogitLensExplorer(char_model(), "hello world", target="o")
    page = explorer.save_html(tmp_path / "lens.html")
    driver = chromium
    driver.get(page.as_uri())
    canvas = _wait("the saved page", lambda: driver.find_elements(By.CSS_SELECTOR, ".ll-scroll"), timeout=10)[0]
    _hover(driver, canvas, 2.5 * 36, 18 * 1.5)
    tooltip = driver.find_element(By.CSS_SELECTOR, ".ll-tooltip")
    assert "1_post" in _wait("the tooltip", lambda: tooltip.text, timeout=5)
    _click_at(driver, canvas, 2.5 * 36, 18 * 1.5)
    driver.find_element(By.CSS_SELECTOR, ".ll-popup .ll-pin").click()
    # No kernel: the line comes from the top-k lists (dashed, with gaps where the token drops out of them).
    line = _wait("the pinned line", lambda: driver.find_elements(By.CSS_SELECTOR, "path.ll-pin-line"), timeout=5)[0]
    assert line.get_attribute("stroke-dasharray") and line.get_attribute("d").startswith("M")
    assert driver.find_element(By.CSS_SELECTOR, "input.ll-prompt").get_attribute("disabled")
    assert not driver.find_element(By.CSS_SELECTOR, "select.ll-lens-kind").is_displayed()  # no tuned lens given
    # Each colour map repaints the cells: the first cell's colour (a corner, clear of its text) differs per map.
    from selenium.webdriver.support.ui import Select

    cells = driver.find_element(By.CSS_SELECTOR, "canvas.ll-cells")
    corner = (
        "const c = arguments[0], s = c.width / c.clientWidth;"
        "return Array.from(c.getContext('2d').getImageData(Math.round(3 * s), Math.round(21 * s), 1, 1).data);"
    )
    seen = {}
    for name in COLORMAPS:
        Select(driver.find_element(By.CSS_SELECTOR, "select.ll-colormap")).select_by_value(name)
        cells = driver.find_element(By.CSS_SELECTOR, "canvas.ll-cells")  # the redraw makes a new canvas
        seen[name] = tuple(driver.execute_script(corner, cells))
    assert len(set(seen.values())) == len(COLORMAPS), seen
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
