"""Reading the model through sparse dictionaries: the feature lens, feature attribution and ablation, steering,
and the dictionaries' evaluation (L0, explained variance, CE-loss and KL scores).

Imports ground, io, model, viz, data, lens, patching and dictionaries.
"""
