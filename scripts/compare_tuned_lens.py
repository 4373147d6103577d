"""Trains our tuned lens and the tuned-lens package's on the same token rows with the same steps, and prints
their per-translator KL to the final distribution on held-out rows (and the logit lens's, for scale).

The package (MIT licence) is not a dependency of llama_lens. Its lens module imports only torch, transformers and
huggingface_hub, so it runs from its own venv that sees the project's environment:

    python -m venv /tmp/tl-venv
    echo "$(python -c 'import site; print(site.getsitepackages()[0])')" \\
        > /tmp/tl-venv/lib/python3.11/site-packages/project_env.pth      # run with the project's venv active
    /tmp/tl-venv/bin/pip install --no-deps tuned-lens==0.2.0
    PYTHONPATH=. /tmp/tl-venv/bin/python scripts/compare_tuned_lens.py --steps 4

(`--system-site-packages` would expose the base interpreter's packages, not the project venv's torch; and
installing with its dependencies would add wandb, datasets, torchdata, plotly and more, unused here.)

The package's side: its TunedLens and Unembed modules on transformers' LlamaForCausalLM (same weights, float32),
stepped as its train_loop.py steps them: hidden_states[:-1] read out one translator at a time, loss
sum(p * (log p - log q)) averaged over tokens, backward per translator, gradients clipped to norm 1, SGD with
Nesterov momentum 0.9, lr 1 * (1 - 0.9), weight decay 1e-3 (ingredients.Optimizer's defaults),
get_linear_schedule_with_warmup with no warm-up. Not its bfloat16 autocast: both sides run in float32 (bfloat16
matmuls are slower on CPUs without bf16 instructions). Its saved lens (config.json + params.pt) is then read
by `TunedLens.load` and both lenses are scored by the same function.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import llama_lens as ll
from llama_lens.data.texts import generated_texts
from llama_lens.lens.train import mean_kl, token_rows
from llama_lens.lens.tuned import TunedLens


def train_package_lens(hf_model, rows: torch.Tensor, steps: int, rows_per_step: int, rows_per_batch: int):
    from transformers import get_linear_schedule_with_warmup
    from tuned_lens import TunedLens as PackageLens

    lens = PackageLens.from_model(hf_model)
    momentum = 0.9
    params = [p for p in lens.parameters() if p.requires_grad]  # the translators; Unembed is frozen
    opt = torch.optim.SGD(params, lr=1.0 * (1 - momentum), momentum=momentum, nesterov=True, weight_decay=1e-3)
    schedule = get_linear_schedule_with_warmup(opt, 0, steps)
    grad_acc_steps = rows_per_step // rows_per_batch
    for step in range(steps):
        step_rows = rows[step * rows_per_step : (step + 1) * rows_per_step]
        for start in range(0, rows_per_step, rows_per_batch):
            batch = step_rows[start : start + rows_per_batch]
            with torch.no_grad():
                output = hf_model(input_ids=batch, output_hidden_states=True)
            labels = output.logits.float().log_softmax(dim=-1)
            for i, hidden in enumerate(output.hidden_states[:-1]):
                logits = lens(hidden, idx=i)
                loss = torch.sum(labels.exp() * (labels - logits.log_softmax(-1)), dim=-1).mean()
                (loss / grad_acc_steps).backward()
        torch.nn.utils.clip_grad_norm_(lens.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        schedule.step()
        print(f"package step {step + 1}/{steps}", flush=True)
    return lens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rows-per-step", type=int, default=1)
    parser.add_argument("--eval-rows", type=int, default=2)
    args = parser.parse_args()

    from transformers import LlamaForCausalLM

    path = ll.demo_model_path()
    model = ll.load(path)
    hf_model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    n_rows = args.steps * args.rows_per_step
    rows = token_rows(model.tokenizer, generated_texts(400, seed=0), seq_len=args.seq_len, max_rows=n_rows)
    if len(rows) < n_rows:
        raise SystemExit(f"only {len(rows)} rows of text for {n_rows}: lower --steps or --seq-len")
    held_out = token_rows(model.tokenizer, generated_texts(50, seed=1), seq_len=args.seq_len, max_rows=args.eval_rows)

    start = time.perf_counter()
    ours = TunedLens.train(
        model,
        rows,
        max_steps=args.steps,
        tokens_per_step=args.rows_per_step * args.seq_len,
        seq_len=args.seq_len,
        batch_tokens=args.seq_len,
        shuffle=False,
        progress=False,
    )
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    package_lens = train_package_lens(hf_model, rows, args.steps, args.rows_per_step, 1)
    package_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        package_lens.save(folder)  # config.json + params.pt, the package's own format
        theirs = TunedLens.load(folder)

    logit = mean_kl(TunedLens.for_model(model), model, texts=held_out)
    kl_ours = mean_kl(ours, model, texts=held_out)
    kl_theirs = mean_kl(theirs, model, texts=held_out)
    tokens = args.rows_per_step * args.seq_len
    print(f"{args.steps} steps x {tokens} tokens; ours {ours_s:.0f} s, package {package_s:.0f} s")
    print(f"held-out KL to the final distribution (nats/token, {held_out.numel()} tokens)")
    # ours/pkg compares the KLs; gain ratio compares how far each lens moved from the logit lens (the stricter
    # test after few steps, when both KLs are still close to the logit lens's).
    print(f"{'translator':>10} {'logit':>8} {'ours':>8} {'package':>8} {'ours/pkg':>8} {'gain ratio':>10}")
    worst = 0.0
    for label in ours.labels:
        ratio = kl_ours[label] / kl_theirs[label]
        gain = (logit[label] - kl_ours[label]) / (logit[label] - kl_theirs[label])
        worst = max(worst, abs(ratio - 1))
        print(
            f"{label:>10} {logit[label]:8.3f} {kl_ours[label]:8.3f} {kl_theirs[label]:8.3f} {ratio:8.3f} {gain:10.3f}"
        )
    print(f"largest relative difference of the KLs: {worst:.1%}")


if __name__ == "__main__":
    main()
