"""llama_lens: open a Llama checkpoint, hook every step of its forward pass, and look inside.

Names are imported on first use, so `import llama_lens` stays cheap (no pandas, matplotlib or transformers).
"""

from __future__ import annotations

import importlib

# public name -> module that defines it
_LAZY = {
    "LlamaConfig": "config",
    "RopeScaling": "config",
    "HookedLlama": "model",
    "KVCache": "kv_cache",
    "HookPoint": "hooks",
    "ActivationCache": "cache",
    "Generation": "generate",
    "Checkpoint": "checkpoint",
    "load": "loading",
    "from_transformers": "from_transformers",
    "load_tokenizer": "tokenizer",
    "demo_model_path": "demo",
    "demo_gguf_path": "demo",
    "logit_lens": "lens",
    "direct_logit_attribution": "attribution",
    "LensResult": "lens",
    "AttributionResult": "attribution",
    "LensInputs": "inputs",
    "lens_dataset": "dataset",
    "attribution_dataset": "dataset",
    "store_activations": "dataset",
    "read_prompts": "dataset",
    "DatasetResult": "dataset",
    "ManifestMismatchError": "errors",
    "ActivationDataset": "activation_store",
    "LlamaLensError": "errors",
    "ConfigError": "errors",
    "CheckpointError": "errors",
    "NotEnoughMemoryError": "errors",
    "DemoModelError": "errors",
    "UnknownNameError": "errors",
    "LensFileError": "errors",
    "TunedLens": "tuned_lens",
    "tuned_lens_readout": "tuned_lens",
    "read_texts": "text_sources",
    "generated_texts": "text_sources",
    "GroupedHeadsError": "errors",
    "WeightOnDiskError": "errors",
    "FactoredMatrix": "weights",
}
# `plan` is a submodule that is called like a function (`ll.plan(path)`), see plan.CallableModule: a package
# attribute that were the function would be replaced by the module as soon as anything imports llama_lens.plan.
_SUBMODULES = {"plot", "widgets", "testing", "utils", "patching", "plan"}

__all__ = sorted(_LAZY) + sorted(_SUBMODULES)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'llama_lens' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__
