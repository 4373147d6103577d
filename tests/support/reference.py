"""transformers' LlamaForCausalLM built from the same random weights as ours: the reference for parity tests."""

import re

import torch

from llama_lens.config import LlamaConfig
from support.models import tiny_model

_HF_TO_OURS = [
    (r"^model\.embed_tokens\.", "embed."),
    (r"^model\.norm\.", "ln_final."),
    (r"^lm_head\.", "unembed."),
    (r"^model\.layers\.(\d+)\.self_attn\.", r"blocks.\1.attn."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"blocks.\1.ln1."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"blocks.\1.ln2."),
    (r"^model\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
]


def hf_name_to_ours(name: str) -> str:
    for pattern, repl in _HF_TO_OURS:
        name, count = re.subn(pattern, repl, name)
        if count:
            return name
    raise KeyError(name)


def reference_pair(cfg: LlamaConfig, *, seed: int = 0, attn: str = "eager", device: str | torch.device = "cpu"):
    """(transformers model, our model) holding identical random float32 weights, on `device`.

    Our model is `tiny_model(cfg, seed=seed, scale=4.0)` (matrices with std 0.08, so attention is not near
    uniform); transformers' gets a copy of each tensor under its own name, renamed by the table above, which is
    independent of the loader's.
    """
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    ours = tiny_model(cfg, seed=seed, scale=4.0)
    hf_cfg = HFConfig(**cfg.to_hf())
    hf_cfg._attn_implementation = attn
    hf = LlamaForCausalLM(hf_cfg).eval()
    state = ours.state_dict()
    hf.load_state_dict({name: state[hf_name_to_ours(name)].clone() for name in hf.state_dict()}, strict=True)
    return hf.to(device), ours.to(device)
