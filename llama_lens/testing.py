"""Random Llama weights for tests, benchmarks and notebooks, and the checkpoint writers (from `writer`).

cfg = LlamaConfig(d_model=64, n_layers=2, ...)
state = random_state_dict(cfg)                        # our parameter names
write_hf_checkpoint(tmp / "hf", cfg, state, shards=3)  # model-0000k-of-00003.safetensors + index + config
write_meta_checkpoint(tmp / "meta", cfg, state, mp=2)  # consolidated.0k.pth + params.json
"""

from __future__ import annotations

import torch

from .config import LlamaConfig
from .io.names import is_norm_weight, param_shapes

# The writers live in llama_lens.io.writer; they are importable from here too, where tests and notebooks look.
from .io.writer import meta_params, write_hf_checkpoint, write_meta_checkpoint

__all__ = ["meta_params", "random_state_dict", "write_hf_checkpoint", "write_meta_checkpoint"]


def random_state_dict(cfg: LlamaConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Plausible random weights under our parameter names (see `names.param_shapes`).

    Matrices and biases are normal with std 0.02, norm weights 1 + normal noise (std 0.1), so activations
    keep a sensible scale through many layers (Qwen3's q_norm/k_norm count as norms). With tied embeddings
    `unembed.weight` is the same tensor object as `embed.weight`.
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in param_shapes(cfg).items():
        if name == "unembed.weight" and cfg.tie_embeddings:
            state[name] = state["embed.weight"]
            continue
        values = torch.randn(shape, generator=generator)
        if is_norm_weight(name):
            values = 1 + 0.1 * values
        else:
            values = 0.02 * values
        state[name] = values.to(dtype)
    return state
