"""Texts and prompts from files or generators, and activations stored on disk to read back by rows."""
