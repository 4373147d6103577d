"""The feature explorer's data: a FeatureLensResult packed for the page, small enough to ship whole.

For 30 sites x 300 positions x top-10 that is 90,000 (feature, activation, DLA) entries and up to as many
distinct features with their read-out tokens: as JSON, several megabytes. Here the numbers are little-endian
typed arrays in one buffer, deflated (zlib; the page inflates it with the browser's DecompressionStream), and
only the texts travel as JSON:

    meta (JSON)   tokens, positions, labels, layers, k, n_readout, n_vocab, target, n_unique [S], empty (the
                  entry marking no feature), sections (name -> [offset, length, dtype] in the inflated buffer)
    data (bytes)  zlib of, in order (4-byte arrays first, so every array is aligned):
        n_active   uint32 [S * P]         active features per cell (the L0)
        features   uint32 [sum n_unique]  each site's reported feature ids, ascending, as differences from the
                                          previous id (they deflate better)
        entry      uint16 [S * P * k]     index into the site's features, 65535 where no feature is (uint32 and
                                          0xFFFFFFFF when a site reports 65,535 or more)
        act        float16 [S * P * k]    activations
        dla        float16 [S * P * k]    DLA to the target (absent without a target)
        readout    uint16 [sum n_unique * n_readout]  indices into vocab (uint32 past 65,535 texts)
        vocab      uint8                  the read-out tokens' texts, UTF-8, joined by NUL

float16 keeps three significant digits, which is what the page shows; values beyond its range are clamped.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch

from ..features.lens_result import FeatureLensResult

FLOAT16_MAX = 65504.0


def _half(values: torch.Tensor) -> np.ndarray:
    array = values.float().clamp(-FLOAT16_MAX, FLOAT16_MAX).numpy()  # NaN stays NaN
    return array.astype("<f2")


def pack(result: FeatureLensResult, *, n_readout: int = 3, level: int = 9) -> tuple[dict[str, Any], bytes]:
    """(meta, data) for the page, with each feature's first `n_readout` read-out tokens; see the module
    docstring for the layout."""
    n_sites, n_pos, k = result.feature_ids.shape
    readouts = result.readouts
    n_unique = [len(r.features) for r in readouts]
    n_readout = min(n_readout, max((r.top_ids.shape[1] for r in readouts), default=0))
    wide = max(n_unique, default=0) >= 0xFFFF
    empty = 0xFFFFFFFF if wide else 0xFFFF
    entry = np.full((n_sites, n_pos, k), empty, dtype="<u4" if wide else "<u2")
    for s, r in enumerate(readouts):
        ids = result.feature_ids[s]
        valid = ids >= 0
        if valid.any():
            entry[s][valid.numpy()] = np.searchsorted(r.features.numpy(), ids[valid].numpy())
    # Read-out texts: one table of the token ids read out anywhere; each feature's tokens index into it. A site
    # that writes nothing to the residual stream has no read-out: its rows point at an empty text.
    token_ids, texts = [], {}
    for r in readouts:
        ids = torch.full((len(r.features), n_readout), -1, dtype=torch.long)
        ids[:, : min(n_readout, r.top_ids.shape[1])] = r.top_ids[:, :n_readout]
        token_ids.append(ids.reshape(-1))
        for row_ids, row_strs in zip(r.top_ids[:, :n_readout].tolist(), r.top_strs):
            texts.update(zip(row_ids, row_strs))
    token_ids = torch.cat(token_ids).numpy() if token_ids else np.zeros(0, dtype=np.int64)
    table, readout = np.unique(token_ids, return_inverse=True)
    vocab = [texts.get(i, "") for i in table.tolist()]
    features = [np.diff(r.features.numpy(), prepend=0) for r in readouts]
    arrays: list[tuple[str, np.ndarray]] = [
        ("n_active", result.n_active.numpy().astype("<u4").reshape(-1)),
        ("features", np.concatenate(features).astype("<u4") if features else np.zeros(0, "<u4")),
        ("entry", entry.reshape(-1)),
        ("act", _half(result.activations).reshape(-1)),
    ]
    if result.dla is not None:
        arrays.append(("dla", _half(result.dla).reshape(-1)))
    arrays.append(("readout", readout.reshape(-1).astype("<u4" if len(vocab) > 0xFFFF else "<u2")))
    # The texts last, as UTF-8 joined by NUL (which no token text holds: the tokenizers' texts are printable).
    arrays.append(("vocab", np.frombuffer("\0".join(vocab).encode("utf-8"), dtype="u1")))
    sections, parts, offset = {}, [], 0
    for name, array in arrays:
        raw = array.tobytes()
        sections[name] = [offset, len(array), array.dtype.str.lstrip("<|")]
        parts.append(raw)
        offset += len(raw)
    meta = {
        "tokens": [result.str_tokens[0][p] for p in result.positions],
        "positions": result.positions,
        "labels": result.labels,
        "layers": [site.layer for site in result.sites],
        "k": k,
        "n_readout": n_readout,
        "n_vocab": len(vocab),
        "target": result.target_strs[0][0] if result.target_strs else None,
        "n_unique": n_unique,
        "sections": sections,
        "empty": empty,
    }
    return meta, zlib.compress(b"".join(parts), level)
