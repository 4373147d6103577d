"""notebooks/widgets_smoke.ipynb run in real JupyterLab, in headless Chromium, with the widgets screenshotted.

Needs the Debian packages `chromium` and `chromium-driver` (skipped without them) and the `selenium` and
`jupyterlab` packages. Nothing is downloaded: Selenium gets the driver's path, so its driver manager stays
idle, and Chromium runs with its background networking off. Screenshots go to the test's tmp_path, and also
to $LLAMA_LENS_SCREENSHOTS when that is set.
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
NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "widgets_smoke.ipynb"
REPO_ROOT = NOTEBOOK.parent.parent
TOKEN = "llama-lens-browser-test"

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
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(what: str, condition, timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _ink(png: Path) -> tuple[float, int]:
    """Share of pixels that are not near-white, and the number of distinct colours."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    inked = float((pixels.min(axis=1) < 230).mean())
    return inked, len(np.unique(pixels, axis=0))


def _shown_png(driver, image) -> bytes:
    """The PNG bytes an <img> shows, read back from its src (ipywidgets gives the Image a blob: URL)."""
    import base64

    data_url = driver.execute_async_script(
        "const [img, done] = arguments;"
        "fetch(img.src).then(r => r.blob()).then(blob => {"
        "  const reader = new FileReader(); reader.onload = () => done(reader.result); reader.readAsDataURL(blob);"
        "}).catch(error => done('error: ' + error));",
        image,
    )
    assert data_url.startswith("data:image/png;base64,"), data_url[:200]
    return base64.b64decode(data_url.split(",", 1)[1])


def _cell_colours(png: bytes, size: int = 6, min_chroma: int = 16) -> int:
    """Distinct colours, greys left out, that fill a size x size block of identical pixels: the heatmap cells.

    Text, antialiased edges and the colour bar (a pixel or two per shade) make no such block, so a heatmap
    drawn in one flat colour counts 1 however much else the picture holds.
    """
    import io

    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int64)
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    height, width = packed.shape
    corner = packed[: height - size + 1, : width - size + 1]
    solid = np.ones(corner.shape, dtype=bool)
    for dy in range(size):
        for dx in range(size):
            solid &= packed[dy : dy + corner.shape[0], dx : dx + corner.shape[1]] == corner
    colours = np.unique(corner[solid])
    channels = np.stack([(colours >> 16) & 255, (colours >> 8) & 255, colours & 255], axis=-1)
    return int((channels.max(axis=-1) - channels.min(axis=-1) > min_chroma).sum())


def _assert_varied_heatmap(driver, image, what: str) -> None:
    png = _shown_png(driver, image)
    cells = _cell_colours(png)
    assert cells >= 8, f"{what}: the heatmap has {cells} cell colour(s); a flat heatmap has 1"


def _changed(first: Path, second: Path) -> float:
    """Share of pixels that differ between two screenshots of the same size."""
    import numpy as np
    from PIL import Image

    a, b = (np.asarray(Image.open(p).convert("RGB")).astype(int) for p in (first, second))
    if a.shape != b.shape:
        return 1.0
    return float((np.abs(a - b).sum(axis=-1) > 30).mean())


def test_widgets_render_in_jupyterlab(jupyter_lab, chromium, tmp_path):
    from selenium.webdriver.common.by import By

    driver = chromium
    driver.get(f"{jupyter_lab}/lab/tree/smoke.ipynb?token={TOKEN}")
    _wait(
        "the notebook's kernel",
        lambda: driver.execute_script(
            "const app = window.jupyterapp; const widget = app && app.shell.currentWidget;"
            "return !!(widget && widget.sessionContext && widget.sessionContext.session"
            " && widget.sessionContext.session.kernel && widget.content && widget.content.widgets.length);"
        ),
        timeout=90,
    )
    driver.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")

    expected = _notebook_widget_count()
    selector = ".jp-OutputArea-output img.widget-image"

    def rendered():
        stderr = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
        errors = driver.find_elements(By.CSS_SELECTOR, stderr)
        tracebacks = [e.text for e in errors if "Error" in e.text or "Traceback" in e.text]
        if tracebacks:
            pytest.fail("a cell raised:\n" + "\n".join(tracebacks)[-3000:])
        images = driver.find_elements(By.CSS_SELECTOR, selector)
        loaded = [img for img in images if driver.execute_script("return arguments[0].naturalWidth", img) > 0]
        return loaded if len(loaded) >= expected else None

    images = _wait(f"{expected} rendered widget images", rendered, timeout=180)

    shots = []
    for index, image in enumerate(images):
        width, height = driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
        assert width >= 300 and height >= 200, f"widget image {index} is {width}x{height}"
        widget = image.find_element(By.XPATH, "./ancestor::div[contains(@class, 'widget-vbox')][1]")
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", widget)
        time.sleep(0.3)
        shot = tmp_path / f"widget_{index}.png"
        widget.screenshot(str(shot))
        shots.append(shot)
        inked, colours = _ink(shot)
        # A heatmap fills much of the picture with many shades; a blank or broken image does not.
        assert inked > 0.15, f"{shot.name}: only {inked:.0%} of pixels are not white"
        assert colours > 50, f"{shot.name}: only {colours} distinct colours"
        _assert_varied_heatmap(driver, image, f"widget image {index}")
    # A change made in the browser reaches the kernel and comes back as a new picture: tick "scores".
    first = images[0]
    widget = first.find_element(By.XPATH, "./ancestor::div[contains(@class, 'widget-vbox')][1]")
    before = first.get_attribute("src")
    checkbox = widget.find_element(
        By.XPATH, ".//div[contains(@class, 'widget-checkbox')][.//*[contains(text(), 'scores')]]//input"
    )
    driver.execute_script("arguments[0].click()", checkbox)
    _wait("the redrawn attention scores", lambda: first.get_attribute("src") != before, timeout=60)
    _assert_varied_heatmap(driver, first, "the attention scores")
    # The loop above left the last widget in view; an element screenshot of one out of view catches whatever
    # is on screen at its place.
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", widget)
    time.sleep(0.3)
    shot = tmp_path / "widget_0_scores.png"
    widget.screenshot(str(shot))
    shots.append(shot)
    assert _changed(shots[0], shot) > 0.05, "ticking 'scores' did not change the picture"

    # Typing a new prompt into the lens explorer (Enter submits it) recomputes the lens.
    if len(images) > 1:
        from selenium.webdriver.common.keys import Keys

        lens_image = images[1]
        lens_widget = lens_image.find_element(By.XPATH, "./ancestor::div[contains(@class, 'widget-vbox')][1]")
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", lens_widget)
        before = lens_image.get_attribute("src")
        prompt_box = lens_widget.find_element(By.CSS_SELECTOR, ".widget-text input")
        prompt_box.send_keys(Keys.CONTROL, "a")
        prompt_box.send_keys("abc" + Keys.ENTER)
        _wait("the recomputed lens", lambda: lens_image.get_attribute("src") != before, timeout=60)
        status = lens_widget.find_element(By.XPATH, ".//*[contains(text(), 'tokens,')]").text
        assert status.startswith("4 tokens"), status
        _assert_varied_heatmap(driver, lens_image, "the recomputed lens")

    page = tmp_path / "jupyterlab.png"
    driver.save_screenshot(str(page))
    shots.append(page)

    keep = os.environ.get("LLAMA_LENS_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for shot in shots:
            shutil.copy(shot, Path(keep) / shot.name)
