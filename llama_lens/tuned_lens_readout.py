"""The tuned lens's read-out of a prompt: `ll.logit_lens(..., lens=tuned)`, kept under this name too.

Each residual stream is translated by the lens (`TunedLens.translate`), then read out as the logit lens reads
it, unembed(ln_final(x)), by the same blockwise engine; the last layer's resid_post read-out is the model's
output itself. The result is the same `LensResult`, with `lens == "tuned"`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .tuned_lens import DEFAULT_READOUT, TunedLens

if TYPE_CHECKING:
    from .lens import LensResult
    from .model import HookedLlama


def tuned_lens_readout(
    model: HookedLlama,
    prompt_or_tokens: Any,
    target: Any = None,
    *,
    lens: TunedLens,
    readout: str | Sequence[str] = DEFAULT_READOUT,
    positions: int | Iterable[int] | None = None,
    top_k: int = 5,
    **kwargs: Any,
) -> LensResult:
    """Reads out the translated residual stream at every layer: `ll.logit_lens(model, ..., lens=lens)`.

    Args:
        model: the whole HookedLlama the lens was trained for (loaded or streamed).
        prompt_or_tokens, target, positions, top_k: as in `ll.logit_lens`.
        lens: the TunedLens; it must have a translator for every read-out asked for.
        readout: "embed", "resid_pre", "resid_mid", "resid_post" or a list of them (default: the lens's).
        kwargs: the rest of `ll.logit_lens`'s options (`keep_logits`, `chunk_size`, `prepend_bos`, ...).

    Returns:
        A LensResult whose metrics are the tuned read-outs' (`kl_to_final` against the model's own output).

    Raises:
        ValueError: a lens made for another model or a partial model, a read-out the lens has no translator
            for, a bad position, target or top_k.
    """
    from .lens import logit_lens

    return logit_lens(
        model, prompt_or_tokens, target, readout=readout, positions=positions, top_k=top_k, lens=lens, **kwargs
    )
