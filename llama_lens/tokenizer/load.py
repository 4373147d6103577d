"""Opens a checkpoint's tokenizer, whichever form it comes in, behind one interface (`Tokenizer`).

Three on-disk forms are read without importing transformers (which costs seconds):

- Hugging Face `tokenizer.json` (+ tokenizer_config.json), through the `tokenizers` package (`hf.py`);
- Meta Llama 1/2 `tokenizer.model`, a sentencepiece model, through `sentencepiece` (`spm.py`);
- Meta Llama 3/4 `tokenizer.model`, a tiktoken ranks file, through `tiktoken` with Meta's split pattern and
  special tokens (`meta_tiktoken.py`);
- the vocabulary in a GGUF file's metadata, built into a `tokenizers.Tokenizer` (`gguf.py`).

A transformers tokenizer (or any object with `encode` and `convert_ids_to_tokens`) can be wrapped with
`as_tokenizer`. Every backend's defaults are the checkpoint's own (BOS, special-token text, decode): see
`base.py`; chat formats are in `chat.py`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ..errors import ArgumentError, CheckpointError, MissingFileError
from .base import Tokenizer
from .hf import HFTokenizer, TransformersTokenizer
from .meta_tiktoken import TiktokenTokenizer
from .spm import SentencePieceTokenizer

_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} \d+\r?\n?")


# ---------------------------------------------------------------------------------------------- loading
def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Opens the tokenizer of a checkpoint.

    Args:
        path: a tokenizer.json or tokenizer.model file, or a checkpoint folder holding one (tokenizer.json is
            preferred). A tokenizer_config.json beside it may name the bos/eos/pad tokens. Or a .gguf file,
            whose metadata hold the vocabulary, special tokens and chat template.

    Returns:
        A `Tokenizer`: `HFTokenizer`, `SentencePieceTokenizer` or `TiktokenTokenizer`, with the checkpoint's
        defaults (BOS, special-token text) and chat template (tokenizer_config.json's `chat_template` or a
        chat_template.jinja file; Meta's format for a Meta tokenizer.model without one).

    Raises:
        MissingFileError: no such file, or the folder holds neither tokenizer.json nor tokenizer.model.
        CheckpointError: the file is in none of the known formats (or a tiktoken file of unknown size), or
            tokenizer_config.json is not valid JSON or names unknown tokens.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        found = next((path / name for name in ("tokenizer.json", "tokenizer.model") if (path / name).is_file()), None)
        if found is None:
            raise MissingFileError(
                f"no tokenizer.json or tokenizer.model in {path}; copy the checkpoint's tokenizer there or pass "
                "tokenizer= to load()"
            )
        path = found
    elif not path.is_file():
        raise MissingFileError(f"no tokenizer file at {path}")
    if path.suffix.lower() == ".gguf":
        return _gguf_tokenizer(path)

    tokenizer = _open_tokenizer_file(path)
    config_path = path.parent / "tokenizer_config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{config_path} is not valid JSON: {error}") from None
        except RecursionError:
            raise CheckpointError(f"{config_path}: JSON nested too deeply to parse; the file is damaged") from None
        apply_tokenizer_config(tokenizer, config, where=str(config_path))
    template_path = path.parent / "chat_template.jinja"  # where transformers >= 4.43 saves the template
    if template_path.is_file():
        tokenizer.chat_template = template_path.read_text(encoding="utf-8")
    tokenizer.guess_specials()
    return tokenizer


def _gguf_tokenizer(path: Path) -> Tokenizer:
    from ..io.gguf import read_gguf_header
    from .gguf import gguf_backend_tokenizer, gguf_tokenizer_config

    meta = read_gguf_header(path).metadata
    tokenizer = HFTokenizer(backend=gguf_backend_tokenizer(meta, str(path)))
    tokenizer.source = str(path)
    apply_tokenizer_config(tokenizer, gguf_tokenizer_config(meta, str(path)), where=str(path))
    tokenizer.guess_specials()
    return tokenizer


def _open_tokenizer_file(path: Path) -> Tokenizer:
    if path.suffix == ".json":
        return HFTokenizer(path)
    with open(path, "rb") as file:
        head = file.read(4096)
    # A tiktoken ranks file is ASCII lines "<base64> <rank>"; a sentencepiece model is a binary protobuf.
    first_line = head.split(b"\n", 1)[0] + b"\n"
    if _TIKTOKEN_LINE.fullmatch(first_line):
        return TiktokenTokenizer(path)
    if head.lstrip().startswith(b"{"):
        return HFTokenizer(path)
    try:
        return SentencePieceTokenizer(path)
    except CheckpointError as error:
        raise CheckpointError(
            f"{path} is not a tokenizer.json, a sentencepiece model or a tiktoken ranks file ({error})"
        ) from None


def _config_token(value: Any) -> str | None:
    """tokenizer_config.json writes tokens as a string, as {"content": ...} (an AddedToken), or null."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


# The special-token strings transformers passes to a chat template (its `special_tokens_map`).
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def apply_tokenizer_config(tokenizer: Tokenizer, config: dict[str, Any], *, where: str) -> None:
    """Sets a tokenizer's specials, BOS default and chat template from a tokenizer_config.json dict.

    Raises:
        ConfigError: a special token that is not in the vocabulary (naming `where`).
    """
    eos = config.get("eos_token")
    eos_tokens = [_config_token(t) for t in eos] if isinstance(eos, list) else [_config_token(eos)]
    tokenizer.set_specials(
        bos=_config_token(config.get("bos_token")),
        eos=[t for t in eos_tokens if t is not None],
        pad=_config_token(config.get("pad_token")),
        where=where,
    )
    if isinstance(config.get("add_bos_token"), bool):
        tokenizer.add_bos = config["add_bos_token"]
    if config.get("split_special_tokens") is True:
        tokenizer.parse_special = False
    tokenizer.special_tokens_map = {
        **tokenizer.special_tokens_map,
        **{key: token for key in _SPECIAL_KEYS if (token := _config_token(config.get(key))) is not None},
    }
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    if isinstance(template, str):
        tokenizer.chat_template = template


_INTERFACE = ("encode", "decode", "token_strs", "id_of", "batch_encode", "bos_id", "eos_ids", "pad_id", "vocab_size")


def as_tokenizer(tokenizer: Any) -> Tokenizer:
    """Accepts what a user may pass as `tokenizer=`: a path, one of our tokenizers (or any object with the same
    interface), a transformers tokenizer, or a `tokenizers.Tokenizer`.

    Raises:
        ArgumentError: the object is none of these.
    """
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_tokenizer(tokenizer)
    if isinstance(tokenizer, Tokenizer) or all(hasattr(tokenizer, name) for name in _INTERFACE):
        return tokenizer
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "convert_ids_to_tokens"):
        return TransformersTokenizer(tokenizer)
    if hasattr(tokenizer, "id_to_token") and hasattr(tokenizer, "get_added_tokens_decoder"):
        return HFTokenizer(backend=tokenizer)
    missing = [name for name in _INTERFACE if not hasattr(tokenizer, name)]
    raise ArgumentError(
        f"cannot use a {type(tokenizer).__name__} as a tokenizer: it lacks {missing}; pass a path, a transformers "
        "tokenizer, a tokenizers.Tokenizer or an object with the llama_lens Tokenizer interface"
    )
