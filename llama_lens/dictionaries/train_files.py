"""What a training run writes to its folder `out`:

    out/cfg.json, out/sae_weights.safetensors   the dictionary, in SAELens 6.x's format (`ll.load_dictionary`
                                                and sae-lens read it), written when the run ends
    out/checkpoint.safetensors                  the run's whole state every `checkpoint_every` steps: parameters,
                                                optimiser state, latent firing counts, and in its metadata the
                                                step, the losses so far and the settings it was made with

Both are written atomically (`files.atomic_path`): a run killed at any moment leaves the previous checkpoint whole.

SAELens names: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out]; cfg.json's
`architecture` is "topk" or "standard" for an SAE and "transcoder" for a ReLU transcoder. SAELens has no TopK
transcoder architecture: one is written as "topk" (the same math: relu(topk(x @ W_enc + b_enc)) @ W_dec + b_dec,
with apply_b_dec_to_input false), the hook it writes in metadata.hook_name_out, which `ll.load_dictionary` reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..files import atomic_path, write_text_atomic
from .train_config import TrainDictionaryConfig

CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINT_FORMAT = 1
SAELENS_FORMAT_VERSION = "6.0.0"  # the cfg.json layout written (SAELens 6.x), so readers take the 6.x path


def saelens_cfg(config: TrainDictionaryConfig, *, d_in: int, d_out: int, info: dict[str, Any]) -> dict[str, Any]:
    """cfg.json for a trained dictionary."""
    transcoder = config.is_transcoder
    if config.architecture == "topk":
        architecture = "topk"
    else:
        architecture = "transcoder" if transcoder else "standard"
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": d_in,
        "d_sae": config.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": not transcoder,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if architecture == "topk":
        cfg |= {"k": config.k, "rescale_acts_by_decoder_norm": False}
    if transcoder:
        cfg["d_out"] = d_out
    metadata: dict[str, Any] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": SAELENS_FORMAT_VERSION,
        "hook_name": config.hook_in,
        "llama_lens_training": info,
    }
    if transcoder:
        metadata["hook_name_out"] = config.hook_out
    return cfg | {"metadata": metadata}


def write_saelens(folder: Path, weights: dict[str, torch.Tensor], cfg: dict[str, Any]) -> None:
    """The dictionary's two files; `weights` in the trainer's names (W_in [d_sae, d_in], b_enc, W_dec, b_dec)."""
    from safetensors.torch import save_file

    tensors = {
        "W_enc": weights["W_in"].T.contiguous(),
        "b_enc": weights["b_enc"].contiguous(),
        "W_dec": weights["W_dec"].contiguous(),
        "b_dec": weights["b_dec"].contiguous(),
    }
    with atomic_path(folder / "sae_weights.safetensors") as temporary:
        save_file(tensors, str(temporary), metadata={"format": "pt"})
    write_text_atomic(folder / "cfg.json", json.dumps(cfg, indent=2))


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], *, state: dict[str, Any]) -> None:
    """The run's tensors and its state (JSON in the file's metadata), as one file written atomically."""
    from safetensors.torch import save_file

    contiguous = {name: t.detach().contiguous() for name, t in tensors.items()}
    with atomic_path(folder / CHECKPOINT_FILE) as temporary:
        metadata = {"llama_lens": json.dumps(state | {"format": CHECKPOINT_FORMAT})}
        save_file(contiguous, str(temporary), metadata=metadata)


def read_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(tensors, state) of the checkpoint in `folder`, or None if there is none.

    Raises:
        CheckpointError: a checkpoint that is not one llama_lens wrote, or is damaged.
    """
    from safetensors import SafetensorError, safe_open

    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 - safe_open has no iter
        state = json.loads(metadata["llama_lens"])
    except (SafetensorError, KeyError, ValueError, OSError) as err:
        raise CheckpointError(
            f"{path} is not a training checkpoint llama_lens can read ({err}); delete it to start the run afresh"
        ) from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {state.get('format')!r}; this llama_lens writes 1")
    return tensors, state
