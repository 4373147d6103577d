"""Drawing only: matplotlib figures from tensors, caches and neutral values (`heatmap.Grid`, `lines.Trajectory`,
`bars.LayerBars`). Knows no result type; results build what they show and call down into here.
"""
