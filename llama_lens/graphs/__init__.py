"""Attribution graphs: the direct effects between transcoder features, error nodes, token embeddings and output
logits through the model with its MLPs replaced by transcoders and its attention patterns and norm scales frozen.

Imports ground, io, model, viz, data, lens, dictionaries and features.
"""
