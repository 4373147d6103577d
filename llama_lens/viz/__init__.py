"""Drawing only: matplotlib figures from tensors, grids and caches. Knows no result type; results build what
they show and call down into here.
"""
