"""transformers' LlamaForCausalLM built from the same random weights as ours: the reference for parity tests."""

import re

import torch

from llama_lens.config import LlamaConfig
from llama_lens.model import HookedLlama

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


def reference_pair(cfg: LlamaConfig, *, seed: int = 0, attn: str = "eager"):
    """(transformers model, our model) holding identical random float32 weights."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    hf_cfg = HFConfig(**cfg.to_hf())
    hf_cfg._attn_implementation = attn
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0, 0.08)
    ours = HookedLlama(cfg)
    ours.load_state_dict({hf_name_to_ours(k): v.clone() for k, v in hf.state_dict().items()}, strict=True)
    return hf, ours.eval()
