"""`load`: a checkpoint folder (or GGUF file) in, a HookedLlama holding only the asked-for layers out."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..io.checkpoint import Checkpoint
from ..validate import check_layers, resolve_device, resolve_dtype


def load(
    path: str | os.PathLike | Checkpoint,
    *,
    dtype: torch.dtype | str | None = torch.float32,
    device: torch.device | str = "cpu",
    layers: Iterable[int] | None = None,
    stream: bool = False,
    tokenizer: Any = None,
    index_cache: str | os.PathLike | bool | None = None,
    unembed: str = "auto",
    check_memory: bool = True,
    progress: bool = True,
):
    """Opens a checkpoint and returns a HookedLlama holding its weights.

    Everything after `path` is a keyword, named as in `ll.plan` (dtype, device, layers, stream, unembed), so that
    the estimate of a load is the same call with `load` replaced by `plan`.

    The model is built on the meta device and filled with the tensors as they are read, one layer at a time,
    each cast to `dtype` as soon as it is read: peak memory is about one copy of what was asked for.

    Args:
        path: a checkpoint folder (Hugging Face or Meta layout, see `Checkpoint`), a .gguf file (each tensor
            dequantized into `dtype` as it is read), or an open Checkpoint.
        dtype: torch dtype or "float32", "bfloat16", "float16", "float64"; None: the dtype most of the
            checkpoint's tensors are stored in (`Checkpoint.stored_dtype`), every tensor cast to it, as the
            forward pass needs one dtype (some checkpoints store the norms in float32 beside bfloat16 matrices).
        device: where the weights go ("cpu", "cuda", "cuda:1", ...).
        layers: decoder layers to load (e.g. `range(0, 3)`); default all. The embedding, final norm and
            unembedding are always loaded, so a partial model still gives logits.
        stream: read each decoder layer when the forward pass reaches it, and the embedding's rows of the
            prompt's tokens only, and keep only the final norm and the unembedding in memory (a
            `StreamedLlama`, see `llama_lens.loading.stream`).
        tokenizer: a tokenizer file or folder, a tokenizer object (ours, transformers' or a
            `tokenizers.Tokenizer`), or None for the checkpoint's own tokenizer.json / tokenizer.model (if any).
        index_cache: where to cache the shard index (see `Checkpoint`).
        unembed: with `stream=True`, how to hold the unembedding: "memory" (read now and held), "stream" (read
            from disk a vocabulary block at a time at each forward pass and by the logit lens: a read of
            d_vocab x d_model per pass, for the least memory) or "auto" (default: held unless memory is short, see
            `ll.plan` and `plan.choose_unembed`). Without streaming it is always held ("stream" is refused).
        check_memory: refuse, before reading, a load whose weights cannot fit in the memory available
            (see `ll.plan`); False to try anyway.
        progress: show progress bars (loading; with `stream=True`, each forward pass).

    Returns:
        HookedLlama in eval mode, with `.tokenizer` set (None when neither given nor found).

    Raises:
        ArgumentError (a ValueError): for a bad dtype, device, layer range or unembed mode.
        CheckpointError, ConfigError (ValueErrors): a corrupt checkpoint, or a config llama_lens cannot run.
        MissingFileError (a FileNotFoundError): for a missing folder, config or weight file.
        NotEnoughMemoryError (a MemoryError and ValueError): the weights would not fit; the message gives the
            estimate and suggests stream=True, layers=range(...) or a smaller dtype.
    """
    from ..model.llama import HookedLlama

    dtype, device = resolve_dtype(dtype), resolve_device(device)
    ckpt = path if isinstance(path, Checkpoint) else Checkpoint(path, index_cache=index_cache)
    layer_indices = check_layers(layers, ckpt.config.n_layers)
    dtype = dtype or ckpt.stored_dtype
    # The tokenizer first: a bad tokenizer path should fail before minutes of reading weights.
    tokenizer = _resolve_tokenizer(tokenizer, ckpt)
    from .plan import check_fits, choose_unembed

    if check_memory:
        unembed = check_fits(
            ckpt, layers=layer_indices, dtype=dtype, device=device, stream=stream, unembed=unembed
        ).unembed
    else:
        unembed = choose_unembed(ckpt, unembed, stream=stream, dtype=dtype, layers=layer_indices, device=device)
    if stream:
        from .stream import load_streamed

        return load_streamed(
            ckpt, dtype=dtype, device=device, layers=layer_indices, tokenizer=tokenizer, progress=progress,
            unembed=unembed,
        )  # fmt: skip
    with torch.device("meta"):
        model = HookedLlama(ckpt.config, layers=layer_indices)
    state = ckpt.state_dict(ckpt.params_for(layer_indices), dtype=dtype, device=device, progress=progress)
    if ckpt.config.tie_embeddings:
        # One Parameter under both names keeps the weights tied (and counted once) after assign=True.
        state["embed.weight"] = state["unembed.weight"] = nn.Parameter(state["embed.weight"])
    model.load_state_dict(state, strict=True, assign=True)
    model.tokenizer = tokenizer
    return model.eval()


def _resolve_tokenizer(tokenizer: Any, ckpt: Checkpoint) -> Any:
    """The given tokenizer (a path, or an object wrapped by `as_tokenizer`), else the checkpoint's own."""
    if tokenizer is None and ckpt.tokenizer_path is None:
        return None
    from ..tokenizer.load import as_tokenizer, load_tokenizer

    if tokenizer is not None:
        return as_tokenizer(tokenizer)
    found = load_tokenizer(ckpt.tokenizer_path)
    if ckpt.tokenizer_path.parent != ckpt.path and found.vocab_size > ckpt.config.d_vocab:
        # One folder up (a Llama 2 layout) it may belong to another model: ids past the embedding would say so.
        warnings.warn(
            f"{ckpt.tokenizer_path} (one folder up from the checkpoint) has {found.vocab_size} tokens, more than "
            f"the model's {ckpt.config.d_vocab}: it is another model's, so the model has no tokenizer; pass "
            "tokenizer= to load()",
            stacklevel=3,
        )
        return None
    return found
