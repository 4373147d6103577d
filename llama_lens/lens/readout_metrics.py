"""The metrics the read-out engine (readout.py) gives per row, preallocated and filled a chunk at a time."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass(repr=False)
class ReadoutMetrics:
    """Per-row metrics of read-outs, float32 whatever the logits' dtype. `[rows]` is [n_rows] for the final
    distribution and [n_rows, n_readouts] for the read-outs (see `read_out`).

    Attributes:
        top_ids, top_logits, top_probs: [rows, top_k], most likely first.
        lse: [rows] logsumexp of the logits.
        entropy: [rows] entropy of the distribution, in nats.
        kl: [rows] KL(final || read-out) in nats (0 for the final distribution itself).
        target_logits, target_probs: [rows, n_targets], or None without targets.
        target_ranks: [rows, n_targets] how many tokens have a strictly higher logit (0 = top), -1 where the
            row's logits are not finite (NaN / inf: no rank), or None.
        logits: [rows, d_vocab] in the logits' dtype with `keep_logits=True`, else None.
    """

    top_ids: torch.Tensor
    top_logits: torch.Tensor
    top_probs: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor
    kl: torch.Tensor
    target_logits: torch.Tensor | None = None
    target_probs: torch.Tensor | None = None
    target_ranks: torch.Tensor | None = None
    logits: torch.Tensor | None = None

    def __repr__(self) -> str:
        return f"ReadoutMetrics(rows={tuple(self.entropy.shape)}, top_k={self.top_ids.shape[-1]})"

    @classmethod
    def empty(
        cls, n_rows: int, top_k: int, n_targets: int, device: torch.device, *,
        logits: tuple[int, torch.dtype] | None = None,
    ) -> ReadoutMetrics:  # fmt: skip
        """Preallocated, to be filled a chunk at a time; `logits`: (d_vocab, dtype) to keep every logit."""

        def new(*shape, dtype=torch.float32):
            return torch.empty(n_rows, *shape, dtype=dtype, device=device)

        return cls(
            top_ids=new(top_k, dtype=torch.long),
            top_logits=new(top_k),
            top_probs=new(top_k),
            lse=new(),
            entropy=new(),
            kl=new(),
            target_logits=new(n_targets) if n_targets else None,
            target_probs=new(n_targets) if n_targets else None,
            target_ranks=new(n_targets, dtype=torch.long) if n_targets else None,
            logits=new(logits[0], dtype=logits[1]) if logits is not None else None,
        )

    def unflatten_rows(self, n_rows: int) -> ReadoutMetrics:
        """Position-major rows (row j, read-out k at j * n_readouts + k) as [n_rows, n_readouts, ...] views."""
        return ReadoutMetrics(**{
            f.name: None if (v := getattr(self, f.name)) is None else v.unflatten(0, (n_rows, -1)) for f in fields(self)
        })  # fmt: skip
