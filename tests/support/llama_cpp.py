"""llama.cpp's own conventions, written out independently of llama_lens: the oracle its GGUF tests check against."""

import torch


def llama_cpp_permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's rotate-half q/k rows to Meta's interleaved order (how a
    llama GGUF stores q/k weights and biases)."""
    return (
        weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )
