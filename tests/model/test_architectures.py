"""Mistral, Qwen2 and Qwen3 against transformers: tiny random models saved by transformers, loaded with `ll.load`.

Each architecture is checked in every attention path (the fused kernel, the written-out scores -> pattern path
that runs when a pattern hook is on, and generation with the KV cache), with prompts longer than the sliding
window, and the lens, plots and widgets are run on it. The reference is always transformers' own model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from support.models import CharTokenizer, tiny_transformers_model

import llama_lens as ll
from llama_lens import widgets as ll_widgets
from llama_lens.config import LlamaConfig
from llama_lens.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WINDOW = 4
PROMPT_LEN = 12  # three times the window

# id -> (model_type, transformers config changes). GQA (4 heads, 2 KV heads) unless the case says otherwise.
SLIDING = {"use_sliding_window": True, "sliding_window": WINDOW}  # Qwen2/3's switch and window
CASES = {
    "mistral": ("mistral", {"sliding_window": WINDOW}),
    "mistral-mha": ("mistral", {"sliding_window": WINDOW, "num_key_value_heads": 4}),
    "mistral-no-window-tied": ("mistral", {"sliding_window": None, "tie_word_embeddings": True}),
    # Qwen2 slides from max_window_layers on: layer 0 full, layers 1 and 2 sliding.
    "qwen2": ("qwen2", SLIDING | {"max_window_layers": 1, "num_hidden_layers": 3}),
    "qwen2-mqa-tied": ("qwen2", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    # head_dim 24: n_heads * d_head = 96 is not d_model.
    "qwen3": ("qwen3", SLIDING | {"head_dim": 24, "max_window_layers": 1}),
    "qwen3-bias-mha-tied": (
        "qwen3",
        {"head_dim": 8, "attention_bias": True, "num_key_value_heads": 4, "tie_word_embeddings": True},
    ),
}
ATOL = 1e-4


def _pair(case: str, tmp_path, device: torch.device | str = "cpu", **kwargs):
    """(transformers model, ours loaded from what it saved) for a case, both on `device`."""
    model_type, changes = CASES[case]
    hf_model = tiny_transformers_model(model_type, **(changes | kwargs))
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").is_file()
    return hf_model.to(device), ll.load(tmp_path, device=device, progress=False, tokenizer=CharTokenizer())


def _tokens(batch: int = 2, pos: int = PROMPT_LEN, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.randint(3, 128, (batch, pos), generator=torch.Generator().manual_seed(seed)).to(device)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _pattern_names(name: str) -> bool:
    return name.endswith(("hook_pattern", "hook_attn_scores"))


# ---------------------------------------------------------------------------------------------- config
def test_config_names_the_architecture(tmp_path):
    _, model = _pair("qwen2", tmp_path)
    cfg = model.cfg
    assert (cfg.model_type, cfg.architecture, cfg.original_architecture) == ("qwen2", *["Qwen2ForCausalLM"] * 2)
    assert cfg.sliding_window == WINDOW and [cfg.attention_window(i) for i in range(3)] == [None, WINDOW, WINDOW]
    assert cfg.has_qkv_bias and not cfg.has_o_bias and model.blocks[0].attn.o_proj.bias is None
    assert model.extra_repr().startswith("qwen2, layers=0..2 of 3")


@pytest.mark.parametrize(
    "changes",
    [
        {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 2, "num_hidden_layers": 5},
        {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 28},
        {"use_sliding_window": False, "sliding_window": 3, "max_window_layers": 0},
        {"use_sliding_window": True, "sliding_window": 3, "layer_types": ["sliding_attention", "full_attention"]},
    ],
)
@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_qwen_layer_windows_follow_transformers(model_type, changes):
    """Which layers slide, read from config.json as transformers 4.x (no layer_types) and 5.x (with) write it."""
    import transformers

    config_class = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[model_type]
    base = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2}
    hf_config = config_class(**(base | changes))
    expected = [hf_config.sliding_window if kind == "sliding_attention" else None for kind in hf_config.layer_types]
    saved = json.loads(hf_config.to_json_string())
    for config_json in (saved, {k: v for k, v in saved.items() if k != "layer_types"}):
        if "layer_types" in changes and "layer_types" not in config_json:
            continue  # an explicit layer_types has no 4.x spelling
        cfg = LlamaConfig.from_hf(config_json)
        assert [cfg.attention_window(i) for i in range(cfg.n_layers)] == expected


def test_config_defaults_are_transformers_class_defaults():
    """Keys a config.json leaves out mean what transformers' class makes of them."""
    import transformers

    shape = {"hidden_size": 64, "num_attention_heads": 32, "intermediate_size": 128, "num_hidden_layers": 2}
    classes = {
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }
    for model_type, config_class in classes.items():
        cfg = LlamaConfig.from_hf({"model_type": model_type, "vocab_size": 128} | shape)
        reference = config_class(vocab_size=128, **shape)
        assert cfg.n_kv_heads == reference.num_key_value_heads
        # Qwen3's default head_dim is 128, not d_model // n_heads.
        assert cfg.d_head == getattr(reference, "head_dim", None) or shape["hidden_size"] // 32
        assert cfg.sliding_window == reference.sliding_window
    # An explicit null switches Mistral's window off.
    assert (
        LlamaConfig.from_hf({"model_type": "mistral", "vocab_size": 128, "sliding_window": None} | shape).sliding_window
        is None
    )


@pytest.mark.parametrize(
    ("config_json", "message"),
    [
        ({"model_type": "mistral", "layer_types": ["full_attention"] * 2}, r"unsupported key\(s\) \['layer_types'\]"),
        ({"model_type": "mistral", "attention_bias": True}, r"unsupported key\(s\) \['attention_bias'\]"),
        ({"model_type": "qwen2", "mlp_bias": True}, r"unsupported key\(s\) \['mlp_bias'\]"),
        ({"model_type": "qwen3", "max_window_layers": "2"}, "max_window_layers must be an integer"),
        ({"model_type": "qwen2", "layer_types": ["sliding_attention", "full_attention"]}, "no window"),
        ({"model_type": "qwen2", "layer_types": ["full_attention"]}, "layer_types must list one of"),
        ({"model_type": "qwen3", **SLIDING, "sliding_window": 0}, "sliding_window must be a positive"),
        ({"model_type": "mistral", "sliding_window": "4096"}, "sliding_window must be an integer"),
        ({"model_type": "gemma2"}, "model_type is 'gemma2'"),
    ],
)  # fmt: skip
def test_bad_architecture_keys_are_named(config_json, message):
    shape = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128, "num_hidden_layers": 2}
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_hf({"vocab_size": 128} | shape | config_json, source="x/config.json")


def test_qwen2_ignores_attention_bias_as_transformers_does():
    shape = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}
    shape |= {"num_hidden_layers": 2, "vocab_size": 128}
    cfg = LlamaConfig.from_hf({"model_type": "qwen2", "attention_bias": False} | shape)
    assert cfg.has_qkv_bias and not cfg.has_o_bias


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model_type": "llama", "qk_norm": True}, "llama models have no qk_norm"),
        ({"model_type": "mistral", "qkv_bias": True}, "mistral models have no qkv_bias"),
        ({"model_type": "qwen2", "qkv_bias": True, "attention_bias": True}, "qwen2 models have no attention_bias"),
        ({"model_type": "qwen2"}, "qwen2 models always have qkv_bias=True"),
        ({"model_type": "qwen3"}, "qwen3 models always have qk_norm=True"),
        ({"model_type": "llama", "sliding_window": 4}, "llama models have no sliding_window"),
        ({"model_type": "qwen3", "qk_norm": True, "layer_types": ("full_attention",)}, "one of"),
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not one of"),
    ],
)
def test_config_refuses_switches_outside_their_architecture(fields, message):
    from support.models import tiny_config

    with pytest.raises(ConfigError, match=message):
        tiny_config(**fields)


@pytest.mark.parametrize("case", ["mistral", "qwen2", "qwen3", "qwen3-bias-mha-tied"])
def test_to_hf_round_trips_through_transformers(case, tmp_path):
    """Our config written as config.json is read by transformers as the same model: equal logits."""
    hf_model, model = _pair(case, tmp_path)
    import transformers

    config_class = type(hf_model.config)
    rebuilt = json.loads(config_class(**model.cfg.to_hf()).to_json_string())
    assert LlamaConfig.from_hf(rebuilt) == model.cfg.replace(checkpoint_dtype=rebuilt.get("dtype"))
    twin = getattr(transformers, model.cfg.architecture)(config_class(**model.cfg.to_hf())).eval()
    twin.load_state_dict(hf_model.state_dict())
    tokens = _tokens()
    with torch.no_grad():
        assert _max_diff(twin(tokens).logits, hf_model(tokens).logits) == 0.0


# ----------------------------------------------------------------------------------- logits, every path
@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers_on_both_attention_paths(case, tmp_path, device):
    hf_model, model = _pair(case, tmp_path, device)
    tokens = _tokens(device=device)
    with torch.no_grad():
        expected = hf_model(tokens).logits
        fused = model(tokens)
        written_out, cache = model.run_with_cache(tokens, names_filter=_pattern_names)
    assert len(cache) == 2 * model.cfg.n_layers  # the pattern hooks were on: the written-out path ran
    assert _max_diff(fused, expected) <= ATOL
    assert _max_diff(written_out, expected) <= ATOL


@pytest.mark.parametrize("case", ["mistral", "qwen2", "qwen3"])
def test_left_padded_batches_match_transformers(case, tmp_path, device):
    """Padding with a window: distances count cache positions, padding included, as transformers' masks do."""
    hf_model, model = _pair(case, tmp_path, device)
    tokens = _tokens(device=device)
    attention_mask = torch.ones_like(tokens)
    attention_mask[0, :5] = 0
    tokens[0, :5] = 0
    real = attention_mask.bool()
    with torch.no_grad():
        expected = hf_model(tokens, attention_mask=attention_mask).logits
        fused = model(tokens, attention_mask=attention_mask)
        written_out, _ = model.run_with_cache(tokens, attention_mask=attention_mask, names_filter=_pattern_names)
    assert _max_diff(fused[real], expected[real]) <= ATOL
    assert _max_diff(written_out[real], expected[real]) <= ATOL


@pytest.mark.parametrize("case", ["mistral", "mistral-mha", "qwen2", "qwen3"])
def test_patterns_match_transformers_and_are_zero_outside_the_window(case, tmp_path):
    hf_model, model = _pair(case, tmp_path)
    eager = tiny_transformers_model(CASES[case][0], attn_implementation="eager", **CASES[case][1])
    tokens = _tokens()
    with torch.no_grad():
        expected = eager(tokens, output_attentions=True).attentions  # per layer [batch, n_heads, q_pos, k_pos]
        _, cache = model.run_with_cache(tokens, names_filter=_pattern_names)
    query = torch.arange(PROMPT_LEN)[:, None]
    key = torch.arange(PROMPT_LEN)[None, :]
    for layer in range(model.cfg.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        scores = cache[f"blocks.{layer}.attn.hook_attn_scores"]
        torch.testing.assert_close(pattern, expected[layer], atol=1e-5, rtol=0)
        window = model.cfg.attention_window(layer)
        hidden = key > query if window is None else (key > query) | (key <= query - window)  # [q_pos, k_pos]
        assert bool((pattern[..., hidden] == 0).all()) and bool((scores[..., hidden] == float("-inf")).all())
        assert bool((pattern[..., ~hidden] > 0).all())
        torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern[..., 0]))
    windows = [model.cfg.attention_window(i) for i in range(model.cfg.n_layers)]
    assert WINDOW in windows  # every case here slides somewhere


@pytest.mark.parametrize("case", ["mistral", "qwen2", "qwen3"])
def test_kv_cache_chunks_match_transformers(case, tmp_path, device):
    """Logits of a prompt fed in pieces through the KV cache (past the window) equal transformers' in one go."""
    hf_model, model = _pair(case, tmp_path, device)
    tokens = _tokens(pos=PROMPT_LEN + 3, device=device)
    with torch.no_grad():
        expected = hf_model(tokens).logits
        for names_filter in (None, _pattern_names):
            kv_cache = ll.KVCache()
            pieces = []
            with model.hooks([(names_filter, lambda x, hook: None)] if names_filter else []):
                for start, stop in [(0, 6), (6, 7), (7, 12), (12, 13), (13, 15)]:
                    pieces.append(model(tokens[:, start:stop], kv_cache=kv_cache))
            assert _max_diff(torch.cat(pieces, dim=1), expected) <= ATOL


@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_matches_transformers(case, tmp_path, device):
    """Generation past the window with the KV cache, on both attention paths, and without the cache."""
    hf_model, model = _pair(case, tmp_path, device)
    hf_model.generation_config.eos_token_id = None  # compare all the steps
    prompt = _tokens(batch=1, device=device)
    new = 12
    with torch.no_grad():
        out = hf_model.generate(
            prompt, max_new_tokens=new, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
    top2 = torch.stack(out.scores)[:, 0].topk(2).values
    assert bool((top2[:, 0] - top2[:, 1] > 10 * ATOL).all())  # no near-tie that rounding could flip
    expected = out.sequences[0, PROMPT_LEN:].tolist()
    pattern_hook = [(_pattern_names, lambda x, hook: None)]
    for kwargs in ({}, {"fwd_hooks": pattern_hook}, {"use_kv_cache": False}):
        generated = model.generate(prompt, max_new_tokens=new, temperature=0, stop_at_eos=False, **kwargs)
        assert generated.tokens[0] == expected, kwargs


# ----------------------------------------------------------------------------------------------- Qwen3 norms
def test_qwen3_q_norm_and_k_norm_hooks(tmp_path):
    hf_model, model = _pair("qwen3", tmp_path)
    cfg = model.cfg
    assert cfg.qk_norm and cfg.use_qk_norm and cfg.d_head == 24
    names = [n for n in model.hook_names if n.startswith("blocks.0.attn.")]
    assert names[:7] == [
        "blocks.0.attn.hook_q",
        "blocks.0.attn.hook_k",
        "blocks.0.attn.hook_v",
        "blocks.0.attn.q_norm.hook_scale",
        "blocks.0.attn.q_norm.hook_normalized",
        "blocks.0.attn.k_norm.hook_scale",
        "blocks.0.attn.k_norm.hook_normalized",
    ]
    # transformers' q_norm/k_norm outputs, caught with torch hooks: ours are hook_normalized times the weight.
    caught = {}
    attn = hf_model.model.layers[1].self_attn
    handles = [
        module.register_forward_hook(lambda mod, args, out, key=key: caught.__setitem__(key, out))
        for key, module in (("q", attn.q_norm), ("k", attn.k_norm))
    ]
    tokens = _tokens()
    try:
        with torch.no_grad():
            hf_model(tokens)
            _, cache = model.run_with_cache(tokens)
    finally:
        for handle in handles:
            handle.remove()
    ours = model.blocks[1].attn
    for key, norm in (("q", ours.q_norm), ("k", ours.k_norm)):
        normalized = cache[f"blocks.1.attn.{key}_norm.hook_normalized"]
        heads = cfg.n_heads if key == "q" else cfg.n_kv_heads
        assert normalized.shape == (2, PROMPT_LEN, heads, cfg.d_head)
        assert cache[f"blocks.1.attn.{key}_norm.hook_scale"].shape == (2, PROMPT_LEN, heads, 1)
        torch.testing.assert_close(norm.w * normalized, caught[key], atol=1e-5, rtol=0)
        # The scale is the root mean square over d_head of the hooked q/k.
        raw = cache[f"blocks.1.attn.hook_{key}"]
        rms = (raw.pow(2).mean(-1, keepdim=True) + cfg.norm_eps).sqrt()
        torch.testing.assert_close(cache[f"blocks.1.attn.{key}_norm.hook_scale"], rms)
    # Replacing q_norm's output changes what follows: zero queries score every visible key alike, so layer 1's
    # pattern is uniform over the window.
    zero = [("blocks.1.attn.q_norm.hook_normalized", lambda x, hook: torch.zeros_like(x))]
    with torch.no_grad(), model.hooks(fwd_hooks=zero):
        _, patched = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_pattern")
    visible = torch.ones(PROMPT_LEN, PROMPT_LEN).tril().triu(-(WINDOW - 1))  # [q_pos, k_pos]
    uniform = visible / visible.sum(-1, keepdim=True)
    torch.testing.assert_close(
        patched["blocks.1.attn.hook_pattern"], uniform.expand_as(patched["blocks.1.attn.hook_pattern"])
    )


# --------------------------------------------------------------------------------- lens, plots, widgets
@pytest.mark.parametrize("case", ["mistral", "qwen2", "qwen3"])
def test_lens_matches_transformers_hidden_states(case, tmp_path):
    hf_model, model = _pair(case, tmp_path)
    tokens = _tokens()
    with torch.no_grad():
        out = hf_model(tokens, output_hidden_states=True)
        # transformers' hidden_states[i + 1] is layer i's output; the last one is already normed.
        expected = [hf_model.lm_head(hf_model.model.norm(h)) for h in out.hidden_states[1:-1]] + [out.logits]
    result = ll.logit_lens(model, tokens, readout="resid_post", keep_logits=True)
    assert result.labels == [f"{i}_post" for i in range(model.cfg.n_layers)]
    assert _max_diff(result.logits, torch.stack(expected, dim=1)) <= ATOL
    assert len(result.to_frame()) > 0


@pytest.mark.parametrize("case", ["mistral", "qwen3"])
def test_attention_plots_and_widgets_show_the_window(case, tmp_path):
    import matplotlib.pyplot as plt

    _, model = _pair(case, tmp_path)
    text = "a sliding window"
    _, cache = model.run_with_cache(model.to_tokens(text), names_filter=_pattern_names)
    figure = ll.plot.attention(cache, 1, 0, tokens=model.to_str_tokens(text))
    assert figure.axes
    plt.close(figure)

    explorer = ll_widgets.AttentionExplorer(model, text, layers=[0, 1], head=1)
    state = json.loads(json.dumps(explorer.state))
    assert state["head"] == {"layer": 0, "head": 1} and state["layers"] == [0, 1]
    n = len(explorer.tokens)
    words = np.frombuffer(explorer.patterns, dtype="<u2")
    tri = n * (n + 1) // 2
    shown = np.zeros((n, n))
    index = 1 * model.cfg.n_heads + 1  # layer 1, head 1
    shown[np.tril_indices(n)] = words[index * tri : (index + 1) * tri] / 65535
    np.testing.assert_allclose(shown, cache["blocks.1.attn.hook_pattern"][0, 1].numpy(), atol=1 / 65535)
    assert (shown[np.tril_indices(n, -WINDOW)] == 0).all()  # the page gets the window's zeros

    lens = ll_widgets.LogitLensExplorer(model, text, top_k=3)
    assert json.loads(json.dumps(lens.state))["lens"] == "logit"
    assert lens.result.labels[-1] == f"{model.cfg.n_layers - 1}_post"


@pytest.mark.parametrize("case", ["mistral", "qwen2", "qwen3-bias-mha-tied"])
def test_our_hf_writer_round_trips_every_architecture(case, tmp_path):
    """write_hf_checkpoint (config.to_hf and the rename table read backwards) gives a folder transformers and
    ll.load both read as the same model; a Meta layout is refused."""
    import transformers

    from llama_lens.testing import write_hf_checkpoint, write_meta_checkpoint

    hf_model, model = _pair(case, tmp_path / "theirs")
    state = {name: param.detach() for name, param in model.state_dict().items()}
    write_hf_checkpoint(tmp_path / "ours", model.cfg, state)
    reread = ll.load(tmp_path / "ours", progress=False)
    again = getattr(transformers, model.cfg.architecture).from_pretrained(tmp_path / "ours").eval()
    tokens = _tokens()
    with torch.no_grad():
        assert _max_diff(reread(tokens), hf_model(tokens).logits) <= ATOL
        assert _max_diff(again(tokens).logits, hf_model(tokens).logits) <= ATOL
    with pytest.raises(ValueError, match="Meta checkpoints hold Llama models only"):
        write_meta_checkpoint(tmp_path / "meta", model.cfg, state)


# Published config.json files, every key as released.
MISTRAL_7B_V01 = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000,
}  # fmt: skip
QWEN25_7B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
}  # fmt: skip
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 12288, "max_position_embeddings": 40960, "max_window_layers": 36, "model_type": "qwen3",
    "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936,
}  # fmt: skip


@pytest.mark.parametrize("config_json", [MISTRAL_7B_V01, QWEN25_7B_INSTRUCT, QWEN3_8B], ids=lambda c: c["model_type"])
def test_published_configs_read_as_transformers_reads_them(config_json):
    import transformers

    reference = transformers.AutoConfig.for_model(**config_json)
    cfg = LlamaConfig.from_hf(config_json)
    assert cfg.architecture == config_json["architectures"][0]
    head_dim = getattr(reference, "head_dim", None) or reference.hidden_size // reference.num_attention_heads
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab) == (
        reference.hidden_size,
        reference.num_hidden_layers,
        reference.num_attention_heads,
        reference.num_key_value_heads,
        head_dim,
        reference.intermediate_size,
        reference.vocab_size,
    )
    assert cfg.rope_theta == reference.rope_parameters["rope_theta"] and cfg.norm_eps == reference.rms_norm_eps
    layer_types = getattr(reference, "layer_types", None) or ["sliding_attention"] * reference.num_hidden_layers
    windows = [reference.sliding_window if kind == "sliding_attention" else None for kind in layer_types]
    assert [cfg.attention_window(i) for i in range(cfg.n_layers)] == windows


@pytest.mark.parametrize("case", ["mistral", "qwen3"])
def test_streamed_and_partial_loads(case, tmp_path):
    hf_model, model = _pair(case, tmp_path)
    tokens = _tokens()
    streamed = ll.load(tmp_path, stream=True, progress=False)
    first = ll.load(tmp_path, layers=range(0, 1), progress=False)
    with torch.no_grad():
        out = hf_model(tokens, output_hidden_states=True)
        assert _max_diff(streamed(tokens), out.logits) <= ATOL
        resid = first(tokens, stop_at_layer=1)
    torch.testing.assert_close(resid, out.hidden_states[1], atol=1e-5, rtol=0)


def test_a_bias_the_architecture_lacks_is_named(tmp_path):
    """Qwen2 has q/k/v biases but none on o: a stored o_proj.bias is refused, the architecture named."""
    from safetensors.torch import load_file, save_file

    _pair("qwen2", tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"o_proj.bias.*a Qwen2ForCausalLM has no such bias"):
        ll.Checkpoint(tmp_path, index_cache=False)


@pytest.mark.parametrize("case", ["mistral", "qwen2"])
def test_left_padded_batch_generation_matches_transformers(case, tmp_path):
    """Two prompts of different lengths in one left-padded batch, generated past the window."""
    hf_model, model = _pair(case, tmp_path)
    hf_model.generation_config.eos_token_id = None
    prompts = ["a window of text", "short"]
    tokens, attention_mask = model.prepare_tokens(prompts)
    assert attention_mask is not None and int(attention_mask[1].sum()) < tokens.shape[1]  # the second is padded
    new = 10
    with torch.no_grad():
        out = hf_model.generate(
            tokens,
            attention_mask=attention_mask,
            max_new_tokens=new,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    top2 = torch.stack(out.scores).topk(2).values  # [new, batch, 2]
    assert bool((top2[..., 0] - top2[..., 1] > 10 * ATOL).all())
    generated = model.generate(prompts, max_new_tokens=new, temperature=0, stop_at_eos=False)
    assert generated.tokens == out.sequences[:, tokens.shape[1] :].tolist()
