"""Sparse dictionaries (SAEs and transcoders): loading the published formats, and splicing them into the model.

Imports ground, io, model and data (training reads the activation store).
"""
