"""Tokenizers: every on-disk form a checkpoint ships (tokenizer.json, sentencepiece and tiktoken
`tokenizer.model`, a GGUF vocabulary) behind one `Tokenizer` interface, and chat templates.

`load_tokenizer(path)` opens whichever a folder holds; see `load.py`. Imports the ground modules and `io`
(for a GGUF file's metadata).
"""

from .base import Tokenizer, bytes_to_text
from .hf import HFTokenizer, TransformersTokenizer
from .load import apply_tokenizer_config, as_tokenizer, load_tokenizer
from .meta_tiktoken import TiktokenTokenizer, llama3_special_tokens, llama4_special_tokens, read_tiktoken_ranks
from .spm import SentencePieceTokenizer

__all__ = [
    "HFTokenizer",
    "SentencePieceTokenizer",
    "TiktokenTokenizer",
    "Tokenizer",
    "TransformersTokenizer",
    "as_tokenizer",
    "bytes_to_text",
    "llama3_special_tokens",
    "llama4_special_tokens",
    "read_tiktoken_ranks",
    "load_tokenizer",
    "apply_tokenizer_config",
]
