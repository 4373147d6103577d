"""Meta's reference tokenizer code and tokenizer.model files (Llama 3 and 4) from the `llama-models` wheel on the
package registry: downloaded and unpacked (never installed) under $LLAMA_LENS_HOME on first use."""

from __future__ import annotations

import importlib.util
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
    from llama_lens.demo import cache_dir

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
