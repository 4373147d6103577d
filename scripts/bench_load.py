"""Peak memory of loading a checkpoint: llama_lens (full and a layer range) against transformers.

Each measurement runs in a fresh Python process: after the imports (and an embedding built on the meta
device, which imports sympy once) it records the peak resident set size (VmHWM, or `ru_maxrss` of
`resource.getrusage` without /proc), loads, and reports how much the peak grew. Growth is compared with the
bytes of the weights asked for, in float32.

    python scripts/bench_load.py                        # synthetic bf16 checkpoint of SmolLM2-135M's shape
    python scripts/bench_load.py --path CHECKPOINT_DIR  # e.g. the folder from llama_lens.demo_model_path()
    python scripts/bench_load.py --path CHECKPOINT_DIR --layout meta --mp 2
                                                        # a bf16 Meta copy of it (consolidated.0k.pth), written
                                                        # to a temporary folder first; transformers is skipped
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def smollm2_shaped_checkpoint(folder: str) -> str:
    """Writes a random bf16 checkpoint with SmolLM2-135M's shape, in 3 safetensors shards, to `folder`."""
    import torch

    from llama_lens.config import LlamaConfig
    from llama_lens.testing import random_state_dict, write_hf_checkpoint

    cfg = LlamaConfig(
        d_model=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        d_head=64,
        d_mlp=1536,
        d_vocab=49152,
        rope_theta=100000.0,
        norm_eps=1e-5,
        tie_embeddings=True,
        max_position_embeddings=8192,
        bos_token_id=0,
        eos_token_ids=(0,),
    )
    write_hf_checkpoint(folder, cfg, random_state_dict(cfg, dtype=torch.bfloat16), shards=3)
    return folder


def meta_copy(source: str, folder: str, mp: int) -> str:
    """Writes the weights of the checkpoint at `source`, in bfloat16, as a Meta release with `mp` shards."""
    import torch

    import llama_lens as ll
    from llama_lens.testing import write_meta_checkpoint

    model = ll.load(source, dtype=torch.bfloat16, progress=False)
    write_meta_checkpoint(folder, model.cfg, model.state_dict(), mp=mp)
    return folder


def _peak_rss_bytes() -> int:
    """This process's peak resident set size.

    VmHWM where /proc has it: ru_maxrss survives exec on Linux, so a child would start with its parent's peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _baseline_rss_bytes() -> int:
    """The peak to measure growth from: the current RSS, after resetting the peak to it where Linux allows
    (otherwise an earlier transient peak, e.g. while parsing the tokenizer, would hide part of the growth)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass
    return _peak_rss_bytes()


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(kind: str, path: str, layers: list[int]) -> dict:
    """Runs in the child process: one load of `kind`, returns its figures."""
    import torch

    import llama_lens as ll
    from llama_lens.io.checkpoint import Checkpoint

    ckpt = Checkpoint(path)  # warms the index cache so no variant pays for header parsing
    # A random init on the meta device (transformers' loader does one) imports sympy: about 70 MiB, once per
    # process, whatever the model's size. Paid before the baseline by every variant, so none is charged for it.
    with torch.device("meta"):
        torch.nn.Embedding(2, 2)
    read: list[str] = []
    tokenizer_bytes = 0
    if kind == "transformers":
        from transformers import LlamaForCausalLM

        baseline = _baseline_rss_bytes()
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        original = Checkpoint.read_into

        def spy(self, targets, *args, **kwargs):  # every load reads through read_into
            read.extend(targets)
            return original(self, targets, *args, **kwargs)

        Checkpoint.read_into = spy
        import llama_lens.model.llama  # noqa: F401  (imported before the baseline, like transformers above)

        # The tokenizer (tokenizer.json: a few tens of MiB) is read before the baseline: weights are measured.
        before_tokenizer = _current_rss_bytes()
        tokenizer = ll.load_tokenizer(ckpt.tokenizer_path) if ckpt.tokenizer_path else None
        tokenizer_bytes = _current_rss_bytes() - before_tokenizer
        baseline = _baseline_rss_bytes()
        chosen = range(*layers) if kind == "layers" else None
        model = ll.load(path, dtype=torch.float32, layers=chosen, tokenizer=tokenizer)
    peak_growth = _peak_rss_bytes() - baseline  # before anything else (pandas below) allocates
    table = ckpt.tensors()
    by_param = table[table["param"].notna()].set_index("param")  # `read` holds our names (a tied embedding's once)
    return {
        "kind": kind,
        "peak_growth": peak_growth,
        "weight_bytes": sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()),
        "tensors_read": read,
        "tokenizer_bytes": tokenizer_bytes,
        "stored_bytes_read": int(by_param.loc[read, "bytes"].sum()),
        "checkpoint_stored_bytes": int(table["bytes"].sum()),
    }


def run_child(function: str, *args) -> object:
    """Calls `function(*args)` of this script in a fresh Python process; returns its (JSON) result."""
    code = (
        f"import json, sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'scripts')!r}]; import bench_load; "
        f"print(json.dumps(bench_load.{function}(*json.loads(sys.argv[1]))))"
    )
    done = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{function}{args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", type=Path, help="checkpoint folder (default: a synthetic SmolLM2-shaped one)")
    parser.add_argument("--layers", default="0:3", help="layer range for the partial load, as start:stop")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument(
        "--layout",
        choices=["as-is", "meta"],
        default="as-is",
        help="meta: measure a bf16 Meta copy of the checkpoint (written first; transformers cannot read it)",
    )
    parser.add_argument("--mp", type=int, default=1, help="model-parallel shards of the Meta copy")
    args = parser.parse_args()
    layers = [int(n) for n in args.layers.split(":")]

    with tempfile.TemporaryDirectory() as tmp:
        path = args.path
        if path is None:
            # Written by a child too, so this process stays small (its peak would otherwise show in children).
            path = Path(tmp) / "smollm2-shaped"
            run_child("smollm2_shaped_checkpoint", str(path))
            print(f"synthetic checkpoint: {path}")
        if args.layout == "meta":
            source, path = path, Path(tmp) / "meta"
            run_child("meta_copy", str(source), str(path), args.mp)
            print(f"Meta copy (mp={args.mp}) of {source}: {path}")
        skip_transformers = args.skip_transformers or args.layout == "meta"
        kinds = ["full", "layers"] + ([] if skip_transformers else ["transformers"])
        results = {kind: run_child("measure", kind, str(path), layers) for kind in kinds}

    mib = 2**20
    full, part = results["full"], results["layers"]
    print(f"checkpoint: {path}  ({full['checkpoint_stored_bytes'] / mib:.1f} MiB stored)")
    print(
        f"ll.load(dtype=float32): peak RSS growth {full['peak_growth'] / mib:.1f} MiB, fp32 weights "
        f"{full['weight_bytes'] / mib:.1f} MiB -> ratio {full['peak_growth'] / full['weight_bytes']:.2f}"
    )
    print(
        f"ll.load(layers=range({layers[0]}, {layers[1]})): peak RSS growth {part['peak_growth'] / mib:.1f} MiB, "
        f"fp32 weights of those tensors {part['weight_bytes'] / mib:.1f} MiB -> ratio "
        f"{part['peak_growth'] / part['weight_bytes']:.2f}; "
        f"read {len(part['tensors_read'])} of {len(full['tensors_read'])} tensors, "
        f"{part['stored_bytes_read'] / full['stored_bytes_read']:.1%} of the bytes of a full load"
    )
    print("  tensors read:", ", ".join(part["tensors_read"]))
    if part["tokenizer_bytes"]:
        print(f"  (the tokenizer, loaded before the baseline, took {part['tokenizer_bytes'] / mib:.1f} MiB more)")
    if "transformers" in results:
        hf = results["transformers"]
        print(
            f"transformers from_pretrained(dtype=float32): peak RSS growth {hf['peak_growth'] / mib:.1f} MiB, "
            f"fp32 weights {hf['weight_bytes'] / mib:.1f} MiB -> ratio {hf['peak_growth'] / hf['weight_bytes']:.2f}"
        )


if __name__ == "__main__":
    main()
