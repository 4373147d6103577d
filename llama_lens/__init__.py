"""llama_lens: open a Llama checkpoint, hook every step of its forward pass, and look inside.

Names are imported on first use, so `import llama_lens` stays cheap (no pandas, matplotlib or transformers).
"""

from __future__ import annotations

import importlib

# public name -> module that defines it
_LAZY = {
    "attribution_graph": "graphs.attribute",
    "AttributionGraph": "graphs.result",
    "InterventionResult": "graphs.intervene",
    "LlamaConfig": "config",
    "RopeScaling": "config",
    "HookedLlama": "model.llama",
    "KVCache": "model.kv_cache",
    "HookPoint": "model.hooks",
    "ActivationCache": "model.activation_cache",
    "Generation": "model.generate",
    "Checkpoint": "io.checkpoint",
    "load": "loading.load",
    "from_transformers": "loading.from_transformers",
    "load_tokenizer": "tokenizer.load",
    "demo_model_path": "loading.demo",
    "demo_gguf_path": "loading.demo",
    "logit_lens": "lens.logit",
    "direct_logit_attribution": "lens.attribution",
    "LensResult": "lens.logit_result",
    "AttributionResult": "lens.attribution",
    "LensInputs": "lens.inputs",
    "lens_dataset": "runs.runner",
    "attribution_dataset": "runs.runner",
    "store_activations": "runs.runner",
    "RunOptions": "runs.options",
    "read_prompts": "data.texts",
    "DatasetResult": "runs.result",
    "ManifestMismatchError": "errors",
    "ActivationDataset": "data.store",
    "LlamaLensError": "errors",
    "ConfigError": "errors",
    "CheckpointError": "errors",
    "NotEnoughMemoryError": "errors",
    "DemoModelError": "errors",
    "UnknownNameError": "errors",
    "LensFileError": "errors",
    "TunedLens": "lens.tuned",
    "tuned_lens_readout": "lens.logit",
    "read_texts": "data.texts",
    "generated_texts": "data.generated",
    "GroupedHeadsError": "errors",
    "WeightOnDiskError": "errors",
    "ArgumentError": "errors",
    "ArgumentTypeError": "errors",
    "MissingFileError": "errors",
    "UsageError": "errors",
    "OutOfRangeError": "errors",
    "UnknownAttributeError": "errors",
    "FactoredMatrix": "model.weights",
    "plan": "loading.plan",
    "Plan": "loading.plan",
    "load_dictionary": "dictionaries.load",
    "Dictionary": "dictionaries.dictionary",
    "CrossLayerTranscoder": "dictionaries.cross_layer",
    "spliced": "dictionaries.splice",
    "run_with_dictionaries": "dictionaries.splice",
    "feature_lens": "features.lens",
    "FeatureLensResult": "features.lens_result",
    "steer": "features.steer",
    "Steering": "features.steer",
    "SteeringVector": "features.steer",
    "steering_vector": "features.steer_vector",
    "feature_attribution": "features.attribute",
    "ablate_features": "features.attribute_ablate",
    "FeatureAttribution": "features.attribute_result",
    "evaluate_dictionary": "features.evaluate",
    "DictionaryEvaluation": "features.evaluate",
    "evaluate_dataset": "runs.evaluate",
    "train_dictionary": "dictionaries.train",
    "TrainDictionaryConfig": "dictionaries.train_config",
    # a transcoder per layer, trained for attribution graphs
    "train_transcoder_set": "dictionaries.train_set",
    "TrainedTranscoders": "dictionaries.train_set",
}
# the faces: submodules users import by these names
_SUBMODULES = {"plot", "widgets", "testing", "utils", "patching"}

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
