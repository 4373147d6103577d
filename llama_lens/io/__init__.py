"""Checkpoint files: the formats on disk (safetensors, Meta `.pth`, GGUF), the tensor index over them, the
name maps to our parameter names, and the writers.

Imports only the ground modules (config, errors, validate, files): nothing here knows the model.
"""
