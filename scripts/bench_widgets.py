"""Widget frame sizes and first-picture time on the embedded model at a given prompt length (default 300 tokens).

For the LogitLensExplorer and the AttentionExplorer it prints:

  frame        the synced state a notebook sends the page when the explorer is shown: its JSON and its binary
               buffers (ipywidgets' `get_state`), as the kernel puts them on the wire
  static       the static picture's display bundle (the PNG inside HTML, shown where the live view cannot run)
  ready        seconds from the call to the explorer until its first frame is ready to send (the model run and
               the frame's making), and the model run's own seconds; `after run` is their difference, the part
               of the first picture that is the widget's

and a notebook figure: `--notebook N` explorers (half lens, half attention, the states measured above), saved as
JupyterLab saves a notebook with its widget state, exported by nbconvert's default HTML exporter; the HTML size.

The machine is shared: run it alone if you can, and read the load average it prints beside the figures.

Usage: python scripts/bench_widgets.py [PATH] [--tokens 300] [--notebook 25] [--attention-layers 1]
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


def notebook_html_bytes(explorers: list, n: int) -> int:
    """HTML bytes of a notebook of `n` explorers (cycling through `explorers`), its widget state saved."""
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
    parser.add_argument("--attention-layers", type=int, default=1, help="layers the attention explorer shows")
    args = parser.parse_args()

    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    model = ll.load(args.path or ll.demo_model_path(), progress=False)
    prompt = prompt_of(model, args.tokens)
    n = model.to_tokens(prompt).shape[1]
    print(f"{model.cfg.n_layers} layers, prompt of {n} tokens")

    started = time.perf_counter()
    ll.logit_lens(model, prompt)
    run_seconds = time.perf_counter() - started
    print(f"{'logit_lens alone (the model run)':<34} {run_seconds:5.2f} s")

    lens, lens_row = measure("LogitLensExplorer", lambda: widgets.LogitLensExplorer(model, prompt, threaded=False))
    print(f"{'':<34} after the run: {lens_row['ready_s'] - run_seconds:5.2f} s")
    lens.target = " Paris"  # a target adds its probabilities (and ranks when coloured by rank)
    json_bytes, buffer_bytes = frame_bytes(lens)
    print(f"{'  with target Paris':<34} frame {(json_bytes + buffer_bytes) / MB:6.3f} MB")
    lens.metric = "target_rank"
    json_bytes, buffer_bytes = frame_bytes(lens)
    print(f"{'  coloured by target rank':<34} frame {(json_bytes + buffer_bytes) / MB:6.3f} MB")
    lens.metric, lens.target = "prob", ""

    layers = list(range(args.attention_layers))
    attention, _ = measure(
        f"AttentionExplorer ({len(layers)} layer)",
        lambda: widgets.AttentionExplorer(model, prompt, layers=layers, threaded=False),
    )
    if args.notebook:
        size = notebook_html_bytes([lens, attention], args.notebook)
        print(f"notebook of {args.notebook} explorers (nbconvert HTML, widget state saved): {size / MB:.2f} MB")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
