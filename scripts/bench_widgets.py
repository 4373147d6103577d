"""Widget frame sizes and first-picture time on the embedded model at a given prompt length (default 300 tokens).

For the LogitLensExplorer and the AttentionExplorer it prints:

  frame        the synced state a notebook sends the page when the explorer is shown: its JSON and its binary
               buffers (ipywidgets' `get_state`), as the kernel puts them on the wire (the lens's page asks for
               the top-k of further positions and other metrics later; its whole panel, as a saved page holds
               it, is printed beside)
  static       the static picture's display bundle (the PNG inside HTML, shown where the live view cannot run)
  ready        seconds from the call to the explorer until its first frame is ready to send (the model run and
               the frame's making), and for the lens the model run's own seconds and the rest (the frame's
               making), the part of the first picture that is the widget's before the page draws it

The attention explorer is measured showing one layer and showing every layer (its frame holds every shown
head's thumbnail; the page asks for an opened head's pattern, whose answer is timed; `patterns`, what a saved page
carries, is printed beside).

and a notebook figure: `--notebook N` explorers (half lens, half attention, the states measured above), saved as
JupyterLab saves a notebook, without and with its widget state, exported by nbconvert's default HTML exporter:
the HTML size; with the widget state, once with one-layer and once with every-layer attention explorers.

The machine is shared: run it alone if you can, and read the load average it prints beside the figures.

Usage: python scripts/bench_widgets.py [PATH] [--tokens 300] [--notebook 25]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import llama_lens as ll
from llama_lens import widgets

MB = 1e6


def prompt_of(model, n_tokens: int) -> str:
    """A text of about `n_tokens` tokens (BOS included): prose, repeated, cut at a token boundary."""
    base = (
        "The Eiffel Tower is in Paris, the capital of France. Berlin is the capital of Germany, and Rome is the "
        "capital of Italy. Mary and John went to the store; John gave a drink to Mary. "
    )
    ids = model.to_tokens(base * (n_tokens // 20 + 2), prepend_bos=False)[0, : n_tokens - 1]
    return model.to_string(ids)


def frame_bytes(explorer) -> tuple[int, int]:
    """(JSON bytes, binary buffer bytes) of the state the kernel sends when the explorer is shown."""
    from ipywidgets.widgets.widget import _remove_buffers

    state, _, buffers = _remove_buffers(explorer.get_state())
    return len(json.dumps(state, separators=(",", ":")).encode()), sum(memoryview(b).nbytes for b in buffers)


def measure(name: str, make) -> tuple[object, dict]:
    started = time.perf_counter()
    explorer = make()
    ready = time.perf_counter() - started
    json_bytes, buffer_bytes = frame_bytes(explorer)
    static = len(json.dumps(explorer.static_bundle()).encode())
    row = {"frame_json": json_bytes, "frame_buffers": buffer_bytes, "static": static, "ready_s": ready}
    print(
        f"{name:<34} frame {(json_bytes + buffer_bytes) / MB:6.3f} MB (json {json_bytes / MB:.3f}, buffers "
        f"{buffer_bytes / MB:.3f})   static {static / MB:.3f} MB   ready {ready:5.2f} s",
        flush=True,
    )
    return explorer, row


def notebook_html_bytes(explorers: list, n: int, *, with_state: bool) -> int:
    """HTML bytes of a notebook of `n` explorers (cycling through `explorers`), with their widget state saved
    (JupyterLab's "Save Widget State Automatically") or without (its default: the static pictures only)."""
    import nbformat
    from ipywidgets.widgets.widget import _remove_buffers
    from nbconvert import HTMLExporter

    cells, widget_state = [], {}
    for i in range(n):
        explorer = explorers[i % len(explorers)]
        model_id = f"{i:032x}"
        state, paths, buffers = _remove_buffers(explorer.get_state())
        import base64

        widget_state[model_id] = {
            "model_name": explorer._model_name,
            "model_module": explorer._model_module,
            "model_module_version": explorer._model_module_version,
            "state": state,
            "buffers": [
                {"path": path, "encoding": "base64", "data": base64.b64encode(memoryview(b).tobytes()).decode()}
                for path, b in zip(paths, buffers)
            ],
        }
        view = {
            "application/vnd.jupyter.widget-view+json": {"version_major": 2, "version_minor": 0, "model_id": model_id}
        }
        outputs = [
            nbformat.v4.new_output("display_data", data=view | {"text/plain": type(explorer).__name__}),
            nbformat.v4.new_output("display_data", data=explorer.static_bundle()),
        ]
        cells.append(nbformat.v4.new_code_cell(f"explorer_{i}", outputs=outputs, execution_count=i + 1))
    notebook = nbformat.v4.new_notebook(cells=cells)
    if with_state:
        notebook.metadata["widgets"] = {
            "application/vnd.jupyter.widget-state+json": {"version_major": 2, "version_minor": 0, "state": widget_state}
        }
    body, _ = HTMLExporter().from_notebook_node(notebook)
    return len(body.encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", default=None)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--notebook", type=int, default=25, help="explorers in the exported notebook (0: skip)")
    args = parser.parse_args()

    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    model = ll.load(args.path or ll.demo_model_path(), progress=False)
    prompt = prompt_of(model, args.tokens)
    n = model.to_tokens(prompt).shape[1]
    print(f"{model.cfg.n_layers} layers, prompt of {n} tokens")

    lens, lens_row = measure("LogitLensExplorer", lambda: widgets.LogitLensExplorer(model, prompt, threaded=False))
    run_seconds = lens.runs[0].seconds  # the model run and the lens, inside the explorer
    print(
        f"{'':<34} of which the model run and lens: {run_seconds:5.2f} s; "
        f"the rest: {lens_row['ready_s'] - run_seconds:5.2f} s"
    )
    whole = len(json.dumps(lens.full_panel(), separators=(",", ":")).encode())
    print(f"{'  its panel as a saved page has it':<34} {whole / MB:6.3f} MB (every top-k and metric; the frame asks)")
    lens.target = " Paris"  # a target adds its probabilities (and ranks when coloured by rank)
    json_bytes, buffer_bytes = frame_bytes(lens)
    print(f"{'  with target Paris':<34} frame {(json_bytes + buffer_bytes) / MB:6.3f} MB")
    lens.metric = "target_rank"
    json_bytes, buffer_bytes = frame_bytes(lens)
    print(f"{'  coloured by target rank':<34} frame {(json_bytes + buffer_bytes) / MB:6.3f} MB")
    lens.metric, lens.target = "prob", ""

    attention, _ = measure(
        "AttentionExplorer (1 layer)", lambda: widgets.AttentionExplorer(model, prompt, threaded=False)
    )
    every = list(model.layer_indices)
    wide, _ = measure(
        f"AttentionExplorer ({len(every)} layers)",
        lambda: widgets.AttentionExplorer(model, prompt, layers=every, threaded=False),
    )
    print(f"{'  its patterns as a saved page has them':<34} {len(wide.patterns) * 4 / 3 / MB:6.3f} MB (base64)")
    request = {"want": "head", "layer": every[-1], "head": model.cfg.n_heads - 1, "run": wide.meta["run"]}
    started = time.perf_counter()
    _, buffers = wide.answer(request)
    seconds = time.perf_counter() - started
    print(f"{'  opening a head, the kernel answers':<34} {seconds * 1e3:6.1f} ms ({len(buffers[0]) / MB:.3f} MB)")
    if args.notebook:
        for with_state in (False, True):
            size = notebook_html_bytes([lens, attention], args.notebook, with_state=with_state)
            saved = "widget state saved" if with_state else "no widget state (JupyterLab's default)"
            print(f"notebook of {args.notebook} explorers, nbconvert HTML, {saved}: {size / MB:.2f} MB")
        size = notebook_html_bytes([lens, wide], args.notebook, with_state=True)
        print(
            f"notebook of {args.notebook} explorers, every attention explorer showing {len(every)} layers, "
            f"widget state saved: {size / MB:.2f} MB"
        )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
