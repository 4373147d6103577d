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

from ..errors import ArgumentError, CheckpointError, ConfigError, MissingFileError
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


def _config_token(config: dict[str, Any], key: str, where: str, value: Any = None) -> str | None:
    """tokenizer_config.json writes a token as a string, as {"content": ...} (an AddedToken), or null; anything
    else is a ConfigError naming the file and key (`value`, when given, is one entry of the key's list)."""
    value = config.get(key) if value is None else value
    if value is None:
        return None
    content = value.get("content") if isinstance(value, dict) else value
    if isinstance(content, str):
        return content
    raise ConfigError(
        f"{where}: key {key!r} is {value!r:.60} (a {type(value).__name__}), expected a token string, "
        '{"content": "<token>"} or null; fix or remove the entry'
    )


def _config_flag(config: dict[str, Any], key: str, where: str) -> bool | None:
    value = config.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise ConfigError(f"{where}: key {key!r} is {value!r:.60} (a {type(value).__name__}), expected true, false or null")


def _config_template(config: dict[str, Any], where: str) -> str | None:
    """The chat template: a string, or the "default" of a list of named templates ([{"name", "template"}])."""
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list) and all(
        isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("template"), str)
        for entry in template
    ):
        return {entry["name"]: entry["template"] for entry in template}.get("default")
    raise ConfigError(
        f"{where}: key 'chat_template' is {template!r:.60} (a {type(template).__name__}), expected a Jinja template "
        'string or a list of {"name": ..., "template": ...} objects'
    )


# The special-token strings transformers passes to a chat template (its `special_tokens_map`).
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def apply_tokenizer_config(tokenizer: Tokenizer, config: dict[str, Any], *, where: str) -> None:
    """Sets a tokenizer's specials, BOS default and chat template from a tokenizer_config.json dict.

    Raises:
        ConfigError: naming `where` and the key: a special token that is not in the vocabulary, or a value of the
            wrong type (naming the type expected), or a top level that is not a JSON object.
    """
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: the top level is a {type(config).__name__}, expected a JSON object")
    eos = config.get("eos_token")
    eos_tokens = (
        [_config_token(config, "eos_token", where, t) for t in eos]
        if isinstance(eos, list)
        else [_config_token(config, "eos_token", where)]
    )
    tokenizer.set_specials(
        bos=_config_token(config, "bos_token", where),
        eos=[t for t in eos_tokens if t is not None],
        pad=_config_token(config, "pad_token", where),
        where=where,
    )
    add_bos = _config_flag(config, "add_bos_token", where)
    if add_bos is not None:
        tokenizer.add_bos = add_bos
    if _config_flag(config, "split_special_tokens", where) is True:
        tokenizer.parse_special = False
    tokenizer.special_tokens_map = {
        **tokenizer.special_tokens_map,
        **{
            key: token
            for key in _SPECIAL_KEYS
            if not isinstance(config.get(key), list)  # a list of EOS tokens (checked above) has no one string
            and (token := _config_token(config, key, where)) is not None
        },
    }
    template = _config_template(config, where)
    if template is not None:
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
