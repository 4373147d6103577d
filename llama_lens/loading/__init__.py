"""From a path (or a transformers model) to a ready hooked model: `load`, the memory `plan`, streaming of
layers and of the vocabulary matrices, and the embedded default model.
"""
