"""`ll.train_dictionary`: train a TopK SAE or transcoder, or a ReLU/L1 SAE, on an activation store.

    coder = ll.train_dictionary(store_folder, out="sae", hook_in="blocks.6.hook_resid_post", d_sae=4096)
    coder = ll.train_dictionary(model, tokens=rows, out="tc", hook_in="blocks.15.mlp.hook_in",
                                hook_out="blocks.15.hook_mlp_out", d_sae=4608, k=32)
    sae = ll.load_dictionary("sae")                 # what the run wrote, in SAELens 6.x's format

Given a model, the activations are first collected into an activation store (`out/activations` by default, or
`store=`), then read back step by step. The recipes are in train_config.py, the math in train_coder.py, the
optimisers in train_optim.py, the files in train_files.py.

A run checkpoints every `checkpoint_every` steps; run it again into the same `out` (same settings, same data)
and it continues from the last checkpoint to the same weights an uninterrupted run reaches, or, once finished,
returns at once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..data.store import STORE_FOLDER, ActivationDataset
from ..data.token_rows import token_rows
from ..errors import ArgumentError, ArgumentTypeError, UsageError
from .train_coder import SparseCoder, decode_sparse, fvu
from .train_config import RUN_ONLY, TrainDictionaryConfig
from .train_data import StoreBatches, collect_activations
from .train_files import read_checkpoint, saelens_cfg, write_checkpoint, write_saelens
from .train_optim import Adam, ScheduleFreeSignum

PARAMETERS = ("W_in", "b_enc", "W_dec", "b_dec")


def train_dictionary(
    source: Any,
    *,
    out: str | os.PathLike,
    config: TrainDictionaryConfig | None = None,
    tokens: torch.Tensor | None = None,
    texts: Sequence[str] | None = None,
    seq_len: int = 256,
    store: str | os.PathLike | None = None,
    **options: Any,
) -> SparseCoder:
    """Trains a sparse dictionary and writes it to `out` in SAELens 6.x's format.

    Args:
        source: an activation store (its folder, or an `ll.ActivationDataset`) holding `hook_in` and `hook_out`;
            or a model, whose activations over `tokens` or `texts` are collected into a store first.
        out: the run's folder: the dictionary (cfg.json, sae_weights.safetensors) and its checkpoint. A rerun
            into it resumes (or, finished, returns what it trained).
        config: the settings (`ll.TrainDictionaryConfig`); or give them as keywords (`hook_in=..., d_sae=...`),
            which also override `config`'s.
        tokens: with a model: token ids [n_rows, pos], every position a real token.
        texts: with a model, instead of tokens: strings, cut into rows of `seq_len` tokens each starting with BOS.
        store: with a model: where to collect the activations (default `out/activations`; reused when it already
            holds them for these tokens).

    Returns:
        The trained SparseCoder (fp32, on the CPU); `.losses` holds each step's FVU, `.info` the settings and
        what the run found (steps, tokens, final FVU, L0, dead latents); `.path` the folder.

    Raises:
        ArgumentError / ArgumentTypeError: bad settings or data, named; UsageError: `out` holds a run with other
        settings or data; UnknownNameError: a hook the store or model does not have.
    """
    if config is None:
        config = TrainDictionaryConfig.from_options(options)
    elif options:
        TrainDictionaryConfig.from_options(options | {"hook_in": config.hook_in})  # names any unknown option
        config = replace(config, **options)
    elif not isinstance(config, TrainDictionaryConfig):
        raise ArgumentTypeError(f"config must be a TrainDictionaryConfig, got {type(config).__name__}")
    out = Path(out)
    hooks = list(dict.fromkeys([config.hook_in, config.target_hook]))
    if hasattr(source, "hook_names") and hasattr(source, "cfg"):  # a model: collect its activations first
        if (tokens is None) == (texts is None):
            raise ArgumentError("training from a model needs tokens= (token ids [n_rows, pos]) or texts=, one of them")
        if texts is not None:
            if model_tokenizer := getattr(source, "tokenizer", None):
                tokens = token_rows(model_tokenizer, texts, seq_len=seq_len)
            else:
                raise ArgumentError("this model has no tokenizer to cut texts= into rows; pass tokens= instead")
        source = collect_activations(
            source, tokens, hook_names=hooks, folder=Path(store) if store else out / STORE_FOLDER,
            progress=config.progress,
        )  # fmt: skip
    elif tokens is not None or texts is not None or store is not None:
        raise ArgumentError("tokens=, texts= and store= are for training from a model; the source is a store already")
    if not isinstance(source, (str, os.PathLike, ActivationDataset)):
        raise ArgumentTypeError(
            f"source must be an activation store (a folder or ll.ActivationDataset) or a model, got "
            f"{type(source).__name__}"
        )
    batches = StoreBatches(
        source, hook_in=config.hook_in, hook_out=config.target_hook, batch_tokens=config.batch_tokens,
        shuffle=config.shuffle, buffer_tokens=config.shuffle_buffer(), seed=config.seed,
    )  # fmt: skip
    return fit(batches, config, out=out)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit(batches: StoreBatches, config: TrainDictionaryConfig, *, out: Path) -> SparseCoder:
    """The training loop (see `train_dictionary`): resumes from `out`'s checkpoint when it has one."""
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    topk = config.architecture == "topk"
    coder = SparseCoder(
        batches.d_in, config.d_sae, batches.d_out,
        k=config.k if topk else None, apply_b_dec_to_input=not config.is_transcoder,
    )  # fmt: skip
    params = [getattr(coder, name) for name in PARAMETERS]
    if topk:
        optimizer = ScheduleFreeSignum(params, PARAMETERS, lr=config.learning_rate(), momentum=config.momentum)
    else:
        optimizer = Adam(params, PARAMETERS, lr=config.learning_rate())
    n_steps = (config.max_tokens or batches.epoch_tokens) // config.batch_tokens
    run = {
        "config": {key: value for key, value in config.info().items() if key not in RUN_ONLY},
        "data": batches.fingerprint(),
        "d_in": batches.d_in,
        "d_out": batches.d_out,
        "steps": n_steps,
    }
    since_fired = torch.zeros(config.d_sae, dtype=torch.long)  # tokens since each latent last fired
    step, last_l0 = _resume(out, run, coder, optimizer, since_fired)
    if step == 0:
        coder.initialize(seed=config.seed, transcoder=config.is_transcoder, standard=not topk)
    bar = tqdm(total=n_steps, initial=step, desc=f"training {config.architecture}", unit="step",
               disable=not config.progress)  # fmt: skip
    try:
        with torch_threads(config.resolved_threads()):
            while step < n_steps:
                x, y = batches.batch(step)
                if step == 0:
                    coder.initialize_biases(x, y, transcoder=config.is_transcoder)
                loss, fired, last_l0 = _step(coder, optimizer, x, y, config=config, since_fired=since_fired)
                since_fired += len(x)
                since_fired[fired] = 0
                coder.losses.append(loss)
                step += 1
                bar.update()
                bar.set_postfix(fvu=f"{loss:.4f}")
                if step % config.checkpoint_every == 0 or step == n_steps:
                    _checkpoint(out, run, coder, optimizer, since_fired, step, l0=last_l0)
    finally:
        bar.close()
    final = optimizer.averaged()
    with torch.no_grad():
        for name in PARAMETERS:
            getattr(coder, name).copy_(final[name])
    dead = since_fired > config.dead_tokens
    coder.info = config.info() | {
        "steps": n_steps,
        "tokens": n_steps * config.batch_tokens,
        "store_tokens": batches.n_tokens,
        "final_fvu": coder.losses[-1] if coder.losses else None,
        "l0_last_step": last_l0,
        "dead_fraction": float(dead.float().mean()),
    }
    coder.path = out
    write_saelens(out, final, saelens_cfg(config, d_in=batches.d_in, d_out=batches.d_out, info=coder.info))
    return coder


def _step(
    coder: SparseCoder, optimizer: Any, x: torch.Tensor, y: torch.Tensor, *, config: TrainDictionaryConfig,
    since_fired: torch.Tensor,
) -> tuple[float, torch.Tensor, float]:  # fmt: skip
    """One optimiser step: (its FVU, the latents that fired, mean active latents per token)."""
    total_variance = (y - y.mean(0)).pow(2).sum()
    sae = not config.is_transcoder
    if coder.is_topk:
        if sae:
            coder.normalize_decoder()
        values, indices = coder.encode_sparse(x)
        error = y - (decode_sparse(values, indices, coder.W_dec) + coder.b_dec)
        fvu_value = error.pow(2).sum() / total_variance
        loss = fvu_value
        dead = since_fired > config.dead_tokens
        if config.auxk_alpha > 0 and bool(dead.any()):
            loss = loss + config.auxk_alpha * _auxk(coder, x, error, dead, total_variance)
        fired = indices.flatten().unique()
        l0 = float((values > 0).sum()) / len(x)
    else:
        acts = torch.relu(coder.pre_activations(x))
        recon = coder.decode(acts)
        fvu_value = fvu(y, recon)
        mse = (recon - y).pow(2).sum(-1).mean()
        l1 = (acts * coder.W_dec.norm(dim=1)).sum(-1).mean()  # SAELens: |acts| weighted by decoder row norms
        loss = mse + config.l1_coefficient * l1
        active = acts > 0
        fired = active.any(0).nonzero().squeeze(-1)
        l0 = float(active.sum()) / len(x)
    loss.backward()
    if coder.is_topk and sae:
        coder.remove_parallel_gradient()
    optimizer.step()
    optimizer.zero_grad()
    return float(fvu_value.detach()), fired, l0


def _auxk(
    coder: SparseCoder, x: torch.Tensor, error: torch.Tensor, dead: torch.Tensor, total_variance: torch.Tensor
) -> torch.Tensor:
    """sparsify's AuxK loss: the top k_aux dead latents (k_aux = d_out / 2) reconstruct the live latents' error.
    As in sparsify, it reaches the decoder only (the activations are taken as they are)."""
    with torch.no_grad():
        pre = torch.relu(coder.pre_activations(x))
        pre = torch.where(dead[None], pre, -torch.inf)
    k_aux = error.shape[-1] // 2
    n_dead = int(dead.sum())
    scale = min(n_dead / k_aux, 1.0)
    values, indices = pre.topk(min(k_aux, n_dead), dim=-1, sorted=False)
    e_hat = decode_sparse(values, indices, coder.W_dec)
    return scale * (e_hat - error.detach()).pow(2).sum() / total_variance


def _checkpoint(
    out: Path, run: dict, coder: SparseCoder, optimizer: Any, since_fired: torch.Tensor, step: int, *, l0: float
) -> None:
    tensors = {f"param.{name}": getattr(coder, name) for name in PARAMETERS}
    tensors |= optimizer.state_tensors() | {"since_fired": since_fired}
    write_checkpoint(out, tensors, state={"run": run, "step": step, "losses": coder.losses, "l0_last_step": l0})


def _resume(out: Path, run: dict, coder: SparseCoder, optimizer: Any, since_fired: torch.Tensor) -> tuple[int, float]:
    """Loads `out`'s checkpoint into the run, returning (its step, the L0 of its last step); (0, nan) when there
    is none.

    Raises:
        UsageError: the checkpoint is of a run with other settings or data (named).
    """
    found = read_checkpoint(out)
    if found is None:
        return 0, float("nan")
    tensors, state = found
    if state.get("run") != run:
        saved = state.get("run") or {}
        differ = sorted(
            f"{key}: {saved.get(section, {}).get(key)!r} -> {value!r}"
            for section in ("config", "data")
            for key, value in run[section].items()
            if saved.get(section, {}).get(key) != value
        ) or [f"{key}: {saved.get(key)!r} -> {run[key]!r}" for key in run if saved.get(key) != run[key]]
        raise UsageError(
            f"{out} holds a training run with other settings or data ({'; '.join(differ)}): pass another out=, or "
            f"delete {out / 'checkpoint.safetensors'} to start this one afresh"
        )
    with torch.no_grad():
        for name in PARAMETERS:
            getattr(coder, name).copy_(tensors[f"param.{name}"])
    optimizer.load_state_tensors(tensors)
    since_fired.copy_(tensors["since_fired"])
    coder.losses = list(state["losses"])
    return int(state["step"]), float(state.get("l0_last_step", float("nan")))
