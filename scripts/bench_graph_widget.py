"""GraphExplorer on a real-model graph: payload size, build time, and the page's draw / hover / pin times.

The graph is scripts/bench_graph.py's: the embedded SmolLM2-135M-Instruct (float32), 30 random ReLU transcoders
of 2,304 latents calibrated to about 32 active features per token, the 11-token prompt, max_feature_nodes=1024.
The explorer is built without and with activating contexts (`--contexts N` prompts), then its page runs:

- in Node on the stand-in DOM of tests/widgets/view_harness.mjs (the view's own work: building the SVG
  elements and the tooltips, no layout or paint);
- with `--browser`, as a saved page in headless Chromium (/usr/bin/chromium), where the SVG is laid out and
  painted: first draw, hover (mouse moved onto nodes), pin (a click, which restyles the nodes) and the next frame.

Timings are measured, never asserted; the machine is shared, so the load average is printed beside them.

    LLAMA_LENS_HOME=... PYTHONPATH=. python scripts/bench_graph_widget.py [--contexts 32] [--browser] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "scripts" / "parity"))
HARNESS = ROOT / "tests" / "widgets" / "view_harness.mjs"
SENTENCES = [
    "The Eiffel Tower is located in the city of Paris.",
    "Berlin is the capital of Germany, and Rome is the capital of Italy.",
    "Mary and John went to the store; John gave a drink to Mary.",
    "The quick brown fox jumps over the lazy dog.",
    "In 1969, astronauts landed on the Moon for the first time.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "She opened the door and saw the garden covered in snow.",
    "The stock market fell sharply after the announcement.",
]


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def frame_kb(explorer) -> float:
    from ipywidgets.widgets.widget import _remove_buffers

    state, _, buffers = _remove_buffers(explorer.get_state())
    return (len(json.dumps(state, separators=(",", ":")).encode()) + sum(memoryview(b).nbytes for b in buffers)) / 1e3


def node_timings(explorer, folder: Path) -> dict:
    from llama_lens import widgets

    n = len(explorer.node_ids)
    steps = [{"dispatch": ["ll-gnode", (i * 7) % n, "mouseenter"]} for i in range(200)]
    steps += [{"dispatch": ["ll-gnode", (i * 11) % n, "click"]} for i in range(10)] + [{"report": "end"}]
    (folder / "state.json").write_text(json.dumps(explorer.page_state() | {"offline": True}))
    (folder / "script.json").write_text(json.dumps(steps))
    widgets_dir = Path(widgets.__file__).parent
    command = ["node", str(HARNESS), str(widgets_dir), "graph", str(folder / "state.json"), str(folder / "script.json")]
    out = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    if out["errors"]:
        raise SystemExit(f"the view failed: {out['errors']}")
    return out["timings"]


def browser_timings(explorer, folder: Path) -> dict:
    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    page = explorer.save_html(folder / "graph.html")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--window-size=1600,1200",
                 f"--user-data-dir={folder / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=options)
    try:
        start = time.perf_counter()
        driver.get(page.as_uri())
        while not driver.find_elements(By.CSS_SELECTOR, ".ll-root[data-ready='1']"):
            time.sleep(0.02)
        loaded = time.perf_counter() - start
        nodes = driver.find_elements(By.CSS_SELECTOR, ".ll-gnode")
        for node in nodes[:: max(1, len(nodes) // 60)]:
            ActionChains(driver).move_to_element(node).perform()
        for k in range(5):  # by index, in the page: a click may redraw
            driver.execute_script(
                "const all = document.querySelectorAll('.ll-gnode');"
                "all[arguments[0] % all.length].dispatchEvent(new MouseEvent('click', {bubbles: true}))",
                k * 13,
            )
        timings = driver.execute_script("return window.llamaLensTimings")
        # The paint after the last click: two animation frames after it.
        paint = driver.execute_async_script(
            "const done = arguments[0], t = performance.now();"
            "requestAnimationFrame(() => requestAnimationFrame(() => done(performance.now() - t)));"
        )
        return timings | {"page_load_s": [loaded], "frame_ms": [paint]}
    finally:
        driver.quit()


def summary(name: str, values: list[float]) -> str:
    values = sorted(values)
    return f"{name} median {statistics.median(values):.2f} ms, max {values[-1]:.2f} ms (n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--contexts", type=int, default=32, help="context prompts (sentences, repeated)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--browser", action="store_true")
    parser.add_argument("--keep", type=Path, help="a folder keeping the transcoders and the graph between runs")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from bench_graph import BATCH_SIZE, MAX_FEATURE_NODES, model_dir, prepare

    import llama_lens as ll

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        kept = args.keep or folder
        kept.mkdir(parents=True, exist_ok=True)
        model = ll.load(model_dir(), dtype=torch.float32, progress=False)
        if not (kept / "graph.pt").exists():
            tokens = prepare(kept / "set")
            start = time.perf_counter()
            graph = ll.attribution_graph(
                model, torch.tensor(tokens), ll.load_dictionary(kept / "set"), max_feature_nodes=MAX_FEATURE_NODES,
                batch_size=BATCH_SIZE,
            )  # fmt: skip
            print(f"{graph} in {time.perf_counter() - start:.1f} s (load {load()})")
            torch.save(graph, kept / "graph.pt")
        graph = torch.load(kept / "graph.pt", weights_only=False)
        transcoders = ll.load_dictionary(kept / "set")
        prompts = [SENTENCES[i % len(SENTENCES)] + f" ({i})" for i in range(args.contexts)]
        full = {"model": model, "transcoders": transcoders, "contexts": prompts}
        # Random transcoders explain little, so the default pruning (0.8) keeps no feature: 0.99 and 1.0 keep some.
        runs = [(0.8, "graph only", {}), (0.99, "read-outs", full | {"contexts": None}),
                (0.99, f"read-outs + {len(prompts)} contexts", full),
                (1.0, f"read-outs + {len(prompts)} contexts", full)]  # fmt: skip
        for threshold, label, options in runs:
            start = time.perf_counter()
            explorer = ll.widgets.GraphExplorer(graph, node_threshold=threshold, **options)
            took = time.perf_counter() - start
            meta = explorer.meta
            kinds = [n["kind"] for n in meta["nodes"]]
            print(
                f"node_threshold {threshold}, {label}: built in {took:.2f} s, payload "
                f"{len(json.dumps(meta)) / 1e3:.0f} kB, frame {frame_kb(explorer):.0f} kB; {kinds.count('feature')} "
                f"features, {len(kinds)} nodes, {len(meta['edges'])} edges (load {load()})"
            )
            if "contexts" not in label:
                continue
            timings = node_timings(explorer, folder)
            print(f"  Node stand-in DOM: draw {timings['draw'][0]:.0f} ms; {summary('hover', timings['hover'])}; "
                  f"{summary('pin', timings['click'])} (load {load()})")  # fmt: skip
            if args.browser:
                timings = browser_timings(explorer, folder)
                print(f"  Chromium (headless): page ready {timings['page_load_s'][0]:.2f} s, first draw "
                      f"{timings['draw'][0]:.0f} ms; {summary('hover', timings['hover'])}; "
                      f"{summary('pin', timings['click'])}; the next frame {timings['frame_ms'][0]:.0f} ms "
                      f"(load {load()})")  # fmt: skip


if __name__ == "__main__":
    main()
