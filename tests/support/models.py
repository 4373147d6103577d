"""Helpers shared by the tests: the tiny config and model, and comparisons that hold on every CPU.

Imported as `from helpers import ...` (pytest puts tests/ on sys.path); conftest.py holds fixtures only.

    cfg = tiny_config(n_layers=3)                      # d_model 64, 4 heads, 2 KV heads, vocab 128; 3 layers
    model = tiny_model(cfg, seed=1, scale=4.0)         # random weights, eval mode, on the CPU
    model = tiny_model(layers=[1], tokenizer=CharTokenizer())
    model = char_model()                               # peaked attention and a character tokenizer
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from llama_lens.config import LlamaConfig
from llama_lens.io.names import is_norm_weight
from llama_lens.model.llama import HookedLlama
from llama_lens.testing import random_state_dict
from llama_lens.tokenizer import Tokenizer


def tiny_config(**changes) -> LlamaConfig:
    """The unit-test model: 2 layers, d_model 64, 4 heads, 2 KV heads, vocab 128."""
    base = dict(
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_head=16,
        d_mlp=128,
        d_vocab=128,
        rope_theta=10000.0,
        norm_eps=1e-5,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_ids=(2,),
    )
    return LlamaConfig(**(base | changes))


def tiny_model(
    cfg: LlamaConfig | None = None,
    *,
    seed: int = 0,
    scale: float = 1.0,
    embed_scale: float | None = None,
    qk_scale: float | None = None,
    layers: Iterable[int] | None = None,
    tokenizer: Tokenizer | None = None,
) -> HookedLlama:
    """The one builder of random test models: `random_state_dict`'s weights in a HookedLlama, in eval mode.

    Matrices and biases start with std 0.02 and norm weights near 1 (see `random_state_dict`); `scale`
    multiplies every matrix and bias; `embed_scale` replaces it for the embedding (peaked read-outs, for the
    lens) and `qk_scale` for q_proj/k_proj (peaked attention patterns, for the plots). A tied unembedding is
    the embedding, scaled once.

    Args:
        cfg: the config; `tiny_config()` if None.
        seed: seeds the weights.
        layers: the blocks to load (a partial model, as `ll.load(layers=...)` makes), every block if None.
        tokenizer: set as `model.tokenizer` (e.g. `CharTokenizer()`), none if None.
    """
    cfg = cfg or tiny_config()
    state = random_state_dict(cfg, seed=seed)
    for name, value in state.items():
        if is_norm_weight(name) or (name == "unembed.weight" and cfg.tie_embeddings):
            continue  # norm weights stay near 1; a tied unembedding is scaled with the embedding
        factor = scale
        if name == "embed.weight" and embed_scale is not None:
            factor = embed_scale
        elif (".attn.q_proj." in name or ".attn.k_proj." in name) and qk_scale is not None:
            factor = qk_scale
        if factor != 1.0:
            value.mul_(factor)  # in place: a tied unembed.weight is the same tensor
    if layers is not None:
        layers = list(layers)
        keep = tuple(f"blocks.{i}." for i in layers)
        state = {k: v for k, v in state.items() if not k.startswith("blocks.") or k.startswith(keep)}
    model = HookedLlama(cfg, layers=layers)
    model.load_state_dict(state, strict=True)
    model.tokenizer = tokenizer
    return model.eval()


class CharTokenizer(Tokenizer):
    """One token per ASCII character (id = code point); ids 0, 1, 2 are pad, BOS and EOS."""

    bos_id = 1
    eos_id = 2
    eos_ids = frozenset({2})
    pad_id = 0
    vocab_size = 128
    source = "characters"
    specials = {0: "<pad>", 1: "<s>", 2: "</s>"}

    def _encode(self, text: str) -> list[int]:
        ids = [ord(c) for c in text]
        if any(not 3 <= i < 128 for i in ids):
            raise ValueError(f"CharTokenizer handles printable ASCII only, got {text!r}")
        return ids

    def _decode(self, ids: list[int]) -> str:
        return "".join(self.specials.get(i, chr(i)) for i in ids)

    def _token_text(self, token_id: int) -> str:
        return self.specials.get(token_id, chr(token_id))

    def _raw_to_id(self, raw: str) -> int | None:
        inverse = {text: i for i, text in self.specials.items()}
        if raw in inverse:
            return inverse[raw]
        return ord(raw) if len(raw) == 1 and 3 <= ord(raw) < 128 else None


def char_model(seed: int = 0, scale: float = 10.0, **cfg_changes) -> HookedLlama:
    """The tiny model for tests that type prompts (widgets, attention plots): a CharTokenizer, room for 1024
    positions, and q/k weights `scale` times the others, so attention patterns are peaked, not near uniform."""
    cfg = tiny_config(**({"max_position_embeddings": 1024} | cfg_changes))
    return tiny_model(cfg, seed=seed, qk_scale=scale, tokenizer=CharTokenizer())


def run_patterns(model: HookedLlama, text: str | list[str]):
    """(logits, cache) with every layer's attention pattern and pre-softmax scores."""
    with torch.no_grad():
        return model.run_with_cache(
            model.to_tokens(text), names_filter=lambda name: name.endswith(("hook_pattern", "hook_attn_scores"))
        )


def assert_same_top_k(
    ids: torch.Tensor,
    values: torch.Tensor,
    expected_values: torch.Tensor,
    *,
    scores: torch.Tensor | None = None,
    expected_ids: torch.Tensor | None = None,
    atol: float = 0.0,
) -> None:
    """Asserts that a top-k result agrees with a reference as far as ties allow.

    `torch.topk` promises no order among equal values, and which of two equal logits comes first differs
    between SIMD kernels (AVX2, AVX-512, none), so ids are never compared where values tie:
    - the values must equal the reference's (within `atol`; exactly by default);
    - with `scores` (the full rows the reference ranked, [..., d_vocab]), every id must point at a score equal to
      its value and the ids of a row must be distinct: together, exactly the top-k up to the order of ties;
    - with `expected_ids`, ids must be equal wherever the value is apart (by more than `atol`) from both its
      neighbours in the list; the last one only with `scores`, where the value after it is known.

    Args:
        ids, values: [..., k] the result under test.
        expected_values: [..., k] the reference's values, largest first.
        scores: [..., d_vocab] what was ranked, if at hand.
        expected_ids: [..., k] the reference's ids, if at hand.
        atol: how far two values may be apart and still count as tied or equal.
    """
    torch.testing.assert_close(values, expected_values, atol=atol, rtol=0)
    if scores is not None:
        torch.testing.assert_close(scores.gather(-1, ids), expected_values, atol=atol, rtol=0)
        sorted_ids = ids.sort(dim=-1).values
        assert bool((sorted_ids[..., 1:] != sorted_ids[..., :-1]).all()), "an id appears twice in one row"
    if expected_ids is None:
        return
    k = expected_values.shape[-1]
    gap = torch.full_like(expected_values, float("inf"))
    if k > 1:
        step = (expected_values[..., :-1] - expected_values[..., 1:]).abs()  # [..., k - 1]
        gap[..., :-1] = step
        gap[..., 1:] = torch.minimum(gap[..., 1:], step)
    if scores is not None:
        d_vocab = scores.shape[-1]
        after = scores.topk(k + 1, dim=-1).values[..., -1] if d_vocab > k else None
        if after is not None:
            gap[..., -1] = torch.minimum(gap[..., -1], (expected_values[..., -1] - after).abs())
    else:
        gap[..., -1] = 0.0  # the value after the last is unknown: it may tie
    apart = gap > atol
    assert torch.equal(ids[apart], expected_ids[apart]), "ids differ where the values are not tied"


# transformers' (config class, model class) of each architecture llama_lens reads.
TRANSFORMERS_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def tiny_transformers_model(
    model_type: str, *, seed: int = 0, scale: float = 5.0, attn_implementation: str = "sdpa", **config_changes
):
    """A tiny transformers `...ForCausalLM` of `model_type` with random weights: the reference of the architecture
    tests. 2 layers, d_model 64, 4 heads, 2 KV heads, vocab 128 (so `CharTokenizer` fits), unless changed.

    Matrices and biases are normal with std 0.02 * `scale` (peaked attention and well-separated logits, so greedy
    decoding has no near-ties), norm weights 1 + normal noise (std 0.1).

    Args:
        model_type: "llama", "mistral", "qwen2" or "qwen3".
        attn_implementation: "sdpa" or "eager" (which returns attention patterns with output_attentions=True).
        config_changes: keyword arguments of the transformers config class (sliding_window=4, head_dim=24, ...).
    """
    import transformers

    config_class, model_class = (getattr(transformers, name) for name in TRANSFORMERS_CLASSES[model_type])
    base = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config = config_class(**(base | config_changes))
    model = model_class._from_config(config, attn_implementation=attn_implementation)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.02 * scale * noise)
    return model.eval()
