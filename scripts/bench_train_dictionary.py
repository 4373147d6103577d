"""Training a TopK transcoder: llama_lens against eai-sparsify 1.3.3, side by side on this machine.

The MLP of layer 15 of the embedded model (SmolLM2-135M-Instruct): reads blocks.15.mlp.hook_in (sparsify's
input of `layers.15.mlp`), writes blocks.15.hook_mlp_out (its output); 4,608 latents, k = 32, the same token rows
(generated texts, 256 tokens each starting with BOS) in the same order (no shuffle), 16 rows (4,096 tokens) per
step, sparsify's default recipe on both sides (Signum under a schedule-free average, lr 5e-3 / sqrt(4608 / 2**14),
no AuxK, seed 0: sparsify's torch.manual_seed(0) nn.Linear draw is the same as ours).

    python scripts/bench_train_dictionary.py                   # 65,536 training tokens (16 steps)
    python scripts/bench_train_dictionary.py --tokens 2000000  # the issue's target run (hours on 2 cores)
    python scripts/bench_train_dictionary.py --no-end-to-end   # sparsify on our stored activations only

Timed: ours = collecting the activations into the store (the forward pass stops after layer 15) + training from
the store; sparsify = `Trainer.fit()`, which runs the whole model (all 30 layers, as its users run it) for every
batch; and sparsify's SparseCoder and optimiser run on our stored activations (its Trainer's loop without the
model: the training cost alone, against ours from the store). Held-out FVU (sparsify's definition, over all
held-out tokens at once) of every dictionary, each loaded with `ll.load_dictionary`, on the activations of
held-out rows. The sparsify process also checks that sae-lens reads what we wrote (encode/decode against
ll.load_dictionary on the held-out inputs) and that its transformers forward gives the same activations as ours.

Needs the parity environment (scripts/parity/make_env.sh) at $LLAMA_LENS_HOME/parity-venv.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import llama_lens as ll
from llama_lens.data.token_rows import token_rows
from llama_lens.dictionaries.train_data import collect_activations

LAYER = 15
HOOK_IN, HOOK_OUT = f"blocks.{LAYER}.mlp.hook_in", f"blocks.{LAYER}.hook_mlp_out"
D_SAE, K, SEQ_LEN, BATCH_ROWS = 4608, 32, 256, 16

SPARSIFY = r"""
import json, os, sys, time
os.environ["SPARSIFY_DISABLE_TRITON"] = "1"
import torch
from safetensors.torch import load_file
work, model_path = sys.argv[1], sys.argv[2]
args = json.load(open(f"{work}/args.json"))
from datasets import Dataset
from transformers import AutoModel
from sparsify import SaeConfig, Trainer, TrainConfig
from sparsify.sparse_coder import SparseCoder
model = AutoModel.from_pretrained(model_path, torch_dtype=torch.float32)
tokens = torch.load(f"{work}/train_tokens.pt")
data = Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")
cfg = TrainConfig(
    SaeConfig(num_latents=args["d_sae"], k=args["k"], transcode=True), batch_size=args["batch_rows"],
    hookpoints=[f"layers.{args['layer']}.mlp"], log_to_wandb=False, save_dir=f"{work}/sparsify", run_name="run",
    save_every=10**9, init_seeds=[0],
)
out = {"folder": f"{work}/sparsify/run/layers.{args['layer']}.mlp"}
if args["end_to_end"]:
    trainer = Trainer(cfg, data, model)
    start = time.perf_counter()
    trainer.fit()
    out["fit_seconds"] = time.perf_counter() - start

# sparsify's SparseCoder and optimiser on the activations of our store: its Trainer's loop for loss_fn="fvu"
# without the model's forward pass (bias init on the first batch, total variance of the batch, signum under the
# schedule-free wrapper, eval() before saving)
from schedulefree import ScheduleFreeWrapper
from sparsify.sign_sgd import SignSGD
torch.manual_seed(0)
coder = SparseCoder(args["d_in"], SaeConfig(num_latents=args["d_sae"], k=args["k"], transcode=True), "cpu",
                    dtype=torch.float32)
lr = 5e-3 / (coder.num_latents / 2**14) ** 0.5
opt = ScheduleFreeWrapper(SignSGD([dict(params=coder.parameters(), lr=lr)]), momentum=0.95)
opt.train()
shards = sorted(p for p in os.listdir(f"{work}/store") if p.endswith(".safetensors"))
step_tokens = args["batch_rows"] * args["seq_len"]
start = time.perf_counter()
step = 0
for name in shards:
    shard = load_file(f"{work}/store/{name}")
    xs, ys = shard[args["hook_in"]], shard[args["hook_out"]]
    for first in range(0, len(xs) - step_tokens + 1, step_tokens):
        x, y = xs[first:first + step_tokens], ys[first:first + step_tokens]
        if step == 0:
            coder.encoder.bias.data = -x.mean(0) @ coder.encoder.weight.data.T
            coder.b_dec.data = y.mean(0)
        result = coder(x=x, y=y, dead_mask=None, total_variance=(y - y.mean(0)).pow(2).sum())
        result.fvu.backward()
        opt.step()
        opt.zero_grad()
        step += 1
opt.eval()
out["sae_only_seconds"] = time.perf_counter() - start
out["sae_only_steps"] = step
coder.save_to_disk(f"{work}/sparsify_sae_only/layers.{args['layer']}.mlp")

# sparsify's own held-out FVU, and its model's activations against ours
held = load_file(f"{work}/heldout.safetensors")
mlp = model.layers[args["layer"]].mlp
seen = {}
hook = mlp.register_forward_hook(lambda m, i, o: seen.update(x=i[0].detach(), y=o.detach()))
with torch.no_grad():
    xs, ys = [], []
    for row in held["tokens"].split(8):
        model(row)
        xs.append(seen["x"].flatten(0, 1)); ys.append(seen["y"].flatten(0, 1))
hook.remove()
x, y = torch.cat(xs), torch.cat(ys)
out["activation_max_abs_diff"] = [float((x - held["x"]).abs().max()), float((y - held["y"]).abs().max())]
for key, folder in [("sparsify_own_fvu", out["folder"]),
                    ("sae_only_own_fvu", f"{work}/sparsify_sae_only/layers.{args['layer']}.mlp")]:
    if os.path.isdir(folder):
        loaded = SparseCoder.load_from_disk(folder)
        with torch.no_grad():
            recon = loaded(held["x"], held["y"]).sae_out
        out[key] = float((held["y"] - recon).pow(2).sum() / (held["y"] - held["y"].mean(0)).pow(2).sum())

# sae-lens reads what llama_lens wrote
from sae_lens import SAE
sae = SAE.load_from_disk(f"{work}/ours")
with torch.no_grad():
    acts = sae.encode(held["x"])
    torch.save({"acts": acts.to_sparse(), "out": sae.decode(acts)}, f"{work}/saelens_out.pt")
out["saelens_architecture"] = sae.cfg.architecture()
json.dump(out, open(f"{work}/sparsify.json", "w"))
"""


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def held_out_fvu(dictionary, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        recon = dictionary(x)
    return float((y - recon).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=65_536, help="training tokens (rounded down to whole steps)")
    parser.add_argument("--heldout-rows", type=int, default=32, help="held-out rows of 256 tokens")
    parser.add_argument(
        "--no-end-to-end",
        action="store_true",
        help="skip sparsify's Trainer.fit (whose forward pass over the whole model dominates its time)",
    )
    parser.add_argument("--keep", type=Path, default=None, help="keep the work folder here (default: a temporary one)")
    args = parser.parse_args()
    home = Path(os.environ.get("LLAMA_LENS_HOME", Path.home() / ".cache" / "llama_lens"))
    parity_python = home / "parity-venv" / "bin" / "python"
    if not parity_python.exists():
        sys.exit(f"no parity environment at {parity_python}: run scripts/parity/make_env.sh")
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_train_dictionary."))
    work.mkdir(parents=True, exist_ok=True)
    print(f"load average at start: {load_average()} ({os.cpu_count()} cores); work folder {work}")

    model_path = ll.demo_model_path()
    model = ll.load(model_path, progress=False)
    step_tokens = BATCH_ROWS * SEQ_LEN
    train_rows = max(1, args.tokens // step_tokens) * BATCH_ROWS
    n_texts, rows = 500, None
    while rows is None or len(rows) < train_rows + args.heldout_rows:
        n_texts *= 2
        rows = token_rows(model.tokenizer, ll.generated_texts(n_texts, seed=0), seq_len=SEQ_LEN)
    train_tokens, heldout_tokens = rows[:train_rows], rows[train_rows : train_rows + args.heldout_rows]
    torch.save(train_tokens, work / "train_tokens.pt")
    print(f"{train_rows} training rows ({train_tokens.numel():,} tokens, {train_rows // BATCH_ROWS} steps), "
          f"{args.heldout_rows} held-out rows")  # fmt: skip

    # --- held-out activations (ours), for both dictionaries' FVU
    held = collect_activations(model, heldout_tokens, hook_names=[HOOK_IN, HOOK_OUT], folder=work / "heldout",
                               progress=False)  # fmt: skip
    x_h = torch.cat([held[i][HOOK_IN] for i in range(len(held))]).float()
    y_h = torch.cat([held[i][HOOK_OUT] for i in range(len(held))]).float()
    from safetensors.torch import save_file

    save_file({"tokens": heldout_tokens, "x": x_h, "y": y_h}, str(work / "heldout.safetensors"))

    # --- ours: collect into the store, then train from it
    start = time.perf_counter()
    store = collect_activations(model, train_tokens, hook_names=[HOOK_IN, HOOK_OUT], folder=work / "store")
    collect_s = time.perf_counter() - start
    start = time.perf_counter()
    coder = ll.train_dictionary(
        store, out=work / "ours", hook_in=HOOK_IN, hook_out=HOOK_OUT, architecture="topk", d_sae=D_SAE, k=K,
        batch_tokens=step_tokens, shuffle=False, seed=0,
    )  # fmt: skip
    train_s = time.perf_counter() - start
    print(f"ours: collect {collect_s:.1f} s + train {train_s:.1f} s (load average {load_average()})")
    del model

    # --- sparsify, in the parity environment
    settings = {"d_sae": D_SAE, "k": K, "batch_rows": BATCH_ROWS, "layer": LAYER, "seq_len": SEQ_LEN, "d_in": 576,
                "hook_in": HOOK_IN, "hook_out": HOOK_OUT, "end_to_end": not args.no_end_to_end}  # fmt: skip
    (work / "args.json").write_text(json.dumps(settings))
    start = time.perf_counter()
    # -I: the work folder and this checkout stay off its sys.path (a file named sparsify.py would shadow the package)
    subprocess.run([str(parity_python), "-I", "-c", SPARSIFY, str(work), str(model_path)], check=True)
    process_s = time.perf_counter() - start
    theirs = json.loads((work / "sparsify.json").read_text())
    print(f"sparsify process {process_s:.1f} s (load average {load_average()})")

    ours_dict = ll.load_dictionary(work / "ours")
    fvu_ours = held_out_fvu(ours_dict, x_h, y_h)
    saelens = torch.load(work / "saelens_out.pt")
    with torch.no_grad():
        acts = ours_dict.encode(x_h)
        d_acts = float((saelens["acts"].to_dense() - acts).abs().max())
        d_out = float((saelens["out"] - ours_dict.decode(acts)).abs().max())
        in_memory = float((coder.decode(coder.encode(x_h)) - ours_dict(x_h)).abs().max())

    total = collect_s + train_s
    print()
    print(f"TopK transcoder, layer {LAYER} MLP, d_sae {D_SAE}, k {K}, {train_tokens.numel():,} training tokens "
          f"({train_rows // BATCH_ROWS} steps), {x_h.shape[0]:,} held-out tokens")  # fmt: skip
    print(f"  ours                          held-out FVU {fvu_ours:.4f}   wall {total:.1f} s (collect {collect_s:.1f} "
          f"+ train {train_s:.1f})")  # fmt: skip
    if "fit_seconds" in theirs:
        fvu_fit = held_out_fvu(ll.load_dictionary(theirs["folder"]), x_h, y_h)
        print(
            f"  sparsify Trainer.fit          held-out FVU {fvu_fit:.4f} (its own code: "
            f"{theirs['sparsify_own_fvu']:.4f})   wall {theirs['fit_seconds']:.1f} s   "
            f"ratio ours/sparsify {total / theirs['fit_seconds']:.2f}x   FVU difference {fvu_ours - fvu_fit:+.4f}"
        )
    folder = work / "sparsify_sae_only" / f"layers.{LAYER}.mlp"
    fvu_only = held_out_fvu(ll.load_dictionary(folder), x_h, y_h)
    print(
        f"  sparsify on our stored acts   held-out FVU {fvu_only:.4f} (its own code: "
        f"{theirs['sae_only_own_fvu']:.4f})   wall {theirs['sae_only_seconds']:.1f} s "
        f"({theirs['sae_only_steps']} steps)   ratio ours train/sparsify "
        f"{train_s / theirs['sae_only_seconds']:.2f}x   FVU difference {fvu_ours - fvu_only:+.4f}"
    )
    print(f"  checks   activations vs transformers max |d| in {theirs['activation_max_abs_diff'][0]:.2e} "
          f"out {theirs['activation_max_abs_diff'][1]:.2e}; sae-lens reads ours as {theirs['saelens_architecture']!r},"
          f" encode max |d| {d_acts:.2e}, decode {d_out:.2e}; in-memory vs loaded {in_memory:.2e}")  # fmt: skip
    print(f"load average at end: {load_average()}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
