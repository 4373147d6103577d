"""A tiny random HookedLlama with a character-level tokenizer, for tests that type prompts (widgets, lens)."""

from __future__ import annotations

import torch
from helpers import tiny_config

from llama_lens.model import HookedLlama
from llama_lens.testing import random_state_dict
from llama_lens.tokenizer import Tokenizer

SPECIALS = {0: "<pad>", 1: "<s>", 2: "</s>"}


class CharTokenizer(Tokenizer):
    """One token per ASCII character (id = code point); ids 0, 1, 2 are pad, BOS and EOS."""

    bos_id = 1
    eos_id = 2
    eos_ids = frozenset({2})
    pad_id = 0
    vocab_size = 128
    source = "characters"

    def _encode(self, text: str) -> list[int]:
        ids = [ord(c) for c in text]
        if any(not 3 <= i < 128 for i in ids):
            raise ValueError(f"CharTokenizer handles printable ASCII only, got {text!r}")
        return ids

    def _decode(self, ids: list[int]) -> str:
        return "".join(SPECIALS.get(i, chr(i)) for i in ids)

    def _token_text(self, token_id: int) -> str:
        return SPECIALS.get(token_id, chr(token_id))

    def _raw_to_id(self, raw: str) -> int | None:
        inverse = {text: i for i, text in SPECIALS.items()}
        if raw in inverse:
            return inverse[raw]
        return ord(raw) if len(raw) == 1 and 3 <= ord(raw) < 128 else None


def char_model(seed: int = 0, scale: float = 10.0, **cfg_changes) -> HookedLlama:
    """The tiny test config (vocab 128) with random weights and a CharTokenizer. Attention weights are scaled
    up by `scale` so patterns are peaked rather than near uniform."""
    cfg = tiny_config(**({"max_position_embeddings": 1024} | cfg_changes))
    state = random_state_dict(cfg, seed=seed)
    for name, tensor in state.items():
        if ".attn.q_proj" in name or ".attn.k_proj" in name:
            state[name] = tensor * scale
    model = HookedLlama(cfg)
    model.load_state_dict(state, strict=True)
    model.tokenizer = CharTokenizer()
    return model.eval()


def run_patterns(model: HookedLlama, text: str | list[str]):
    """(logits, cache) with every layer's attention pattern and pre-softmax scores."""
    with torch.no_grad():
        return model.run_with_cache(
            model.to_tokens(text), names_filter=lambda name: name.endswith(("hook_pattern", "hook_attn_scores"))
        )
