"""llama_lens beside transformers, TransformerLens and nnsight on the same checkpoint (fp32, CPU).

Each tool runs in a fresh Python process, on the embedded SmolLM2-135M-Instruct (or PATH), and reports:

  import     seconds to import the tool (torch already imported)
  load       seconds to open the checkpoint into a model (page cache warm)
  peak/w     peak RSS growth during the load ÷ the model's float32 weight bytes
  lens       seconds for a logit lens over every layer's resid_post at every position of the prompt (norm →
             unembedding → top-5), median of --repeats runs, for the short prompt and a ~500-token one
  top-1      the last layer's top token at the last position (all tools must agree)
  meta       whether the tool opens a Meta copy of the same weights (consolidated.00.pth + params.json),
             written by this script with llama_lens.testing

Each tool does the lens its own documented way: llama_lens `ll.logit_lens` (which also computes entropy, KL
to the final layer and the target's rank), transformers `output_hidden_states` + norm + lm_head + softmax,
TransformerLens 4 `TransformerBridge.boot_transformers` + `run_with_cache` + `accumulated_resid(apply_ln=True)`
+ `unembed`, nnsight `LanguageModel.trace` saving `lm_head(norm(layer.output))` per layer. A tool that is not
installed is skipped; install them beside llama_lens with `pip install transformer_lens nnsight`.

Usage: python scripts/bench_compare.py [PATH] [--repeats 5] [--tools llama_lens transformers ...]
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

REPO = Path(__file__).resolve().parent.parent
TOOLS = ("llama_lens", "transformers", "transformer_lens", "nnsight")
PROMPT = "The Eiffel Tower is located in the city of"
LONG_PROMPT = (
    "The logit lens reads the residual stream of a transformer after every layer through the final norm and the "
    "unembedding, as if the model stopped there. Researchers use it to see when a prediction forms. "
) * 14  # about 500 tokens


# ------------------------------------------------------------------------------------------ measurement
def _peak_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_peak_rss() -> int:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS (Linux)
    return _peak_rss()


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def child(tool: str, path: str, meta_path: str, repeats: int) -> dict:
    """Runs in a fresh process: one tool's import, load, lens and Meta attempt."""
    import torch

    torch.set_grad_enabled(False)
    with torch.device("meta"):
        torch.nn.Embedding(2, 2)  # normal_ on the meta device imports sympy (transformers' loaders do it); paid
        # before every tool's timings and baseline alike
    start = time.perf_counter()
    loader = {"llama_lens": _llama_lens, "transformers": _transformers, "transformer_lens": _transformer_lens,
              "nnsight": _nnsight}[tool]()  # fmt: skip
    import_seconds = time.perf_counter() - start

    baseline = _reset_peak_rss()
    start = time.perf_counter()
    model, lens = loader(path)
    load_seconds = time.perf_counter() - start
    peak_growth = _peak_rss() - baseline
    weights = sum(p.numel() * 4 for p in {id(p): p for p in model_parameters(model)}.values())

    top1 = lens(PROMPT)
    result = {
        "tool": tool, "import": import_seconds, "load": load_seconds, "peak_growth": peak_growth,
        "weight_bytes": weights, "top1": top1,
        "lens_short": _median_seconds(lambda: lens(PROMPT), repeats),
        "lens_long": _median_seconds(lambda: lens(LONG_PROMPT), max(1, repeats // 2)),
    }  # fmt: skip
    try:
        loader(meta_path)
        result["meta"] = "yes"
    except Exception as err:  # what the tool says when it cannot open the folder
        result["meta"] = f"no ({type(err).__name__}: {str(err).splitlines()[0][:70]})"
    return result


def model_parameters(model):
    return getattr(model, "_model", model).parameters()  # nnsight wraps the torch module in an Envoy


def _llama_lens():
    import llama_lens as ll

    def load(path):
        model = ll.load(path, dtype="float32", progress=False)

        def lens(prompt):
            result = ll.logit_lens(model, prompt, readout="resid_post")
            return result.top_strs[0][-1][-1][0]

        return model, lens

    return load


def _transformers():
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    def load(path):
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)

        def lens(prompt):
            tokens = tokenizer(prompt, return_tensors="pt").input_ids
            hidden = model(tokens, output_hidden_states=True, use_cache=False).hidden_states
            # hidden_states[-1] is already normed: transformers applies the final norm before returning it.
            tops = [torch.softmax(model.lm_head(h if i == len(hidden) - 1 else model.model.norm(h)), -1).topk(5)
                    for i, h in enumerate(hidden[1:], start=1)]  # fmt: skip
            return tokenizer.decode(tops[-1].indices[0, -1, 0])

        return model, lens

    return load


def _transformer_lens():
    import torch
    from transformer_lens import TransformerBridge

    def load(path):
        model = TransformerBridge.boot_transformers(path, dtype=torch.float32, device="cpu")

        def keep(name: str) -> bool:
            return name.endswith(("hook_resid_pre", "hook_resid_post")) or name == "ln_final.hook_scale"

        def lens(prompt):
            _, cache = model.run_with_cache(model.to_tokens(prompt), names_filter=keep)
            probs = model.unembed(cache.accumulated_resid(apply_ln=True)[1:]).softmax(-1)
            return model.to_string(probs.topk(5).indices[-1, 0, -1, :1])

        return model, lens

    return load


def _nnsight():
    import torch
    from nnsight import LanguageModel

    def load(path):
        model = LanguageModel(path, device_map="cpu", dispatch=True, dtype=torch.float32)

        def lens(prompt):
            tops = []  # defined outside: nnsight compiles the body of the `with` block on its own
            with model.trace(prompt):
                for layer in model.model.layers:
                    out = layer.output
                    resid = out[0] if isinstance(out, tuple) else out
                    tops.append(model.lm_head(model.model.norm(resid)).softmax(-1).topk(5).indices.save())
            return model.tokenizer.decode(tops[-1][0, -1, 0])

        return model, lens

    return load


# ------------------------------------------------------------------------------------------------ parent
def write_meta_copy(path: str, folder: str) -> str:
    """The same weights in Meta's layout (consolidated.00.pth + params.json + the tokenizer)."""
    import shutil

    import torch

    import llama_lens as ll
    from llama_lens.testing import write_meta_checkpoint

    model = ll.load(path, dtype=torch.bfloat16, progress=False)
    write_meta_checkpoint(folder, model.cfg, model.state_dict())
    shutil.copy(Path(path) / "tokenizer.json", folder)
    return folder


def run_child(tool: str, path: str, meta_path: str, repeats: int) -> dict:
    code = (
        f"import json, sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'scripts')!r}]; import bench_compare; "
        f"print('RESULT', json.dumps(bench_compare.child(*json.loads(sys.argv[1]))))"
    )
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", code, json.dumps([tool, path, meta_path, repeats])],
                          capture_output=True, text=True, env=env)  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        return {"tool": tool, "error": (done.stderr.strip().splitlines() or ["failed"])[-1][:150]}
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", help="HF checkpoint folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    args = parser.parse_args()
    import importlib.util

    import torch

    import llama_lens as ll

    path = args.path or str(ll.demo_model_path())
    print(f"model: {path}  float32 on cpu, {torch.get_num_threads()} threads")
    print(f"{'tool':<17} {'import':>7} {'load':>7} {'peak/w':>7} {'lens 11 tok':>12} {'lens ~500 tok':>14} "
          f"{'top-1':>8}  meta layout")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        meta_path = write_meta_copy(path, str(Path(tmp) / "meta"))
        for tool in args.tools:
            if importlib.util.find_spec(tool) is None:
                print(f"{tool:<17} not installed")
                continue
            r = run_child(tool, path, meta_path, args.repeats)
            if "error" in r:
                print(f"{tool:<17} failed: {r['error']}")
                continue
            print(
                f"{tool:<17} {r['import']:>6.2f}s {r['load']:>6.2f}s {r['peak_growth'] / r['weight_bytes']:>7.2f} "
                f"{r['lens_short'] * 1e3:>10.0f}ms {r['lens_long'] * 1e3:>12.0f}ms {r['top1']!r:>8}  {r['meta']}"
            )


if __name__ == "__main__":
    main()
