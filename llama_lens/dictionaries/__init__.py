"""Sparse dictionaries (SAEs and transcoders): loading the published formats, and splicing them into the model.

Imports ground, io and model only.
"""
