"""`ll.train_transcoder_set`: one TopK transcoder per layer of a model, the set an attribution graph needs.

    transcoders = ll.train_transcoder_set(model, texts=ll.generated_texts(200), d_sae=1536, k=32,
                                          model_name="SmolLM2-135M-Instruct")
    graph = ll.attribution_graph(model, prompt, transcoders)
    transcoders.info["layers"][i]["final_fvu"]      # what each layer's run reached

Layer i's transcoder reads `blocks.{i}.mlp.hook_in` (the MLP's input after its norm) and writes
`blocks.{i}.hook_mlp_out`, as `ll.attribution_graph` expects. The model runs ONCE over the token rows: that pass
fills one activation store per layer (data.store's format, each checked and read by its own layer's run only),
then each layer is trained by `ll.train_dictionary`'s loop (train.py) from its store.

The set is written in eai-sparsify's layout, which holds TopK transcoders exactly and which `ll.load_dictionary`
(and sparsify's `SparseCoder.load_many`) read as a list: `layers.{i}.mlp/cfg.json` + `sae.safetensors`, beside a
`set.json` with the settings and each layer's training figures.

Caching and atomicity: the set's folder is named after a digest of everything that decides its weights (the
model's shape and a sample of its weights, the tokens, the training settings), so a second call with the same
arguments loads it at once. The work happens in `<folder>.partial/`: the stores, each layer's training run
(checkpointed, so a killed run resumes), and the finished layers; only when every layer is done is the set
renamed to its final name, so a folder under that name is always whole. A final folder without `set.json` is
not one this function wrote, and is refused rather than loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..data.token_rows import token_rows
from ..errors import ArgumentError, ArgumentTypeError, UsageError
from ..files import atomic_path, write_text_atomic
from .dictionary import Dictionary
from .load import load_dictionary
from .train import train_dictionary
from .train_config import RUN_ONLY, TrainDictionaryConfig
from .train_data import collect_stores

SET_FILE = "set.json"  # written last inside the set: a set without it is unfinished
SET_FORMAT = 1
PARTIAL_SUFFIX = ".partial"
# Options the set decides itself: each layer's hooks, and TopK (the architecture sparsify's layout holds).
SET_DECIDES = ("hook_in", "hook_out", "architecture")


class TrainedTranscoders(list):
    """The transcoders of a set, one `Dictionary` per layer in layer order: pass it wherever a list of
    transcoders goes (`ll.attribution_graph`, `graph.intervene`, `ll.widgets.GraphExplorer`).

    Attributes:
        path: the set's folder.
        info: set.json: the settings, the token count and each layer's training figures ("layers": final_fvu,
            l0_last_step, dead_fraction, steps, tokens).
        trained: whether this call trained the set (False: loaded from the cache).
    """

    def __init__(self, transcoders: list[Dictionary], *, path: Path, info: dict[str, Any], trained: bool) -> None:
        super().__init__(transcoders)
        self.path, self.info, self.trained = path, info, trained

    def held_out_fvu(self, model: Any, tokens: torch.Tensor, *, leave_out_bos: bool = True) -> list[float]:
        """Each layer's fraction of variance unexplained of the MLP output on `tokens` [n_rows, pos] (text the
        set was not trained on), from one forward pass: sum |mlp_out - transcoder(mlp_in)|^2 over the
        variance of mlp_out around its mean, per layer; without the BOS tokens unless told (as the set trains)."""
        tokens = _token_rows(model, None, tokens, seq_len=0)  # checked: token ids [n_rows, pos]
        keep = tokens != model.cfg.bos_token_id if leave_out_bos else torch.ones_like(tokens, dtype=torch.bool)
        hooks = {name for d in self for name in (d.hook_in, d.hook_out)}
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in hooks)
            out = []
            for dictionary in self:
                x = cache[dictionary.hook_in][keep.to(cache[dictionary.hook_in].device)].to(dictionary.dtype)
                y = cache[dictionary.hook_out][keep.to(x.device)].to(x.dtype)
                error = y - dictionary.forward(x)
                out.append(float(error.pow(2).sum() / (y - y.mean(0)).pow(2).sum()))
        return out

    def __repr__(self) -> str:
        fvus = [layer["final_fvu"] for layer in self.info.get("layers", [])]
        mean = f", mean training FVU {sum(fvus) / len(fvus):.3f}" if fvus else ""
        return f"TrainedTranscoders({len(self)} layers{mean}, path={str(self.path)!r})"


def train_transcoder_set(
    model: Any,
    *,
    texts: list[str] | None = None,
    tokens: torch.Tensor | None = None,
    seq_len: int = 128,
    model_name: str | None = None,
    out: str | os.PathLike | None = None,
    batch_rows: int = 8,
    leave_out_bos: bool = True,
    **options: Any,
) -> TrainedTranscoders:
    """Trains (or loads from the cache) one TopK transcoder per layer of `model`, from `blocks.{i}.mlp.hook_in` to
    `blocks.{i}.hook_mlp_out`.

    Args:
        model: a HookedLlama with all its layers.
        texts: strings, cut into rows of `seq_len` tokens each starting with BOS; or
        tokens: token ids [n_rows, pos], every position a real token.
        model_name: the folder under `$LLAMA_LENS_HOME/dictionaries/` the set goes in (default: the model's shape
            and a digest of its weights).
        out: the folder that holds the set's folder, instead of `$LLAMA_LENS_HOME/dictionaries/<model_name>`.
        batch_rows: rows per forward pass while collecting activations.
        leave_out_bos: train on every token but BOS, wherever it falls (rows cut from a stream of texts hold one
            at each text's start): its activations, an attention sink's, reach hundreds of times the norm of the
            others' in some layers and would dominate the loss; the attribution graph leaves position 0 out too.
        **options: the training settings of every layer, as `ll.train_dictionary` takes them (d_sae, k,
            batch_tokens, max_tokens, lr, seed, ...; threads, progress and checkpoint_every do not change the set).
            `threads` defaults to torch's current thread count.

    Returns:
        TrainedTranscoders: a list of the layers' Dictionary objects, with `.path`, `.info` and `.trained`.

    Raises:
        ArgumentError: bad data or settings, named (ArgumentTypeError for a wrong type).
        UsageError: a folder under the set's name that is not a finished set.
    """
    decided = [name for name in SET_DECIDES if name in options]
    if decided:
        raise ArgumentError(
            f"train_transcoder_set sets {', '.join(decided)} itself (TopK transcoders from blocks.{{i}}.mlp.hook_in "
            "to blocks.{i}.hook_mlp_out); leave them out"
        )
    if not (hasattr(model, "hook_names") and hasattr(model, "cfg")):
        raise ArgumentTypeError(f"model must be a HookedLlama, got {type(model).__name__}")
    n_layers = model.cfg.n_layers
    if len(getattr(model, "layer_indices", range(n_layers))) != n_layers:
        raise ArgumentError("a transcoder set needs every layer of the model; load it whole")
    options.setdefault("threads", torch.get_num_threads())
    configs = [
        TrainDictionaryConfig.from_options(
            options | {"hook_in": f"blocks.{i}.mlp.hook_in", "hook_out": f"blocks.{i}.hook_mlp_out"}
        )
        for i in range(n_layers)
    ]
    tokens = _token_rows(model, texts, tokens, seq_len)
    if not isinstance(leave_out_bos, bool):
        raise ArgumentTypeError(f"leave_out_bos must be True or False, got {leave_out_bos!r}")
    skip_token = model.cfg.bos_token_id if leave_out_bos else None
    settings = _settings(model, tokens, configs[0]) | {"skip_token": skip_token}
    if model_name is not None and (not isinstance(model_name, str) or not model_name or "/" in model_name):
        raise ArgumentError(f"model_name must be a folder name (no '/'), got {model_name!r}")
    parent = Path(out).expanduser() if out is not None else _home() / "dictionaries" / (model_name or settings["model"])
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = parent / f"transcoders-topk-{configs[0].d_sae}-k{configs[0].k}-{key}"
    trained = not (folder / SET_FILE).is_file()
    if trained:
        _train(model, tokens, configs, folder, settings=settings, batch_rows=batch_rows, skip_token=skip_token)
    return open_set(folder, settings=settings, trained=trained)


def open_set(folder: Path, *, settings: dict[str, Any] | None = None, trained: bool = False) -> TrainedTranscoders:
    """The finished set at `folder`, checked against `settings` when given.

    Raises:
        UsageError: `folder` holds no finished set (no set.json), or one made with other settings.
    """
    info_path = folder / SET_FILE
    if not info_path.is_file():
        raise UsageError(
            f"{folder} is not a finished transcoder set: it has no {SET_FILE}, which is written last. Delete the "
            "folder (a run in progress works in the folder's .partial twin, never under this name)"
        )
    try:
        info = json.loads(info_path.read_text())
    except ValueError as err:
        raise UsageError(f"{info_path} is not JSON ({err}); delete {folder} and train the set again") from None
    if settings is not None and info.get("settings") != settings:
        raise UsageError(f"{folder} holds a transcoder set with other settings than these; delete it to retrain")
    transcoders = load_dictionary(folder)
    transcoders = sorted(transcoders, key=lambda d: int(d.hook_in.split(".")[1]))
    return TrainedTranscoders(transcoders, path=folder, info=info, trained=trained)


# --------------------------------------------------------------------------------------------- training
def _train(
    model: Any, tokens: torch.Tensor, configs: list[TrainDictionaryConfig], folder: Path, *, settings: dict,
    batch_rows: int, skip_token: int | None,
) -> None:  # fmt: skip
    """Trains the layers not yet finished in `folder`'s .partial twin, then renames the finished set into place."""
    if folder.exists():
        open_set(folder)  # not a finished set (no set.json): named and refused
    work = folder.with_name(folder.name + PARTIAL_SUFFIX)
    finished = work / "set"
    progress = configs[0].progress
    todo = [i for i in range(len(configs)) if not (finished / _layer_folder(i) / "cfg.json").is_file()]
    stores = collect_stores(
        model, tokens, {work / "activations" / f"layer_{i}": [c.hook_in, c.hook_out] for i, c in _pick(configs, todo)},
        batch_rows=batch_rows, progress=progress, dtype=torch.bfloat16, shard_tokens=4096,
        skip_token=skip_token,
    )  # fmt: skip
    for i, config in _pick(configs, todo):
        store = work / "activations" / f"layer_{i}"
        coder = train_dictionary(stores[store], out=work / "runs" / f"layer_{i}", config=config)
        _write_sparsify_layer(finished / _layer_folder(i), coder, config)
        shutil.rmtree(store)  # its run is finished: free the disk while the next layers train
    layers = [_layer_info(work / "runs" / f"layer_{i}") | {"layer": i} for i in range(len(configs))]
    n_tokens = tokens.numel() if skip_token is None else int((tokens != skip_token).sum())
    info = {"format": SET_FORMAT, "settings": settings, "n_tokens": n_tokens, "layers": layers}
    write_text_atomic(finished / SET_FILE, json.dumps(info, indent=2))
    try:
        finished.rename(folder)  # atomic: the set appears under its name whole, or not at all
    except OSError:
        if not (folder / SET_FILE).is_file():  # else another process finished the same set first
            raise
    shutil.rmtree(work, ignore_errors=True)


def _pick(configs: list[TrainDictionaryConfig], layers: list[int]) -> list[tuple[int, TrainDictionaryConfig]]:
    return [(i, configs[i]) for i in layers]


def _layer_folder(layer: int) -> str:
    return f"layers.{layer}.mlp"  # sparsify's hookpoint for the MLP: ll.load_dictionary maps it to our hooks


def _write_sparsify_layer(folder: Path, coder: Any, config: TrainDictionaryConfig) -> None:
    """A trained TopK transcoder in sparsify's layout; cfg.json last, so a layer with it is whole."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "encoder.weight": coder.W_in.detach().contiguous(),  # nn.Linear's [d_sae, d_in]
        "encoder.bias": coder.b_enc.detach().contiguous(),
        "W_dec": coder.W_dec.detach().contiguous(),  # [d_sae, d_out]
        "b_dec": coder.b_dec.detach().contiguous(),
    }
    with atomic_path(folder / "sae.safetensors") as temporary:
        save_file(tensors, str(temporary), metadata={"format": "pt"})
    d_in = tensors["encoder.weight"].shape[1]
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, config.d_sae // d_in),
        "normalize_decoder": False,
        "num_latents": config.d_sae,
        "k": config.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": True,
        "d_in": d_in,
    }
    write_text_atomic(folder / "cfg.json", json.dumps(cfg, indent=2))


def _layer_info(run: Path) -> dict[str, Any]:
    """What a layer's finished run reached, from the SAELens cfg.json the trainer wrote."""
    info = json.loads((run / "cfg.json").read_text())["metadata"]["llama_lens_training"]
    return {key: info[key] for key in ("final_fvu", "l0_last_step", "dead_fraction", "steps", "tokens")}


# --------------------------------------------------------------------------------------------- settings
def _token_rows(model: Any, texts: Any, tokens: Any, seq_len: int) -> torch.Tensor:
    if (texts is None) == (tokens is None):
        raise ArgumentError("train_transcoder_set needs texts= (strings) or tokens= (token ids [n_rows, pos]), one")
    if texts is not None:
        if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
            raise ArgumentTypeError("texts must be a list of strings")
        if getattr(model, "tokenizer", None) is None:
            raise ArgumentError("this model has no tokenizer to cut texts= into rows; pass tokens= instead")
        return token_rows(model.tokenizer, texts, seq_len=seq_len)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long or not tokens.numel():
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ArgumentError(f"tokens must be a LongTensor [n_rows, pos] of token ids, got {shape}")
    return tokens


def _settings(model: Any, tokens: torch.Tensor, config: TrainDictionaryConfig) -> dict[str, Any]:
    """Everything that decides the set's weights, as JSON: its digest names the set's folder."""
    training = {key: value for key, value in config.info().items() if key not in (*RUN_ONLY, "hook_in", "hook_out")}
    return {
        "format": SET_FORMAT,
        "model": _model_id(model),
        "tokens_sha256": hashlib.sha256(tokens.contiguous().numpy().tobytes()).hexdigest(),
        "tokens_shape": list(tokens.shape),
        "training": training,
    }


def _model_id(model: Any) -> str:
    """The model's shape and a digest of a sample of its weights (the first values of every tensor): two
    checkpoints of one architecture get different sets."""
    cfg = model.cfg
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        if param.is_meta:
            continue
        digest.update(name.encode())
        digest.update(param.detach().flatten()[:64].to(torch.float32).numpy().tobytes())
    return f"llama-{cfg.n_layers}L-{cfg.d_model}d-{digest.hexdigest()[:8]}"


def _home() -> Path:
    """`$LLAMA_LENS_HOME`, or the user cache directory (as loading/demo.py's cache_dir, which this room may not
    import)."""
    home = os.environ.get("LLAMA_LENS_HOME")
    if home:
        return Path(home).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("llama_lens"))
