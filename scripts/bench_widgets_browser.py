"""The explorers' figures in a real browser, on the embedded model (SmolLM2-135M, 30 layers) at 300 tokens.

Writes each explorer's standalone page (`save_html`, nothing fetched) with a prompt that carries script-injection
text, opens it in headless Chromium (tests/support/chromium.py) and drives it: hovers over heatmap cells and over
the prompt's tokens, opens heads, clicks cells. It prints the page's own timings (window.llamaLensTimings, in
milliseconds: `draw` the whole view drawn, `hover` the event's handling, `hover_frame` a hover to the next frame
drawn, `open` a head opened and drawn at full resolution) and the console's errors (there should be none).

A saved page holds every head's pattern, so opening a head there is the page's work only; in a notebook the
kernel sends the pattern first (scripts/bench_widgets.py prints the kernel's part). The first picture after the
model run is the kernel's frame (bench_widgets.py's "the rest") plus the page's first `draw` here.

The machine is shared: read the load average printed beside the figures.

Usage: PYTHONPATH=.:tests python scripts/bench_widgets_browser.py [--tokens 300] [--no-lens] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import llama_lens as ll
from llama_lens import widgets

INJECTION = ' <!--<script>alert(1)</script> "</script><img src=x onerror=alert(2)> '


def prompt_of(model, n_tokens: int) -> str:
    base = (
        "The Eiffel Tower is in Paris, the capital of France." + INJECTION + "Berlin is the capital of Germany, and "
        "Rome is the capital of Italy. Mary and John went to the store; John gave a drink to Mary. "
    )
    ids = model.to_tokens(base * (n_tokens // 20 + 2), prepend_bos=False)[0, : n_tokens - 1]
    return model.to_string(ids)


def summary(values: list[float]) -> str:
    if not values:
        return "n=0"
    ordered = sorted(values)
    return f"n={len(values):3d}  median {ordered[len(values) // 2]:7.1f}  max {ordered[-1]:7.1f}"


def hover(driver, element, x: float, y: float) -> None:
    """The pointer to (x, y) px from the element's top-left corner, in window coordinates (Selenium's element
    offsets are from the centre of its part in sight, which a heatmap larger than the window moves)."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    # Into sight first when the point is not (the pointer cannot leave the window); a scroll only then, so most
    # hovers find the page as the previous one left it.
    left, top = driver.execute_script(
        "const e = arguments[0], r = e.getBoundingClientRect(), y = r.top + arguments[1];"
        "if (y < 0 || y > window.innerHeight - 20 || r.left + arguments[2] > window.innerWidth) {"
        "  e.scrollIntoView({block: 'start', inline: 'start'}); }"
        "const s = e.getBoundingClientRect(); return [s.left, s.top]",
        element,
        y,
        x,
    )
    actions = ActionBuilder(driver)
    actions.pointer_action.move_to_location(int(left + x), int(top + y))
    actions.perform()


def drive_attention(driver, n_layers: int, n_heads: int) -> None:
    from selenium.webdriver.common.by import By

    heatmap = driver.find_element(By.CSS_SELECTOR, "canvas.ll-att-canvas")
    for i in range(24):  # cells down the diagonal and across the first rows
        hover(driver, heatmap, 70 + (3 + 7 * i) * 10 % 580 + 5, 70 + (5 + 11 * i) * 10 % 580 + 5)
    for i in range(10):  # heads across the layers
        layer, head = (3 * i) % n_layers, (2 * i + 1) % n_heads
        driver.find_element(By.CSS_SELECTOR, f".ll-thumb[data-layer='{layer}'][data-head='{head}']").click()
        time.sleep(0.2)
    for position in (3, 10, 20, 30, 40, 50):
        spans = driver.find_elements(By.CSS_SELECTOR, f".ll-text span[data-pos='{position}']")
        if spans:
            hover(driver, spans[0], 2, 2)
    for name in ("CSV", "SVG", "PNG"):
        driver.find_element(By.XPATH, f"//button[text()='{name}']").click()


def drive_lens(driver) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    canvas = driver.find_element(By.CSS_SELECTOR, "canvas.ll-cells")
    for i in range(24):
        hover(driver, canvas, (i % 20 + 0.5) * 36, (1 + (i * 7) % 28 + 0.5) * 18)
    for i in range(4):
        hover(driver, canvas, (i + 0.5) * 36, 1.5 * 18)
        ActionChains(driver).click().perform()
    for name in ("CSV", "SVG", "PNG"):
        driver.find_element(By.XPATH, f"//button[text()='{name}']").click()


def run_page(page: Path, profile: Path, drive) -> tuple[dict, list]:
    from support.chromium import console_errors, saved_page_in_chromium

    started = time.perf_counter()
    with saved_page_in_chromium(page, profile) as driver:
        loaded = time.perf_counter() - started
        drive(driver)
        time.sleep(0.5)  # the last frames
        timings = driver.execute_script("return window.llamaLensTimings || {}")
        errors = console_errors(driver)
    timings["page_ready_s"] = [loaded]
    return timings, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--no-lens", action="store_true", help="skip the lens (its model run is the slow part)")
    parser.add_argument("--out", default=None, help="folder for the pages (default: a temporary one)")
    args = parser.parse_args()
    os.environ["SE_OFFLINE"] = "true"
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    model = ll.load(ll.demo_model_path(), progress=False)
    prompt = prompt_of(model, args.tokens)
    folder = Path(args.out or tempfile.mkdtemp(prefix="bench_widgets_browser_"))
    folder.mkdir(parents=True, exist_ok=True)
    every = list(model.layer_indices)
    print(f"{model.cfg.n_layers} layers, prompt of {model.to_tokens(prompt).shape[1]} tokens; pages in {folder}")

    results = {}
    attention = widgets.AttentionExplorer(model, prompt, layers=every, threaded=False)
    page = attention.save_html(folder / "attention.html")
    print(f"attention page ({len(every)} layers): {page.stat().st_size / 1e6:.1f} MB")
    results["attention"] = run_page(page, folder / "profile_attention",
                                    lambda d: drive_attention(d, len(every), model.cfg.n_heads))  # fmt: skip
    if not args.no_lens:
        lens = widgets.LogitLensExplorer(model, prompt, threaded=False)
        page = lens.save_html(folder / "lens.html")
        print(f"lens page: {page.stat().st_size / 1e6:.1f} MB")
        results["lens"] = run_page(page, folder / "profile_lens", drive_lens)
    for name, (timings, errors) in results.items():
        print(f"{name}: console errors {len(errors)}{': ' + json.dumps(errors)[:400] if errors else ''}")
        for kind in ("page_ready_s", "draw", "hover", "hover_frame", "open", "open_thumb", "click", "grid"):
            if kind in timings:
                unit = "s " if kind.endswith("_s") else "ms"
                print(f"  {kind:<12} {summary(timings[kind])} {unit}")
    (folder / "timings.json").write_text(json.dumps({k: v[0] for k, v in results.items()}, indent=1))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
