"""`ll.evaluate_dictionary`: how well a dictionary stands in for the activation it reconstructs, with sae-lens'
definitions (L0, explained variance, MSE, cosine, CE-loss score, KL score; see `evaluate_sums`).

Which positions count (as sae-lens' `run_evals` with `exclude_special_tokens=True`): every real token but the
tokenizer's BOS, EOS and padding ids. At those the spliced run keeps the clean activation (sae-lens' replacement
hook does the same), and neither the reconstruction metrics nor the KL count them; a next-token prediction counts
for the CE loss when the token it is made at counts (and the predicted token is real). The zero-ablated run
zeroes the site at every position, as sae-lens' does.

One forward pass per batch computes all three runs: the batch is repeated three times (clean, spliced, ablated)
and a hook at the dictionary's site changes the second and third copies. Everything before the site is the same
in the three, so the dictionary reads the clean activations; a streamed model reads its layers once per batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..dictionaries.dictionary import Dictionary
from ..dictionaries.sites import BLOCK_SITES, GLOBAL_SITES
from ..errors import ArgumentError, ArgumentTypeError, UnknownNameError, did_you_mean
from ..validate import check_count
from .evaluate_sums import EvaluationSums, merge


def special_token_ids(tokenizer: Any, exclude: bool | Iterable[int]) -> list[int]:
    """The ids whose positions do not count: the tokenizer's BOS, EOS and padding ids for True (sae-lens'
    `get_special_token_ids`), none for False, or the ids given."""
    if exclude is True:
        ids = (getattr(tokenizer, name, None) for name in ("bos_id", "eos_id", "pad_id"))
        return sorted({int(i) for i in ids if i is not None})
    if exclude is False or exclude is None:
        return []
    return sorted({int(i) for i in exclude})


def check_fits(model: Any, dictionary: Dictionary) -> None:
    """Refuses a dictionary whose hook points the model lacks or whose widths differ from the model's there."""
    if not isinstance(dictionary, Dictionary):
        raise ArgumentTypeError(
            f"expected a Dictionary (from ll.load_dictionary), got {type(dictionary).__name__}; a folder with "
            "several dictionaries loads as a list: evaluate them one at a time"
        )
    cfg = model.cfg
    widths = {"d_model": cfg.d_model, "d_mlp": cfg.d_mlp, "n_heads * d_head": cfg.n_heads * cfg.d_head}
    ends = ((dictionary.hook_in, dictionary.d_in, "reads"), (dictionary.hook_out, dictionary.d_out, "writes"))
    for hook, width, what in ends:
        if hook not in model.hook_dict:
            raise UnknownNameError(
                f"{dictionary.path}: the model has no hook point {hook!r}{did_you_mean(hook, model.hook_dict)}"
            )
        point = hook if hook in GLOBAL_SITES else hook.split(".", 2)[-1]
        expected = widths[(BLOCK_SITES | GLOBAL_SITES).get(point, "d_model")]
        if expected != width:
            raise ArgumentError(
                f"{dictionary.path}: the dictionary {what} {hook} with width {width}, the model's is {expected}; "
                "it was trained for another model (or another site)"
            )


def _three_way_hooks(dictionary: Dictionary, counted: torch.Tensor, captured: dict[str, torch.Tensor]):
    """Hooks for a batch repeated three times: copy 0 runs clean (its activations are captured), copy 1 with
    the reconstruction at the counted positions, copy 2 with the site zeroed."""
    batch = counted.shape[0]

    def write(act: torch.Tensor, *, hook) -> torch.Tensor:
        clean = act[:batch]
        source = captured.get("source", clean)  # a transcoder's input, saved at its hook_in; an SAE reads the site
        _, pre = dictionary.encode_pre(source)
        acts = dictionary._activate(dictionary._flat(source, dictionary.d_in, "x"), pre)
        recons = dictionary.decode(acts, source)
        captured.update(target=dictionary._flat(clean, dictionary.d_out, "x"), acts=acts, recons=recons)
        keep = counted.view(batch, counted.shape[1], *[1] * (act.dim() - 2))
        spliced = torch.where(keep, recons.reshape(clean.shape).to(act.dtype), act[batch : 2 * batch])
        return torch.cat([clean, spliced, torch.zeros_like(clean)])

    if not dictionary.is_transcoder:
        return [(dictionary.hook_out, write)]

    def read(act: torch.Tensor, *, hook) -> None:
        captured["source"] = act[:batch]

    return [(dictionary.hook_in, read), (dictionary.hook_out, write)]


@torch.no_grad()
def batch_sums(
    model: Any,
    dictionary: Dictionary,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    ignore_ids: Sequence[int] = (),
) -> list[EvaluationSums]:
    """One EvaluationSums per prompt of a batch of token ids [batch, pos] (padded where `attention_mask` is 0)."""
    batch, n_pos = tokens.shape
    real = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    counted = real & ~torch.isin(tokens, torch.as_tensor(list(ignore_ids), dtype=tokens.dtype, device=tokens.device))
    captured: dict[str, torch.Tensor] = {}
    mask3 = None if attention_mask is None else attention_mask.repeat(3, 1)
    with model.hooks(_three_way_hooks(dictionary, counted, captured)):
        logits = model(tokens.repeat(3, 1), attention_mask=mask3)
    if "target" not in captured:
        raise ArgumentError(f"{dictionary.path}: the forward pass never reached {dictionary.hook_out}")
    counted = counted.to(captured["acts"].device)
    sums = _reconstruction_sums(captured, counted)
    _add_downstream_sums(sums, logits.float(), tokens, counted, real)
    return [_row(sums, b) for b in range(batch)]


def _reconstruction_sums(captured: dict[str, torch.Tensor], counted: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per prompt sums [batch] (and sum_x [batch, d_out], feature counts [batch, d_sae]) of the per-token
    values sae-lens averages, over the counted positions."""
    x, x_hat, acts = captured["target"].float(), captured["recons"].float(), captured["acts"].float()
    x_norm, x_hat_norm = x.norm(dim=-1), x_hat.norm(dim=-1)
    per_token = {
        "l0": (acts != 0).sum(-1).float(),
        "l1": acts.abs().sum(-1),
        "mse": (x - x_hat).pow(2).sum(-1),
        "cossim": ((x / x.norm(dim=-1, keepdim=True)) * (x_hat / x_hat.norm(dim=-1, keepdim=True))).sum(-1),
        "l2_norm_in": x_norm,
        "l2_norm_out": x_hat_norm,
        "l2_ratio": x_hat_norm / torch.where(x_norm.abs() < 1e-4, torch.ones_like(x_norm), x_norm),
        "x_hat_sq": x_hat_norm**2,
        "x_dot_x_hat": (x * x_hat).sum(-1),
        "x_sq": x.pow(2).sum(-1),
    }
    sums = {name: _masked_sum(value, counted) for name, value in per_token.items()}
    sums["n_tokens"] = counted.sum(-1)
    sums["sum_x"] = (x.double() * counted[..., None]).sum(1)
    sums["feature_counts"] = ((acts != 0) & counted[..., None]).sum(1)
    return sums


def _add_downstream_sums(
    sums: dict[str, torch.Tensor], logits: torch.Tensor, tokens: torch.Tensor, counted: torch.Tensor, real: torch.Tensor
) -> None:
    """CE losses and KL divergences of the three runs (sae-lens' get_recons_loss), summed per prompt."""
    batch = tokens.shape[0]
    counted, real, tokens = counted.to(logits.device), real.to(logits.device), tokens.to(logits.device)
    clean_logp = F.log_softmax(logits[:batch], dim=-1)
    predicted = tokens[:, 1:, None]
    ce_counted = counted[:, :-1] & real[:, 1:]
    for name, run in (("ce_without_sae", 0), ("ce_with_sae", 1), ("ce_with_ablation", 2)):
        logp = clean_logp if run == 0 else F.log_softmax(logits[run * batch : (run + 1) * batch], dim=-1)
        sums[name] = _masked_sum(-logp[:, :-1].gather(-1, predicted).squeeze(-1), ce_counted)
        if run:
            # KL(clean || run), as sae-lens' _kl: F.kl_div(log q, p) summed over the vocabulary.
            kl = F.kl_div(logp, clean_logp.exp(), reduction="none").sum(-1)
            sums["kl_with_sae" if run == 1 else "kl_with_ablation"] = _masked_sum(kl, counted)
    sums["n_ce"] = ce_counted.sum(-1)
    sums["n_kl"] = counted.sum(-1)


def _masked_sum(value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where, not a product: a masked-out NaN (cos of a zero vector) must not poison the sum.
    return torch.where(mask, value.double(), torch.zeros((), dtype=torch.float64, device=value.device)).sum(-1)


def _row(sums: dict[str, torch.Tensor], b: int) -> EvaluationSums:
    counts = {"n_tokens", "n_ce", "n_kl", "sum_x", "feature_counts"}
    return EvaluationSums(
        n_tokens=int(sums["n_tokens"][b]),
        n_ce=int(sums["n_ce"][b]),
        n_kl=int(sums["n_kl"][b]),
        sums={name: float(value[b]) for name, value in sums.items() if name not in counts},
        sum_x=sums["sum_x"][b].cpu(),
        feature_counts=sums["feature_counts"][b].cpu().long(),
    )


@dataclass
class DictionaryEvaluation:
    """What `evaluate_dictionary` returns: the merged sums, and the metrics they give.

    Attributes:
        dictionary: the dictionary's description (format, architecture, site).
        hook: the hook point it replaces.
        sums: the EvaluationSums (add another evaluation's `sums` to merge two runs).
    """

    dictionary: str
    hook: str
    sums: EvaluationSums

    @property
    def metrics(self) -> dict[str, float]:
        """The metrics under sae-lens' names (see `llama_lens.features.evaluate_sums`)."""
        return self.sums.metrics()

    @property
    def feature_density(self) -> torch.Tensor:
        """Per feature, the fraction of counted tokens it fired on [d_sae]."""
        return self.sums.feature_density()

    def __getitem__(self, metric: str) -> float:
        metrics = self.metrics
        if metric not in metrics:
            raise UnknownNameError(f"no metric {metric!r}{did_you_mean(metric, metrics)}")
        return metrics[metric]

    def to_frame(self):
        """A tidy DataFrame: one row per metric (columns hook, metric, value)."""
        import pandas as pd

        return pd.DataFrame([{"hook": self.hook, "metric": k, "value": v} for k, v in self.metrics.items()])

    def __repr__(self) -> str:
        m = self.metrics
        return (
            f"DictionaryEvaluation({self.hook}: l0={m['l0']:.2f}, explained_variance={m['explained_variance']:.4f}, "
            f"ce_loss_score={m['ce_loss_score']:.4f}, kl_div_score={m['kl_div_score']:.4f}, "
            f"tokens={self.sums.n_tokens})"
        )


def evaluate_dictionary(
    model: Any,
    dictionary: Dictionary,
    prompts: torch.Tensor | str | Sequence[str] | Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    exclude_special_tokens: bool | Iterable[int] = True,
    prepend_bos: bool | None = None,
) -> DictionaryEvaluation:
    """Evaluates a dictionary spliced into `model` on prompts, with sae-lens' metrics (see the module docstring).

    Args:
        model: a HookedLlama (a streamed one too).
        dictionary: from `ll.load_dictionary`; an SAE or a transcoder.
        prompts: texts (tokenized and left-padded per batch), or token ids [batch, pos] (none is padding).
        batch_size: prompts per forward pass (each pass runs 3 × batch_size sequences).
        exclude_special_tokens: True leaves out the tokenizer's BOS, EOS and padding positions (sae-lens' default),
            False counts every position, a list of ids leaves out those.
        prepend_bos: for texts: add BOS or not (default: the tokenizer's own behaviour).

    Returns:
        A DictionaryEvaluation: `.metrics` (a dict), `.to_frame()`, `.feature_density`, `.sums`.

    Raises:
        ArgumentTypeError: `dictionary` is not a Dictionary.
        UnknownNameError: the model has no hook point where the dictionary reads or writes.
        ArgumentError: the dictionary's widths do not fit the model's at its site; no prompts.
    """
    check_fits(model, dictionary)
    batch_size = check_count("batch_size", batch_size, 1)
    ignore = special_token_ids(model.tokenizer, exclude_special_tokens)
    parts = []
    for tokens, mask in _batches(model, prompts, batch_size, prepend_bos):
        parts.extend(batch_sums(model, dictionary, tokens, mask, ignore_ids=ignore))
    if not parts:
        raise ArgumentError("evaluate_dictionary needs at least one prompt")
    return DictionaryEvaluation(repr(dictionary), dictionary.hook_out, merge(parts))


def _batches(model: Any, prompts: Any, batch_size: int, prepend_bos: bool | None):
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], str):
        for b0 in range(0, len(prompts), batch_size):
            yield model.prepare_tokens(list(prompts[b0 : b0 + batch_size]), prepend_bos=prepend_bos)
        return
    try:
        tokens = torch.as_tensor(prompts) if not isinstance(prompts, torch.Tensor) else prompts
    except (TypeError, ValueError, RuntimeError):
        raise ArgumentError(
            "prompts must be texts, or token ids [batch, pos] of one length (pad texts, not ids: pass the texts)"
        ) from None
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2 or tokens.dtype.is_floating_point:
        raise ArgumentError(f"token ids must be integers [batch, pos], got {tuple(tokens.shape)} {tokens.dtype}")
    tokens = tokens.to(model.unembed.weight.device)
    for b0 in range(0, tokens.shape[0], batch_size):
        yield tokens[b0 : b0 + batch_size], None
