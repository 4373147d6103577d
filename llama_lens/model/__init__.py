"""The hooked forward pass: HookedLlama, its attention, norm and MLP, hook points, the activation cache, the KV
cache, generation, and the memory figures a forward pass needs.

Imports only the ground modules: the model knows no files, no tokenizer class and no analysis.
"""
