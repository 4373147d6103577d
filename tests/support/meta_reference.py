"""Meta's reference tokenizer code and tokenizer.model files (Llama 3 and 4) from the `llama-models` wheel on the
package registry: downloaded and unpacked (never installed) under $LLAMA_LENS_HOME on first use; and a stand-in
for Llama 2's sentencepiece tokenizer.model, trained with its settings (the real one is not on the registry)."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
import types
import zipfile
from pathlib import Path

LLAMA_MODELS = "llama-models==0.3.0"
META_FILES = (
    "llama_models/tokenizer_utils.py",
    "llama_models/llama3/tokenizer.py",
    "llama_models/llama3/tokenizer.model",
    "llama_models/llama4/tokenizer.py",
    "llama_models/llama4/tokenizer.model",
)


def meta_reference_folder() -> Path:
    """Meta's reference tokenizer code and files from the `llama-models` wheel, unpacked (not installed) under
    $LLAMA_LENS_HOME on first use, like the embedded default model."""
    from llama_lens.loading.demo import cache_dir

    folder = cache_dir() / "llama_models-0.3.0"
    if all((folder / name).is_file() for name in META_FILES):
        return folder
    download = folder / "wheel"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", LLAMA_MODELS, "-d", str(download)],
        capture_output=True,
        text=True,
    )
    wheels = list(download.glob("llama_models-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(f"could not download {LLAMA_MODELS} from the package registry: {result.stderr[-500:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        for name in META_FILES:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(wheel.read(name))
    return folder


def import_meta_tokenizer(folder: Path, version: str):
    """Meta's `llama_models.<version>.tokenizer` module, imported from `folder` under a private package name
    (its relative import of `tokenizer_utils` resolves there; nothing else of llama_models is loaded)."""
    root = "meta_reference_llama_models"
    for name, path in ((root, folder / "llama_models"), (f"{root}.{version}", folder / "llama_models" / version)):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(path)]
            sys.modules[name] = package
    name = f"{root}.{version}.tokenizer"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, folder / "llama_models" / version / "tokenizer.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def train_llama2_style(sentences: list[str], vocab_size: int = 2_000) -> bytes:
    """A sentencepiece BPE with the trainer settings of Llama 2's tokenizer.model (its normalizer spec and
    trainer spec): byte fallback, digits split, whitespace-only pieces allowed, no normalization, dummy prefix."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=0.99995,
        byte_fallback=True,
        split_digits=True,
        split_by_unicode_script=True,
        split_by_whitespace=True,
        split_by_number=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        max_sentencepiece_length=16,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()
