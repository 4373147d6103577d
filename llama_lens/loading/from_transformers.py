"""`from_transformers`: a HookedLlama over the weights of a transformers model already in memory, without a copy.

For users who already hold a `LlamaForCausalLM` (or Mistral, Qwen2, Qwen3) in a notebook: the hooked model's
parameters are the transformers model's own `nn.Parameter` objects, so both see every in-place edit and the
weights take memory once.

transformers is never imported here: the model is recognised by its class name and read through its config's
`to_dict()`, exactly as a config.json on disk would be.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import ARCHITECTURES, LlamaConfig
from ..errors import ArgumentError, CheckpointError
from ..io.names import HF_IGNORED, HF_TO_CANONICAL, layer_template, param_shapes, rename

SUPPORTED_CLASSES = tuple(architecture for architecture, _ in ARCHITECTURES.values())


def from_transformers(hf_model: Any, tokenizer: Any = None):
    """Wraps a loaded transformers causal LM as a HookedLlama sharing its weights (same storage, no copy).

    Args:
        hf_model: a `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM` or `Qwen3ForCausalLM`, on one
            device, in one dtype, not quantized.
        tokenizer: set as `model.tokenizer`: a transformers tokenizer, a `tokenizers.Tokenizer`, one of ours,
            or a path; None for none.

    Returns:
        HookedLlama in eval mode whose parameters are `hf_model`'s (`requires_grad` as they are there).

    Raises:
        ArgumentError (a ValueError): another class, a quantized model, or weights on several devices, in
            several dtypes or on the meta device (offloaded).
        ConfigError: the model's config has a key that changes the forward pass in a way llama_lens does not
            implement (named).
    """
    from ..model.llama import HookedLlama

    class_name = type(hf_model).__name__
    if class_name not in SUPPORTED_CLASSES:
        raise ArgumentError(
            f"from_transformers takes a {', '.join(SUPPORTED_CLASSES)}, got a {class_name}; for a base model "
            "without its language-model head, pass the ...ForCausalLM that holds it"
        )
    config = getattr(hf_model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ArgumentError(f"this {class_name} has no transformers config (.config.to_dict()) to read its shape from")
    hf_config = config.to_dict()
    if hf_config.get("quantization_config") is not None:
        raise ArgumentError(
            f"this {class_name} is quantized ({hf_config['quantization_config'].get('quant_method', '?')}); "
            "from_transformers shares plain float weights: load it without quantization, or pass its folder to "
            "ll.load"
        )
    cfg = LlamaConfig.from_hf(hf_config, source=f"{class_name}.config")
    if cfg.architecture != class_name:
        raise ArgumentError(f"a {class_name} whose config says model_type={cfg.model_type!r}; they must agree")
    if cfg.tie_embeddings and _head_is_untied(hf_model):
        # transformers ties the weights when it builds the model; a head given a Parameter of its own afterwards
        # (`hf_model.lm_head.weight = ...`) is what its forward uses, whatever the config says: ours too.
        cfg = cfg.replace(tie_embeddings=False)

    state = _shared_state(hf_model, cfg, class_name)
    with torch.device("meta"):
        model = HookedLlama(cfg)
    for name, param in model.named_parameters(remove_duplicate=False):
        # load_state_dict(assign=True) sets the assigned Parameter's requires_grad to ours: match theirs first,
        # so that wrapping never unfreezes the user's weights.
        param.requires_grad_(state[name].requires_grad)
    model.load_state_dict(state, strict=True, assign=True)
    if tokenizer is not None:
        from ..tokenizer.load import as_tokenizer

        tokenizer = as_tokenizer(tokenizer)
    model.tokenizer = tokenizer
    return model.eval()


def _head_is_untied(hf_model: Any) -> bool:
    """Whether the model's output head holds a weight other than its token embedding's Parameter."""
    state = hf_model.state_dict(keep_vars=True)
    by_name = {rename(stored, HF_TO_CANONICAL): param for stored, param in state.items()}
    unembed = by_name.get("unembed.weight")
    return unembed is not None and unembed is not by_name.get("embed.weight")


def _shared_state(hf_model: Any, cfg: LlamaConfig, class_name: str) -> dict[str, torch.nn.Parameter]:
    """Our parameter name -> the transformers model's own Parameter, checked for names, shapes, device, dtype."""
    state: dict[str, torch.nn.Parameter] = {}
    for stored, param in hf_model.state_dict(keep_vars=True).items():
        canonical = rename(stored, HF_TO_CANONICAL)
        if canonical is None:
            if layer_template(stored)[0] in HF_IGNORED:
                continue
            raise CheckpointError(f"{class_name} holds {stored!r}, which has no place in a {cfg.architecture}")
        state[canonical] = param
    if cfg.tie_embeddings:
        # One Parameter under both names keeps them tied, as transformers ties them.
        state["unembed.weight"] = state.get("embed.weight")
    expected = param_shapes(cfg)
    missing = sorted(set(expected) - {name for name, param in state.items() if param is not None})
    if missing:
        raise CheckpointError(f"{class_name} lacks the weights {missing} its config implies")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"{class_name} holds weights its config does not imply: {unexpected}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(
                f"{class_name}: {name} is {list(state[name].shape)}, its config implies {list(shape)}"
            )
    placements = {(param.device, param.dtype) for param in state.values()}
    if any(device.type == "meta" for device, _ in placements):
        raise ArgumentError(
            f"some of this {class_name}'s weights are on the meta device (offloaded by device_map); load it "
            "whole on one device"
        )
    if len(placements) > 1:
        found = sorted(f"{device} {str(dtype).removeprefix('torch.')}" for device, dtype in placements)
        raise ArgumentError(
            f"this {class_name}'s weights are spread over {found}; from_transformers needs one device and one "
            "dtype (e.g. hf_model.to('cuda', torch.bfloat16) first)"
        )
    return state
