"""Records sae-lens 6.54.12's own evaluation metrics for a small SAE on the embedded model, for
tests/features/test_evaluate_parity.py.

Run with the parity environment's python (scripts/parity/make_env.sh builds it), offline:

    HF_HUB_OFFLINE=1 /work/main/.cache/llama_lens/parity-venv/bin/python scripts/parity/record_eval.py \
        [--model $LLAMA_LENS_HOME/models/SmolLM2-135M-Instruct]

What it does:
1. Loads the embedded model (SmolLM2-135M-Instruct) with transformers 4 from its local folder and converts it to a
   TransformerLens HookedTransformer with TransformerLens' own Llama weight conversion (TransformerLens has no
   entry for SmolLM2 in its model list, so the config is written here from the checkpoint's config.json). The
   converted model's logits are checked against transformers' on the tokens.
2. Builds a StandardSAE at blocks.6.hook_resid_post (d_sae = 128) whose weights make ~30 features fire per token:
   decoder directions drawn from centred activations of calibration texts, the encoder their transpose, each
   feature's bias set at its (1 - 30/128) quantile, and the decoder then refitted by least squares, so the
   reconstruction is a real one. Saved with sae-lens' own `save_model` to tests/features/fixtures/eval_sae/.
3. Runs sae-lens' `get_sparsity_and_variance_metrics` and `get_downstream_reconstruction_metrics` (the functions
   `run_evals` calls) on fixed tokens, in one batch, with sae-lens' special tokens excluded, and writes the
   metrics with the tokens to tests/features/fixtures/eval_metrics.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

HOOK = "blocks.6.hook_resid_post"
D_SAE, FIRING = 128, 30
N_POS = 20
TEXTS = [
    "The capital of France is Paris, and the capital of Germany is Berlin. Both cities are known for",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Photosynthesis is the process by which green plants use sunlight to make food from carbon dioxide and water.",
]
CHAT = "<|im_start|>user\nWhat is the tallest mountain?<|im_end|>\n<|im_start|>assistant\nMount Everest is the tallest"
CALIBRATION = [
    "Once upon a time, in a small village by the sea, there lived an old fisherman and his wife.",
    "The stock market fell sharply on Monday as investors worried about rising interest rates.",
    "To install the package, run pip install and then import it in your Python script.",
    "Water boils at one hundred degrees Celsius at sea level, but at lower temperatures on mountains.",
    "She opened the letter slowly, afraid of what it might say about her application.",
    "import numpy as np\nx = np.linspace(0, 1, 100)\ny = np.sin(x)\nprint(y.mean())",
    "In 1969, astronauts landed on the Moon for the first time, watched by millions of people on television.",
    "The recipe calls for two cups of flour, one egg, a pinch of salt and a spoonful of sugar.",
    "Machine learning models learn patterns from data and use them to make predictions on new examples.",
    "The train to London leaves at half past nine from platform four, and arrives shortly before noon.",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i, 'is even')\n    else:\n        print(i, 'is odd')",
    "Dear Sir or Madam, I am writing to ask about the opening for a junior engineer at your company.",
]


def tl_model(folder: Path):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
    from transformers import AutoTokenizer, LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    c = hf.config
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size,
        d_head=c.hidden_size // c.num_attention_heads,
        n_heads=c.num_attention_heads,
        n_key_value_heads=c.num_key_value_heads,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=256,
        eps=c.rms_norm_eps,
        d_vocab=c.vocab_size,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=c.hidden_size // c.num_attention_heads,
        rotary_base=c.rope_theta,
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        default_prepend_bos=False,
        dtype=torch.float32,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right")
    model.load_and_process_state_dict(
        convert_llama_weights(hf, cfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return model.eval(), hf, tokenizer


def token_rows(tokenizer) -> torch.Tensor:
    # BOS first on three rows (it is excluded, as sae-lens excludes it); the chat row holds BOS and EOS inside.
    rows = [[tokenizer.bos_token_id, *tokenizer.encode(text)][:N_POS] for text in TEXTS]
    rows.append(tokenizer.encode(CHAT)[:N_POS])
    assert all(len(r) == N_POS for r in rows), [len(r) for r in rows]
    return torch.tensor(rows)


@torch.no_grad()
def build_sae(model, tokenizer, out: Path):
    from sae_lens import StandardSAE, StandardSAEConfig

    acts = []
    for text in CALIBRATION:
        ids = [tokenizer.bos_token_id, *tokenizer.encode(text)]
        _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=HOOK)
        acts.append(cache[HOOK][0, 1:])  # not BOS: its norm is far larger than the rest's, and evals skip it
    x = torch.cat(acts).double()
    b_dec = x.mean(0)
    centred = x - b_dec
    generator = torch.Generator().manual_seed(0)
    picks = centred[torch.randint(0, len(centred), (D_SAE,), generator=generator)]
    noise = torch.randn(picks.shape, generator=generator, dtype=torch.float64) / picks.shape[1] ** 0.5
    directions = picks + 0.3 * picks.norm(dim=-1, keepdim=True) * noise
    directions = directions / directions.norm(dim=-1, keepdim=True)
    pre = centred @ directions.T
    b_enc = -torch.quantile(pre, 1 - FIRING / D_SAE, dim=0)
    codes = torch.relu(pre + b_enc)
    # Ridge least squares (fewer calibration tokens than a plain fit of 128 rows would need).
    gram = codes.T @ codes
    ridge = 0.05 * gram.diagonal().mean() * torch.eye(D_SAE, dtype=torch.float64)
    W_dec = torch.linalg.solve(gram + ridge, codes.T @ centred)  # [d_sae, d_model]
    cfg = StandardSAEConfig(d_in=x.shape[1], d_sae=D_SAE, apply_b_dec_to_input=True)
    cfg.metadata.hook_name = HOOK
    cfg.metadata.model_name = "SmolLM2-135M-Instruct"
    sae = StandardSAE(cfg)
    sae.W_enc.copy_(directions.T.float())
    sae.b_enc.copy_(b_enc.float())
    sae.W_dec.copy_(W_dec.float())
    sae.b_dec.copy_(b_dec.float())
    sae.save_model(out)
    return StandardSAE.load_from_disk(out)  # what the test reads, round-tripped


class FixedTokens:
    """The one method of an ActivationsStore that sae-lens' eval functions call."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def get_batch_tokens(self, batch_size: int) -> torch.Tensor:
        assert batch_size == len(self.tokens)
        return self.tokens


def main() -> None:
    from sae_lens.evals import get_downstream_reconstruction_metrics, get_sparsity_and_variance_metrics
    from sae_lens.training.activation_scaler import ActivationScaler
    from sae_lens.util import get_special_token_ids

    home = Path(os.environ.get("LLAMA_LENS_HOME", "/work/main/.cache/llama_lens"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=home / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "tests/features/fixtures")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, hf, tokenizer = tl_model(args.model)
    tokens = token_rows(tokenizer)
    with torch.no_grad():
        difference = (model(tokens) - hf(tokens).logits).abs().max().item()
    print(f"TransformerLens vs transformers logits: max |diff| {difference:.2e}")
    assert difference < 1e-3

    args.out.mkdir(parents=True, exist_ok=True)
    sae = build_sae(model, tokenizer, args.out / "eval_sae")
    store, scaler = FixedTokens(tokens), ActivationScaler()
    ignore = sorted(get_special_token_ids(tokenizer))
    metrics, feature_metrics = get_sparsity_and_variance_metrics(
        sae, model, store, scaler, n_batches=1, compute_l2_norms=True, compute_sparsity_metrics=True,
        compute_variance_metrics=True, compute_featurewise_density_statistics=True,
        eval_batch_size_prompts=len(tokens), model_kwargs={}, ignore_tokens=ignore,
    )  # fmt: skip
    metrics |= get_downstream_reconstruction_metrics(
        sae, model, store, scaler, compute_kl=True, compute_ce_loss=True, n_batches=1,
        eval_batch_size_prompts=len(tokens), ignore_tokens=ignore,
    )  # fmt: skip
    record = {
        "about": "sae-lens 6.54.12 metrics of eval_sae/ on these tokens (scripts/parity/record_eval.py)",
        "hook": HOOK,
        "tokens": tokens.tolist(),
        "ignore_tokens": ignore,
        "metrics": metrics,
        "feature_density": [round(v, 6) for v in feature_metrics["feature_density"]],
    }
    (args.out / "eval_metrics.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
